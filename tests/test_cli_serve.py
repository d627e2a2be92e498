"""`dmengine serve` (what `make run` starts): prints its URLs and API key, serves both ports,
keeps the API key across restarts, and exits cleanly on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

LINE = re.compile(r"^(device port|API|docs|metrics|health|content|API key): (\S+)$")


def start(data_dir: str, *extra: str, stderr: int | None = subprocess.PIPE
          ) -> tuple[subprocess.Popen, dict[str, str]]:
    """``dmengine serve`` on free ports (``extra``: more options) and what it printed: its
    URLs and API key by label.  ``stderr=None``: its log goes to this process's stderr."""
    p = subprocess.Popen([sys.executable, "-m", "dmengine", "serve", "--data", data_dir,
                          "--device-port", "0", "--api-port", "0", *extra],
                         stdout=subprocess.PIPE, stderr=stderr, text=True)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 60
    assert p.stdout is not None
    while "API key" not in seen:
        assert time.monotonic() < deadline, f"serve printed only {seen}"
        line = p.stdout.readline()
        if not line:
            try:
                raise AssertionError(f"serve exited: {p.wait()} {p.stderr.read() if p.stderr else ''}")
            finally:
                close_pipes(p)
        m = LINE.match(line.strip())
        if m:
            seen[m.group(1)] = m.group(2)
    return p, seen


def stop(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    finally:
        close_pipes(p)


def close_pipes(p: subprocess.Popen) -> None:
    """The pipes of an ended child: left to the GC they are a ResourceWarning (an error here)."""
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            f.close()


def get(url: str, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_prints_urls_serves_and_stops_on_sigterm(tmp_path):
    data = str(tmp_path / "var")
    p, urls = start(data)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dm", urls["device port"])
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", urls["API"])
        assert urls["metrics"] == urls["API"] + "metrics"
        key = urls["API key"]
        assert get(urls["health"]) == (200, b'{"status":"ok"}')
        status, body = get(urls["metrics"])
        assert status == 200 and b"dmengine_device_messages_received_total" in body
        # the docs and the OpenAPI document need no key; the operations do
        status, body = get(urls["docs"])
        assert status == 200 and b"swagger-ui" in body
        status, body = get(urls["API"] + "openapi.json")
        assert status == 200 and b'"operationId":"doOperation"' in body
        assert get(urls["API"] + "v1/tasks/nope")[0] == 401
        status, body = get(urls["API"] + "v1/tasks/nope", key)
        assert status == 404 and json.loads(body)["error"] == "not_found"
        # The device port answers a GET on /dm with 405 (devices POST).
        assert get(urls["device port"])[0] == 405
        assert oct(os.stat(os.path.join(data, "api-key")).st_mode & 0o777) == "0o600"
    finally:
        rc = stop(p)
    assert rc == 0
    # The key is kept for the next start; the store survived the restart.
    p2, urls2 = start(data)
    try:
        assert urls2["API key"] == key
    finally:
        assert stop(p2) == 0
    check = subprocess.run([sys.executable, "-m", "dmengine", "store", "check", "--data",
                            os.path.join(data, "store")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("args,needle", [
    (["serve", "--auth", "nope"], "invalid choice"),
    (["serve", "--gateway", "smoke:signals"], "configuration error (gateway): unknown gateway"),
    (["serve", "--device-processes", "2", "--main-device-share", "1.5"],
     "configuration error (main_device_share)"),
])
def test_serve_refuses_bad_configuration(tmp_path, args, needle):
    r = subprocess.run([sys.executable, "-m", "dmengine", *args, "--data", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert needle in r.stderr


def test_serve_on_a_taken_port_says_so(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dmengine", "serve", "--data", str(tmp_path),
                            "--device-port", str(port), "--api-port", "0"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cannot start" in r.stderr and "Traceback" not in r.stderr
