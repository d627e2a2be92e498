"""`dmengine serve` options for the scheduler's clock and budgets (issue 14): they reach the
running scheduler, and a value it could not work with stops `serve` at once with exit status 2
and a message naming the option."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from dmengine.cli import _broker_config, build_parser
from dmengine.config import BrokerConfig
from dmengine.errors import ConfigError

from test_cli_serve import LINE, close_pipes, stop


def _serve(data: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dmengine", "serve", "--data", data,
                             "--device-port", "0", "--api-port", "0", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("options, named", [
    (["--retry-delays", "60,0"], "--retry-delays"),
    (["--retry-delays", "soon"], "--retry-delays"),
    (["--retry-jitter", "1.5"], "--retry-jitter"),
    (["--max-notifications", "0"], "--max-notifications"),
    (["--task-ttl", "-5"], "--task-ttl"),
    (["--claim-lease", "0"], "--claim-lease"),
    (["--claim-page", "20000"], "--claim-page"),
    (["--max-notify-rate", "0"], "--max-notify-rate"),
    (["--max-in-flight", "0"], "--max-in-flight"),
    (["--alert-wait", "nan"], "--alert-wait"),
    (["--alert-followups", "-1"], "--alert-followups"),
    (["--scheduler-tick", "0"], "--scheduler-tick"),
    (["--job-batch", "0"], "--job-batch"),
])
def test_a_refused_value_names_its_option_and_serve_does_not_start(tmp_path, options, named):
    p = _serve(str(tmp_path / "var"), *options)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2, (out, err)
    assert named in err, err
    assert "API key" not in out                  # nothing was served


def test_options_become_the_broker_config():
    args = build_parser().parse_args([
        "serve", "--retry-delays", "5,30,120", "--retry-jitter", "0", "--max-notifications",
        "6", "--task-ttl", "3600", "--claim-lease", "45", "--claim-page", "500",
        "--max-notify-rate", "250", "--max-in-flight", "1000", "--alert-wait", "600",
        "--alert-followups", "5", "--scheduler-tick", "0.5", "--job-batch", "100",
        "--notify-parallel", "64", "--server-id", "acme"])
    cfg = _broker_config(args)
    assert (cfg.retry_delays, cfg.retry_jitter, cfg.max_notifications, cfg.task_ttl) == \
        ((5.0, 30.0, 120.0), 0.0, 6, 3600.0)
    assert (cfg.claim_lease, cfg.claim_page, cfg.max_notify_rate, cfg.max_in_flight) == \
        (45.0, 500, 250.0, 1000)
    assert (cfg.alert_wait, cfg.alert_followups, cfg.tick_interval, cfg.job_batch,
            cfg.notify_parallel, cfg.server_id) == (600.0, 5, 0.5, 100, 64, "acme")
    # options not given keep the defaults
    assert _broker_config(build_parser().parse_args(["serve"])) == BrokerConfig()


def test_the_config_refuses_what_no_scheduler_could_work_with():
    for bad, field in ((dict(retry_delays=()), "retry_delays"),
                       (dict(tick_interval=float("inf")), "tick_interval"),
                       (dict(notify_ui_mode=7), "notify_ui_mode"),
                       (dict(resync_after=0), "resync_after"),
                       (dict(claim_page=0), "claim_page")):
        with pytest.raises(ConfigError) as ei:
            BrokerConfig(**bad)          # type: ignore[arg-type]
        assert ei.value.key == field


class _Receiver(http.server.BaseHTTPRequestHandler):
    posts: list[float] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


def _call(url: str, key: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None
                                 else None, headers={"X-API-Key": key,
                                                     "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def test_retry_delays_and_max_notifications_reach_the_running_scheduler(tmp_path):
    """A device that never connects, with ``--retry-delays 0.3 --max-notifications 2``: two
    package #0 about 0.3 s apart, then the task expires — seconds, where the defaults would
    take an hour and four notifications."""
    _Receiver.posts = []
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    gw = f"http:http://127.0.0.1:{receiver.server_address[1]}/pkg0"
    p = _serve(str(tmp_path / "var"), "--gateway", gw, "--allow-private-callbacks",
               "--scheduler-tick", "0.05", "--retry-delays", "0.3", "--retry-jitter", "0",
               "--max-notifications", "2")
    try:
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 30
        assert p.stdout is not None
        while "API key" not in seen:
            assert time.monotonic() < deadline, seen
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            m = LINE.match(line.strip())
            if m:
                seen[m.group(1)] = m.group(2)
        api, key = seen["API"], seen["API key"]
        status, _ = _call(api + "v1/devices", key, {
            "devId": "IMEI:356938035643809", "imei": "356938035643809", "msisdn": "+491701234567",
            "account": {"serverId": "dmengine", "clientName": "dev1",
                        "clientPassword": "client-secret", "serverPassword": "server-secret"}})
        assert status == 201
        status, made = _call(api + "v1/operations", key, {
            "target": {"devId": "IMEI:356938035643809"},
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        task_url = api + f"v1/tasks/{made['taskId']}"
        deadline = time.monotonic() + 20
        while True:
            _, task = _call(task_url, key)
            if task["status"] == "EXPIRED":
                break
            assert time.monotonic() < deadline, task
            time.sleep(0.05)
        assert "after 2 notifications" in task["cause"], task
        assert task["attempts"] == 2 and len(_Receiver.posts) == 2
        assert _Receiver.posts[1] - _Receiver.posts[0] >= 0.25     # the retry delay
    finally:
        if p.poll() is None:
            stop(p)
        close_pipes(p)
        receiver.shutdown()
        receiver.server_close()        # the listening socket, else a ResourceWarning
