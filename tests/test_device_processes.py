"""``serve --device-processes N``: the device port over several processes (dmengine/devprocs.py).

Driven as an operator and a device would: ``python -m dmengine serve`` in a subprocess, package
1s over fresh HTTP connections, a campaign through the API with the simulator's phones (the
campaign benchmark's own harness), ``kill -9`` of a device process and of the main one."""
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

from dmengine.simulator.device import DeviceProfile, VirtualDevice

from test_cli_serve import close_pipes, start


def serve(data_dir: str, *extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    return start(data_dir, *extra, stderr=None)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    close_pipes(p)


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:        # LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(0.05)


_NEXT_DEVICE = iter(range(10**6))


def resp_uri_of_package1(url: str) -> str:
    """Package 1 of a device not seen before (none of them is known: a device that fails
    more than five times must wait) on a new connection; the RespURI of the answer."""
    out = VirtualDevice(next(_NEXT_DEVICE), DeviceProfile(encoding="xml")).session(url=url).first()
    req = urllib.request.Request(url, data=out.body,
                                 headers={**dict(out.wire_headers), "Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            raise AssertionError(f"{e.code} {dict(e.headers)} {e.read()!r}") from None
    (uri,) = re.findall(r"<RespURI>(.*?)</RespURI>", text)
    return uri


def health(api: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(api + "health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        e.close()
        return e.code, body


def test_new_sessions_spread_and_each_names_its_own_process(tmp_path) -> None:
    """New connections to the device port reach both processes, and each answers with a
    RespURI naming a port of its own (not the shared device port): a device's next message,
    on any connection, reaches the process that holds its session.  Fails when RespURIs name
    the shared port (the kernel would hand half the next messages to a process that does
    not know the session)."""
    p, urls = serve(str(tmp_path / "var"), "--device-processes", "2", "--auth", "none")
    try:
        device_port = urls["device port"].split(":")[2].split("/")[0]
        ports = {resp_uri_of_package1(urls["device port"]).split(":")[2].split("/")[0]
                 for i in range(40)}
        assert device_port not in ports
        assert len(ports) == 2, ports            # 2 ** -39 to fail by chance
    finally:
        stop(p)


def test_the_main_process_share_of_new_connections_is_steered(tmp_path) -> None:
    """``--main-device-share 0``: the kernel hands every new connection to the device process
    (the port group's BPF program), the main one keeps the scheduler and the API to itself.
    Fails without the program (the kernel's even spread: 2 ** -39 to pass by chance)."""
    p, urls = serve(str(tmp_path / "var"), "--device-processes", "2", "--auth", "none",
                    "--main-device-share", "0")
    try:
        ports = {resp_uri_of_package1(urls["device port"]).split(":")[2].split("/")[0]
                 for i in range(40)}
        assert len(ports) == 1, ports
        (worker,) = children(p.pid)       # ... and the one port is the device process's
        assert int(ports.pop()) in listening_ports(worker)
    finally:
        stop(p)


def test_a_device_process_that_dies_is_started_again_and_health_says_so(tmp_path) -> None:
    """kill -9 of a device process: /health answers 503 naming it until the main process
    has started it again; killing the main process (no SIGTERM, nothing to tell the others)
    ends the device processes too: they see their standard input close."""
    p, urls = serve(str(tmp_path / "var"), "--device-processes", "2", "--auth", "none")
    api = urls["API"]
    try:
        assert health(api)[0] == 200
        (worker,) = children(p.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: health(api)[0] == 503, 5, "/health to see the dead process")
        code, body = health(api)
        assert code == 503 and "device process 1" in json.dumps(body), body
        wait_for(lambda: health(api)[0] == 200, 30, "the device process to be started again")
        (again,) = children(p.pid)
        assert again != worker
        # the new one takes new sessions too
        ports = {resp_uri_of_package1(urls["device port"]).split(":")[2].split("/")[0]
                 for _ in range(40)}
        assert len(ports) == 2, ports
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        wait_for(lambda: not alive(again), 15, "the device process to stop with its main")
    finally:
        stop(p)


def test_a_campaign_over_two_processes_completes_and_metrics_count_both(monkeypatch) -> None:
    """The campaign benchmark's path with ``--device-processes 2``: import, package, job
    through the API; the simulator's phones (package 0 over the HTTP gateway, FUMO sessions
    with downloads, Generic Alerts, failures, drops) against both processes sharing the
    store.  The job's counts equal what the phones did, every session completed, and the
    main process's /metrics counts the sessions of both processes (fails without the
    device processes' metrics added in: the main process alone started about half)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import bench_campaign
    monkeypatch.setenv("DMENGINE_CAMPAIGN_SERVE_ARGS", "--device-processes 2")
    o = bench_campaign.campaign(300, 100)          # raises unless the counts agree
    assert o.job["succeeded"] + o.job["failed"] == 300
    outcomes = o.sim["outcomes"]
    assert set(outcomes) == {"completed"}, outcomes
    assert o.metrics["dmengine_device_sessions_started_total"] == o.sim["sessions"], \
        (o.metrics.get("dmengine_device_sessions_started_total"), o.sim["sessions"])


def api_call(api: str, key: str, method: str, path: str, body: bytes | None = None,
             ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(api + path, data=body, method=method,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}")


def post_dm(url: str, out) -> bytes:
    req = urllib.request.Request(url, data=out.body,
                                 headers={**dict(out.wire_headers), "Connection": "close"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def test_tasks_of_sessions_lost_with_a_device_process_are_put_back(tmp_path) -> None:
    """A device process dies (kill -9) while a device's session in it has a job task: the
    main process puts the task back to PENDING (its cause says why), and the device's next
    session finishes it.  Fails without the recovery: the task would stay IN_PROGRESS until
    its deadline, days away."""
    import threading

    from dmengine.simulator.fleet import registration_csv

    p, urls = start(str(tmp_path / "var"), "--device-processes", "2")
    err: list[str] = []
    worker_port = threading.Event()

    def drain() -> None:                 # the device process says where its sessions are
        assert p.stderr is not None
        for line in p.stderr:
            err.append(line)
            if "its sessions on port" in line:
                worker_port.set()
    threading.Thread(target=drain, daemon=True).start()
    try:
        api, key = urls["API"], urls["API key"]
        assert worker_port.wait(30)
        port = int(re.search(r"its sessions on port (\d+)",
                             next(x for x in err if "its sessions on port" in x)).group(1))
        dev = VirtualDevice(77, DeviceProfile(encoding="xml"))
        code, rep = api_call(api, key, "POST", "v1/devices/import",
                             b"".join(registration_csv([dev])), "text/csv")
        assert code == 200 and rep["created"] == 1, rep
        code, job = api_call(api, key, "POST", "v1/jobs", json.dumps({
            "name": "query", "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]},
            "selection": {"devIds": [dev.dev_id]}}).encode())
        assert code == 201, job
        # the device's session, in the device process (its own port takes package 1s too);
        # it gets the job's command and never answers it
        worker_url = f"http://127.0.0.1:{port}/dm"
        cs = dev.session(url=worker_url)
        cs.receive(post_dm(worker_url, cs.first()))

        def task() -> dict:
            code, page = api_call(api, key, "GET", f"v1/jobs/{job['jobId']}/tasks")
            assert code == 200, page
            return page["items"][0] if page["items"] else {}
        try:
            wait_for(lambda: task().get("status") == "IN_PROGRESS", 10, "the session to start it")
        except AssertionError:
            raise AssertionError(f"{task()} {err[-15:]}")
        (worker,) = children(p.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: task().get("status") == "PENDING", 15, "the task to be put back")
        code, hist = api_call(api, key, "GET", f"v1/tasks/{task()['taskId']}/history")
        assert "device process" in json.dumps(hist), hist
        # the device comes again (any process): the task is done
        cs = dev.session(url=urls["device port"])
        out = cs.first()
        while out is not None:
            cs.receive(post_dm(cs.url, out))
            out = cs.next()
        wait_for(lambda: task().get("status") == "SUCCEEDED", 15, "the task to succeed")
    finally:
        stop(p)
