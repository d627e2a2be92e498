"""The Python client (dmengine.client) against a real ``dmengine serve``: every call answers the
route's own msgspec Struct (dmengine.wsi.schemas), which encodes back to the very JSON the
server sent (so the CLI's ``--json`` prints what it printed before the client was typed); an
answer of the wrong shape is an error naming the field; ``dmengine jobs watch`` draws a rich
progress bar on a terminal and keeps its lines (or JSON lines) off one.

The job that completes here is run by simulated devices (``dmengine simulate``) that open
their own sessions: the server has no package-0 gateway, so its tasks wait for them."""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import msgspec
import pytest
import uvloop

from dmengine.client import (Client, ClientError, ContentView, DevicePage, DeviceView,
                             HistoryPage, HistoryView, ImportReport, JobCreated, JobOut, JobPage, SyncClient,
                             TaskCancelled, TaskDataView, TaskPage, TaskSummary, to_builtins)
from dmengine.jobs_cli import watch_job

from test_cli_serve import start, stop

QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("typed")
    p, urls = start(str(root / "var"))
    try:
        yield root, urls
    finally:
        assert stop(p) == 0


def dmengine(*args: str, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DMENGINE_API_KEY"}
    return subprocess.run([sys.executable, "-m", "dmengine", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


async def raw(c: Client, path: str) -> Any:
    """The same answer as plain JSON values, in the server's key order (what the CLI printed
    with ``json.dumps`` before)."""
    return await c.request("GET", path)


async def same_json(c: Client, path: str, typ: Any) -> Any:
    """One answer's bytes decoded both ways: as ``typ`` (the client's way) and as plain JSON
    (the CLI's way before).  Compared as text, so key order and number spelling (1.0 vs 1)
    count too.  One read: a running job's rate moves between two."""
    async with c._http().get(c.url + path) as r:
        assert r.status == 200
        body = await r.read()
    typed = msgspec.json.decode(body, type=typ)
    assert json.dumps(to_builtins(typed), indent=2) == json.dumps(json.loads(body), indent=2)
    return typed


async def provision(c: Client, cap: str, n: int, first: int) -> list[str]:
    await c.request("POST", "v1/capabilities", json={"oid": cap, "model": "EX100"})
    devs = []
    for i in range(n):
        imei = f"{first + i:015d}"
        made = await c.create_device({"devId": f"IMEI:{imei}", "imei": imei,
                                      "msisdn": f"+4915{(first + i) % 10**8:08d}", "capability": cap,
                                      "account": {"serverId": "s", "clientName": f"d{i}",
                                                  "clientPassword": "SECRET-pw"}})
        assert isinstance(made, DeviceView) and made.dev_id == f"IMEI:{imei}"
        assert made.account is not None and made.account.client_password == "***"
        devs.append(made.dev_id)
    return devs


def test_answers_are_the_routes_structs_and_encode_back_to_the_same_json(served, tmp_path):
    root, urls = served
    api, key = urls["API"], urls["API key"]

    async def main() -> None:
        async with Client(api, key) as c:
            devs = await provision(c, "cap-typed", 6, 350000000001000)
            dev = await c.get_device(devs[0][len("IMEI:"):])          # a bare IMEI
            assert isinstance(dev, DeviceView) and dev.capability == "cap-typed"
            await same_json(c, f"v1/devices/{devs[0]}", DeviceView)
            page = await c.find_devices(capability="cap-typed", limit=4)
            assert isinstance(page, DevicePage) and len(page.items) == 4 and page.next_cursor
            await same_json(c, "v1/devices?capability=cap-typed&limit=4", DevicePage)
            assert sorted([d.dev_id async for d in c.iter_devices(capability="cap-typed",
                                                                   limit=4)]) == sorted(devs)
            patched = await c.update_device(devs[1], {"msisdn": "+491700000001"})
            assert isinstance(patched, DeviceView) and patched.msisdn == "+491700000001"

            pkg = tmp_path / "fw.bin"
            pkg.write_bytes(b"\x00\x01firmware" * 1000)
            seen: list[int] = []
            rec = await c.upload_content(pkg, to_version="9.9", progress=seen.append)
            assert isinstance(rec, ContentView) and rec.size == pkg.stat().st_size
            assert sum(seen) == rec.size and rec.download_url
            assert await same_json(c, f"v1/content/{rec.content_id}", ContentView) == rec

            made = await c.create_job({"operation": QUERY, "selection": {"capability":
                                                                          "cap-typed"}})
            assert isinstance(made, JobCreated) and made.targets == 6
            deadline = time.monotonic() + 30
            while (job := await c.get_job(made.job_id)).total < 6:   # the scheduler's tasks
                assert time.monotonic() < deadline, job
                await asyncio.sleep(0.1)
            paused = await c.pause_job(made.job_id, "a look")
            assert isinstance(paused, JobOut) and paused.state == "PAUSED"
            assert paused.cause == "a look"
            tasks = await c.tasks(made.job_id, limit=4)
            assert isinstance(tasks, TaskPage) and all(isinstance(t, TaskSummary)
                                                      for t in tasks.items)
            assert await same_json(c, f"v1/jobs/{made.job_id}/tasks?limit=4", TaskPage) == tasks
            every = [t async for t in c.iter_tasks(made.job_id, limit=4)]
            assert len({t.task_id for t in every}) == 6
            t = await c.get_task(every[0].task_id)
            assert isinstance(t, TaskDataView) and t.job_id == made.job_id
            assert t.op.nodes == ["./DevInfo/Mod"] and t.operation == "QUERY"
            gone = await c.cancel_task(t.task_id)
            assert isinstance(gone, TaskCancelled) and gone.status == "CANCELLED"
            assert await same_json(c, f"v1/tasks/{t.task_id}", TaskDataView) == \
                await c.get_task(t.task_id)
            hist = await c.task_history(t.task_id)
            assert all(isinstance(h, HistoryView) for h in hist)
            assert [h.seq for h in hist] == list(range(1, len(hist) + 1))
            assert hist[-1].to_state == "CANCELLED"
            assert (await same_json(c, f"v1/tasks/{t.task_id}/history", HistoryPage)).items == hist

            ended = await c.cancel_job(made.job_id, "done looking")
            assert isinstance(ended, JobOut) and ended.state == "CANCELLED"
            await same_json(c, f"v1/jobs/{made.job_id}", JobOut)
            await same_json(c, "v1/jobs?state=CANCELLED", JobPage)
            jobs = await c.jobs(state="CANCELLED")
            assert isinstance(jobs, JobPage) and made.job_id in {j.job_id for j in jobs.items}
            assert made.job_id in {j.job_id async for j in c.iter_jobs(limit=1)}

            # errors: the API's, and an answer that is not the route's type, named by field
            with pytest.raises(ClientError) as err:
                await c.get_task("t-nope")
            assert (err.value.status, err.value.error) == (404, "not_found")
            with pytest.raises(ClientError) as err:
                await c.request("GET", "v1/jobs?state=CANCELLED", type=DevicePage)
            assert err.value.error == "bad_answer" and err.value.where == "$.items[0]"
            assert "jobId" in err.value.message or "unknown field" in err.value.message
            with pytest.raises(ClientError) as err:
                await c.request("GET", f"v1/tasks/{t.task_id}", type=ImportReport)
            # a task's float "created" is not a report's int "created"
            assert (err.value.error, err.value.where) == ("bad_answer", "$.created")
            assert "Expected `int`, got `float`" in err.value.message
    uvloop.run(main())


def test_sync_client_answers_the_same_structs(served):
    """The blocking client (its own loop in a thread): the same calls and Structs."""
    root, urls = served
    with SyncClient(urls["API"], urls["API key"]) as c:
        c.request("POST", "v1/capabilities", json={"oid": "cap-sync"})
        dev = c.create_device({"devId": "IMEI:350000000003000", "imei": "350000000003000",
                               "capability": "cap-sync"})
        assert isinstance(dev, DeviceView)
        made = c.create_job({"operation": QUERY, "selection": {"devIds": [dev.dev_id]}})
        assert isinstance(made, JobCreated) and made.targets == 1
        job = c.cancel_job(made.job_id, "sync")
        assert isinstance(job, JobOut) and (job.state, job.cause) == ("CANCELLED", "sync")
        assert c.get_job(made.job_id).state == "CANCELLED"
        assert made.job_id in {j.job_id for j in c.iter_jobs(limit=2)}
        with pytest.raises(ClientError) as err:
            c.get_job("j-nope")
        assert (err.value.status, err.value.error) == (404, "not_found")


def test_cli_json_is_the_servers_json(served):
    """``--json`` prints ``json.dumps(answer, indent=2)`` of the server's JSON, as before."""
    root, urls = served
    api, key = urls["API"], urls["API key"]

    async def setup() -> tuple[str, str, Any, Any, Any]:
        async with Client(api, key) as c:
            devs = await provision(c, "cap-json", 2, 350000000002000)
            made = await c.create_job({"operation": QUERY, "selection": {"devIds": devs}})
            while (await c.get_job(made.job_id)).total < 2:
                await asyncio.sleep(0.1)
            await c.cancel_job(made.job_id, "json check")
            task = (await c.tasks(made.job_id)).items[0].task_id
            return (made.job_id, devs[0], await raw(c, f"v1/jobs/{made.job_id}"),
                    await raw(c, f"v1/tasks/{task}"), await raw(c, f"v1/devices/{devs[0]}"))
    job_id, dev_id, job, task, dev = uvloop.run(setup())
    base = ["--url", api, "--api-key", key]
    r = dmengine("jobs", "get", job_id, "--json", *base)
    assert r.returncode == 0, r.stderr
    # the same text but for the rate (finished tasks per second since the start: it still
    # moves after the job ended)
    printed = r.stdout.replace(json.dumps(json.loads(r.stdout)["rate"]), "RATE")
    assert printed == json.dumps(job, indent=2).replace(json.dumps(job["rate"]), "RATE") + "\n"
    r = dmengine("tasks", "get", task["taskId"], "--json", *base)
    assert r.returncode == 0 and r.stdout == json.dumps(task, indent=2) + "\n", r.stderr
    r = dmengine("devices", "get", dev_id, *base)
    assert r.returncode == 0 and r.stdout == json.dumps(dev, indent=2) + "\n", r.stderr
    # watch off a terminal: one line, or with --json the job as one JSON object a line
    r = dmengine("jobs", "watch", job_id, "--interval", "0.1", *base)
    assert r.returncode == 1 and r.stdout.splitlines()[0].startswith(f"{job_id}  CANCELLED")
    assert r.stdout.splitlines()[-1] == "json check" and "\x1b[" not in r.stdout
    r = dmengine("jobs", "watch", job_id, "--json", "--interval", "0.1", *base)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 1 and len(lines) == 1
    assert list(lines[0]) == list(job) and {**lines[0], "rate": 0} == {**job, "rate": 0}


def test_jobs_watch_draws_a_progress_bar_until_the_job_completes(served, tmp_path):
    root, urls = served
    api, key, dm = urls["API"], urls["API key"], urls["device port"]
    n, first = 8, 4000
    fleet = tmp_path / "fleet.csv"
    r = dmengine("simulate", "--url", dm, "--devices", str(n), "--first-index", str(first),
                 "--capability", "cap-watch", "--write-import", str(fleet))
    assert r.returncode == 0, r.stderr

    async def main() -> tuple[JobOut, str, dict[str, Any]]:
        async with Client(api, key) as c:
            await c.request("POST", "v1/capabilities", json={"oid": "cap-watch"})
            rep = await c.import_devices(fleet)
            assert isinstance(rep, ImportReport) and rep.created == n, rep
            made = await c.create_job({"operation": QUERY,
                                       "selection": {"capability": "cap-watch"}})
            deadline = time.monotonic() + 30
            while (await c.get_job(made.job_id)).total < n:     # every task made, waiting
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            out = io.StringIO()
            from rich.console import Console
            console = Console(file=out, force_terminal=True, width=160)
            watching = asyncio.create_task(watch_job(c, made.job_id, interval=0.2,
                                                     console=console))
            await asyncio.sleep(0.5)
            assert not watching.done()
            # the devices open their sessions and run the job's QUERY
            sim = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dmengine", "simulate", "--url", dm, "--devices", str(n),
                "--first-index", str(first), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            sim_out, sim_err = await asyncio.wait_for(sim.communicate(), 90)
            assert sim.returncode == 0, sim_err.decode()
            job = await asyncio.wait_for(watching, 60)
            return job, out.getvalue(), json.loads(sim_out)
    job, text, summary = uvloop.run(main())
    assert summary["outcomes"] == {"completed": n}, summary
    assert job.state == "COMPLETED" and (job.final, job.succeeded, job.failed) == (n, n, 0)
    assert "\x1b[" in text                          # drawn as on a terminal
    frames = [ANSI.sub("", f) for f in re.split(r"\r|\n", text) if ANSI.sub("", f).strip()]
    last = frames[-1]
    assert f"{job.job_id} COMPLETED" in last and f"{n}/{n}" in last, last
    assert f"{n} succeeded" in last and "0 failed" in last and "tasks/s" in last, last
    assert "ETA -" in last, last
    # it was drawn while the job ran, not only at its end
    assert any(f"{job.job_id} RUNNING" in f and f"0/{n}" in f for f in frames), frames[:3]
