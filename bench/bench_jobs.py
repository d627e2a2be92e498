"""Jobs benchmark (issue 14): creating a 1,000,000-device job, the cost of a scheduler pass as
the stored tasks grow, and the notifications per second the scheduler sustains.

(a) **Job creation.**  1M devices with one capability are imported into a fresh LMDB store
    (``store.import_devices``, 20k per transaction: the baseline, the store's own bulk write of
    the same devices), then, in a fresh process of its own (so that a heap the import grew does
    not hide the job's), ``Jobs.create(UpdateOp, Selection(capability=...))`` — the job and its
    1M target rows, no tasks — is timed, and the process's RSS is watched while it runs:
    before, after and the peak (``/proc/self/status`` sampled every 2 ms, and ``VmHWM`` after
    resetting it through ``/proc/self/clear_refs``).  The anonymous part of the RSS is the
    Python heap; the file part is LMDB pages mapped while they are read.  Targets: ≤ 30 s and
    ≤ 300 MB of RSS growth.

(b) **Scheduler pass cost** with 10k, 100k and 1M tasks stored (one store grown in steps): the
    tasks are mostly final, a tenth of them unfinished but due only in 11 days; each timed
    pass (``Scheduler.tick()``: expiry, the jobs' step, claims of due work, notifications) has
    the same small amount of work, 100 tasks due now (each notified: device read, NOTIFIED
    written, package #0 built and handed to a counting loopback gateway).  The median of
    ``ROUNDS`` passes, and an idle pass (nothing due).  The cost must stay flat as the stored
    tasks grow.

(d) **Finished jobs**: the pass of (b) with 10k tasks stored, timed again after 10,000
    COMPLETED jobs are added: a pass lists only SCHEDULED and RUNNING jobs (the store's
    job-state index), so its cost must not move.

(c) **Notifications/s**: a RUNNING job over 100k devices (explicit device list, no rate limit,
    no caps) and passes run back to back into a loopback gateway whose callback only counts,
    until every target is NOTIFIED.  Tasks are made by the passes (``job_batch`` per pass) and
    notified ``notify_parallel`` at a time, each notification a durable write.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import uvloop

from bench.common import ROOT, Row, write_results
from dmengine.broker import Broker
from dmengine.bulk import Jobs
from dmengine.config import BrokerConfig
from dmengine.model import (Capability, Content, Device, DmAccount, Job, JobState, QueryOp,
                            Selection, Task, TaskState, UpdateOp)
from dmengine.notify.loopback import LoopbackGateway
from dmengine.store.lmdb import LmdbStore
from dmengine.tasks import Tasks

NAME = "jobs"
S = TaskState
CAP = "cap-x1"
DUE = 100           # tasks due in each timed pass
ROUNDS = 7          # timed passes per size
FAR = 11 * 86400.0  # when the unfinished filler tasks are due
FINISHED_JOBS = 10_000   # (d) finished jobs added next to the running one


def _device(i: int, capability: str | None = CAP) -> Device:
    imei = f"{356938000000000 + i}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=f"+49170{i:08d}",
                  capability=capability,
                  account=DmAccount(server_id="acme-dms", client_name=f"dev{i}",
                                    client_password=f"cpw{i}", server_password=f"spw{i}",
                                    client_key="DV4giKozqa1xsMX/tjaQjQ==",
                                    server_key="qIUiuFQooZcVh8cn6FkGFQ=="))


# --- memory -------------------------------------------------------------------------------


def _status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM in MB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


class RssWatch:
    """Peak RSS (total and anonymous) while the block runs, sampled by a thread; VmHWM is
    reset at the start when the kernel allows (``clear_refs`` 5) and read at the end."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.peak = 0.0
        self.peak_anon = 0.0
        self._stop = threading.Event()
        self.hwm_reset = False

    def __enter__(self) -> "RssWatch":
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            pass
        self.before = _status()
        self.peak = self.before["VmRSS"]
        self.peak_anon = self.before["RssAnon"]
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            s = _status()
            self.peak = max(self.peak, s["VmRSS"])
            self.peak_anon = max(self.peak_anon, s["RssAnon"])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.after = _status()
        self.peak = max(self.peak, self.after["VmRSS"])
        if self.hwm_reset:
            self.peak = max(self.peak, self.after["VmHWM"])
        self.peak_anon = max(self.peak_anon, self.after["RssAnon"])


# --- (a) a 1M-device job ----------------------------------------------------------------------


async def _import(path: str, n: int) -> float:
    """The baseline: the store's own import of the devices (and what the job needs)."""
    store = LmdbStore(path)
    try:
        await store.create_capability(Capability(oid=CAP, make="Acme", model="X1",
                                                 mo_paths={"fumo": "./FUMO/1"}))
        await store.create_content(Content(content_id="fw-x1", name="x1-2.0.bin", size=1 << 20,
                                           sha256="0" * 64, capability=CAP))
        t0 = time.perf_counter()
        rep = await store.import_devices((_device(i) for i in range(n)), chunk=20_000)
        import_s = time.perf_counter() - t0
        assert rep.created == n and not rep.rejected, rep
        return import_s
    finally:
        await store.close()


async def _create(path: str, n: int) -> dict[str, Any]:
    """The job, in a process of its own (``--create PATH N``): its RSS is not flattered by a
    heap an import grew before."""
    store = LmdbStore(path)
    try:
        cfg = BrokerConfig()
        jobs = Jobs(store, Tasks(store, cfg), cfg)
        with RssWatch() as w:
            t0 = time.perf_counter()
            c0 = time.process_time()
            job = await jobs.create(UpdateOp(content_id="fw-x1"), Selection(capability=CAP),
                                    name="firmware 2.0 for every X1", rate_limit=500)
            create_s = time.perf_counter() - t0
            create_cpu = time.process_time() - c0
        assert job.targets == n and job.state == JobState.RUNNING, job
        assert len(await store.job_targets(job.job_id, n - 5, 10)) == 5
        return {"create_s": create_s, "create_cpu_s": create_cpu,
                "rss_before": w.before["VmRSS"], "rss_after": w.after["VmRSS"],
                "rss_peak": w.peak, "anon_before": w.before["RssAnon"],
                "anon_after": w.after["RssAnon"], "anon_peak": w.peak_anon,
                "file_after": w.after["RssFile"], "file_before": w.before["RssFile"],
                "hwm_reset": w.hwm_reset}
    finally:
        await store.close()


def _creation(path: str, n: int) -> dict[str, Any]:
    import_s = uvloop.run(_import(path, n))
    out = subprocess.run([sys.executable, "-m", "bench.bench_jobs", "--create", path, str(n)],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["import_s"] = import_s
    return res


# --- (b) pass cost as the stored tasks grow ----------------------------------------------------


class Counting:
    """A loopback gateway's receiver that only counts."""

    def __init__(self) -> None:
        self.n = 0

    async def __call__(self, msisdn: str, pkg0: bytes) -> bool:
        self.n += 1
        return True


async def _grow(store: LmdbStore, job_id: str, upto: int, now: float) -> None:
    """Filler tasks up to ``upto`` in the job: 9 in 10 final, the rest due in FAR seconds."""
    job = await store.get_job(job_id)
    total = job.total
    op = QueryOp(nodes=["./DevInfo/Mod"])
    while total < upto:
        k = min(10_000, upto - total)
        ids = [f"IMEI:{100000000000000 + total + i}" for i in range(k)]
        await store.add_job_targets(job_id, ids)
        tasks = []
        for i, d in enumerate(ids):
            seq = total + i
            if seq % 10:
                tasks.append(Task(task_id=f"f{seq:08d}", dev_id=d, op=op, job_id=job_id,
                                  state=S.SUCCEEDED, finished=now))
            else:
                tasks.append(Task(task_id=f"f{seq:08d}", dev_id=d, op=op, job_id=job_id,
                                  next_attempt=now + FAR, deadline=now + 2 * FAR))
        made = await store.create_job_tasks(job_id, total, tasks)
        total += len(made)


async def _add_due(store: LmdbStore, job_id: str, first: int, now: float) -> None:
    job = await store.get_job(job_id)
    ids = [_device(first + i).dev_id for i in range(DUE)]
    await store.add_job_targets(job_id, ids)
    op = QueryOp(nodes=["./DevInfo/Mod"])
    await store.create_job_tasks(job_id, job.total, [
        Task(task_id=f"d{first + i:08d}", dev_id=d, op=op, job_id=job_id, next_attempt=now - 1,
             deadline=now + FAR) for i, d in enumerate(ids)])


async def _timed_passes(store: LmdbStore, sched: Any, counting: Counting, used: int
                        ) -> tuple[list[float], list[float]]:
    """ROUNDS times: an idle pass, then DUE tasks made due and a pass that notifies them
    (devices ``used`` … onwards).  Returns (busy pass times, idle pass times) in seconds."""
    idle: list[float] = []
    busy: list[float] = []
    for r in range(ROUNDS):
        t0 = time.perf_counter()
        touched = await sched.tick()
        idle.append(time.perf_counter() - t0)
        assert touched == 0, touched
        await _add_due(store, "stored", used + r * DUE, time.time())
        before = counting.n
        t0 = time.perf_counter()
        touched = await sched.tick()
        busy.append(time.perf_counter() - t0)
        assert touched == DUE and counting.n - before == DUE, (touched, counting.n - before)
    return busy, idle


async def _pass_cost(path: str, sizes: list[int]) -> list[dict[str, Any]]:
    store = LmdbStore(path)
    out = []
    try:
        await store.import_devices(_device(i) for i in range(DUE * ROUNDS * len(sizes)))
        counting = Counting()
        broker = Broker(store, LoopbackGateway(counting), config=BrokerConfig())
        sched = broker.scheduler
        await store.create_job(Job(job_id="stored", state=JobState.RUNNING,
                                   op=QueryOp(nodes=["./DevInfo/Mod"])))
        used = 0
        for n in sizes:
            t0 = time.perf_counter()
            await _grow(store, "stored", n, time.time())
            grow_s = time.perf_counter() - t0
            busy, idle = await _timed_passes(store, sched, counting, used)
            used += DUE * ROUNDS
            job = await store.get_job("stored")
            out.append({"stored": job.total, "grow_s": grow_s,
                        "pass_ms": 1000 * statistics.median(busy),
                        "pass_min_ms": 1000 * min(busy), "pass_max_ms": 1000 * max(busy),
                        "idle_ms": 1000 * statistics.median(idle)})
            print(f"  {job.total:,} tasks stored: pass with {DUE} due "
                  f"{out[-1]['pass_ms']:.1f} ms, idle pass {out[-1]['idle_ms']:.2f} ms "
                  f"(grown in {grow_s:.1f} s)", flush=True)
    finally:
        await store.close()
    return out


async def _pass_cost_finished_jobs(path: str, stored: int, finished: int) -> dict[str, Any]:
    """(d) The same pass with ``stored`` tasks, before and after ``finished`` COMPLETED jobs
    are added to the store: a pass lists the open jobs through the job-state index, so the
    finished ones must cost it nothing."""
    store = LmdbStore(path)
    try:
        await store.import_devices(_device(i) for i in range(DUE * ROUNDS * 2))
        counting = Counting()
        sched = Broker(store, LoopbackGateway(counting), config=BrokerConfig()).scheduler
        await store.create_job(Job(job_id="stored", state=JobState.RUNNING,
                                   op=QueryOp(nodes=["./DevInfo/Mod"])))
        await _grow(store, "stored", stored, time.time())
        busy0, idle0 = await _timed_passes(store, sched, counting, 0)
        t0 = time.perf_counter()
        done = time.time()
        for first in range(0, finished, 1000):
            await asyncio.gather(*(store.create_job(Job(
                job_id=f"old{i:06d}", name=f"finished campaign {i}", state=JobState.COMPLETED,
                op=QueryOp(nodes=["./DevInfo/Mod"]), targets=1000, started=done - 3600,
                finished=done)) for i in range(first, min(finished, first + 1000))))
        add_s = time.perf_counter() - t0
        busy1, idle1 = await _timed_passes(store, sched, counting, DUE * ROUNDS)
        out = {"stored": (await store.get_job("stored")).total, "finished_jobs": finished,
               "add_s": add_s,
               "pass_ms_without": 1000 * statistics.median(busy0),
               "idle_ms_without": 1000 * statistics.median(idle0),
               "pass_ms_with": 1000 * statistics.median(busy1),
               "idle_ms_with": 1000 * statistics.median(idle1)}
        print(f"  pass with {DUE} due: {out['pass_ms_without']:.1f} ms without, "
              f"{out['pass_ms_with']:.1f} ms with {finished:,} finished jobs; idle pass "
              f"{out['idle_ms_without']:.2f} / {out['idle_ms_with']:.2f} ms", flush=True)
        return out
    finally:
        await store.close()


# --- (c) notifications/s ----------------------------------------------------------------------


async def _notify_rate(path: str, n: int) -> dict[str, Any]:
    store = LmdbStore(path)
    try:
        await store.import_devices(_device(i, capability=None) for i in range(n))
        counting = Counting()
        cfg = BrokerConfig()
        broker = Broker(store, LoopbackGateway(counting), config=cfg)
        job = await broker.jobs.create(QueryOp(nodes=["./DevInfo/Mod"]),
                                       Selection(dev_ids=[_device(i).dev_id for i in range(n)]))
        assert job.targets == n
        passes = 0
        t0 = time.perf_counter()
        c0 = time.process_time()
        while True:
            await broker.scheduler.tick()
            passes += 1
            j = await store.get_job(job.job_id)
            if j.total == n and j.counts.get(S.NOTIFIED, 0) == n:
                break
            assert passes < 10 * n, j.counts
        secs = time.perf_counter() - t0
        cpu = time.process_time() - c0
        assert counting.n == n
        return {"rate": n / secs, "secs": secs, "passes": passes,
                "cpu_us": 1e6 * cpu / n, "batch": cfg.job_batch, "parallel": cfg.notify_parallel}
    finally:
        await store.close()


def run(quick: bool) -> None:
    rows: list[Row] = []
    load_before = os.getloadavg()
    base = tempfile.mkdtemp(prefix="bench-jobs-")
    n_job = 50_000 if quick else 1_000_000
    sizes = [10_000, 50_000] if quick else [10_000, 100_000, 1_000_000]
    n_notify = 10_000 if quick else 100_000
    summary: dict[str, Any] = {}
    try:
        print(f"(a) a job over {n_job:,} devices", flush=True)
        a = _creation(os.path.join(base, "a"), n_job)
        summary["creation"] = a
        rss_growth = a["rss_after"] - a["rss_before"]
        peak_growth = a["rss_peak"] - a["rss_before"]
        anon_peak_growth = a["anon_peak"] - a["anon_before"]
        case = f"createDeployments job over {n_job:,} devices (selection by capability)"
        rows.append(Row.versus(case, "job creation time (job + one target row per device)",
                               round(a["create_s"], 2), "s",
                               f"store import of the same {n_job:,} devices",
                               round(a["import_s"], 2), higher_is_better=False))
        rows.append(Row(case, "process CPU time", round(a["create_cpu_s"], 2), "s"))
        rows.append(Row(case, "RSS growth (after - before)", round(rss_growth, 1), "MB"))
        rows.append(Row(case, "peak RSS growth (peak - before)", round(peak_growth, 1), "MB"))
        rows.append(Row(case, "peak anonymous RSS growth (Python heap)",
                        round(anon_peak_growth, 1), "MB"))
        rows.append(Row(case, "file-backed RSS growth (LMDB pages mapped)",
                        round(a["file_after"] - a["file_before"], 1), "MB"))
        print(f"  created in {a['create_s']:.1f} s (import {a['import_s']:.1f} s), RSS +"
              f"{rss_growth:.0f} MB, peak +{peak_growth:.0f} MB (anon +{anon_peak_growth:.0f})",
              flush=True)
        shutil.rmtree(os.path.join(base, "a"), ignore_errors=True)

        print(f"(b) scheduler pass cost, {DUE} tasks due, {sizes} tasks stored", flush=True)
        b = uvloop.run(_pass_cost(os.path.join(base, "b"), sizes))
        summary["pass_cost"] = b
        small = b[0]["pass_ms"]
        for s in b:
            case = f"scheduler pass, {DUE} tasks due, {s['stored']:,} tasks stored"
            rows.append(Row.versus(case, f"pass time (median of {ROUNDS})",
                                   round(s["pass_ms"], 2), "ms",
                                   f"the same pass with {b[0]['stored']:,} tasks stored",
                                   round(small, 2), higher_is_better=False))
            rows.append(Row(f"scheduler pass, nothing due, {s['stored']:,} tasks stored",
                            f"pass time (median of {ROUNDS})", round(s["idle_ms"], 3), "ms"))
        shutil.rmtree(os.path.join(base, "b"), ignore_errors=True)

        print(f"(d) scheduler pass cost with {FINISHED_JOBS:,} finished jobs stored", flush=True)
        d = uvloop.run(_pass_cost_finished_jobs(os.path.join(base, "d"), 10_000,
                                                FINISHED_JOBS))
        summary["finished_jobs"] = d
        for what, key in (("100 tasks due", "pass_ms"), ("nothing due", "idle_ms")):
            what = what.replace("100", str(DUE))
            rows.append(Row.versus(
                f"scheduler pass, {what}, {d['stored']:,} tasks and {FINISHED_JOBS:,} "
                f"finished jobs stored", f"pass time (median of {ROUNDS})",
                round(d[f"{key}_with"], 3), "ms", "the same pass before the finished jobs "
                                                  "were stored", round(d[f"{key}_without"], 3),
                higher_is_better=False))
        shutil.rmtree(os.path.join(base, "d"), ignore_errors=True)

        print(f"(c) notifications/s, a job over {n_notify:,} devices", flush=True)
        c = uvloop.run(_notify_rate(os.path.join(base, "c"), n_notify))
        summary["notify"] = c
        case = (f"job over {n_notify:,} devices, no rate limit, into a counting loopback "
                f"gateway (job_batch {c['batch']}, notify_parallel {c['parallel']})")
        rows.append(Row(case, "notifications/s (task made, device read, NOTIFIED written, "
                              "package #0 built and sent)", round(c["rate"]), "1/s"))
        rows.append(Row(case, "process CPU per notification", round(c["cpu_us"], 1), "us"))
        rows.append(Row(case, "scheduler passes", c["passes"], "count"))
        print(f"  {c['rate']:,.0f} notifications/s over {c['passes']} passes", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    targets = {
        "creation_30s": summary.get("creation", {}).get("create_s", 1e9) <= 30,
        "creation_rss_300mb": (summary["creation"]["rss_peak"] - summary["creation"]["rss_before"])
        <= 300 if "creation" in summary else None,
        "pass_cost_flat_2x": (max(s["pass_ms"] for s in summary["pass_cost"])
                              <= 2 * summary["pass_cost"][0]["pass_ms"])
        if "pass_cost" in summary else None,
        "pass_cost_flat_with_finished_jobs_1_5x": (
            summary["finished_jobs"]["pass_ms_with"]
            <= 1.5 * summary["finished_jobs"]["pass_ms_without"])
        if "finished_jobs" in summary else None,
    }
    write_results(NAME, rows, load_average={"before": load_before, "after": os.getloadavg()},
                  targets=targets, quick=quick, details=summary)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--create"]:
        print(json.dumps(uvloop.run(_create(sys.argv[2], int(sys.argv[3])))))
    else:
        run(quick="--quick" in sys.argv)
