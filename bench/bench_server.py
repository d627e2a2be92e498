"""Device port throughput, latency and memory (``python -m bench server``).

The server runs in a child process pinned to CPU 0, the load in this process pinned to CPU 1
(``os.sched_setaffinity``).  Measured in one run:

* ``echo``: a raw uvloop + httptools server that answers every POST with its body — the
  machine's ceiling for one request/response on one core, with the same client;
* ``dm pkg1->pkg2``: the device port answering package 1 (WBXML, a fresh session each time,
  DevInfo + Alert 1201, no commands queued, so the reply closes the session): DM messages/s
  and sessions/s, p50/p99 latency; the ratio to ``echo`` is the target (>= 0.4);
* ``dm pkg1->pkg2 (wbxml, md5, LMDB store)``: the same exchange as ``dmengine serve`` answers
  it: MD5 authentication and the real device handler on an LMDB store (the Engine: account
  read, last contact and DevInfo written, the new nonce persisted, open tasks looked up),
  every request a distinct device (a device's next package 1 needs the nonce of the last);
* ``dm md5 sessions (simulator)``: whole sessions of the real simulator (MD5 challenge,
  Get + Replace in package 2, Status/Results in package 3): sessions/s, messages/s, and the
  simulator's CPU per message against the server's on the same rounds (this process's
  ``time.process_time`` vs the server's ``/proc/<pid>/stat``): one simulator core must drive
  one server core, so the ratio's target is <= 1;
* ``parked sessions``: RSS growth of the server per open session, with 100k sessions parked
  after package 2 (each with one Get waiting for its Status), read from a GET route of the
  server itself.
"""
from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

from bench.common import Row, write_results

NAME = "server"

SERVER_CPU, CLIENT_CPU = 0, 1


def _pin(cpu: int) -> None:
    try:
        if cpu in os.sched_getaffinity(0) or len(os.sched_getaffinity(0)) > cpu:
            os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- server processes -------------------------------------------------------------------------


def _echo_server(conn: Any) -> None:
    import httptools
    import uvloop

    _pin(SERVER_CPU)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.p = httptools.HttpRequestParser(self)
            self.body = bytearray()

        def data_received(self, data: bytes) -> None:
            self.p.feed_data(data)

        def on_message_begin(self) -> None:
            self.body = bytearray()

        def on_body(self, chunk: bytes) -> None:
            self.body += chunk

        def on_message_complete(self) -> None:
            b = bytes(self.body)
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.syncml.dm+wbxml\r\n"
                         b"Content-Length: %d\r\nCache-Control: no-store, private\r\n\r\n"
                         % len(b) + b)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
        conn.send(srv.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)

    uvloop.run(main())


class _BenchHandler:
    """Accounts derived like the simulator's (kept after first use, nonces persisted, as a
    store would); optionally gives every session work to do.  Kept lean: it runs in the
    server's process on every message."""

    def __init__(self, mode: str) -> None:
        from dmengine.message import Command, Item
        from dmengine.simulator.device import DeviceProfile
        self.profile = DeviceProfile()
        self.accounts: dict[str, Any] = {}
        self.mode = mode          # "none": no commands; "some": 20 % get Get+Replace; "park"
        self.Command, self.Item = Command, Item

    async def account_for(self, dev_id: str | None, username: str | None) -> Any:
        acc = self.accounts.get(dev_id or "")
        if acc is None and username:
            from dmengine.simulator.fleet import account_for_username
            acc = account_for_username(username, self.profile)
            if acc is not None:
                self.accounts[acc.dev_id] = acc
        return acc

    async def on_events(self, session: Any, events: list[Any]) -> None:
        for ev in events:
            name = type(ev).__name__
            if name == "NonceIssued":
                acc = self.accounts.get(ev.dev_id or "")
                if acc is not None:
                    acc.client_nonce = ev.nonce
            elif name == "DeviceIdentified" and self.mode != "none":
                if self.mode == "park" or ev.dev_id.endswith(("0", "5")):
                    session.queue(1, self.Command(name="Get", items=[
                        self.Item(target="./DevDetail/FwV")]))
                    if self.mode == "some":
                        session.queue(2, self.Command(name="Replace", items=[
                            self.Item(target="./FUMO/1/PkgName", data="bench")]))


def _dm_server(conn: Any, auth: str, mode: str) -> None:
    import uvloop

    from dmengine.server import DmServer, HttpResponse, ServerConfig, tune_gc

    _pin(SERVER_CPU)

    async def main() -> None:
        srv = DmServer(ServerConfig(require_auth=auth, max_sessions=300_000,
                                    max_pending=10_000, session_idle_timeout=3600),
                       _BenchHandler(mode))

        async def rss(request: Any) -> Any:
            gc.collect()
            return HttpResponse(200, f"{_rss_kb()} {len(srv.sessions)}".encode(), "text/plain")
        srv.add_get_route("/_rss", rss)
        await srv.start()
        tune_gc()                         # what serve_forever does after start-up
        conn.send(srv.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    uvloop.run(main())


def _engine_server(conn: Any, n: int) -> None:
    """The device port as ``dmengine serve`` runs it (Engine: MD5, the broker's device
    handler, LMDB store in a temporary directory) with ``n`` simulator devices on record."""
    import base64
    import tempfile

    import uvloop

    from dmengine.engine import Engine, EngineConfig
    from dmengine.model import Device, DmAccount
    from dmengine.server import tune_gc
    from dmengine.simulator.device import DeviceProfile, VirtualDevice

    _pin(SERVER_CPU)

    def b64(v: bytes | None) -> str | None:
        return base64.b64encode(v).decode() if v else None

    def records() -> Any:
        prof = DeviceProfile(auth="md5")
        for i in range(n):
            d = VirtualDevice(i, prof)
            yield Device(dev_id=d.dev_id, imei=d.dev_id[5:], msisdn=d.msisdn, account=DmAccount(
                server_id="dmengine", client_name=d.username, client_password=d.client_secret,
                server_password=d.server_secret, client_nonce=b64(d.client_nonce),
                server_nonce=b64(d.server_nonce)))

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-server-") as data:
            eng = Engine(EngineConfig(data_dir=data, device_port=0, api_port=0,
                                      require_auth="md5", server_overrides={
                                          "max_sessions": 300_000, "max_pending": 10_000}))
            await eng.start()
            await eng.store.import_devices(records())
            tune_gc()
            assert eng.server is not None
            conn.send(eng.server.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            await eng.stop()

    uvloop.run(main())


def _start(target: Any, *args: Any) -> tuple[Any, Any, int]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    port = parent.recv()
    return proc, parent, port


def _stop(proc: Any, pipe: Any) -> None:
    pipe.send("stop")
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


# --- a lean closed-loop load client -------------------------------------------------------------


class _LoadConn(asyncio.Protocol):
    """Sends the next request from the callback of the previous response: no task, no future."""

    def __init__(self, gen: "_Load") -> None:
        import httptools
        self.gen = gen
        self.parser = httptools.HttpResponseParser(self)
        self.t0 = 0.0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        if self.gen.stop:
            self.transport.close()
            return
        self.t0 = time.perf_counter()
        self.transport.write(self.gen.next_request())

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        g = self.gen
        status = self.parser.get_status_code()
        if status != 200:
            g.errors += 1
        g.done += 1
        if g.measure:
            g.lat.append(time.perf_counter() - self.t0)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.closed += 1


class _Load:
    def __init__(self, port: int, requests: list[bytes]) -> None:
        self.port = port
        self.requests = requests
        self.i = 0
        self.stop = False
        self.measure = False
        self.done = 0
        self.errors = 0
        self.closed = 0
        self.lat: list[float] = []

    def next_request(self) -> bytes:
        r = self.requests[self.i % len(self.requests)]
        self.i += 1
        return r

    async def run(self, conns: int, warmup: float, seconds: float,
                  pid: int | None = None) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        for _ in range(conns):
            await loop.create_connection(lambda: _LoadConn(self), "127.0.0.1", self.port)
        await asyncio.sleep(warmup)
        self.measure = True
        d0, t0, c0 = self.done, time.perf_counter(), _cpu(pid)
        await asyncio.sleep(seconds)
        d1, t1, c1 = self.done, time.perf_counter(), _cpu(pid)
        self.measure = False
        self.stop = True
        await asyncio.sleep(0.2)
        lat = sorted(self.lat)
        return {"rate": (d1 - d0) / (t1 - t0), "p50": lat[len(lat) // 2] * 1e3,
                "p99": lat[int(len(lat) * 0.99)] * 1e3, "errors": self.errors,
                # server CPU seconds per request: immune to how much of its core it got
                "cpu_us": (c1 - c0) / max(d1 - d0, 1) * 1e6, "cpu_share": (c1 - c0) / (t1 - t0)}


def _cpu(pid: int | None) -> float:
    """user + system CPU seconds of process ``pid`` (0.0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _post(port: int, body: bytes) -> bytes:
    return (f"POST /dm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/vnd.syncml.dm+wbxml\r\nUser-Agent: bench\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _pkg1_bodies(n: int, first: int = 0, auth: str = "none") -> list[bytes]:
    from dmengine.simulator.device import DeviceProfile, VirtualDevice
    prof = DeviceProfile(server_url="http://127.0.0.1/dm", encoding="wbxml", auth=auth)
    out = []
    for i in range(first, first + n):
        cs = VirtualDevice(i, prof).session(session_id=format(1 + i % 0xFFFE, "X"))
        out.append(cs.first().body)
    return out


def _load(port: int, requests: list[bytes], conns: int, warmup: float,
          seconds: float, pid: int | None = None) -> dict[str, float]:
    import uvloop
    return uvloop.run(_Load(port, requests).run(conns, warmup, seconds, pid))


async def _get(port: int, path: str) -> str:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    n = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0]
            .split(b":")[1])
    body = await r.readexactly(n)
    w.close()
    return body.decode()


async def _exchange(port: int, request: bytes) -> bytes:
    """One request on its own connection; the response body."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    head = await r.readuntil(b"\r\n\r\n")
    n = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0]
            .split(b":")[1])
    body = await r.readexactly(n)
    w.close()
    return body


def _hdr_status(reply: bytes) -> str | None:
    from dmengine import _wbxml
    for c in _wbxml.decode(reply).commands:
        if c.name == "Status" and c.cmd == "SyncHdr":
            return str(c.data)
    return None


async def _park(port: int, bodies: list[bytes], conns: int) -> None:
    """Sends every body once (package 1 of a distinct device), ``conns`` at a time."""
    loop = asyncio.get_running_loop()
    it = iter(bodies)
    done = asyncio.Event()
    active = [conns]

    class P(_LoadConn):
        def send(self) -> None:
            b = next(it, None)
            if b is None:
                self.transport.close()
                return
            self.transport.write(_post(port, b))

        def connection_lost(self, exc: Exception | None) -> None:
            active[0] -= 1
            if active[0] == 0:
                done.set()

    class G:
        stop = False
        measure = False
        done = 0
        errors = 0
        lat: list[float] = []

    for _ in range(conns):
        await loop.create_connection(lambda: P(G), "127.0.0.1", port)  # type: ignore[arg-type]
    await done.wait()
    if G.errors:
        raise RuntimeError(f"{G.errors} package-1 requests failed while parking sessions")


def simulator_rows(seconds: float, warmup: float, conns: int, sim_rounds: int) -> list[Row]:
    """Whole MD5 sessions of the real simulator against the device port (CPU 0), the
    simulator in this process (CPU 1)."""
    import uvloop

    rows: list[Row] = []
    from dmengine.simulator.device import DeviceProfile
    from dmengine.simulator.fleet import Fleet, HttpClient
    proc, pipe, port = _start(_dm_server, "md5", "some")
    try:
        prof = DeviceProfile(server_url=f"http://127.0.0.1:{port}/dm", encoding="wbxml",
                             auth="md5")

        async def sim() -> tuple[dict[str, Any], list[dict[str, float]]]:
            # a warm-up run, then rounds: messages, simulator (this process) CPU and server
            # CPU of each round; the ratio of the two CPU times is the simulator's CPU per
            # message relative to the server's (target <= 1: one simulator core drives one
            # server core)
            fleet = Fleet(prof, 500, client=HttpClient(timeout=30))
            fleet.keep_reports = False
            per: list[dict[str, float]] = []
            try:
                await fleet.run(duration=warmup, concurrency=conns)
                fleet.stats = type(fleet.stats)()
                for _ in range(sim_rounds):
                    st = fleet.stats
                    m0, n0, t0 = st.messages, st.sessions, time.perf_counter()
                    c0, s0 = time.process_time(), _cpu(proc.pid)
                    await fleet.run(duration=seconds / sim_rounds, concurrency=conns)
                    c1, s1 = time.process_time(), _cpu(proc.pid)
                    m, n, t = st.messages - m0, st.sessions - n0, time.perf_counter() - t0
                    per.append({"sim_us": (c1 - c0) / max(m, 1) * 1e6,
                                "srv_us": (s1 - s0) / max(m, 1) * 1e6,
                                "msg_s": m / t, "sess_s": n / t,
                                "sim_share": (c1 - c0) / t, "srv_share": (s1 - s0) / t})
            finally:
                fleet.close()
            return fleet.stats.summary(), per
        s, per = uvloop.run(sim())
    finally:
        _stop(proc, pipe)
    case = "dm md5 sessions (simulator, 20% with Get+Replace)"
    rows.append(Row(case, "sessions/s", round(statistics.median(r["sess_s"] for r in per), 1),
                    "sessions/s"))
    rows.append(Row(case, "messages/s", round(statistics.median(r["msg_s"] for r in per), 1),
                    "msg/s"))
    rows.append(Row(case, "latency p50", s["latency_p50_ms"], "ms"))
    rows.append(Row(case, "latency p99", s["latency_p99_ms"], "ms"))
    bad = sum(v for k, v in s["outcomes"].items() if k != "completed")
    rows.append(Row(case, "sessions not completed", bad, "count"))
    ratios = [r["sim_us"] / r["srv_us"] for r in per if r["srv_us"]]
    if ratios:
        sim_us = statistics.median(r["sim_us"] for r in per)
        srv_us = statistics.median(r["srv_us"] for r in per)
        rows.append(Row(case, "simulator CPU per message", round(sim_us, 2), "us"))
        rows.append(Row(case, "server CPU per message", round(srv_us, 2), "us"))
        # median over rounds of (simulator CPU / server CPU) on the same round; the target is
        # <= 1 (one simulator core drives one server core); "ratio" is target / value
        r = statistics.median(ratios)
        rows.append(Row(case, "simulator CPU / server CPU per message", round(r, 3), "x",
                        "target", 1.0, round(1.0 / r, 3)))
        rows.append(Row(case, "simulator/server CPU ratio, rounds min-max",
                        round(min(ratios), 3), "x", "max", round(max(ratios), 3)))
        # one simulator core drives one server core: the server's core is busy while the
        # simulator's is not
        rows.append(Row(case, "server CPU share while driven", round(statistics.median(
            r["srv_share"] for r in per), 2), "cores", "simulator", round(statistics.median(
                r["sim_share"] for r in per), 2)))
        # each process's least-disturbed round (another job on this shared machine inflates
        # the CPU time of whichever process shares its core)
        lo = min(r["sim_us"] for r in per) / min(r["srv_us"] for r in per)
        rows.append(Row(case, "simulator CPU / server CPU per message, least-disturbed rounds",
                        round(lo, 3), "x", "target", 1.0, round(1.0 / lo, 3)))

    return rows


def run(quick: bool = False) -> None:
    import uvloop

    _pin(CLIENT_CPU)
    seconds = 1.5 if quick else 5.0
    warmup = 0.3 if quick else 1.0
    conns = 32
    rows: list[Row] = []
    bodies = _pkg1_bodies(2000)

    # 1 + 2. echo ceiling and DM package 1 -> 2 (a session per request), measured in
    # alternating rounds so that load from other processes on this shared machine hits both
    echo_p, echo_pipe, echo_port = _start(_echo_server)
    dm_p, dm_pipe, dm_port = _start(_dm_server, "none", "none")
    rounds = 2 if quick else 4
    echos, dms = [], []
    try:
        for _ in range(rounds):
            echos.append(_load(echo_port, [_post(echo_port, b) for b in bodies], conns,
                               warmup, seconds / rounds, echo_p.pid))
            dms.append(_load(dm_port, [_post(dm_port, b) for b in bodies], conns,
                             warmup, seconds / rounds, dm_p.pid))
    finally:
        _stop(echo_p, echo_pipe)
        _stop(dm_p, dm_pipe)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)
    keys = ("rate", "p50", "p99", "cpu_us", "cpu_share")
    echo = {k: med(echos, k) for k in keys}
    dm = {k: med(dms, k) for k in keys}
    dm["errors"] = sum(r["errors"] for r in dms)
    case = "echo (raw httptools, same body)"
    rows.append(Row(case, "requests/s", round(echo["rate"]), "req/s"))
    rows.append(Row(case, "latency p50", round(echo["p50"], 3), "ms"))
    rows.append(Row(case, "latency p99", round(echo["p99"], 3), "ms"))
    case = "dm pkg1->pkg2 (wbxml, new session each)"
    rows.append(Row.versus(case, "messages/s", round(dm["rate"]), "msg/s", "echo requests/s",
                           round(echo["rate"])))
    rows.append(Row(case, "sessions/s", round(dm["rate"]), "sessions/s"))
    # the same comparison per server CPU second (this machine is shared: the wall-clock
    # ratio moves with whatever else runs on the server's core)
    if dm["cpu_us"] and echo["cpu_us"]:
        rows.append(Row.versus(case, "messages per server CPU-second",
                               round(1e6 / dm["cpu_us"]), "msg/cpu-s",
                               "echo requests per server CPU-second",
                               round(1e6 / echo["cpu_us"])))
        rows.append(Row(case, "server CPU share while measured", round(dm["cpu_share"], 2),
                        "cores", "echo", round(echo["cpu_share"], 2)))
    # the spread of the same-round ratios (each round: echo, then dm, back to back): the host
    # is shared, and a round where either server lost its core to other work moves its ratio
    wall = sorted(d["rate"] / e["rate"] for d, e in zip(dms, echos) if e["rate"])
    cpu = sorted(e["cpu_us"] / d["cpu_us"] for d, e in zip(dms, echos) if d["cpu_us"])
    if wall:
        rows.append(Row(case, "messages/s vs echo, same-round ratios min-max", round(wall[0], 3),
                        "x", "max", round(wall[-1], 3)))
    if cpu:
        rows.append(Row(case, "per server CPU-second vs echo, same-round ratios min-max",
                        round(cpu[0], 3), "x", "max", round(cpu[-1], 3)))
    rows.append(Row.versus(case, "latency p50", round(dm["p50"], 3), "ms", "echo p50",
                           round(echo["p50"], 3), higher_is_better=False))
    rows.append(Row.versus(case, "latency p99", round(dm["p99"], 3), "ms", "echo p99",
                           round(echo["p99"], 3), higher_is_better=False))
    if dm["errors"]:
        rows.append(Row(case, "non-200 answers", dm["errors"], "count"))

    # 2b. the same exchange with MD5 and the real store (what `dmengine serve` does); every
    # request is another device, so the run must not wrap around its bodies (a reused body
    # carries a spent nonce and is answered with a challenge instead)
    n_dev = 20_000 if quick else 60_000
    st_p, st_pipe, st_port = _start(_engine_server, n_dev)
    try:
        md5_bodies = [_post(st_port, b) for b in _pkg1_bodies(n_dev, auth="md5")]
        # the exchange measured is an authenticated one: 212 for the SyncHdr
        status = _hdr_status(uvloop.run(_exchange(st_port, md5_bodies.pop(0))))
        if status != "212":
            raise RuntimeError(f"md5+store case: package 1 answered {status}, not 212")
        load = _Load(st_port, md5_bodies)
        st = uvloop.run(load.run(conns, warmup, seconds, st_p.pid))
    finally:
        _stop(st_p, st_pipe)
    case = "dm pkg1->pkg2 (wbxml, md5, LMDB store, new session each)"
    rows.append(Row.versus(case, "messages/s", round(st["rate"]), "msg/s", "echo requests/s",
                           round(echo["rate"])))
    rows.append(Row.versus(case, "messages/s vs no auth + in-memory handler", round(st["rate"]),
                           "msg/s", "dm pkg1->pkg2 (wbxml, new session each) messages/s",
                           round(dm["rate"])))
    if st["cpu_us"]:
        rows.append(Row(case, "server CPU per message", round(st["cpu_us"], 1), "us",
                        "no auth + in-memory handler", round(dm["cpu_us"], 1)))
    rows.append(Row(case, "latency p50", round(st["p50"], 3), "ms"))
    rows.append(Row(case, "latency p99", round(st["p99"], 3), "ms"))
    rows.append(Row(case, "devices on record (one package 1 each)", n_dev, "count"))
    rows.append(Row(case, "requests sent (must not exceed the devices)", load.i + 1, "count"))
    if load.i >= len(md5_bodies):
        raise RuntimeError(f"the md5+store case sent {load.i} package 1s for {n_dev} devices: "
                           f"raise n_dev")
    if st["errors"]:
        rows.append(Row(case, "non-200 answers", st["errors"], "count"))

    # 3. whole MD5 sessions with the real simulator
    rows += simulator_rows(seconds, warmup, conns, 3 if quick else 8)

    # 4. parked sessions: RSS per session
    n_park = 20_000 if quick else 100_000
    proc, pipe, port = _start(_dm_server, "none", "park")
    try:
        async def park() -> tuple[int, int, int]:
            before, _ = map(int, (await _get(port, "/_rss")).split())
            warm = _pkg1_bodies(2000, first=10_000_000)      # warm up allocator and caches
            await _park(port, warm, 16)
            base, n0 = map(int, (await _get(port, "/_rss")).split())
            await _park(port, _pkg1_bodies(n_park), 32)
            after, n1 = map(int, (await _get(port, "/_rss")).split())
            return base, after, n1 - n0
        base, after, parked = uvloop.run(park())
    finally:
        _stop(proc, pipe)
    per = (after - base) * 1024 / max(parked, 1)
    rows.append(Row(f"parked sessions ({parked:,})", "RSS per session", round(per), "bytes",
                    "target", 4096.0, round(4096.0 / per, 3) if per else None))
    rows.append(Row(f"parked sessions ({parked:,})", "server RSS", round(after / 1024, 1), "MB"))
    write_results(NAME, rows)


if __name__ == "__main__":
    import sys
    run(quick="--quick" in sys.argv)
