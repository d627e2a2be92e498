"""Issue 17 end to end: Debian's Prometheus scrapes a running engine while simulated devices
run DM sessions over HTTP and a small job runs through the API; Prometheus's query API then
shows exactly what the test did — sessions, messages, notifications, tasks by state, the job's
progress while it runs — and, once the job is cancelled, its per-job series is gone and its
tasks count as cancelled.  (REAL-PARTS.md: Prometheus; `make deps` installs it.)"""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Callable

import aiohttp

from dmengine.broker import BrokerConfig
from dmengine.engine import Engine, EngineConfig
from dmengine.model import Device, DmAccount
from dmengine.notify.loopback import LoopbackGateway
from dmengine.simulator.device import DeviceProfile
from dmengine.simulator.fleet import Fleet

from test_prometheus import prometheus_for, query   # noqa: F401  (prometheus_for: a fixture)

QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}
N, SILENT = 6, 2          # devices; of them, phones switched off (their tasks stay NOTIFIED)


def b64(b: bytes | None) -> str | None:
    return base64.b64encode(b).decode() if b else None


async def until(prom: int, checks: dict[str, Callable[[list[dict[str, Any]]], bool]],
                timeout: float = 45.0) -> dict[str, list[dict[str, Any]]]:
    """Polls Prometheus until every query's result passes its check (the first sample of a
    new target takes ~5.5 s: service discovery hands targets over on a 5 s tick)."""
    end = time.monotonic() + timeout
    got: dict[str, list[dict[str, Any]]] = {}
    while True:
        for expr, ok in checks.items():
            try:
                got[expr] = await asyncio.to_thread(query, prom, expr)
            except OSError:
                got[expr] = []
        bad = [e for e, ok in checks.items() if not ok(got[e])]
        if not bad:
            return got
        assert time.monotonic() < end, f"Prometheus never showed {bad}: {got}"
        await asyncio.sleep(0.5)


def one(v: float) -> Callable[[list[dict[str, Any]]], bool]:
    """A check: exactly one series, of value ``v``."""
    return lambda res: len(res) == 1 and abs(float(res[0]["value"][1]) - v) < 1e-9


def test_prometheus_sees_sessions_messages_tasks_and_job_progress(tmp_path, prometheus_for):
    import uvloop

    async def main() -> None:
        prof = DeviceProfile()
        fleet = Fleet(prof, N, seed=11)
        silent = {d.msisdn for d in fleet.devices[N - SILENT:]}

        async def on_pkg0(msisdn: str, pkg0: bytes) -> object:
            if msisdn in silent:
                return True                      # accepted by the SMSC; the phone is off
            return await fleet.on_pkg0(msisdn, pkg0)

        engine = Engine(EngineConfig(
            data_dir=str(tmp_path / "var"), device_port=0, api_port=0, metrics_interval=0.5,
            broker=BrokerConfig(retry_delays=(600.0,), tick_interval=0.05, retry_jitter=0.0)),
            gateway=LoopbackGateway(on_pkg0))
        await engine.start()
        prof.server_url = engine.device_url
        headers = {"X-API-Key": engine.api_key}
        try:
            ids = []
            for d in fleet.devices:
                await engine.store.create_device(Device(
                    dev_id=d.dev_id, msisdn=d.msisdn,
                    account=DmAccount(server_id="dmengine", client_name=d.username,
                                      client_password=d.client_secret,
                                      server_password=d.server_secret,
                                      client_nonce=b64(d.client_nonce),
                                      server_nonce=b64(d.server_nonce))))
                ids.append(d.dev_id)
            prom = prometheus_for(engine.api_port)
            # DM sessions the devices start themselves: 2 each
            await fleet.run(sessions_per_device=2, concurrency=N)
            async with aiohttp.ClientSession(headers=headers) as http:
                async with http.post(engine.api_url + "v1/jobs", json={
                        "operation": QUERY, "selection": {"devIds": ids},
                        "name": "prometheus check"}) as r:
                    body = await r.json()
                    assert r.status == 201, body
                job_id = body["jobId"]
                end = time.monotonic() + 30
                while True:
                    async with http.get(engine.api_url + f"v1/jobs/{job_id}") as r:
                        job = await r.json()
                    if job["succeeded"] == N - SILENT:
                        break
                    assert time.monotonic() < end, job
                    await asyncio.sleep(0.05)
                assert job["state"] == "RUNNING" and job["counts"] == {
                    "SUCCEEDED": N - SILENT, "NOTIFIED": SILENT}, job
                await fleet.wait_idle(timeout=10)
                sessions, messages = fleet.stats.sessions, fleet.stats.messages
                assert sessions == 2 * N + (N - SILENT)

                got = await until(prom, {
                    'up{job="dmengine"}': one(1),
                    "sum(dmengine_device_sessions_started_total)": one(sessions),
                    'dmengine_device_sessions_ended_total{reason="completed"}': one(sessions),
                    "dmengine_device_session_seconds_count": one(sessions),
                    "sum(dmengine_device_messages_received_total)": one(messages),
                    "sum(dmengine_device_messages_sent_total)": one(messages),
                    "dmengine_device_sessions_in_flight": one(0),
                    'dmengine_notifications_total{gateway="loopback",result="sent"}': one(N),
                    'dmengine_tasks_created_total{operation="QUERY"}': one(N),
                    'dmengine_tasks{state="SUCCEEDED"}': one(N - SILENT),
                    'dmengine_tasks{state="NOTIFIED"}': one(SILENT),
                    'dmengine_jobs{state="RUNNING"}': one(1),
                    f'dmengine_job_progress_ratio{{job_id="{job_id}"}}': one((N - SILENT) / N),
                    f'dmengine_job_eta_seconds{{job_id="{job_id}"}}':
                        lambda res: len(res) == 1 and float(res[0]["value"][1]) > 0,
                    'dmengine_charging_events_total{kind="QUERY"}': one(N - SILENT),
                    'dmengine_api_requests_total{route="createDeployments",status="201",'
                    'role="admin"}': one(1),
                    "dmengine_store_commit_seconds_count": lambda res: len(res) == 1 and
                    float(res[0]["value"][1]) > 0,
                    "process_resident_memory_bytes": lambda res: len(res) == 1,
                })
                # none of our labels clashes with the target's own (job, instance): Prometheus
                # would have renamed it exported_job / exported_instance
                for clash in ("exported_job", "exported_instance"):
                    assert query(prom, f'{{__name__=~"dmengine_.+",{clash}!=""}}') == []

                # the job is cancelled: its series goes (Prometheus marks it stale) and the
                # tasks of the switched-off phones count as cancelled
                async with http.post(engine.api_url + f"v1/jobs/{job_id}/cancel") as r:
                    assert r.status == 200, await r.text()
                await until(prom, {
                    'dmengine_jobs{state="CANCELLED"}': one(1),
                    'dmengine_jobs{state="RUNNING"}': one(0),
                    'dmengine_tasks{state="CANCELLED"}': one(SILENT),
                    'dmengine_tasks{state="SUCCEEDED"}': one(N - SILENT),
                    "dmengine_job_progress_ratio": lambda res: res == [],
                    'dmengine_task_transitions_total{state="CANCELLED"}': one(SILENT),
                })
        finally:
            await fleet.wait_idle(timeout=10)
            fleet.close()
            await engine.stop()

    uvloop.run(main())
