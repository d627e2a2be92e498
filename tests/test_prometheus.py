"""A real Prometheus (Debian's package) scrapes the API port's /metrics while simulated devices
run sessions and a task; the query API then shows our counters (REAL-PARTS.md recipe)."""
from __future__ import annotations

import base64
import json
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from dmengine.engine import Engine, EngineConfig
from dmengine.model import Device, DmAccount, QueryOp, TaskState
from dmengine.notify.loopback import LoopbackGateway
from dmengine.simulator.device import DeviceProfile
from dmengine.simulator.fleet import Fleet

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.fixture
def prometheus_for(tmp_path):
    procs: list[subprocess.Popen] = []
    logs: list = []

    def start(target_port: int) -> int:
        assert pathlib.Path(PROMETHEUS).exists(), \
            "prometheus is not installed: run `make deps` (the Makefile installs it)"
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: dmengine\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
        # its log goes to a file (a pipe nobody reads could fill and stall it)
        log = open(tmp_path / "prometheus.log", "wb")
        logs.append(log)
        p = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}",
                              f"--storage.tsdb.path={tmp_path / 'data'}",
                              f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                             stdout=subprocess.DEVNULL, stderr=log)
        procs.append(p)
        return port

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in logs:
        f.close()


def test_prometheus_scrapes_device_and_task_counters(tmp_path, prometheus_for):
    import uvloop

    async def main() -> None:
        prof = DeviceProfile()
        fleet = Fleet(prof, 5, seed=3)
        engine = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0),
                        gateway=LoopbackGateway(fleet.on_pkg0))
        await engine.start()
        prof.server_url = engine.device_url
        try:
            for d in fleet.devices:
                await engine.store.create_device(Device(
                    dev_id=d.dev_id, msisdn=d.msisdn,
                    account=DmAccount(server_id="dmengine", client_name=d.username,
                                      client_password=d.client_secret,
                                      server_password=d.server_secret,
                                      client_nonce=base64.b64encode(d.client_nonce).decode(),
                                      server_nonce=base64.b64encode(d.server_nonce).decode())))
            await fleet.run(sessions_per_device=2, concurrency=5)       # 10 sessions
            tid = await engine.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]),
                                                   msisdn=fleet.devices[0].msisdn)
            import asyncio
            for _ in range(500):
                if (await engine.store.get_task(tid)).state == TaskState.SUCCEEDED:
                    break
                await asyncio.sleep(0.02)
            await fleet.wait_idle(timeout=10)
            prom = prometheus_for(engine.api_port)
            # The first sample shows up after ~5.5 s (service discovery ticks every 5 s).
            deadline = time.monotonic() + 30
            got: dict[str, float] = {}
            while time.monotonic() < deadline:
                try:
                    for expr in ('sum(dmengine_device_messages_received_total)',
                                 'sum(dmengine_device_sessions_started_total)',
                                 'dmengine_task_transitions_total{state="SUCCEEDED"}',
                                 'dmengine_notifications_total{result="sent"}',
                                 'up{job="dmengine"}'):
                        res = query(prom, expr)
                        if res:
                            got[expr] = float(res[0]["value"][1])
                except OSError:
                    pass
                if len(got) == 5:
                    break
                await asyncio.sleep(0.5)
            assert got.get('up{job="dmengine"}') == 1.0, got
            assert got['sum(dmengine_device_sessions_started_total)'] >= 11, got
            assert got['sum(dmengine_device_messages_received_total)'] >= 11, got
            assert got['dmengine_task_transitions_total{state="SUCCEEDED"}'] == 1.0, got
            assert got['dmengine_notifications_total{result="sent"}'] == 1.0, got
        finally:
            fleet.close()
            await engine.stop()

    uvloop.run(main())
