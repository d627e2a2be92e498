"""Issue 13 item 7, device port denial of service: each attack driven over real TCP/HTTP
against a running ``DmServer`` (uvloop and the stock asyncio loop), with the limits set small
so every test runs in a few seconds.  Every test here failed on the code before the fix it
names (see SECURITY.md), except ``test_slowloris_headers_and_body_are_cut_by_request_timeout``,
which checks a protection that was already there.

* one address fills every connection slot -> ``max_connections_per_address``
* a download read a little faster than the stall timer allows holds its connection for
  hours -> ``min_send_rate`` over ``send_rate_window``
* blank lines between requests restarted the keep-alive timer -> it no longer restarts
* a client that never reads (or trickles) its replies held its connection and their bytes
  forever -> the same minimum rate, while the transport's buffer is full
* one connection's pipelined burst filled the server-wide ``max_pending`` -> a hard cap of
  ``4 * max_pipeline`` queued requests per connection
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import time

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from dmengine.content import CONTENT_PREFIX, ContentService, download_url
from dmengine.errors import ConfigError
from dmengine.metrics import DeviceMetrics
from dmengine.server import DmServer, HttpResponse, MemoryDeviceHandler, ServerConfig
from dmengine.store.memory import MemoryStore

XML = "application/vnd.syncml.dm+xml"
GET_DM = b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n"        # answered 405 at once: "the port works"


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    errors: list[dict] = []
    lp.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    yield lp
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.run_until_complete(lp.shutdown_default_executor())
    lp.close()
    assert not errors, errors


async def _server(**kw) -> tuple[DmServer, DeviceMetrics]:
    metrics = DeviceMetrics(CollectorRegistry())
    kw.setdefault("tick", 0.05)
    srv = DmServer(ServerConfig(host="127.0.0.1", port=0, **kw), MemoryDeviceHandler(),
                   metrics=metrics)
    await srv.start()
    return srv, metrics


def _sample(metrics: DeviceMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"dmengine_device_{name}_total", labels) or 0.0


async def _socket(port: int, source: str = "127.0.0.1",
                  rcvbuf: int | None = None) -> socket.socket:
    """A client socket bound to ``source`` (all of 127.0.0.0/8 is loopback on Linux), with a
    small receive buffer if asked (the server's send buffers then fill quickly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _connect(port: int, source: str = "127.0.0.1"):
    return await asyncio.open_connection(sock=await _socket(port, source))


async def _recv_paced(sock: socket.socket, size: int, every: float,
                      seconds: float) -> tuple[float, int]:
    """Reads ``size`` bytes every ``every`` s, straight from the socket (no reader buffer
    in between), for at most ``seconds``: (seconds until the server closed or reset the
    connection, or inf; bytes read)."""
    loop = asyncio.get_running_loop()
    t0, got = time.monotonic(), 0
    try:
        while time.monotonic() - t0 < seconds:
            block = await asyncio.wait_for(loop.sock_recv(sock, size), 5)
            if not block:
                return time.monotonic() - t0, got
            got += len(block)
            if every:
                await asyncio.sleep(every)
    except ConnectionError:
        return time.monotonic() - t0, got
    return float("inf"), got


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return int(lines[0].split()[1]), headers, body


async def _until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closes (or aborts) the connection within ``seconds``; what it
    sends meanwhile is read and dropped."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _pattern(size: int) -> bytes:
    return random.Random(size).randbytes(size)


# --- (a) one address fills every connection slot ---------------------------------------------------


def test_one_address_cannot_fill_every_connection_slot(loop):
    """Idle connections from one address beyond ``max_connections_per_address`` get the
    global cap's answer (503 + Retry-After, then close); another address is still served;
    a closed connection frees its address's slot; the per-address table empties."""
    async def main():
        srv, metrics = await _server(max_connections_per_address=3, max_connections=100)
        try:
            idle = [await _connect(srv.port, "127.0.0.1") for _ in range(3)]
            await _until(lambda: len(srv.connections) == 3)
            for _ in range(2):                  # the 4th and 5th from the same address
                r, w = await _connect(srv.port, "127.0.0.1")
                status, headers, _ = await _read_response(r)
                assert status == 503 and headers["retry-after"] == "5"
                assert headers["connection"] == "close"
                assert await _closed_within(r, 5)
                w.close()
            assert _sample(metrics, "rejected", cap="connections_per_address") == 2
            assert _sample(metrics, "rejected", cap="connections") == 0
            assert len(srv.connections) == 3

            other_r, other_w = await _connect(srv.port, "127.0.0.2")    # another address
            other_w.write(GET_DM)
            assert (await _read_response(other_r))[0] == 405
            for r, w in idle:                                            # still working
                w.write(GET_DM)
                assert (await _read_response(r))[0] == 405

            idle[0][1].close()                                           # frees one slot
            await _until(lambda: len(srv.connections) == 3)
            r, w = await _connect(srv.port, "127.0.0.1")
            w.write(GET_DM)
            assert (await _read_response(r))[0] == 405
            for _, cw in [*idle[1:], (r, w), (other_r, other_w)]:
                cw.close()
            await _until(lambda: not srv.connections)
            assert srv.connections_by_address == {}                      # deleted at zero
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_address_key_groups_ipv6_by_64_prefix():
    """An IPv6 client owns a whole /64 (often a /56): one address per connection would make
    the per-address cap worthless, so IPv6 peers are counted by their /64.  IPv4-mapped
    peers (a dual-stack listener) count as their IPv4 address."""
    from dmengine.server import _address_key
    assert _address_key(("10.1.2.3", 4000)) == "10.1.2.3"
    a = _address_key(("2001:db8:1:2::1", 4000, 0, 0))
    assert a == _address_key(("2001:db8:1:2:ffff:1:2:3", 5, 0, 0))
    assert a != _address_key(("2001:db8:1:3::1", 4000, 0, 0))
    assert _address_key(("::ffff:10.1.2.3", 4000, 0, 0)) == "10.1.2.3"
    assert _address_key(None) is None and _address_key("/tmp/sock") is None


def test_new_limits_are_validated():
    for kw in ({"max_connections_per_address": 0}, {"min_send_rate": -1},
               {"send_rate_window": 0.0}):
        with pytest.raises(ConfigError):
            ServerConfig(**kw)
    cfg = ServerConfig(keepalive_timeout=7.0)
    assert cfg.max_connections_per_address == 256 and cfg.min_send_rate == 1024
    assert cfg.rate_window == 7.0 and ServerConfig(send_rate_window=2.0).rate_window == 2.0


# --- (b) a slow reader of a download ----------------------------------------------------------------


def test_slow_download_reader_is_cut_off_a_steady_one_gets_the_file(loop, tmp_path, caplog):
    """Two devices download the same package over ``GET /content/``.  The slow one reads
    4 KB every 0.1 s (~40 KB/s): fast enough that the transport never stalls for a whole
    ``keepalive_timeout`` (3 s here), so the old stall timer, restarted on every chunk,
    never fired; under ``min_send_rate`` (128 KB/s here) it is cut off after one
    ``send_rate_window`` (1 s) or two.  The steady one reads ~3 MB/s and gets every byte.
    (The file is larger than what loopback's socket buffers take at once, ~4 MB here.)"""
    data = _pattern(8 * 1024 * 1024 + 77)

    async def upload():
        for i in range(0, len(data), 256 * 1024):
            yield data[i:i + 256 * 1024]

    async def get(port: int, url: str, rcvbuf: int) -> socket.socket:
        sock = await _socket(port, rcvbuf=rcvbuf)
        await asyncio.get_running_loop().sock_sendall(
            sock, f"GET {url} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return sock

    async def slow_reader(port: int, url: str) -> tuple[float, int]:
        sock = await get(port, url, 8 * 1024)
        try:
            return await _recv_paced(sock, 4096, 0.1, 7)
        finally:
            sock.close()

    async def steady_reader(port: int, url: str) -> bytes:
        loop = asyncio.get_running_loop()
        sock = await get(port, url, 64 * 1024)
        raw = bytearray()
        try:
            while b"\r\n\r\n" not in raw or len(raw) - raw.index(b"\r\n\r\n") - 4 < len(data):
                block = await asyncio.wait_for(loop.sock_recv(sock, 64 * 1024), 5)
                assert block, "the steady reader was cut off"
                raw += block
                await asyncio.sleep(0.02)
        finally:
            sock.close()
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        return body

    async def main():
        svc = ContentService(MemoryStore(), tmp_path)
        c = await svc.ingest(upload(), name="fw", size=len(data))
        srv, _ = await _server(keepalive_timeout=3.0, send_chunk=16 * 1024,
                               min_send_rate=128 * 1024, send_rate_window=1.0)
        srv.add_get_route(CONTENT_PREFIX, svc.device_route())
        url = download_url(c.content_id, "")
        try:
            (cut_after, got), body = await asyncio.gather(slow_reader(srv.port, url),
                                                          steady_reader(srv.port, url))
            assert body == data
            assert cut_after < 4.5, "the slow reader held its download connection"
            assert got < len(data) // 2
            await _until(lambda: not srv.connections)
        finally:
            await srv.shutdown(0.1)

    with caplog.at_level(logging.INFO, logger="dmengine.server"):
        loop.run_until_complete(main())
    assert any("too slow" in r.getMessage() for r in caplog.records)


# --- idle connections and slowloris ----------------------------------------------------------------


def test_blank_lines_do_not_keep_an_idle_connection_open(loop):
    """The parser skips CR/LF between requests without starting one; each of those reads
    used to restart the keep-alive timer, so a CRLF every few seconds held a connection
    (and its slot) forever."""
    async def main():
        srv, _ = await _server(keepalive_timeout=0.5, request_timeout=0.5)
        try:
            r, w = await _connect(srv.port)
            w.write(GET_DM)
            assert (await _read_response(r))[0] == 405
            closed = asyncio.ensure_future(_closed_within(r, 3))
            t0 = time.monotonic()
            while not closed.done() and time.monotonic() - t0 < 3:
                w.write(b"\r\n")
                await asyncio.sleep(0.1)
            assert await closed, "blank lines kept the idle connection open"
            assert time.monotonic() - t0 < 1.5
            w.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_slowloris_headers_and_body_are_cut_by_request_timeout(loop):
    """A request dribbled byte by byte (header block, then body) is answered 408 and closed
    at ``request_timeout`` after its first byte, however steady the dribble (a check: this
    was already so)."""
    async def main():
        srv, _ = await _server(keepalive_timeout=0.6, request_timeout=0.6)
        try:
            head = (f"POST /dm HTTP/1.1\r\nHost: t\r\nContent-Type: {XML}\r\n"
                    f"Content-Length: 1000\r\nX-Pad: {'a' * 200}\r\n\r\n").encode()
            for body_only in (False, True):
                r, w = await _connect(srv.port)
                raw = head
                if body_only:
                    w.write(head)                       # the whole head, then the body dribbles
                    raw = b"x" * 1000
                reply = asyncio.ensure_future(_read_response(r))
                t0 = time.monotonic()
                for i in range(len(raw)):
                    if reply.done():
                        break
                    w.write(raw[i:i + 1])
                    await asyncio.sleep(0.05)
                status, headers, _ = await reply
                assert status == 408 and headers["connection"] == "close"
                assert time.monotonic() - t0 < 1.5
                assert await _closed_within(r, 2)
                w.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


# --- clients that do not read their replies ---------------------------------------------------------


def test_client_that_never_reads_or_trickles_its_replies_is_cut_off(loop):
    """Two clients ask for a 12 MB in-memory reply (more than loopback's socket buffers take,
    ~4 MB here) and, once the server waits for them, pipeline more requests: one
    never reads, one reads 1 KB every 0.2 s.  Both held their connection, the reply's
    buffered bytes and their queued requests forever (no timer ran while the connection
    was not idle); now both are cut off after about one ``send_rate_window`` (here
    ``keepalive_timeout``, 1 s) or two, and their queued requests leave ``pending``."""
    blob = b"z" * (12 * 1024 * 1024)

    async def route(_request):
        return HttpResponse(200, blob, "application/octet-stream")

    async def main():
        lp = asyncio.get_running_loop()
        srv, _ = await _server(keepalive_timeout=1.0, request_timeout=1.0,
                               min_send_rate=64 * 1024)
        srv.add_get_route("/blob", route)
        socks = []
        try:
            for _ in range(2):
                sock = await _socket(srv.port, rcvbuf=4096)
                await lp.sock_sendall(sock, b"GET /blob HTTP/1.1\r\nHost: t\r\n\r\n")
                socks.append(sock)
            # the server waits for both; then requests pipelined behind the replies wait too
            await _until(lambda: len(srv.connections) == 2
                         and all(c.write_paused for c in srv.connections))
            for sock in socks:
                await lp.sock_sendall(sock, GET_DM * 5)
            await _until(lambda: srv.pending == 10)
            t0 = time.monotonic()
            trickle_cut, got = await _recv_paced(socks[1], 1024, 0.2, 5)
            assert trickle_cut < 3.5, "a client trickling its reply held the connection"
            assert got < len(blob) // 4
            await _until(lambda: not srv.connections, 5)
            assert time.monotonic() - t0 < 3.5, "a client never reading held the connection"
            never_cut, _ = await _recv_paced(socks[0], 1 << 20, 0, 2)   # reset by the server
            assert never_cut < 2
            assert srv.pending == 0
        finally:
            for sock in socks:
                sock.close()
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_one_connection_cannot_fill_the_pending_cap(loop):
    """One write of thousands of pipelined requests, never reading the answers: they were
    all parsed into that connection's queue (the pipeline cap only pauses reading *after*
    a read), so ``pending`` passed ``max_pending`` and every device's DM message got 503
    until the connection went away.  Now a connection queues at most ``4 * max_pipeline``
    requests: the burst is answered up to there, then 503 and close."""
    async def main():
        lp = asyncio.get_running_loop()
        srv, metrics = await _server(max_pending=300, max_pipeline=16, keepalive_timeout=2.0)
        sock = await _socket(srv.port, rcvbuf=4096)
        burst = b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n" * 6000

        async def flood():             # 240,000 requests: their answers fill any buffers
            try:
                for _ in range(40):
                    await lp.sock_sendall(sock, burst)
            except ConnectionError:
                pass                                    # cut off: fine
        flooder = asyncio.ensure_future(flood())
        try:
            await asyncio.sleep(1.0)
            assert srv.pending <= 4 * 16 + 1, srv.pending
            # another device is not turned away
            r2, w2 = await _connect(srv.port, "127.0.0.2")
            w2.write(f"POST /dm HTTP/1.1\r\nHost: t\r\nContent-Type: {XML}\r\n"
                     f"Content-Length: 9\r\n\r\n<SyncML/>".encode())
            status, _, _ = await _read_response(r2)
            assert status != 503
            assert _sample(metrics, "rejected", cap="pending") == 0
            w2.close()
            # the flooder got its first answers, then a 503, then the connection closed
            raw = bytearray()
            try:
                while block := await asyncio.wait_for(lp.sock_recv(sock, 1 << 16), 5):
                    raw += block
            except ConnectionError:
                pass
            # (what the socket still holds of them when the server's close becomes a reset,
            # its unread requests being thrown away, is lost: the server's count says it)
            statuses = [int(line.split()[1]) for line in bytes(raw).split(b"\r\n")
                        if line.startswith(b"HTTP/1.1 ")]
            assert len(statuses) <= 4 * 16 + 1
            assert set(statuses[:-1]) <= {404} and statuses[-1:] in ([], [503], [404])
            assert _sample(metrics, "http_errors", status="503") == 1
            assert _sample(metrics, "http_errors", status="404") < 1000    # of 240,000
            await _until(lambda: not srv.connections and srv.pending == 0)
        finally:
            flooder.cancel()
            await asyncio.gather(flooder, return_exceptions=True)
            sock.close()
            await srv.shutdown(0.1)
    loop.run_until_complete(main())
