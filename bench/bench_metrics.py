"""The cost of the metrics on the device port (``python -m bench metrics``), issue 17's target:
metrics on versus off, same run, <= 3 % difference.

Two device-port servers run side by side in child processes pinned to the same CPU (0): one
with ``DeviceMetrics`` plus the process and Python collectors on its registry, one without
metrics.  The load (this process, CPU 1) alternates between them in short rounds, the order
flipped every other pair, and every round also scrapes the server's ``/metrics`` once a second
(the on server renders the whole registry; the off server answers an empty body), so the
scrape's cost is in the numbers too.  Per round: messages/s and the server's CPU seconds per
message (``/proc/<pid>/stat``: immune to how much of its core it got on this shared machine).
The result is the median over pairs of (on / off) of each pair's rounds.  On this shared
2-core machine those rounds are about as noisy as the effect: the A/A control (a second server
without metrics against the first) shows how much.

Two rows without that noise:

* the five metric calls of a message timed alone from Python, against the server's CPU per
  message (the Python methods; the device port itself makes the same counts as C calls
  through ``_metrics.pxd``, cheaper still: an upper bound);
* instructions per message under callgrind, metrics on versus off (``instruction_rows``):
  the same fixed load, one request at a time on one connection, counted in the server's
  process only, start-up and warm-up left out.  Windows of the same server agree to a few
  hundredths of a percent (the "max/min - 1" row), so the on/off difference is the metrics'
  cost in work done, whatever else the machine runs.  The scrape is counted apart, and shared
  over the messages of a second of the server's CPU for the "with a scrape a second" row.
  The server runs with address-space randomisation off (``setarch -R``): with it on, two
  identical servers differed by up to 0.7 % (CPython's type-attribute cache collides on some
  layouts and not others); off, they agree to ~0.01 % (the A/A instruction row).  A layout
  still differs between the on and the off server, so the on/off figure carries that much
  layout luck either way.

Cases:

* ``pkg1->pkg2``: bench_server's case — package 1 answered by package 2 (WBXML, a fresh
  session each time, no auth): every message also starts and ends a session, the most
  metric calls per message of any traffic (session start and end, the session-time and the
  request-latency histograms, messages and bytes in and out);
* ``md5 sessions``: whole sessions of the real simulator (MD5 challenge, 20 % with
  Get + Replace), as bench_server's simulator case.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.bench_server import (SERVER_CPU, CLIENT_CPU, _BenchHandler, _cpu, _Load, _pin,
                                _pkg1_bodies, _post, _start, _stop)
from bench.common import Callgrind, HttpConn, Row, rate, write_results

NAME = "metrics"
#: seconds between scrapes (Prometheus: 15 s usually); with rounds shorter than this, one
#: scrape per round, in its middle: about one a second, pessimistic on purpose
SCRAPE_EVERY = 1.0


async def _build(metrics_on: bool, auth: str, mode: str) -> Any:
    """The measured server: ``DeviceMetrics`` plus the process and Python collectors on its
    registry and a ``/metrics`` route rendering it (off: no metrics, an empty ``/metrics``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from dmengine.metrics import DeviceMetrics, add_process_collectors
    from dmengine.server import DmServer, HttpResponse, ServerConfig, tune_gc

    registry = CollectorRegistry()
    metrics = None
    if metrics_on:
        metrics = DeviceMetrics(registry)
        add_process_collectors(registry)
    srv = DmServer(ServerConfig(require_auth=auth, max_sessions=300_000,
                                max_pending=10_000, session_idle_timeout=3600),
                   _BenchHandler(mode), metrics=metrics)

    async def scrape(request: Any) -> Any:
        body = generate_latest(registry) if metrics_on else b""
        return HttpResponse(200, body, "text/plain; version=0.0.4")
    srv.add_get_route("/metrics", scrape)
    await srv.start()
    tune_gc()
    return srv


def _server(conn: Any, metrics_on: bool, auth: str, mode: str) -> None:
    import uvloop

    _pin(SERVER_CPU)

    async def main() -> None:
        srv = await _build(metrics_on, auth, mode)
        conn.send(srv.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    uvloop.run(main())


async def _scraper(port: int, stop: asyncio.Event, sizes: list[int], first: float) -> None:
    """GET /metrics ``first`` seconds in (inside the measured window), then every
    SCRAPE_EVERY seconds, until ``stop``."""
    wait = first
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), wait)
            return
        except TimeoutError:
            pass
        wait = SCRAPE_EVERY
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sizes.append(len(await r.read()))
        w.close()


async def _pkg1_round(port: int, pid: int, requests: list[bytes], conns: int, warmup: float,
                      seconds: float) -> dict[str, float]:
    stop = asyncio.Event()
    sizes: list[int] = []
    scraper = asyncio.get_running_loop().create_task(
        _scraper(port, stop, sizes, warmup + seconds / 2))
    try:
        out = await _Load(port, requests).run(conns, warmup, seconds, pid)
    finally:
        stop.set()
        await scraper
    out["scrape_bytes"] = max(sizes, default=0)
    return out


async def _sim_round(fleet: Any, port: int, pid: int, conns: int,
                     seconds: float) -> dict[str, float]:
    stop = asyncio.Event()
    sizes: list[int] = []
    scraper = asyncio.get_running_loop().create_task(_scraper(port, stop, sizes, seconds / 2))
    try:
        st = fleet.stats
        m0, t0, c0 = st.messages, time.perf_counter(), _cpu(pid)
        await fleet.run(duration=seconds, concurrency=conns)
        m, t, c = st.messages - m0, time.perf_counter() - t0, _cpu(pid) - c0
    finally:
        stop.set()
        await scraper
    return {"rate": m / t, "cpu_us": c / max(m, 1) * 1e6, "scrape_bytes": max(sizes, default=0)}


# --- instructions per message, counted by callgrind --------------------------------------------
#
# CPU time per message on a shared 2-core machine moves by +-10 % between two identical servers
# (the A/A rows), as much as the effect measured.  Instructions executed do not depend on what
# else runs: the server runs under ``valgrind --tool=callgrind`` and answers a fixed load on one
# keep-alive connection, one request at a time (every read holds exactly one request, so both
# servers run the same code path), and ``callgrind_control`` zeroes the counters before the
# measured messages and dumps them after.  Start-up and warm-up are outside the count.

def _serve(metrics_on: bool, auth: str, mode: str) -> None:
    """``python -m bench.bench_metrics --serve on|off AUTH MODE``: the measured server in this
    process (valgrind runs it), its port on stdout; it ends when stdin closes."""
    import sys

    import uvloop

    async def main() -> None:
        srv = await _build(metrics_on, auth, mode)
        print(srv.port, flush=True)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # a reader on stdin, not an executor thread: nothing else runs in the counted process
        loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
        await done
        await srv.shutdown()

    uvloop.run(main())


class _Pkg1Load:
    """Package 1 after package 1 (a new session each), cycling through ``bodies``."""

    def __init__(self, port: int, bodies: list[bytes]) -> None:
        self.requests = [_post(port, b) for b in bodies]
        self.at = 0

    def run(self, conn: HttpConn, n: int) -> int:
        for _ in range(n):
            status, _ = conn.exchange(self.requests[self.at % len(self.requests)])
            self.at += 1
            if status != 200:
                raise RuntimeError(f"the measured server answered {status}")
        return n


class _SessionLoad:
    """Whole MD5 sessions of simulator devices (package 1 to the server's last message), one
    message at a time; the devices keep their nonces from one session to their next."""

    def __init__(self, port: int, devices: int) -> None:
        from dmengine.simulator.device import DeviceProfile, VirtualDevice
        prof = DeviceProfile(server_url=f"http://127.0.0.1:{port}/dm", encoding="wbxml",
                             auth="md5")
        self.devices = [VirtualDevice(i, prof) for i in range(devices)]
        self.at = 0

    def run(self, conn: HttpConn, n: int) -> int:
        """Sessions until at least ``n`` messages; returns the messages sent."""
        from urllib.parse import urlsplit
        sent = 0
        while sent < n:
            dev = self.devices[self.at % len(self.devices)]
            self.at += 1
            cs = dev.session(session_id=format(1 + self.at % 0xFFFE, "X"))
            out = cs.first()
            while out is not None:
                url = urlsplit(out.url)
                head = "".join(f"{k}: {v}\r\n" for k, v in out.wire_headers
                               if k.lower() not in ("host", "content-length"))
                status, body = conn.exchange(
                    (f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n{head}"
                     f"Content-Length: {len(out.body)}\r\n\r\n").encode() + out.body)
                sent += 1
                if status != 200:
                    raise RuntimeError(f"the measured server answered {status}")
                cs.receive(body)
                out = cs.next()
            if cs.outcome != "completed":
                raise RuntimeError(f"a simulator session ended {cs.outcome}: {cs.detail}")
        return sent


def _instructions(metrics_on: bool, auth: str, mode: str, load: Any, n: int, windows: int,
                  workdir: str) -> dict[str, Any]:
    """Instructions per message of ``windows`` windows of ``n`` messages each (``load(port)``:
    what sends them, one at a time), and of one ``/metrics`` scrape, in one server (``_build``'s,
    with ``auth`` and ``mode``) under callgrind."""
    import os
    import subprocess
    import sys

    tag = "on" if metrics_on else "off"
    os.makedirs(workdir, exist_ok=True)
    cg = Callgrind([sys.executable, "-m", "bench.bench_metrics", "--serve", tag, auth, mode],
                   os.path.join(workdir, f"cg-{tag}.out"), stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE)
    proc, count = cg.proc, cg.count
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        sender = load(port)
        conn, scraper = HttpConn(port), HttpConn(port)

        def scrape() -> int:
            status, body = scraper.exchange(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            if status != 200:
                raise RuntimeError(f"the measured server ({tag}) answered /metrics with {status}")
            return len(body)

        sender.run(conn, n)           # warm-up: codec tables, token pool, free lists
        scrape()
        per_msg = []
        for _ in range(windows):
            instr, sent = count(lambda: sender.run(conn, n))
            per_msg.append(instr / sent)
        per_scrape, size = count(scrape)
        conn.close()
        scraper.close()
        return {"per_msg": per_msg, "scrape": per_scrape, "scrape_bytes": size}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _instruction_case(case: str, off: dict[str, Any], on: dict[str, Any],
                      off_cpu_us: float | None) -> list[Row]:
    off_i = statistics.median(off["per_msg"])
    on_i = statistics.median(on["per_msg"])
    spread = max(max(r["per_msg"]) / min(r["per_msg"]) for r in (off, on)) - 1
    rows = [
        Row(case, "instructions per message, metrics off", round(off_i), "instr"),
        Row(case, "instructions per message, metrics on", round(on_i), "instr",
            "metrics off (off/on)", round(off_i), round(off_i / on_i, 4)),
        Row(case, "metrics cost: instructions per message", round((on_i / off_i - 1) * 100, 2),
            "%", "target", 3.0, None),
        Row(case, "windows of one server: max/min - 1", round(spread * 100, 3), "%"),
        Row(case, "instructions per /metrics scrape, metrics on", on["scrape"], "instr",
            "metrics off (empty body)", off["scrape"], None),
    ]
    if off_cpu_us:
        # one scrape a second (as the wall-clock rounds do; Prometheus' default is one every
        # 15 s) shared by the messages the server answers in a second of its own CPU: the
        # rate of a busy server, not the measured rate (that one depends on what else runs)
        per_s = 1e6 / off_cpu_us
        scrape_per_msg = (on["scrape"] - off["scrape"]) / per_s
        rows.append(Row(case, "metrics cost: instructions per message, with a scrape a second",
                        round((on_i + scrape_per_msg - off_i) / off_i * 100, 2), "%",
                        "messages per CPU second, metrics off", round(per_s), None))
    return rows


def instruction_rows(quick: bool = False, pkg1_cpu_us: float | None = None,
                     md5_cpu_us: float | None = None) -> list[Row]:
    """The callgrind rows, metrics on versus off: instructions per pkg1->pkg2 message, with a
    second server without metrics against the first (A/A: what separate processes alone make
    of the count), and per message of whole MD5 sessions.  ``*_cpu_us``: the server's CPU per
    message without metrics, from the wall-clock rounds, to share one scrape a second over
    a second of the server's messages."""
    import tempfile

    n, windows = (200, 2) if quick else (2000, 3)
    bodies = _pkg1_bodies(500)

    def pkg1(port: int) -> _Pkg1Load:
        return _Pkg1Load(port, bodies)

    def md5(port: int) -> _SessionLoad:
        return _SessionLoad(port, 200)

    with tempfile.TemporaryDirectory(prefix="bench-metrics-cg-") as tmp:
        off = _instructions(False, "none", "none", pkg1, n, windows, f"{tmp}/pkg1")
        on = _instructions(True, "none", "none", pkg1, n, windows, f"{tmp}/pkg1")
        off2 = _instructions(False, "none", "none", pkg1, n, windows, f"{tmp}/pkg1-2")
        md5_off = _instructions(False, "md5", "some", md5, n, windows, f"{tmp}/md5")
        md5_on = _instructions(True, "md5", "some", md5, n, windows, f"{tmp}/md5")
    rows = _instruction_case("dm pkg1->pkg2, instructions (callgrind, one connection, in order)",
                             off, on, pkg1_cpu_us)
    off_i, off2_i = statistics.median(off["per_msg"]), statistics.median(off2["per_msg"])
    rows.append(Row("control: a second server without metrics (A/A)",
                    "metrics cost: instructions per message",
                    round((off2_i / off_i - 1) * 100, 2), "%", "target", 3.0, None))
    rows += _instruction_case("dm md5 sessions, instructions (callgrind, one connection, "
                              "in order; 20% with Get+Replace)", md5_off, md5_on, md5_cpu_us)
    return rows


def _q(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _rows(case: str, pairs: list[tuple[dict[str, float], dict[str, float]]]) -> list[Row]:
    """Rows of one case from (on, off) round pairs (a pair where either server got no CPU
    tick at all — starved by other load on this shared machine — says nothing: left out)."""
    pairs = [(a, b) for a, b in pairs if a["cpu_us"] > 0 and b["cpu_us"] > 0 and b["rate"] > 0]
    assert pairs, "no round pair where both servers ran"
    on_rate = statistics.median(a["rate"] for a, _ in pairs)
    off_rate = statistics.median(b["rate"] for _, b in pairs)
    on_cpu = statistics.median(a["cpu_us"] for a, _ in pairs)
    off_cpu = statistics.median(b["cpu_us"] for _, b in pairs)
    rate_ratio = statistics.median(a["rate"] / b["rate"] for a, b in pairs)
    cpu_ratios = sorted(a["cpu_us"] / b["cpu_us"] for a, b in pairs)
    cpu_ratio = statistics.median(cpu_ratios)
    return [
        Row(case, "messages/s, metrics off", round(off_rate), "msg/s"),
        Row(case, "messages/s, metrics on", round(on_rate), "msg/s",
            "metrics off, median of pair ratios", round(off_rate), round(rate_ratio, 3)),
        Row(case, "server CPU per message, metrics off", round(off_cpu, 2), "us"),
        Row(case, "server CPU per message, metrics on", round(on_cpu, 2), "us",
            "metrics off, median of pair ratios (off/on)", round(off_cpu, 2),
            round(1.0 / cpu_ratio, 3)),
        Row(case, "metrics cost: server CPU per message", round((cpu_ratio - 1) * 100, 2), "%",
            "target", 3.0, None),
        Row(case, "metrics cost: messages/s", round((1 - rate_ratio) * 100, 2), "%",
            "target", 3.0, None),
        Row(case, "metrics cost: server CPU per message, pairs p25-p75",
            round((_q(cpu_ratios, 0.25) - 1) * 100, 2), "%", "p75",
            round((_q(cpu_ratios, 0.75) - 1) * 100, 2), None),
        Row(case, "/metrics body (process + device families)",
            max(a["scrape_bytes"] for a, _ in pairs), "bytes"),
        Row(case, "round pairs", len(pairs), "count"),
    ]


def run(quick: bool = False) -> None:
    import uvloop

    _pin(CLIENT_CPU)
    # many short pairs: a disturbance from other load on this shared machine lands in one
    # round and moves one pair's ratio; the median over pairs compares like with like
    pairs_n = 3 if quick else 30
    seconds = 0.6 if quick else 0.6
    warmup = 0.2 if quick else 0.15
    conns = 32
    rows: list[Row] = []
    extra: dict[str, Any] = {"scrape_every_s": SCRAPE_EVERY}

    # 1. package 1 -> package 2, a session per message; a second server without metrics
    # ("off2") is the control: off2 against off shows what this machine's noise alone makes
    # of two identical servers (an A/A test), next to on against off
    servers = {"on": _start(_server, True, "none", "none"),
               "off": _start(_server, False, "none", "none"),
               "off2": _start(_server, False, "none", "none")}
    bodies = _pkg1_bodies(2000)
    pairs: list[tuple[dict[str, float], dict[str, float]]] = []
    control: list[tuple[dict[str, float], dict[str, float]]] = []
    try:
        async def pkg1() -> None:
            reqs = {k: [_post(port, b) for b in bodies] for k, (_, _, port) in servers.items()}
            for k in range(pairs_n):
                order = ["on", "off", "off2"] if k % 2 == 0 else ["off2", "off", "on"]
                got = {}
                for name in order:
                    proc, _, port = servers[name]
                    got[name] = await _pkg1_round(port, proc.pid, reqs[name], conns, warmup,
                                                  seconds)
                pairs.append((got["on"], got["off"]))
                control.append((got["off2"], got["off"]))
        uvloop.run(pkg1())
    finally:
        for proc, pipe, _ in servers.values():
            _stop(proc, pipe)
    errors = sum(a["errors"] + b["errors"] for a, b in pairs)
    rows += _rows("dm pkg1->pkg2 (wbxml, new session each)", pairs)
    rows += [r for r in _rows("control: a second server without metrics (A/A)", control)
             if r.metric.startswith("metrics cost")]
    if errors:
        rows.append(Row("dm pkg1->pkg2 (wbxml, new session each)", "non-200 answers", errors,
                        "count"))

    # 2. whole MD5 sessions of the simulator
    from dmengine.simulator.device import DeviceProfile
    from dmengine.simulator.fleet import Fleet, HttpClient
    on_p, on_pipe, on_port = _start(_server, True, "md5", "some")
    off_p, off_pipe, off_port = _start(_server, False, "md5", "some")
    sim_pairs = []
    try:
        async def sim() -> None:
            fleets = {}
            for flag, port in ((True, on_port), (False, off_port)):
                prof = DeviceProfile(server_url=f"http://127.0.0.1:{port}/dm",
                                     encoding="wbxml", auth="md5")
                f = Fleet(prof, 500, client=HttpClient(timeout=30))
                f.keep_reports = False
                fleets[flag] = f
                await f.run(duration=warmup, concurrency=conns)
            try:
                for k in range(pairs_n):
                    order = [(True, on_port, on_p.pid), (False, off_port, off_p.pid)]
                    if k % 2:
                        order.reverse()
                    got = {}
                    for flag, port, pid in order:
                        got[flag] = await _sim_round(fleets[flag], port, pid, conns, seconds)
                    sim_pairs.append((got[True], got[False]))
            finally:
                for f in fleets.values():
                    f.close()
        uvloop.run(sim())
    finally:
        _stop(on_p, on_pipe)
        _stop(off_p, off_pipe)
    rows += _rows("dm md5 sessions (simulator, 20% with Get+Replace)", sim_pairs)

    # 3. the calls themselves, timed alone (this thread's CPU): what every pkg1->pkg2 message
    # costs in metrics, against the server's CPU per message with metrics off measured above
    from prometheus_client import CollectorRegistry

    from dmengine.metrics import DeviceMetrics
    m = DeviceMetrics(CollectorRegistry())

    def one_message() -> None:
        m.message_in("wbxml", 300)
        t = m.session_started()
        m.message_out("wbxml", 400)
        m.session_ended("completed", t)
        m.observe_latency(0.0004)
    calls = 1e6 / rate(one_message, clock=time.thread_time)
    off_cpu = statistics.median(b["cpu_us"] for _, b in pairs if b["cpu_us"] > 0)
    case = "metric calls of one pkg1->pkg2 message (5 calls, timed alone)"
    rows.append(Row(case, "CPU per message", round(calls, 3), "us",
                    "server CPU per message, metrics off", round(off_cpu, 2), None))
    rows.append(Row(case, "share of the server's CPU per message",
                    round(calls / off_cpu * 100, 2), "%", "target", 3.0, None))

    # 4. instructions per message under callgrind, metrics on versus off: the repeatable figure
    md5_cpu = statistics.median(b["cpu_us"] for _, b in sim_pairs if b["cpu_us"] > 0)
    rows += instruction_rows(quick, pkg1_cpu_us=off_cpu, md5_cpu_us=md5_cpu)
    write_results(NAME, rows, **extra)


if __name__ == "__main__":
    import sys
    if "--serve" in sys.argv:
        at = sys.argv.index("--serve")
        _serve(sys.argv[at + 1] == "on", sys.argv[at + 2], sys.argv[at + 3])
    else:
        run(quick="--quick" in sys.argv)
