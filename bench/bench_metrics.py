"""The cost of the metrics on the device port (``python -m bench metrics``), issue 17's target:
metrics on versus off, same run, <= 3 % difference.

Two device-port servers run side by side in child processes pinned to the same CPU (0): one
with ``DeviceMetrics`` plus the process and Python collectors on its registry, one without
metrics.  The load (this process, CPU 1) alternates between them in short rounds, the order
flipped every other pair, and every round also scrapes the server's ``/metrics`` once a second
(the on server renders the whole registry; the off server answers an empty body), so the
scrape's cost is in the numbers too.  A last row times the five metric calls of a message
alone, against the server's CPU per message: the same cost without the machine's noise.  Per round: messages/s and the server's CPU seconds per
message (``/proc/<pid>/stat``: immune to how much of its core it got on this shared machine).
The result is the median over pairs of (on / off) of each pair's rounds.

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
from bench.common import Row, rate, write_results

NAME = "metrics"
#: seconds between scrapes (Prometheus: 15 s usually); with rounds shorter than this, one
#: scrape per round, in its middle: about one a second, pessimistic on purpose
SCRAPE_EVERY = 1.0


def _server(conn: Any, metrics_on: bool, auth: str, mode: str) -> None:
    import uvloop
    from prometheus_client import CollectorRegistry, generate_latest

    from dmengine.metrics import DeviceMetrics, add_process_collectors
    from dmengine.server import DmServer, HttpResponse, ServerConfig, tune_gc

    _pin(SERVER_CPU)

    async def main() -> None:
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
    write_results(NAME, rows, **extra)


if __name__ == "__main__":
    import sys
    run(quick="--quick" in sys.argv)
