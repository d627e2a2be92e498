"""The DMWSI API port under load (``python -m bench api``).

The engine runs as a user runs it: ``python -m dmengine serve --data DIR`` in its own process
(pinned to CPU 0 when there are two), the API key read from what it prints.  One device and
one QUERY task are made through the API (no gateway: the task waits for its device).  Then,
in the same run, rounds that alternate:

* ``getTaskById`` — ``GET /v1/tasks/{taskId}`` of the real app: the key check, the store read
  (LMDB), the TaskData answer (redacted, camelCase) — against a **bare aiohttp handler** that
  answers the same path with the same bytes (a process of its own, same CPU, same uvloop,
  no middleware, no store): what the API's own work costs on top of aiohttp.  Target: the
  ratio ≥ 0.7;
* ``doOperation`` — ``POST /v1/operations`` (a QUERY of one node on that device): a task
  written to the store (group commit) and its first notification tried, per request.

The load comes from ``wrk`` (Debian's, pinned to CPU 1) with keep-alive connections; without
wrk, from an asyncio client in a second process writing raw HTTP/1.1 on keep-alive sockets.
The machine is shared and noisy: the row's value is the median over the rounds and the ratio
the median of the per-round ratios (each round runs both sides back to back).

The same comparison is also counted in instructions (``valgrind --tool=callgrind``, through
bench.common's ``Callgrind`` as bench_metrics does, address-space randomisation off): a second
engine and a second bare handler run under callgrind, answer
getTaskById on one keep-alive connection one request at a time, and ``callgrind_control``
zeroes the counters before the measured requests and dumps them after.  Instructions do not
depend on what else runs on the machine, where CPU time per request moves by ±10 % or more.
They count against the engine somewhat: its timers (the scheduler's pass, the job tally)
fire by the wall clock, and a request under callgrind takes some fifty times longer, so
their work is spread over fewer requests than in a real run.

And counted once more under load: the same two servers under callgrind answer ``wrk`` on
32 keep-alive connections for a while, instructions divided by the requests wrk counted.
This is the case the wall-clock rounds measure, without their noise: work done once per
turn of the event loop for all the requests that are ready (the engine checks a key once
per turn, :meth:`dmengine.identity.Identities.known`) is shared as it is in a real run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from bench.common import ROOT, Callgrind, HttpConn, Row, write_results

NAME = "api"
SERVER_CPU, CLIENT_CPU = "0", "1"
LINE = re.compile(r"^(API|API key): (\S+)$")

#: the bare aiohttp app of the baseline: one GET and one POST route answering fixed bytes
BARE_APP = r'''
import sys, uvloop
from aiohttp import web
body = sys.stdin.buffer.read()
async def get(request):
    return web.Response(body=body, content_type="application/json")
async def post(request):
    await request.read()
    return web.Response(body=b'{"taskId":"t0000000000000000000000000000"}', status=201,
                        content_type="application/json")
app = web.Application()
app.router.add_get("/v1/tasks/{taskId}", get)
app.router.add_post("/v1/operations", post)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    import asyncio
    await asyncio.Event().wait()
uvloop.run(main())
'''

#: the fallback load generator (no wrk): N keep-alive connections for D seconds
RAW_CLIENT = r'''
import asyncio, sys, time, uvloop
host, port, conns, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
request = sys.stdin.buffer.read()
done = 0
bad = 0
async def one(stop):
    global done, bad
    r, w = await asyncio.open_connection(host, port)
    while time.monotonic() < stop:
        w.write(request)
        head = await r.readuntil(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                n = int(line[15:])
        if n:
            await r.readexactly(n)
        if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
            bad += 1
        done += 1
    w.close()
async def main():
    stop = time.monotonic() + secs
    t0 = time.monotonic()
    await asyncio.gather(*(one(stop) for _ in range(conns)))
    print(done / (time.monotonic() - t0), bad)
uvloop.run(main())
'''


def _two_cpus() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
    except AttributeError:
        return False


def _pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if _two_cpus() else argv


def start_engine(data: str) -> tuple[subprocess.Popen[str], str, str]:
    p = subprocess.Popen(_pinned(SERVER_CPU, [sys.executable, "-m", "dmengine", "serve",
                                              "--data", data, "--device-port", "0",
                                              "--api-port", "0"]),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return (p, *_announced(p))


def _announced(p: subprocess.Popen[str], deadline: float = 60) -> tuple[str, str]:
    """The API URL and key ``dmengine serve`` prints."""
    seen: dict[str, str] = {}
    until = time.monotonic() + deadline
    assert p.stdout is not None
    while "API key" not in seen:
        if time.monotonic() > until:
            p.kill()
            raise RuntimeError(f"dmengine serve printed only {seen}")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"dmengine serve exited with {p.wait()}")
        m = LINE.match(line.strip())
        if m:
            seen[m.group(1)] = m.group(2)
    return seen["API"], seen["API key"]


def start_bare(body: bytes) -> tuple[subprocess.Popen[bytes], int]:
    p = subprocess.Popen(_pinned(SERVER_CPU, [sys.executable, "-c", BARE_APP]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(body)
    p.stdin.close()
    port = int(p.stdout.readline())
    return p, port


def stop(p: subprocess.Popen[Any]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def call(url: str, key: str, body: Any = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={
        "X-API-Key": key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


# --- load ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, url: str, key: str, **kw: Any) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) of one load run against the server
    process ``pid``: CPU time per request hardly moves when other work shares the machine,
    where requests/s does."""
    c0 = cpu_seconds(pid)
    rps, n = load(url, key, **kw)
    return rps, (cpu_seconds(pid) - c0) / max(n, 1) * 1e6


def load(url: str, key: str, *, seconds: float, conns: int, method: str = "GET",
         body: bytes | None = None, tmp: str) -> tuple[float, int]:
    """(requests per second, requests) of ``url`` for ``seconds``; raises if any answer was
    not 2xx."""
    if shutil.which("wrk"):
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-H", f"X-API-Key: {key}"]
        if method != "GET":
            script = os.path.join(tmp, "post.lua")
            with open(script, "w") as f:
                f.write(f'wrk.method = "{method}"\n'
                        f"wrk.body = {json.dumps((body or b'').decode())}\n"
                        f'wrk.headers["Content-Type"] = "application/json"\n')
            argv += ["-s", script]
        out = subprocess.run(_pinned(CLIENT_CPU, [*argv, url]), capture_output=True,
                             text=True, timeout=seconds + 60).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"wrk said: {out}")
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        if bad:
            raise RuntimeError(f"{bad.group(1)} answers were not 2xx: {out}")
        n = re.search(r"(\d+) requests in", out)
        return float(m.group(1)), int(n.group(1)) if n else 0
    from urllib.parse import urlsplit
    u = urlsplit(url)
    head = (f"{method} {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nX-API-Key: {key}\r\n")
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = head.encode() + b"\r\n" + (body or b"")
    r = subprocess.run(_pinned(CLIENT_CPU, [sys.executable, "-c", RAW_CLIENT,
                                            u.hostname or "127.0.0.1", str(u.port),
                                            str(conns), str(seconds)]),
                       input=request, capture_output=True, timeout=seconds + 60)
    rps, failed = r.stdout.split()
    if int(failed):
        raise RuntimeError(f"{int(failed)} answers were not 2xx")
    return float(rps), int(float(rps) * seconds)


def _per_request(cg: Callgrind, port: int, request: bytes, n: int,
                 windows: int) -> list[float]:
    """Instructions per request of the process under ``cg`` answering ``request`` ``n`` times
    on one keep-alive connection, for each of ``windows`` windows."""
    def send() -> None:
        for _ in range(n):
            status, _ = conn.exchange(request)
            if status != 200:
                raise RuntimeError(f"measured answer {status}")
    conn = HttpConn(port)
    try:
        for _ in range(max(50, n // 5)):          # warm-up: caches, free lists, the JIT-less
            status, _ = conn.exchange(request)     # interpreter's specialised opcodes
            if status != 200:
                raise RuntimeError(f"warm-up answer {status}")
        return [cg.count(send)[0] / n for _ in range(windows)]
    finally:
        conn.close()


def _under_load(cg: Callgrind, url: str, key: str, seconds: float, conns: int,
                windows: int, tmp: str) -> list[float]:
    """Instructions per request of the process under ``cg`` while wrk (:func:`load`) loads
    ``url`` on ``conns`` keep-alive connections for ``seconds``, for each of ``windows``
    windows."""
    def run() -> int:
        return load(url, key, seconds=seconds, conns=conns, tmp=tmp)[1]
    run()                                            # warm-up
    got = []
    for _ in range(windows):
        total, requests = cg.count(run)
        got.append(total / max(requests, 1))
    return got


def instructions(tmp: str, n: int, windows: int, *, load_seconds: float = 0
                 ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(engine, bare) instructions per getTaskById, each under callgrind (module docstring):
    one request at a time, then (``load_seconds`` > 0 and wrk there) under wrk's load."""
    data = os.path.join(tmp, "cg-var")
    cg = Callgrind([sys.executable, "-m", "dmengine", "serve", "--data", data,
                    "--device-port", "0", "--api-port", "0"], os.path.join(tmp, "engine.cg"),
                   stdout=subprocess.PIPE, text=True)
    try:
        api, key = _announced(cg.proc, deadline=600)
        task_url, answer = _one_task(api, key)
        port = int(api.rstrip("/").rsplit(":", 1)[1])
        path = task_url[len(api.rstrip("/")):]
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n\r\n"
                   .encode())
        engine = _per_request(cg, port, request, n, windows)
        loaded = (_under_load(cg, task_url, key, load_seconds, 32, windows, tmp)
                  if load_seconds and shutil.which("wrk") else [])
    finally:
        stop(cg.proc)
    bare = Callgrind([sys.executable, "-c", BARE_APP], os.path.join(tmp, "bare.cg"),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    b = bare.proc
    try:
        assert b.stdin is not None and b.stdout is not None
        b.stdin.write(answer)
        b.stdin.close()
        bare_port = int(b.stdout.readline())
        base = _per_request(bare, bare_port, request, n, windows)
        base_loaded = (_under_load(bare, f"http://127.0.0.1:{bare_port}{path}", key,
                                   load_seconds, 32, windows, tmp) if loaded else [])
    finally:
        stop(b)
    return engine, base, loaded, base_loaded


def _one_task(api: str, key: str) -> tuple[str, bytes]:
    """One device and one QUERY task made through the API (no gateway: the task waits for
    its device); the task's URL and its getTaskById answer."""
    status, _ = call(api + "v1/devices", key, {
        "devId": "IMEI:356938035643809", "imei": "356938035643809",
        "msisdn": "+491701234567"})
    assert status == 201
    status, created = call(api + "v1/operations", key, OP)
    task_url = api + f"v1/tasks/{json.loads(created)['taskId']}"
    status, answer = call(task_url, key)
    assert status == 200 and b'"status":"PENDING"' in answer
    return task_url, answer


OP = {"target": {"devId": "IMEI:356938035643809"},
      "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}}


def run(quick: bool) -> None:
    rounds = 3 if quick else 7
    seconds = 1 if quick else 3
    conns = 32
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench-api-")
    rows: list[Row] = []
    engine = bare = None
    try:
        engine, api, key = start_engine(os.path.join(tmp, "var"))
        task_url, answer = _one_task(api, key)
        bare, port = start_bare(answer)
        bare_url = f"http://127.0.0.1:{port}" + task_url[len(api.rstrip("/")):]
        with urllib.request.urlopen(bare_url, timeout=10) as r:     # the same bytes
            assert r.read() == answer
        # warm both, then alternate
        load(task_url, key, seconds=1, conns=conns, tmp=tmp)
        load(bare_url, key, seconds=1, conns=conns, tmp=tmp)
        get_api, get_bare, get_ratio = [], [], []
        cpu_api, cpu_bare, cpu_ratio = [], [], []
        for i in range(rounds):
            pair = [("api", engine.pid, task_url), ("bare", bare.pid, bare_url)]
            if i % 2:
                pair.reverse()
            got = {name: measured(pid, url, key, seconds=seconds, conns=conns, tmp=tmp)
                   for name, pid, url in pair}
            get_api.append(got["api"][0])
            get_bare.append(got["bare"][0])
            get_ratio.append(got["api"][0] / got["bare"][0])
            cpu_api.append(got["api"][1])
            cpu_bare.append(got["bare"][1])
            cpu_ratio.append(got["bare"][1] / got["api"][1])
        body = json.dumps(OP).encode()
        posts = [measured(engine.pid, api + "v1/operations", key, seconds=seconds, conns=conns,
                          method="POST", body=body, tmp=tmp)
                 for _ in range(max(3, rounds // 2))]
        post_api = [rps for rps, _ in posts]
        post_cpu = [c for _, c in posts]
    finally:
        for p in (bare, engine):
            if p is not None:
                stop(p)
    try:
        cg_n, cg_windows = (200, 1) if quick else (1000, 3)
        cg_engine, cg_bare, cg_engine_load, cg_bare_load = instructions(
            tmp, cg_n, cg_windows, load_seconds=5 if quick else 15)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gen = "wrk" if shutil.which("wrk") else "asyncio raw-socket client"
    where = "server and load on CPUs 0 and 1" if _two_cpus() else "one CPU shared"
    base = f"bare aiohttp handler, same bytes, same run ({where})"
    case = f"getTaskById, {conns} keep-alive connections ({gen})"
    rows.append(Row(case, "requests/s", round(statistics.median(get_api)), "1/s", base,
                    round(statistics.median(get_bare)), round(statistics.median(get_ratio), 3)))
    # the same comparison by server CPU per request (ratio: bare's CPU / the API's, i.e.
    # requests per CPU-second relative to the bare handler): what a core of its own would give
    rows.append(Row(case, "requests per server CPU-second",
                    round(1e6 / statistics.median(cpu_api)), "1/s", base,
                    round(1e6 / statistics.median(cpu_bare)),
                    round(statistics.median(cpu_ratio), 3)))
    rows.append(Row(case, "server CPU per request", round(statistics.median(cpu_api), 1), "us",
                    base, round(statistics.median(cpu_bare), 1),
                    round(statistics.median(cpu_ratio), 3)))
    cg_case = "getTaskById, one keep-alive connection, one request at a time (callgrind)"
    cg_api, cg_base = statistics.median(cg_engine), statistics.median(cg_bare)
    rows.append(Row(cg_case, "instructions per request", round(cg_api), "instructions",
                    "bare aiohttp handler, same bytes, same run (callgrind)", round(cg_base),
                    round(cg_base / cg_api, 3)))
    if cg_engine_load:
        api_l, base_l = statistics.median(cg_engine_load), statistics.median(cg_bare_load)
        rows.append(Row(f"getTaskById, {conns} keep-alive connections (wrk, under callgrind)",
                        "instructions per request", round(api_l), "instructions",
                        "bare aiohttp handler, same bytes, same run (callgrind, wrk)",
                        round(base_l), round(base_l / api_l, 3)))
    post_case = f"doOperation (QUERY, one device), {conns} keep-alive connections ({gen})"
    rows.append(Row(post_case, "requests/s", round(statistics.median(post_api)), "1/s"))
    rows.append(Row(post_case, "server CPU per request", round(statistics.median(post_cpu), 1),
                    "us"))
    write_results(NAME, rows, load_average={"before": load_before, "after": os.getloadavg()},
                  quick=quick, rounds=rounds, seconds_per_round=seconds,
                  getTaskById_ratios=[round(r, 3) for r in get_ratio],
                  getTaskById_cpu_ratios=[round(r, 3) for r in cpu_ratio],
                  doOperation_runs=[round(r) for r in post_api],
                  callgrind_requests_per_window=cg_n,
                  callgrind_engine_windows=[round(x) for x in cg_engine],
                  callgrind_bare_windows=[round(x) for x in cg_bare],
                  callgrind_loaded_engine_windows=[round(x) for x in cg_engine_load],
                  callgrind_loaded_bare_windows=[round(x) for x in cg_bare_load])


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
