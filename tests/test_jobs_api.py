"""Jobs over the API (issues 14 and 15): createDeployments, doBulkOperation, the list form of
doBootstrap, getJob / getJobs / getJobsByDate, pause / restart / cancel and getTasks over real
HTTP against a real engine (LMDB store, device port, package 0 through the loopback gateway)
and the simulator's devices; and the ``dmengine jobs …`` / ``dmengine tasks …`` CLI against a
real ``dmengine serve``."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp

from dmengine import bootstrap
from dmengine.broker import BrokerConfig

from conftest import api_client, bounded
from test_broker_e2e import World, run_world, upload_firmware
from test_cli_serve import start, stop
from test_jobs import register_all

FAST = BrokerConfig(retry_delays=(0.3,), tick_interval=0.05, retry_jitter=0.0)
QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}
FINAL = {"COMPLETED", "CANCELLED", "FAILED"}


class Api:
    """The API of a World's engine over aiohttp: ``await api.call(method, path, ...)`` →
    ``(status, decoded body)``."""

    def __init__(self, w: World, http: aiohttp.ClientSession) -> None:
        self.url = w.engine.api_url
        self.headers = {"X-API-Key": w.engine.api_key}
        self.http = http

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=json, params=params,
                                     headers=self.headers) as r:
            return r.status, await r.json(content_type=None)

    async def job(self, job_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"v1/jobs/{job_id}")
        assert status == 200, body
        return body

    async def wait_job(self, job_id: str, states: set[str], timeout: float = 60.0
                       ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["state"] in states:
                return job
            assert time.monotonic() < end, f"job stuck in {job['state']}: {job}"
            await asyncio.sleep(0.05)

    async def all_tasks(self, job_id: str, *, limit: int, state: str | None = None
                        ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            if state:
                params["state"] = state
            status, page = await self.call("GET", f"v1/jobs/{job_id}/tasks", params=params)
            assert status == 200, page
            assert set(page) == {"items", "nextCursor"}
            assert len(page["items"]) <= limit
            out += page["items"]
            cursor = page["nextCursor"]
            if cursor is None:
                return out


def with_api(tmp_path, scenario, **kw: Any) -> None:
    async def outer(w: World) -> None:
        async with api_client() as http:
            await bounded(scenario(w, Api(w, http)))
    run_world(tmp_path, outer, **kw)


def test_staged_job_created_and_watched_over_http(tmp_path):
    """createDeployments over 300 devices in three stages; getJob follows it to COMPLETED
    with the right counts; getTasks pages over every task exactly once."""
    n = 300

    async def scenario(w: World, api: Api) -> None:
        ids = await register_all(w, n)
        status, r = await api.call("POST", "v1/jobs", json={
            "operation": QUERY, "selection": {"capability": "cap-ex100"}, "name": "mod check",
            "stages": [{"percent": 1, "successThreshold": 0.9},
                       {"percent": 10, "successThreshold": 0.9}, {"percent": 100}],
            "concurrency": 50, "stopRule": {"maxFailureRatio": 0.5, "minFinished": 10}})
        assert status == 201, r
        assert r["state"] == "RUNNING" and r["targets"] == n and set(r) == {"jobId", "state",
                                                                            "targets"}
        job_id = r["jobId"]
        stages_seen = set()
        end = time.monotonic() + 90
        while True:
            job = await api.job(job_id)
            stages_seen.add(job["stage"])
            assert job["total"] <= {0: 3, 1: 30, 2: n}[job["stage"]]    # a stage's boundary
            if job["state"] != "RUNNING":
                break
            assert time.monotonic() < end, job
            await asyncio.sleep(0.02)
        assert job["state"] == "COMPLETED", job["cause"]
        assert job["counts"] == {"SUCCEEDED": n}
        assert (job["targets"], job["total"], job["final"], job["succeeded"], job["failed"]) == \
            (n, n, n, n, 0)
        assert job["progress"] == 1.0 and job["rate"] > 0 and job["etaSeconds"] is None
        assert job["owner"] == "api" and job["name"] == "mod check"
        assert job["operation"] == QUERY
        assert job["selection"]["capability"] == "cap-ex100"
        assert job["stages"][0] == {"percent": 1.0, "successThreshold": 0.9, "approval": False}
        assert job["stopRule"] == {"maxFailureRatio": 0.5, "minFinished": 10}
        assert "baseFinal" not in job and "base_final" not in job
        assert stages_seen >= {2}
        tasks = await api.all_tasks(job_id, limit=37)
        assert len(tasks) == n and len({t["taskId"] for t in tasks}) == n
        assert sorted(t["devId"] for t in tasks) == sorted(ids)      # each device once
        t = tasks[0]
        assert t["status"] == "SUCCEEDED" and t["operation"] == "QUERY" and t["jobId"] == job_id
        assert t["result"]["nodes"] == {"./DevInfo/Mod": "EX100"}
        assert len(await api.all_tasks(job_id, limit=100, state="succeeded")) == n
        assert await api.all_tasks(job_id, limit=100, state="FAILED") == []

    with_api(tmp_path, scenario, n=n, broker=FAST)


def test_bulk_operation_names_the_bad_targets(tmp_path):
    """doBulkOperation: a target that names no device is listed with its index and nothing
    is made; a good list becomes a job over those devices (a device named twice once)."""
    async def scenario(w: World, api: Api) -> None:
        await register_all(w, 4)
        d = [w.device(i) for i in range(4)]
        bad = [{"msisdn": d[0].msisdn}, {"imei": d[1].dev_id[5:]}, {"devId": d[2].dev_id},
               {"msisdn": "+4915100000000"}, {}, {"imei": "000000000000000"}]
        status, err = await api.call("POST", "v1/operations/bulk",
                                     json={"targets": bad, "operation": QUERY})
        assert status == 400, err                   # a mix of not-found and malformed
        assert err["where"] == "targets[3].msisdn" and "3 of 6 targets" in err["message"]
        assert [e["where"] for e in err["errors"]] == ["targets[3].msisdn", "targets[4]",
                                                       "targets[5].imei"]
        status, err = await api.call("POST", "v1/operations/bulk", json={
            "targets": [{"msisdn": d[0].msisdn}, {"msisdn": "+4915100000000"}],
            "operation": QUERY})
        assert status == 404 and err["error"] == "not_found"
        assert err["where"] == "targets[1].msisdn"
        status, page = await api.call("GET", "v1/jobs")
        assert page == {"items": [], "nextCursor": None}            # nothing was made
        status, err = await api.call("POST", "v1/operations/bulk",
                                     json={"targets": [], "operation": QUERY})
        assert status == 400 and err["where"] == "$.targets"
        status, err = await api.call("POST", "v1/operations/bulk", json={
            "targets": [{"msisdn": d[0].msisdn}], "operation": QUERY,
            "stages": [{"percent": 50}, {"percent": 40}]})
        assert status == 400 and err["where"] == "stages[1].percent"

        good = [{"msisdn": d[0].msisdn}, {"imei": d[1].dev_id[5:]}, {"devId": d[2].dev_id},
                {"imei": d[0].dev_id[5:]}]                  # d[0] twice
        status, r = await api.call("POST", "v1/operations/bulk", json={
            "targets": good, "operation": QUERY, "owner": "care-desk", "testCycle": True})
        assert status == 201, r
        assert r["targets"] == 3
        job = await api.wait_job(r["jobId"], FINAL)
        assert job["state"] == "COMPLETED" and job["owner"] == "care-desk"
        assert job["testCounts"] == {"SUCCEEDED": 3} and job["counts"] == {}
        assert job["testCycle"] is True
        assert sorted(job["selection"]["devIds"]) == sorted(x.dev_id for x in d[:3])

    with_api(tmp_path, scenario, n=4, broker=FAST)


def test_validation_errors_name_the_field(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        await register_all(w, 2)
        cap = {"capability": "cap-ex100"}
        cases = [
            ({"stages": [{"percent": 10}, {"percent": 5}, {"percent": 100}]}, 400,
             "stages[1].percent"),
            ({"stages": [{"percent": 10}, {"percent": 50}]}, 400, "stages[1]"),
            ({"stages": [{"percent": 0}]}, 400, "$.stages[0].percent"),
            ({"stages": [{"percent": 100, "successTreshold": 1}]}, 400,
             "$.stages[0].successTreshold"),
            ({"operation": {"operation": "UPDATE", "contentId": "nope"}}, 404,
             "operation.contentId"),
            ({"operation": {"operation": "UPDATE", "content_id": "nope"}}, 400,
             "$.operation.content_id"),
            ({"operation": {"operation": "QUERY", "nodes": []}}, 400, "$.operation.nodes"),
            ({"operation": {"operation": "BOOTSTRAP",                # doBootstrap's
                            "account": {"serverId": "x"}}}, 400, "$.operation.operation"),
            ({"selection": {}}, 400, "selection"),
            ({"selection": {"devIds": ["IMEI:1"], "capability": "x"}}, 400, "selection"),
            ({"selection": {"devIds": ["IMEI 1"]}}, 400, "selection.devIds[0]"),
            ({"selection": {"tac": "123"}}, 400, "$.selection.tac"),
            ({"startAt": 2_000_000_000, "endAt": 1_900_000_000}, 400, "endAt"),
            ({"tz": "Mars/Olympus_Mons"}, 400, "tz"),
            ({"windows": [{"start": 3600, "end": 3600}]}, 400, "windows[0]"),
            ({"windows": [{"start": 0, "end": 90000}]}, 400, "$.windows[0].end"),
            ({"stopRule": {"maxFailureRatio": 2}}, 400, "$.stopRule.maxFailureRatio"),
            ({"acceptDevicePolicy": 50}, 400, "$.acceptDevicePolicy"),
            ({"rateLimit": 0}, 400, "$.rateLimit"),
            ({"concurrency": 0}, 400, "$.concurrency"),
            ({"rate_limit": 5}, 400, "$.rate_limit"),                # snake case is not taken
        ]
        for change, code, where in cases:
            body = {"operation": QUERY, "selection": cap, **change}
            status, err = await api.call("POST", "v1/jobs", json=body)
            assert (status, err.get("where")) == (code, where), (change, err)
            assert set(err) == {"error", "message", "where"}, err
        status, page = await api.call("GET", "v1/jobs")
        assert page["items"] == []                    # no refused request left a job behind
        for params, where in (({"state": "NOPE"}, "state"), ({"limit": "0"}, "limit"),
                              ({"limit": "x"}, "limit"), ({"cursor": "!!"}, "cursor"),
                              ({"owner": "a", "colour": "red"}, "colour")):
            status, err = await api.call("GET", "v1/jobs", params=params)
            assert status == 400 and err["where"] == where, (params, err)
        for params, where in (({"from": "20", "to": "10"}, "to"), ({"from": "yesterday"}, "from")):
            status, err = await api.call("GET", "v1/jobs/by-date", params=params)
            assert status == 400 and err["where"] == where, (params, err)
        for method, path in (("GET", "v1/jobs/j-nope"), ("POST", "v1/jobs/j-nope/pause"),
                             ("GET", "v1/jobs/j-nope/tasks")):
            status, err = await api.call(method, path)
            assert status == 404 and err["where"] == "jobId", err
        status, err = await api.call("GET", "v1/jobs/j-nope/tasks", params={"state": "DONE"})
        assert status == 400 and err["where"] == "state"
        async with api.http.post(api.url + "v1/jobs", json={"operation": QUERY,
                                                             "selection": cap}) as r:
            assert r.status == 401                        # the key is needed

    with_api(tmp_path, scenario, n=2, broker=FAST)


def test_pause_restart_cancel_over_http(tmp_path):
    n = 300

    async def scenario(w: World, api: Api) -> None:
        await register_all(w, n)
        status, r = await api.call("POST", "v1/jobs", json={
            "operation": QUERY, "selection": {"capability": "cap-ex100"}, "rateLimit": 200})
        assert status == 201, r
        job_id = r["jobId"]
        while (await api.job(job_id))["total"] < 30:
            await asyncio.sleep(0.01)
        status, job = await api.call("POST", f"v1/jobs/{job_id}/pause",
                                     json={"cause": "night shift"})
        assert status == 200 and job["state"] == "PAUSED" and job["cause"] == "night shift"
        await w.fleet.wait_idle(10)
        await asyncio.sleep(0.3)
        paused = await api.job(job_id)
        assert paused["state"] == "PAUSED" and paused["total"] < n
        assert paused["etaSeconds"] is None
        await asyncio.sleep(0.5)
        assert (await api.job(job_id))["total"] == paused["total"]      # nothing new starts
        status, err = await api.call("POST", f"v1/jobs/{job_id}/pause")
        assert status == 409 and err["where"] == "jobId"
        status, job = await api.call("POST", f"v1/jobs/{job_id}/restart")
        assert status == 200 and job["state"] == "RUNNING"
        while (await api.job(job_id))["total"] < paused["total"] + 30:
            await asyncio.sleep(0.01)
        status, job = await api.call("POST", f"v1/jobs/{job_id}/cancel",
                                     json={"cause": "wrong nodes"})
        assert status == 200 and job["state"] == "CANCELLED" and job["cause"] == "wrong nodes"
        await w.fleet.wait_idle(10)
        await asyncio.sleep(0.3)
        final = await api.job(job_id)
        assert final["total"] < n
        assert set(final["counts"]) <= {"SUCCEEDED", "CANCELLED"}, final["counts"]
        assert final["counts"].get("SUCCEEDED", 0) > 0              # finished ones kept
        for state in ("PENDING", "NOTIFIED", "IN_PROGRESS", "WAITING_USER"):
            assert await api.all_tasks(job_id, limit=500, state=state) == []
        cancelled = await api.all_tasks(job_id, limit=500, state="CANCELLED")
        assert len(cancelled) == final["counts"].get("CANCELLED", 0)
        for action in ("pause", "restart", "cancel"):
            status, err = await api.call("POST", f"v1/jobs/{job_id}/{action}")
            assert status == 409 and err["where"] == "jobId", (action, err)
        status, err = await api.call("POST", f"v1/jobs/{job_id}/pause", json={"why": 1})
        assert status == 400 and err["where"] == "$.why"

    with_api(tmp_path, scenario, n=n, broker=FAST)


def test_get_jobs_filters_and_by_date(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        await register_all(w, 6)
        made = []
        for i, extra in enumerate([{}, {"owner": "ops"}, {"startAt": time.time() + 3600},
                                   {"owner": "ops", "name": "third"}]):
            status, r = await api.call("POST", "v1/jobs", json={
                "operation": QUERY, "selection": {"capability": "cap-ex100"}, **extra})
            assert status == 201, r
            made.append(r["jobId"])
            await asyncio.sleep(0.02)
        assert (await api.job(made[2]))["state"] == "SCHEDULED"
        status, page = await api.call("GET", "v1/jobs", params={"owner": "ops"})
        assert [j["jobId"] for j in page["items"]] == [made[1], made[3]]
        status, page = await api.call("GET", "v1/jobs", params={"state": "scheduled"})
        assert [j["jobId"] for j in page["items"]] == [made[2]]
        seen, cursor = [], None
        while True:
            status, page = await api.call("GET", "v1/jobs", params={
                "limit": 1, **({"cursor": cursor} if cursor else {})})
            assert status == 200 and len(page["items"]) <= 1
            seen += [j["jobId"] for j in page["items"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert seen == made
        created = [(await api.job(j))["created"] for j in made]
        assert created == sorted(created)
        status, page = await api.call("GET", "v1/jobs/by-date",
                                      params={"from": str(created[1]), "to": str(created[3])})
        assert [j["jobId"] for j in page["items"]] == made[1:3]
        status, page = await api.call("GET", "v1/jobs/by-date", params={"from": str(created[3])})
        assert [j["jobId"] for j in page["items"]] == made[3:]
        iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(created[0] - 60))
        seen, cursor = [], None
        while True:
            status, page = await api.call("GET", "v1/jobs/by-date", params={
                "from": iso, "limit": 3, **({"cursor": cursor} if cursor else {})})
            assert status == 200
            seen += [j["jobId"] for j in page["items"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert seen == made
        status, page = await api.call("GET", "v1/jobs/by-date",
                                      params={"from": str(created[3] + 1000)})
        assert page == {"items": [], "nextCursor": None}
        for j in made:
            if (await api.job(j))["state"] in ("RUNNING", "SCHEDULED"):
                await api.call("POST", f"v1/jobs/{j}/cancel")

    with_api(tmp_path, scenario, n=6, broker=FAST)


async def _bootstrap_side(w: World, msisdn: str, body: bytes, ctype: str) -> object:
    """The device applies the bootstrap it is sent and opens a session with the new account."""
    dev = w.fleet.by_msisdn[msisdn]
    msg = bootstrap.verify(body, ctype, dev.dev_id.split(":")[1].encode())   # NETWORKID = IMEI
    values = {c.items[0].target: c.items[0].data for c in msg.commands}
    base = "./DMAcc/dmengine/AppAuth"
    raw = lambda v: v.encode() if isinstance(v, str) else v     # noqa: E731
    dev.username = values[f"{base}/1/AAuthName"]
    dev.client_secret = values[f"{base}/1/AAuthSecret"]
    dev.server_secret = values[f"{base}/2/AAuthSecret"]
    dev.client_nonce = raw(values[f"{base}/1/AAuthData"])
    dev.server_nonce = raw(values[f"{base}/2/AAuthData"])
    w.fleet.spawn(w.fleet.run_session(dev))
    return True


def test_bulk_bootstrap_makes_a_job_with_a_task_per_target(tmp_path):
    n = 5

    async def scenario(w: World, api: Api) -> None:
        await register_all(w, n)
        d = [w.device(i) for i in range(n)]
        status, err = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"msisdn": d[0].msisdn}, {"msisdn": "+4915100000000"}]})
        assert status == 404 and err["where"] == "targets[1].msisdn"
        status, err = await api.call("POST", "v1/bootstrap", json={
            "target": {"msisdn": d[0].msisdn}, "targets": [{"msisdn": d[0].msisdn}]})
        assert status == 400 and err["where"] == "$.target"
        status, err = await api.call("POST", "v1/bootstrap", json={"targets": []})
        assert status == 400 and err["where"] == "$.targets"
        status, err = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"msisdn": d[0].msisdn}], "security": "USERPIN"})
        assert status == 400 and err["where"] == "pin"
        status, page = await api.call("GET", "v1/jobs")
        assert page["items"] == []

        targets = [{"msisdn": x.msisdn} for x in d] + [{"devId": d[0].dev_id}]
        status, r = await api.call("POST", "v1/bootstrap",
                                   json={"targets": targets, "name": "re-provision"})
        assert status == 201, r
        assert set(r) == {"jobId", "taskIds"} and len(r["taskIds"]) == n + 1
        assert r["taskIds"][0] == r["taskIds"][-1] and len(set(r["taskIds"])) == n
        job = await api.wait_job(r["jobId"], FINAL, timeout=30)
        assert job["state"] == "COMPLETED", job
        assert job["operation"] is None and job["targets"] == n and job["total"] == n
        assert job["counts"] == {"SUCCEEDED": n} and job["owner"] == "api"
        assert job["name"] == "re-provision"
        tasks = await api.all_tasks(r["jobId"], limit=2)
        assert sorted(t["taskId"] for t in tasks) == sorted(set(r["taskIds"]))
        assert {t["operation"] for t in tasks} == {"BOOTSTRAP"}
        # no secret leaves: not in the job's tasks, nor in getTaskById
        async with api.http.get(api.url + f"v1/jobs/{r['jobId']}/tasks",
                                headers=api.headers) as resp:
            text = await resp.text()
        for tid in r["taskIds"][:2]:
            async with api.http.get(api.url + f"v1/tasks/{tid}", headers=api.headers) as resp:
                text += await resp.text()
        for x in d:
            assert x.client_secret not in text and x.server_secret not in text
        rec = await w.store.get_device(d[0].dev_id)
        assert rec.account.client_password == d[0].client_secret     # stored, not shown

    with_api(tmp_path, scenario, n=n, broker=FAST, bootstrap_receiver=_bootstrap_side)


def test_bulk_update_job_with_a_stop_rule_over_http(tmp_path):
    """A firmware job through the API: the content is checked up front, the stop rule trips on
    the simulated failures and pauses the job with its cause, getTasks filters the failed."""
    from dmengine.simulator.device import FaultPlan
    n = 60
    faults = {i: FaultPlan(fail_update=410) for i in range(0, n, 2)}        # half fail

    async def scenario(w: World, api: Api) -> None:
        await register_all(w, n)
        content_id = await upload_firmware(w)
        status, r = await api.call("POST", "v1/jobs", json={
            "operation": {"operation": "UPDATE", "contentId": content_id},
            "selection": {"tac": w.device(0).dev_id[5:13]}, "concurrency": 10,
            "stopRule": {"maxFailureRatio": 0.3, "minFinished": 10}})
        assert status == 201 and r["targets"] == n, r
        job = await api.wait_job(r["jobId"], {"PAUSED", "COMPLETED"}, timeout=60)
        assert job["state"] == "PAUSED" and "error threshold" in job["cause"], job
        assert job["total"] < n
        await w.fleet.wait_idle(10)
        await asyncio.sleep(0.3)
        job = await api.job(r["jobId"])          # the sessions under way have finished
        failed = await api.all_tasks(r["jobId"], limit=7, state="FAILED")
        assert failed and len(failed) == job["counts"]["FAILED"]
        assert all(t["status"] == "FAILED" and t["cause"] for t in failed)

    with_api(tmp_path, scenario, n=n, broker=FAST, faults=faults)


# --- the CLI against `dmengine serve` -------------------------------------------------------------


def _cli(cwd: str, *args: str, key: str | None = None, url: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "dmengine", *args]
    if url:
        argv += ["--url", url]
    if key:
        argv += ["--api-key", key]
    env = {k: v for k, v in os.environ.items() if k != "DMENGINE_API_KEY"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def _post(url: str, key: str, body: Any) -> tuple[int, Any]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_cli_jobs_and_tasks_against_serve(tmp_path):
    """create / list / show / pause / restart / tasks / cancel through `dmengine jobs …` and
    `dmengine tasks …` against a real server (no gateway: tasks wait for their devices),
    with the exit statuses 0 (done), 1 (the API refused) and 2 (usage)."""
    cwd = str(tmp_path)
    p, urls = start(str(tmp_path / "var"))
    try:
        api, key = urls["API"], urls["API key"]
        assert _post(api + "v1/capabilities", key, {"oid": "cap-cli", "model": "C1"})[0] == 201
        for i in range(20):
            status, body = _post(api + "v1/devices", key, {
                "devId": f"IMEI:35000000000{i:04d}", "imei": f"35000000000{i:04d}",
                "msisdn": f"+49151000{i:04d}", "capability": "cap-cli"})
            assert status == 201, body
        op = tmp_path / "query.json"
        op.write_text(json.dumps(QUERY))

        # usage errors: nothing sent, exit 2
        r = _cli(cwd, "jobs", "create", "--operation-file", str(op), url=api, key=key)
        assert r.returncode == 2 and "name the devices" in r.stderr
        r = _cli(cwd, "jobs", "create", "--operation-file", str(op), "--capability", "cap-cli",
                 "--stages", "1,x", url=api, key=key)
        assert r.returncode == 2 and "--stages" in r.stderr
        r = _cli(cwd, "jobs", "create", "--operation-file", str(tmp_path / "none.json"),
                 "--capability", "cap-cli", url=api, key=key)
        assert r.returncode == 2 and "cannot read" in r.stderr
        assert _cli(cwd, "jobs", "frobnicate").returncode == 2
        assert _cli(cwd, "jobs", "show").returncode == 2
        # the API refuses: its message and field, exit 1
        r = _cli(cwd, "jobs", "create", "--operation-file", str(op), "--capability", "cap-cli",
                 "--stages", "50,10,100", url=api, key=key)
        assert r.returncode == 1 and "stages[1].percent" in r.stderr, r.stderr

        r = _cli(cwd, "jobs", "create", "--operation-file", str(op), "--capability", "cap-cli",
                 "--stages", "50,100", "--success-threshold", "0.9", "--concurrency", "5",
                 "--name", "cli job", "--window", "00:00-24:00", "--days", "mon-sun",
                 "--max-failure-ratio", "0.5", "--min-finished", "4", "--json",
                 url=api, key=key)
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        job_id = made["jobId"]
        assert made == {"jobId": job_id, "state": "RUNNING", "targets": 20}

        # the key from ./var/api-key (the data directory of `dmengine serve` here)
        r = _cli(cwd, "jobs", "show", job_id, url=api)
        assert r.returncode == 0, r.stderr
        assert "RUNNING" in r.stdout and "of 20 targets" in r.stdout and "stage" in r.stdout
        r = _cli(cwd, "jobs", "show", job_id, "--json", url=api)
        job = json.loads(r.stdout)
        assert job["stages"] == [{"percent": 50.0, "successThreshold": 0.9, "approval": False},
                                 {"percent": 100.0, "successThreshold": 0.0, "approval": False}]
        assert job["windows"] == [{"start": 0, "end": 86400, "days": list(range(7))}]
        assert job["stopRule"] == {"maxFailureRatio": 0.5, "minFinished": 4}
        r = _cli(cwd, "jobs", "list", url=api, key=key)
        assert r.returncode == 0 and job_id in r.stdout and "cli job" in r.stdout
        r = _cli(cwd, "jobs", "list", "--state", "completed", url=api, key=key)
        assert r.returncode == 0 and job_id not in r.stdout

        r = _cli(cwd, "jobs", "pause", job_id, "--cause", "checking", url=api, key=key)
        assert r.returncode == 0 and "PAUSED" in r.stdout and "checking" in r.stdout, r.stderr
        r = _cli(cwd, "jobs", "pause", job_id, url=api, key=key)
        assert r.returncode == 1 and "PAUSED" in r.stderr and "jobId" in r.stderr
        r = _cli(cwd, "jobs", "restart", job_id, url=api, key=key)
        assert r.returncode == 0 and "RUNNING" in r.stdout, r.stderr

        deadline = time.monotonic() + 20
        while True:                       # the scheduler makes the first stage's tasks
            r = _cli(cwd, "jobs", "tasks", job_id, "--json", "--all", "--limit", "3",
                     url=api, key=key)
            assert r.returncode == 0, r.stderr
            tasks = json.loads(r.stdout)["items"]
            if len(tasks) >= 5:
                break
            assert time.monotonic() < deadline, tasks
            time.sleep(0.2)
        assert len(tasks) <= 10 and all(t["status"] == "PENDING" for t in tasks)
        task_id = tasks[0]["taskId"]
        r = _cli(cwd, "jobs", "tasks", job_id, "--state", "pending", url=api, key=key)
        assert r.returncode == 0 and task_id in r.stdout
        r = _cli(cwd, "tasks", "get", task_id, url=api, key=key)
        assert r.returncode == 0 and "PENDING" in r.stdout and job_id in r.stdout
        shown = _cli(cwd, "tasks", "show", task_id, "--json", url=api, key=key)   # the alias
        got = _cli(cwd, "tasks", "get", task_id, "--json", url=api, key=key)
        assert shown.returncode == got.returncode == 0
        assert json.loads(shown.stdout)["taskId"] == json.loads(got.stdout)["taskId"] == task_id
        r = _cli(cwd, "tasks", "history", task_id, url=api, key=key)
        assert r.returncode == 0 and "PENDING" in r.stdout and "waiting" in r.stdout
        r = _cli(cwd, "tasks", "cancel", task_id, url=api, key=key)
        assert r.returncode == 0 and "CANCELLED" in r.stdout
        r = _cli(cwd, "tasks", "cancel", task_id, url=api, key=key)
        assert r.returncode == 1 and "already CANCELLED" in r.stderr
        r = _cli(cwd, "tasks", "get", "t-nope", url=api, key=key)
        assert r.returncode == 1 and "not_found" in r.stderr

        r = _cli(cwd, "jobs", "cancel", job_id, "--cause", "done testing", url=api, key=key)
        assert r.returncode == 0 and "CANCELLED" in r.stdout, r.stderr
        r = _cli(cwd, "jobs", "show", job_id, "--json", url=api, key=key)
        job = json.loads(r.stdout)
        assert job["state"] == "CANCELLED" and job["cause"] == "done testing"
        assert set(job["counts"]) == {"CANCELLED"}
        r = _cli(cwd, "jobs", "watch", job_id, "--interval", "0.1", url=api, key=key)
        assert r.returncode == 1 and "CANCELLED" in r.stdout     # ended, not completed
        r = _cli(cwd, "jobs", "get", "j-nope", url=api, key=key)
        assert r.returncode == 1 and "not_found" in r.stderr
        r = _cli(cwd, "jobs", "show", job_id, url=api, key="wrong")
        assert r.returncode == 1 and "unauthorized" in r.stderr
    finally:
        assert stop(p) == 0
    r = _cli(cwd, "jobs", "list", url=api, key=key)
    assert r.returncode == 1 and "cannot reach" in r.stderr
