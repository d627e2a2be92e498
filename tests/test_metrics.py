"""The metrics of issue 17 against a real engine (LMDB store, device port, API port, simulated
devices): every family of the metric-name contract is exposed with the right type, the values
follow what was done, labels stay bounded, and the work gauges are computed from the jobs' own
counters without reading every job again (bulk.JobTally).  The real Prometheus check is
tests/test_prometheus_real.py."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dmengine.broker import BrokerConfig
from dmengine.bulk import JobTally
from dmengine.metrics import (AUTH_CAUSES, DeviceMetrics, Histo, MAX_JOB_SERIES, WorkGauges,
                              auth_cause)
from dmengine.model import (Job, JobState, QueryOp, Selection, Task, TaskState, new_id)
from dmengine.store.lmdb import LmdbStore

from test_broker_e2e import World, run_world
from test_jobs import register_all

FAST = BrokerConfig(retry_delays=(0.3,), tick_interval=0.05, retry_jitter=0.0)
QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}

#: the metric-name contract (/tmp/notes/metric_names.md), as exposed: name -> (type, labels)
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "dmengine_device_messages_received_total": ("counter", ("encoding",)),
    "dmengine_device_messages_sent_total": ("counter", ("encoding",)),
    "dmengine_device_received_bytes_total": ("counter", ("encoding",)),
    "dmengine_device_sent_bytes_total": ("counter", ("encoding",)),
    "dmengine_device_sessions_started_total": ("counter", ()),
    "dmengine_device_sessions_ended_total": ("counter", ("reason",)),
    "dmengine_device_sessions_in_flight": ("gauge", ()),
    "dmengine_device_connections": ("gauge", ()),
    "dmengine_device_rejected_total": ("counter", ("cap",)),
    "dmengine_device_http_errors_total": ("counter", ("status",)),
    "dmengine_device_cut_off_total": ("counter", ("reason",)),
    "dmengine_device_auth_failures_total": ("counter", ("scheme", "cause")),
    "dmengine_device_codec_errors_total": ("counter", ("encoding",)),
    "dmengine_device_request_seconds": ("histogram", ()),
    "dmengine_device_session_seconds": ("histogram", ()),
    "dmengine_tasks_created_total": ("counter", ("operation",)),
    "dmengine_task_transitions_total": ("counter", ("state",)),
    "dmengine_tasks": ("gauge", ("state",)),
    "dmengine_task_retries_total": ("counter", ()),
    "dmengine_task_expiries_total": ("counter", ()),
    "dmengine_jobs": ("gauge", ("state",)),
    "dmengine_job_progress_ratio": ("gauge", ("job_id",)),
    "dmengine_job_eta_seconds": ("gauge", ("job_id",)),
    "dmengine_scheduler_lag_seconds": ("histogram", ()),
    "dmengine_scheduler_pass_seconds": ("histogram", ()),
    "dmengine_notifications_total": ("counter", ("gateway", "result")),
    "dmengine_webhook_deliveries_total": ("counter", ("result",)),
    "dmengine_webhook_dead_letters_total": ("counter", ()),
    "dmengine_webhook_backlog": ("gauge", ()),
    "dmengine_charging_events_total": ("counter", ("kind",)),
    "dmengine_store_commit_seconds": ("histogram", ()),
    "dmengine_store_commit_batch_size": ("histogram", ()),
    "dmengine_store_map_used_bytes": ("gauge", ()),
    "dmengine_store_map_size_bytes": ("gauge", ()),
    "dmengine_store_readers": ("gauge", ()),
    "dmengine_api_requests_total": ("counter", ("route", "status", "role")),
    "dmengine_api_request_seconds": ("histogram", ("route",)),
    "dmengine_content_downloads_total": ("counter", ("result",)),
    "dmengine_content_sent_bytes_total": ("counter", ()),
    "dmengine_content_range_requests_total": ("counter", ()),
}


def families(text: str) -> dict[str, Any]:
    """Exposition text -> {family name as exposed (counters with _total): family}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    """The sample ``name`` (a counter's family name with _total, a histogram's _count…) with
    exactly ``labels``; 0 when absent."""
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


async def scrape(w: World) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(w.engine.api_url + "metrics") as r:
            assert r.status == 200
            return families(await r.text())


async def api(w: World, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, w.engine.api_url + path, json=json,
                                headers={"X-API-Key": w.engine.api_key}) as r:
            return r.status, await r.json(content_type=None)


# --- units -------------------------------------------------------------------------------------


def test_histogram_buckets_are_le_and_cumulative():
    h = Histo((0.1, 1.0))
    for v in (0.1, 0.05, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.total == pytest.approx(4.65)


@pytest.mark.parametrize("reason,cause", [
    ("no Cred in SyncHdr", "missing_credentials"),
    ("no x-syncml-hmac header", "missing_credentials"),
    ("unknown device", "unknown_device"),
    ("account belongs to another device", "wrong_device"),
    ("user name does not match the account", "wrong_user"),
    ("credential type 'syncml:auth-basic' not accepted (need syncml:auth-md5)", "wrong_scheme"),
    ("no nonce issued yet", "no_nonce"),
    ("digest mismatch (wrong secret or stale nonce)", "wrong_credentials"),
    ("HMAC mismatch", "wrong_credentials"),
    ("wrong password", "wrong_credentials"),
    ("x-syncml-hmac: unterminated quoted string", "bad_hmac_header"),
    ("x-syncml-hmac: unsupported algorithm 'SHA1'", "bad_hmac_header"),
    ("something new", "other"), (None, "other"),
])
def test_auth_causes_are_a_fixed_set(reason, cause):
    assert auth_cause(reason) == cause
    assert cause in {c for _, c in AUTH_CAUSES} | {"other"}


def test_every_auth_failure_reason_of_the_engine_has_a_cause():
    """The reasons auth.py gives (literal texts) all map to a named cause, so 'other' means
    a reason added later, never one of today's."""
    import ast
    import pathlib
    src = pathlib.Path(__file__).resolve().parent.parent / "dmengine" / "auth.py"
    reasons = []
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AuthResult" \
                and len(node.args) == 5 and node.args[0].value is False:   # type: ignore[attr-defined]
            arg = node.args[4]
            if isinstance(arg, ast.Constant):
                reasons.append(arg.value)
            elif isinstance(arg, ast.JoinedStr):
                reasons.append("".join(v.value for v in arg.values if isinstance(v, ast.Constant)))
            elif isinstance(arg, ast.IfExp):
                reasons += [arg.body.value, arg.orelse.value]   # type: ignore[attr-defined]
    assert len(reasons) >= 10
    assert [r for r in reasons if auth_cause(r) == "other"] == []


def test_device_metrics_session_time_and_codec_errors():
    m = DeviceMetrics(CollectorRegistry())
    t0 = m.session_started()
    m.session_ended("completed", t0)
    m.session_started()
    m.session_ended("timeout")                # start unknown: counted, not timed
    m.codec_error("wbxml")
    m.auth_failed("md5", "digest mismatch (wrong secret or stale nonce)")
    r = m.registry
    assert r.get_sample_value("dmengine_device_session_seconds_count") == 1
    assert r.get_sample_value("dmengine_device_sessions_ended_total", {"reason": "timeout"}) == 1
    assert r.get_sample_value("dmengine_device_sessions_in_flight") == 0
    assert r.get_sample_value("dmengine_device_codec_errors_total", {"encoding": "wbxml"}) == 1
    assert r.get_sample_value("dmengine_device_http_errors_total", {"status": "400"}) == 1
    assert r.get_sample_value("dmengine_device_auth_failures_total",
                              {"scheme": "md5", "cause": "wrong_credentials"}) == 1


def test_job_series_are_capped():
    g = WorkGauges(CollectorRegistry())
    g.update(running=[(f"j-{i}", i / 100, 10.0) for i in range(80)])
    fams = {f.name: f for f in g.collect()}
    assert len(fams["dmengine_job_progress_ratio"].samples) == MAX_JOB_SERIES
    assert len(fams["dmengine_job_eta_seconds"].samples) == MAX_JOB_SERIES


# --- the engine --------------------------------------------------------------------------------


def test_every_contract_family_is_exposed_and_counts_what_happened(tmp_path):
    """Sessions, a single task, a job, API calls, a bad body, a wrong password and a download:
    then one scrape of /metrics shows every family of the contract with its type and labels,
    and the values of what was done."""

    async def scenario(w: World) -> None:
        ids = await register_all(w, 4)
        await w.fleet.run(sessions_per_device=2, concurrency=4)            # 8 sessions
        stats = w.fleet.stats
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), dev_id=ids[0])
        await w.wait_state(tid, {TaskState.SUCCEEDED})
        status, r = await api(w, "POST", "v1/jobs", {
            "operation": QUERY, "selection": {"devIds": ids}, "name": "m"})
        assert status == 201, r
        job_id = r["jobId"]
        for _ in range(600):
            st, job = await api(w, "GET", f"v1/jobs/{job_id}")
            if job["state"] == "COMPLETED":
                break
            await asyncio.sleep(0.05)
        assert job["state"] == "COMPLETED", job
        status, _ = await api(w, "GET", "v1/tasks/t-no-such-task")
        assert status == 404
        async with aiohttp.ClientSession() as http:
            async with http.get(w.engine.api_url + "v1/no/such/path") as r:
                assert r.status in (401, 404)
            async with http.post(w.engine.device_url, data=b"\x00garbage",
                                 headers={"Content-Type": "application/vnd.syncml.dm+wbxml"}) as r:
                assert r.status == 400
        await w.fleet.wait_idle(timeout=10)
        await w.engine.refresh_metrics()
        fams = await scrape(w)

        for name, (kind, labels) in CONTRACT.items():
            assert name in fams, f"{name} not exposed"
            assert fams[name].type == kind, (name, fams[name].type)
            for s in fams[name].samples:
                own = set(s.labels) - {"le"}
                assert own == set(labels), (name, s.labels)

        sessions = stats.sessions           # the fleet's own 8, the task's and the job's 5
        assert sessions == 13
        assert value(fams, "dmengine_device_sessions_started_total") == sessions
        assert value(fams, "dmengine_device_sessions_ended_total", reason="completed") == sessions
        assert value(fams, "dmengine_device_session_seconds_count") == sessions
        assert value(fams, "dmengine_device_sessions_in_flight") == 0
        got = sum(value(fams, "dmengine_device_messages_received_total", encoding=e)
                  for e in ("xml", "wbxml"))
        assert got == stats.messages + 1              # + the garbage body
        assert value(fams, "dmengine_device_codec_errors_total", encoding="wbxml") == 1
        assert value(fams, "dmengine_device_request_seconds_count") >= stats.messages
        assert value(fams, "dmengine_tasks_created_total", operation="QUERY") == 5
        assert value(fams, "dmengine_task_transitions_total", state="SUCCEEDED") == 5
        assert value(fams, "dmengine_tasks", state="SUCCEEDED") == 4      # tasks of jobs only
        assert value(fams, "dmengine_jobs", state="COMPLETED") == 1
        assert value(fams, "dmengine_notifications_total", gateway="loopback",
                     result="sent") == 5
        assert value(fams, "dmengine_scheduler_lag_seconds_count") == 5
        assert value(fams, "dmengine_scheduler_pass_seconds_count") > 0
        assert value(fams, "dmengine_charging_events_total", kind="QUERY") == 5
        assert value(fams, "dmengine_api_requests_total", route="getTaskById", status="404",
                     role="admin") == 1
        assert value(fams, "dmengine_api_requests_total", route="createDeployments",
                     status="201", role="admin") == 1
        assert value(fams, "dmengine_api_request_seconds_count", route="getTaskById") == 1
        # bounded: no label value carries a task, job or device id, nor a path
        for fam in fams.values():
            for s in fam.samples:
                if fam.name.startswith("dmengine_job_"):
                    continue
                for v in s.labels.values():
                    assert not v.startswith(("t-", "j-", "/v1")) and "IMEI" not in v, (fam.name, s)
        store = w.engine.store
        assert value(fams, "dmengine_store_commit_batch_size_sum") <= store.ops
        assert value(fams, "dmengine_store_commit_seconds_count") >= 10
        info = store.info()
        assert value(fams, "dmengine_store_map_size_bytes") == info["map_size"]
        assert value(fams, "process_resident_memory_bytes") > 0
        assert "python_info" in fams

    run_world(tmp_path, scenario, broker=FAST)


def test_running_job_progress_and_eta_then_gone(tmp_path):
    """A job whose two devices of four are switched off: RUNNING at 50 % with an ETA and a
    job series; cancelled, its series goes and its tasks count as CANCELLED/SUCCEEDED."""

    async def scenario(w: World) -> None:
        ids = await register_all(w, 4)
        w.silent.update({w.device(2).msisdn, w.device(3).msisdn})
        status, r = await api(w, "POST", "v1/jobs", {
            "operation": QUERY, "selection": {"devIds": ids}})
        assert status == 201, r
        job_id = r["jobId"]
        for _ in range(400):
            st, job = await api(w, "GET", f"v1/jobs/{job_id}")
            if job["succeeded"] == 2:
                break
            await asyncio.sleep(0.05)
        assert job["succeeded"] == 2 and job["state"] == "RUNNING", job
        await w.engine.refresh_metrics()
        fams = await scrape(w)
        assert value(fams, "dmengine_job_progress_ratio", job_id=job_id) == 0.5
        assert value(fams, "dmengine_job_eta_seconds", job_id=job_id) > 0
        assert value(fams, "dmengine_jobs", state="RUNNING") == 1
        assert value(fams, "dmengine_tasks", state="SUCCEEDED") == 2
        assert value(fams, "dmengine_tasks", state="NOTIFIED") == 2
        status, _ = await api(w, "POST", f"v1/jobs/{job_id}/cancel")
        assert status == 200
        await w.engine.refresh_metrics()
        fams = await scrape(w)
        assert fams["dmengine_job_progress_ratio"].samples == []
        assert value(fams, "dmengine_jobs", state="CANCELLED") == 1
        assert value(fams, "dmengine_jobs", state="RUNNING") == 0
        assert value(fams, "dmengine_tasks", state="CANCELLED") == 2
        assert value(fams, "dmengine_tasks", state="SUCCEEDED") == 2

    run_world(tmp_path, scenario, broker=BrokerConfig(retry_delays=(60.0,), tick_interval=0.05))


# --- JobTally over a real store ----------------------------------------------------------------


class CountingStore(LmdbStore):
    """The real LMDB store, noting which job states are listed (the cost of a refresh)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.listed: list[JobState | None] = []

    async def list_jobs(self, *, state=None, cursor=None, limit=100):  # type: ignore[override]
        self.listed.append(state)
        return await super().list_jobs(state=state, cursor=cursor, limit=limit)


async def _job(store: LmdbStore, n: int, *, state: JobState = JobState.RUNNING) -> Job:
    job = await store.create_job(Job(job_id=new_id("j"), op=QueryOp(nodes=["./DevInfo/Mod"]),
                                     selection=Selection(dev_ids=[f"d{i}" for i in range(n)]),
                                     state=JobState.SCHEDULED))
    await store.add_job_targets(job.job_id, [f"d{i}" for i in range(n)])
    await store.update_job(job.job_id, {"state": JobState.RUNNING, "started": time.time()})
    tasks = [Task(task_id=new_id("t"), dev_id=f"d{i}", op=job.op, job_id=job.job_id,
                  state=TaskState.PENDING) for i in range(n)]
    await store.create_job_tasks(job.job_id, 0, tasks)
    return await store.update_job(job.job_id, {"state": state})


def test_job_tally_counts_each_job_once_and_reads_only_open_and_new_jobs(tmp_path):
    async def main() -> None:
        store = CountingStore(tmp_path / "s")
        try:
            done = await _job(store, 3)
            for t in (await store.tasks_by_job(done.job_id)).items:
                await store.transition(t.task_id, TaskState.CANCELLED, cause="x")
            await store.update_job(done.job_id, {"state": JobState.COMPLETED})
            run = await _job(store, 5)
            t0 = (await store.tasks_by_job(run.job_id)).items[0]
            await store.transition(t0.task_id, TaskState.NOTIFIED, cause="x")

            tally = JobTally(store)
            tasks, jobs, running = await tally.refresh()
            assert jobs == {"COMPLETED": 1, "RUNNING": 1}
            assert tasks == {"CANCELLED": 3, "PENDING": 4, "NOTIFIED": 1}
            assert [r[0] for r in running] == [run.job_id] and running[0][1] == 0.0
            # later refreshes list the open states only: settled jobs are never read again
            store.listed.clear()
            for _ in range(3):
                await tally.refresh()
            assert set(store.listed) <= {JobState.SCHEDULED, JobState.RUNNING, JobState.PAUSED}

            # the running job is cancelled, its tasks after it (as Jobs.cancel does): not
            # settled while a task is in flight, counted once when all are final
            await store.update_job(run.job_id, {"state": JobState.CANCELLED})
            tasks, jobs, running = await tally.refresh()
            assert jobs == {"COMPLETED": 1, "CANCELLED": 1} and running == []
            assert tasks == {"CANCELLED": 3, "PENDING": 4, "NOTIFIED": 1}
            for t in (await store.tasks_by_job(run.job_id)).items:
                await store.transition(t.task_id, TaskState.CANCELLED, cause="x")
            for _ in range(2):
                tasks, jobs, _ = await tally.refresh()
                assert jobs == {"COMPLETED": 1, "CANCELLED": 1}
                assert tasks == {"CANCELLED": 8}
            # a job made and finished between two refreshes is found by its date, once
            quick = await _job(store, 2)
            for t in (await store.tasks_by_job(quick.job_id)).items:
                await store.transition(t.task_id, TaskState.FAILED, cause="x")
            await store.update_job(quick.job_id, {"state": JobState.COMPLETED})
            for _ in range(2):
                tasks, jobs, _ = await tally.refresh()
                assert jobs == {"COMPLETED": 2, "CANCELLED": 1}
                assert tasks == {"CANCELLED": 8, "FAILED": 2}
            # a new tally (a restart) comes to the same numbers
            again = await JobTally(store).refresh()
            assert again[:2] == (tasks, jobs)
        finally:
            await store.close()

    asyncio.run(main())


def _gc_pause_counts(text: str) -> dict[str, tuple[float, float]]:
    """generation → (count, sum) of dmengine_gc_pause_seconds in an exposition."""
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "dmengine_gc_pause_seconds":
            continue
        for s in fam.samples:
            g = out.setdefault(s.labels["generation"], [0.0, 0.0])
            if s.name.endswith("_count"):
                g[0] = s.value
            elif s.name.endswith("_sum"):
                g[1] = s.value
    return {g: (c, t) for g, (c, t) in out.items()}


def test_gc_pauses_are_timed_by_generation():
    """``dmengine_gc_pause_seconds``: each garbage collection's pause, by generation, on every
    registry of the process (one callback, however many engines)."""
    import gc

    from prometheus_client import generate_latest

    from dmengine.metrics import add_process_collectors, gc_pauses
    regs = [CollectorRegistry(), CollectorRegistry()]
    for r in regs:
        add_process_collectors(r)
    assert gc.callbacks.count(gc_pauses()._callback) == 1
    before = _gc_pause_counts(generate_latest(regs[0]).decode())
    gc.collect()
    gc.collect(0)
    for r in regs:
        after = _gc_pause_counts(generate_latest(r).decode())
        assert set(after) == {"0", "1", "2"}
        assert after["2"][0] >= before["2"][0] + 1 and after["2"][1] > before["2"][1]
        assert after["0"][0] >= before["0"][0] + 1


def test_a_serving_engine_exposes_its_gc_pauses():
    """Over HTTP, from ``dmengine serve``: its start-up collection (``tune_gc``) is there."""
    import tempfile
    import urllib.request

    from test_cli_serve import start, stop
    with tempfile.TemporaryDirectory() as tmp:
        p, urls = start(tmp + "/var")
        try:
            with urllib.request.urlopen(urls["metrics"], timeout=10) as r:
                got = _gc_pause_counts(r.read().decode())
        finally:
            stop(p)
    assert got["2"][0] >= 1 and got["2"][1] > 0, got


def test_merged_registry_adds_other_processes_series() -> None:
    """/metrics of a server with device processes (metrics.MergedRegistry): counters and
    histograms summed per label set, a series only another process has joins its family,
    a per-process family (start time) stays this process's, and the exposition parses."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dmengine.metrics import MergedRegistry

    def registry(ok: int, bad: int, seconds: list[float], start: float) -> CollectorRegistry:
        r = CollectorRegistry()
        c = Counter("dm_requests", "requests", ["status"], registry=r)
        c.labels("200").inc(ok)
        if bad:
            c.labels("404").inc(bad)
        h = Histogram("dm_seconds", "latency", registry=r, buckets=(0.1, 1.0))
        for s in seconds:
            h.observe(s)
        Gauge("process_start_time_seconds", "start", registry=r).set(start)
        return r
    main = registry(3, 0, [0.05], 1000.0)
    other = generate_latest(registry(4, 2, [0.5, 2.0], 2000.0)).decode()
    text = generate_latest(MergedRegistry(main, [other, other])).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("dm_requests_total", (("status", "200"),))] == 3 + 4 + 4
    assert got[("dm_requests_total", (("status", "404"),))] == 2 + 2
    assert got[("dm_seconds_bucket", (("le", "0.1"),))] == 1
    assert got[("dm_seconds_bucket", (("le", "1.0"),))] == 1 + 1 + 1
    assert got[("dm_seconds_count", ())] == 5
    assert got[("process_start_time_seconds", ())] == 1000.0
    assert text.count("# TYPE dm_requests_total counter") == 1
