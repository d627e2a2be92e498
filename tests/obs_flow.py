"""A full run of a real ``dmengine serve`` for the observability tests (tests/test_logs.py,
tests/test_deploy.py): keys, a user and its session, devices with DM credentials imported
over the API, a webhook subscription with its secret, DM sessions with MD5 authentication
(one device with wrong credentials, one undecodable message), a doOperation and a job woken
by package 0 through the HTTP gateway (the simulator's SMS centre), the deliveries received.

It returns every secret the run used, the server's whole log (stderr) and its /metrics text.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from dmengine.simulator.device import DeviceProfile
from dmengine.simulator.fleet import FaultShares, Fleet, registration_csv
from dmengine.simulator.pkg0http import Pkg0Listener

LINE = re.compile(r"^(device port|API|API key): (\S+)$")
QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}
GATEWAY_SECRET = "gw-Secret-7f3a9c"          # in the gateway URL's query, as Kannel's is
USER_PASSWORD = "alice-Pa55word-91e2"
N_DEVICES = 6


@dataclasses.dataclass
class Run:
    secrets: dict[str, str]             # what → the secret
    log: str                            # the server's stderr, whole
    metrics: str                        # /metrics after the traffic
    ready: tuple[int, Any]
    task_id: str
    job_id: str
    job_task_ids: list[str]
    dev_ids: list[str]
    bad_dev_id: str
    returncode: int


def fleet_with_one_impostor() -> Fleet:
    """N_DEVICES phones, exactly one of them with wrong credentials (the first seed that
    gives one: the plan is a function of (seed, index))."""
    for seed in range(1, 200):
        fleet = Fleet(DeviceProfile(), N_DEVICES, seed=seed, faults=FaultShares(
            wrong_credentials=0.2))
        if sum(d.faults.wrong_credentials for d in fleet.devices) == 1:
            return fleet
        fleet.close()
    raise AssertionError("no seed gives one device with wrong credentials")


async def _call(http: aiohttp.ClientSession, method: str, url: str, want: int,
                headers: dict[str, str], **kw: Any) -> Any:
    async with http.request(method, url, headers=headers, **kw) as r:
        body = await r.json(content_type=None)
        assert r.status == want, (method, url, r.status, body)
        return body


async def full_run(tmp_path: Any) -> Run:
    fleet = fleet_with_one_impostor()
    bad = next(d for d in fleet.devices if d.faults.wrong_credentials)
    good = [d for d in fleet.devices if not d.faults.wrong_credentials]
    listener = Pkg0Listener(fleet)
    await listener.start()
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(json.loads(await request.read()))
        return web.Response(status=204)
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "dmengine", "serve", "--data", str(tmp_path / "var"),
             "--device-port", "0", "--api-port", "0", "--log-format", "json",
             "--log-level", "debug", "--allow-private-callbacks", "--scheduler-tick", "0.2",
             "--gateway", f"http:{listener.url}?password={GATEWAY_SECRET}"],
            stdout=subprocess.PIPE, stderr=err, text=True)
    secrets: dict[str, str] = {"gateway password": GATEWAY_SECRET,
                               "user password": USER_PASSWORD}
    try:
        urls = await asyncio.get_running_loop().run_in_executor(None, _announced, p)
        api, admin = urls["API"], urls["API key"]
        secrets["serve API key"] = admin
        fleet.profile.server_url = urls["device port"]
        A = {"X-API-Key": admin}
        async with aiohttp.ClientSession() as http:
            key = await _call(http, "POST", api + "v1/keys", 201, A,
                              json={"name": "oss", "role": "operator"})
            secrets["created API key"] = key["apiKey"]
            K = {"X-API-Key": key["apiKey"]}
            await _call(http, "POST", api + "v1/users", 201, A,
                        json={"name": "alice", "role": "operator", "password": USER_PASSWORD,
                              "system": "oss"})
            login = await _call(http, "POST", api + "v1/login", 200, {},
                                json={"userName": "alice", "password": USER_PASSWORD})
            secrets["userSession"] = login["userSession"]
            U = {"Authorization": f"Bearer {login['userSession']}"}
            for d in fleet.devices:
                secrets[f"{d.dev_id} client password"] = d.client_secret
                secrets[f"{d.dev_id} server password"] = d.server_secret
                secrets[f"{d.dev_id} client nonce"] = base64.b64encode(d.client_nonce).decode()
                secrets[f"{d.dev_id} server nonce"] = base64.b64encode(d.server_nonce).decode()
            # the impostor is on record too (its phone sends a wrong digest: the fault)
            csv = b"".join(registration_csv(fleet.devices))
            rep = await _call(http, "POST", api + "v1/devices/import", 200,
                              {**K, "Content-Type": "text/csv"}, data=csv)
            assert rep["created"] == N_DEVICES, rep
            sub = await _call(http, "POST", api + "v1/subscriptions", 201, K,
                              json={"url": hook_url, "events": ["task", "job"]})
            secrets["webhook secret"] = sub["secret"]
            # one device: doOperation; the others: a job (package 0 → their sessions)
            op = await _call(http, "POST", api + "v1/operations", 201, K,
                             json={"target": {"msisdn": good[0].msisdn}, "operation": QUERY})
            job = await _call(http, "POST", api + "v1/jobs", 201, K,
                              json={"operation": QUERY, "name": "obs",
                                    "selection": {"devIds": [d.dev_id for d in good[1:]]}})
            # the impostor calls in itself: its MD5 digest does not match
            await fleet.run_session(bad)
            async with http.post(urls["device port"], data=b"\x00 not syncml",
                                 headers={"Content-Type": "application/vnd.syncml.dm+wbxml"}
                                 ) as r:
                assert r.status == 400
            end = time.monotonic() + 60
            while True:
                t = await _call(http, "GET", api + f"v1/tasks/{op['taskId']}", 200, U)
                j = await _call(http, "GET", api + f"v1/jobs/{job['jobId']}", 200, U)
                done = {x["data"]["taskId"] for x in received if x["type"] == "task.finished"}
                if t["status"] == "SUCCEEDED" and j["state"] == "COMPLETED" \
                        and len(done) >= len(good):
                    break
                assert time.monotonic() < end, (t, j, received)
                await asyncio.sleep(0.2)
            tasks = await _call(http, "GET", api + f"v1/jobs/{job['jobId']}/tasks", 200, U)
            async with http.get(api + "metrics") as r:
                metrics = await r.text()
            async with http.get(api + "ready") as r:
                ready = (r.status, await r.json())
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        if p.stdout is not None:
            p.stdout.close()
        fleet.close()
        await listener.close()
        await runner.cleanup()
    return Run(secrets=secrets, log=log_path.read_text(), metrics=metrics, ready=ready,
               task_id=op["taskId"], job_id=job["jobId"],
               job_task_ids=[x["taskId"] for x in tasks["items"]],
               dev_ids=[d.dev_id for d in good], bad_dev_id=bad.dev_id, returncode=rc)


def _announced(p: subprocess.Popen) -> dict[str, str]:
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 30
    assert p.stdout is not None
    while "API key" not in seen:
        assert time.monotonic() < deadline, f"serve printed only {seen}"
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited: {p.wait()}")
        m = LINE.match(line.strip())
        if m:
            seen[m.group(1)] = m.group(2)
    return seen
