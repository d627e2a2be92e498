"""Store benchmark: durable task transitions per second with group commit next to one
transaction per write (same run, same machine); importing device records; bytes on disk.

A *transition* is the store's ``transition()``: read the task, move its state, append a
history entry, move its job-state index row and the job's counters, commit with fsync, and only
then answer the caller.  Many concurrent callers (asyncio tasks on uvloop) each drive their own
task through NOTIFIED → IN_PROGRESS → PENDING → … so no transition is refused.  The two are
measured in alternation, three rounds each (the machine is shared): the medians, the slowest and
fastest group-commit round, and the worst group-commit round against the best one-per-write round.

The import's generator builds each Device inside the timing; every record is validated.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time

import uvloop

from bench.common import Row, write_results
from dmengine.model import Device, DmAccount, Job, QueryOp, Task, TaskState, UpdateOp
from dmengine.store.lmdb import LmdbStore

NAME = "store"

MOVES = (TaskState.NOTIFIED, TaskState.IN_PROGRESS, TaskState.PENDING)


async def _transitions(path: str, *, callers: int, per_caller: int, batch_size: int,
                       max_delay: float) -> tuple[float, LmdbStore]:
    s = LmdbStore(path, batch_size=batch_size, max_delay=max_delay)
    await s.create_job(Job(job_id="bench-job"))
    await s.create_tasks([Task(task_id=f"bt{i:07d}", dev_id=f"IMEI:{350000000000000 + i}",
                               job_id="bench-job", op=UpdateOp(content_id="fw-2"),
                               correlator=f"corr{i}")
                          for i in range(callers)])

    async def caller(i: int) -> None:
        tid = f"bt{i:07d}"
        for k in range(per_caller):
            await s.transition(tid, MOVES[k % 3], cause="bench", dm_status=200)

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    dt = time.perf_counter() - t0
    s.bench_cpu_us = 1e6 * (time.process_time() - c0) / (callers * per_caller)  # type: ignore[attr-defined]
    job = await s.get_job("bench-job")
    assert sum(job.counts.values()) == callers
    await s.close()
    return callers * per_caller / dt, s


def _device(i: int) -> Device:
    imei = f"{356938000000000 + i}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=f"+49170{i:08d}",
                  capability="cap-x1",
                  account=DmAccount(server_id="acme-dms", client_name=f"dev{i}",
                                    client_key="DV4giKozqa1xsMX/tjaQjQ==",
                                    server_key="qIUiuFQooZcVh8cn6FkGFQ=="))


async def _import(path: str, n: int) -> tuple[float, float, dict]:
    s = LmdbStore(path, map_size=64 << 20)
    t0 = time.perf_counter()
    c0 = time.process_time()
    rep = await s.import_devices((_device(i) for i in range(n)), chunk=20_000)
    dt = time.perf_counter() - t0
    info = s.info()
    info["cpu_s"] = time.process_time() - c0
    assert rep.created == n and not rep.rejected
    await s.close()
    return n / dt, dt, info


async def _task_bytes(path: str, n: int) -> float:
    s = LmdbStore(path, map_size=64 << 20)
    await s.create_job(Job(job_id="size-job"))
    before = s.info()["used_bytes"]
    for start in range(0, n, 5000):
        await s.create_tasks([Task(task_id=f"st{i:08d}", dev_id=f"IMEI:{356938000000000 + i}",
                                   job_id="size-job", op=QueryOp(nodes=["./DevInfo/Mod",
                                                                        "./DevInfo/FwV"]))
                              for i in range(start, min(n, start + 5000))])
    # every task gets three more history entries, the life of a typical task
    for k, st in enumerate((TaskState.NOTIFIED, TaskState.IN_PROGRESS, TaskState.SUCCEEDED)):
        await asyncio.gather(*(s.transition(f"st{i:08d}", st, dm_status=200)
                               for i in range(n)))
    after = s.info()["used_bytes"]
    await s.close()
    return (after - before) / n


def run(quick: bool) -> None:
    rows: list[Row] = []
    load_before = os.getloadavg()
    base = tempfile.mkdtemp(prefix="bench-store-")
    try:
        callers = 1000
        per = 15 if quick else 60
        rounds = 3
        # the machine is shared: group commit and one-transaction-per-write are measured in
        # alternation, ROUNDS times each, and the median of each is reported with its range
        # (rate, process CPU/op, writer CPU/op, ops/txn) per round
        gc_runs: list[tuple[float, float, float, float]] = []
        one_runs: list[float] = []
        for r in range(rounds):
            gc_rate, gs = uvloop.run(_transitions(os.path.join(base, f"gc{r}"), callers=callers,
                                                  per_caller=per, batch_size=2000,
                                                  max_delay=0.002))
            gc_runs.append((gc_rate, gs.bench_cpu_us,  # type: ignore[attr-defined]
                            1e6 * gs.writer_cpu_seconds / max(gs.ops, 1),
                            gs.ops / max(gs.batches, 1)))
            one_rate, _ = uvloop.run(_transitions(os.path.join(base, f"one{r}"), callers=20,
                                                  per_caller=20 if quick else 60, batch_size=1,
                                                  max_delay=0.0))
            one_runs.append(one_rate)
            shutil.rmtree(os.path.join(base, f"gc{r}"), ignore_errors=True)
            shutil.rmtree(os.path.join(base, f"one{r}"), ignore_errors=True)
        gc_med = statistics.median(g[0] for g in gc_runs)
        one_med = statistics.median(one_runs)
        rows.append(Row.versus(f"task transition, group commit (1000 concurrent callers), "
                               f"median of {rounds}",
                               "durable transitions/s", round(gc_med), "1/s",
                               f"one transaction per write (20 callers), median of {rounds}",
                               round(one_med)))
        rows.append(Row(f"task transition, group commit: slowest of {rounds}",
                        "durable transitions/s", round(min(g[0] for g in gc_runs)), "1/s"))
        rows.append(Row(f"task transition, group commit: fastest of {rounds}",
                        "durable transitions/s", round(max(g[0] for g in gc_runs)), "1/s"))
        rows.append(Row.versus(f"task transition, group commit vs one transaction per write, "
                               f"worst round of {rounds}",
                               "durable transitions/s", round(min(g[0] for g in gc_runs)), "1/s",
                               "one transaction per write, best round",
                               round(max(one_runs))))
        rows.append(Row("task transition, group commit", "transitions per transaction",
                        round(statistics.median(g[3] for g in gc_runs), 1), "ops/txn"))
        rows.append(Row(f"task transition, group commit (median of {rounds})",
                        "process CPU per transition", round(statistics.median(
                            g[1] for g in gc_runs), 1), "us"))
        rows.append(Row(f"task transition, group commit (median of {rounds}; commit and fsync "
                        f"included)", "writer thread CPU per transition", round(
                            statistics.median(g[2] for g in gc_runs), 1), "us"))
        n = 50_000 if quick else 1_000_000
        rate, secs, info = uvloop.run(_import(os.path.join(base, "import"), n))
        rows.append(Row(f"import {n:,} devices (validated, 5 index rows each)", "wall time",
                        round(secs, 2), "s"))
        rows.append(Row(f"import {n:,} devices", "devices/s", round(rate), "1/s"))
        rows.append(Row(f"import {n:,} devices (records built by a generator inside the timing)",
                        "process CPU time", round(info["cpu_s"], 2), "s"))
        rows.append(Row(f"import {n:,} devices", "map growths", info["map_grows"], "count"))
        rows.append(Row("device record + indexes", "bytes on disk per device",
                        round(info["used_bytes"] / n, 1), "B"))
        nt = 20_000 if quick else 100_000
        per_task = uvloop.run(_task_bytes(os.path.join(base, "tasks"), nt))
        rows.append(Row("task + 4 history entries + indexes", "bytes on disk per task",
                        round(per_task, 1), "B"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    # the machine is shared: the load average says how much of it this run had
    write_results(NAME, rows, load_average={"before": load_before, "after": os.getloadavg()},
                  quick=quick)


if __name__ == "__main__":
    import sys
    run(quick="--quick" in sys.argv)
