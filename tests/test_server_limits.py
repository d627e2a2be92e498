"""Device port limits and HTTP errors, driven with raw sockets against a running server.

Each test runs on uvloop and on the stock asyncio loop; loop errors fail the test.
"""
from __future__ import annotations

import asyncio
import os
import ssl

import pytest
import trustme
import uvloop

from dmengine.errors import ConfigError
from dmengine.metrics import DeviceMetrics
from dmengine.server import DmServer, HttpResponse, MemoryDeviceHandler, ServerConfig

from prometheus_client import CollectorRegistry

WBXML = "application/vnd.syncml.dm+wbxml"
XML = "application/vnd.syncml.dm+xml"


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    errors: list[dict] = []
    lp.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    yield lp
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.close()
    assert not errors, errors


async def _server(**kw) -> tuple[DmServer, MemoryDeviceHandler, DeviceMetrics]:
    handler = MemoryDeviceHandler()
    metrics = DeviceMetrics(CollectorRegistry())
    kw.setdefault("tick", 0.05)
    srv = DmServer(ServerConfig(host="127.0.0.1", port=0, **kw), handler, metrics=metrics)
    await srv.start()
    return srv, handler, metrics


def _sample(metrics: DeviceMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"dmengine_device_{name}_total", labels) or 0.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _exchange(port: int, raw: bytes, n: int = 1, ssl_ctx=None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx)
    writer.write(raw)
    out = [await _read_response(reader) for _ in range(n)]
    writer.close()
    return out


def post(path: str, body: bytes, ctype: str = WBXML, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_wrong_method_path_and_type_keep_the_connection(loop):
    async def main():
        srv, _, metrics = await _server()
        try:
            raw = (b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n"
                   + post("/dm", b"hello", "text/plain")
                   + post("/elsewhere", b"x")
                   + b"PUT /dm/abc HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
            res = await _exchange(srv.port, raw, 4)       # pipelined: answered in order
            assert [r[0] for r in res] == [405, 415, 404, 405]
            assert res[0][1]["allow"] == "POST"
            assert res[0][1]["cache-control"] == "no-store, private"
            assert "application/vnd.syncml.dm+wbxml" in res[1][1]["accept-post"]
            assert _sample(metrics, "http_errors", status="415") == 1
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_accept_charset_without_utf8_is_406(loop):
    async def main():
        srv, _, _ = await _server()
        try:
            res = await _exchange(srv.port, post("/dm", b"x", extra="Accept-Charset: iso-8859-5\r\n")
                                  + post("/dm", b"x", extra="Accept-Charset: utf-8;q=0\r\n")
                                  + post("/dm", b"\x00", extra="accept-charset: ISO-8859-1, UTF-8\r\n"), 3)
            assert [r[0] for r in res] == [406, 406, 400] and res[0][2].startswith(b"only UTF-8")
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_body_over_max_msg_size_is_413_before_reading_it(loop):
    async def main():
        srv, _, metrics = await _server(max_msg_size=1000, max_body_slack=0)
        try:
            # announced by Content-Length: answered at once, the body is never sent
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"POST /dm HTTP/1.1\r\nHost: t\r\nContent-Type: " + WBXML.encode()
                         + b"\r\nContent-Length: 5000\r\n\r\n")
            status, headers, _ = await _read_response(reader)
            assert status == 413 and headers["connection"] == "close"
            assert await reader.read() == b""                 # closed
            writer.close()
            # chunked: counted as it arrives
            chunk = b"x" * 800
            raw = (b"POST /dm HTTP/1.1\r\nHost: t\r\nContent-Type: " + WBXML.encode()
                   + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n")
            (status, _, _), = await _exchange(srv.port, raw)
            assert status == 413
            assert _sample(metrics, "http_errors", status="413") == 2
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_header_block_too_large_is_431(loop):
    async def main():
        srv, _, _ = await _server(max_header_bytes=2048)
        try:
            raw = b"POST /dm HTTP/1.1\r\nHost: t\r\nX-Junk: " + b"a" * 4000 + b"\r\n\r\n"
            (status, headers, _), = await _exchange(srv.port, raw)
            assert status == 431 and headers["connection"] == "close"
            # a very long request line too
            raw = b"GET /" + b"b" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
            (status, _, _), = await _exchange(srv.port, raw)
            assert status == 431
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_garbage_http_is_400_and_closes(loop):
    async def main():
        srv, _, _ = await _server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
            status, _, _ = await _read_response(reader)
            assert status == 400
            assert await reader.read() == b""
            writer.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_undecodable_body_is_400_and_the_connection_lives_on(loop):
    async def main():
        srv, _, metrics = await _server()
        try:
            raw = post("/dm", b"\x03\x01\x6a\x00\xff\xff\xff") + post("/dm", b"<SyncML", XML)
            res = await _exchange(srv.port, raw, 2)
            assert [r[0] for r in res] == [400, 400]
            assert b"not a SyncML DM message" in res[0][2]
            assert not srv.sessions                       # nothing was created
            assert _sample(metrics, "messages_received", encoding="wbxml") == 1
            assert _sample(metrics, "messages_received", encoding="xml") == 1
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_slow_sender_times_out_without_disturbing_others(loop):
    async def main():
        srv, _, _ = await _server(request_timeout=0.3, keepalive_timeout=0.6)
        try:
            slow_r, slow_w = await asyncio.open_connection("127.0.0.1", srv.port)
            slow_w.write(b"POST /dm HTTP/1.1\r\nHost: t\r\nContent-")   # ... and nothing more
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", srv.port)
            # a good client meanwhile is served at once
            (status, _, _), = await _exchange(srv.port, b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status == 405
            status, headers, _ = await _read_response(slow_r)
            assert status == 408 and headers["connection"] == "close"
            assert await asyncio.wait_for(slow_r.read(), 5) == b""
            # the idle keep-alive connection is closed silently later
            assert await asyncio.wait_for(idle_r.read(), 5) == b""
            slow_w.close()
            idle_w.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_max_connections_answers_503(loop):
    async def main():
        srv, _, metrics = await _server(max_connections=2)
        try:
            conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
            await asyncio.sleep(0.05)
            (status, headers, _), = await _exchange(srv.port, b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status == 503 and headers["retry-after"] == "5"
            assert _sample(metrics, "rejected", cap="connections") == 1
            for r, w in conns:      # the first two still work
                w.write(b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await _read_response(r))[0] == 405
                w.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_extra_get_route_and_head(loop):
    async def main():
        srv, _, _ = await _server()

        async def content(request):
            if request.path == "/content/fw1":
                return HttpResponse(200, b"firmware-bytes", "application/octet-stream",
                                    [("ETag", '"v1"')])
            return HttpResponse(404, b"no\n", "text/plain")
        srv.add_get_route("/content/", content)
        try:
            raw = (b"GET /content/fw1 HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1\r\n\r\n"
                   b"HEAD /content/fw1 HTTP/1.1\r\nHost: t\r\n\r\n"
                   b"GET /content/nope HTTP/1.1\r\nHost: t\r\n\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(raw)
            s1, h1, b1 = await _read_response(reader)
            head = await reader.readuntil(b"\r\n\r\n")       # HEAD: headers only
            s3, _, b3 = await _read_response(reader)
            writer.close()
            assert (s1, b1, h1["etag"]) == (200, b"firmware-bytes", '"v1"')
            assert b"200 OK" in head and b"Content-Length: 14" in head
            assert s3 == 404 and b3 == b"no\n"
            with pytest.raises(ConfigError):
                srv.add_get_route("content", content)
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_tls_from_configuration(loop, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main():
        srv, _, _ = await _server(tls_cert=str(cert_file), tls_key=str(key_file))
        try:
            assert srv.url.startswith("https://")
            (status, _, _), = await _exchange(srv.port, b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n",
                                              ssl_ctx=client_ctx)
            assert status == 405
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())
    with pytest.raises(ConfigError):
        ServerConfig(tls_cert=str(cert_file))
    with pytest.raises(ConfigError):
        ServerConfig(tls_cert=str(tmp_path / "missing.pem"),
                     tls_key=str(tmp_path / "missing.key")).make_ssl_context()


def test_graceful_shutdown_stops_accepting_and_closes_idle(loop):
    async def main():
        srv, _, _ = await _server()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await _read_response(reader))[0] == 405
        port = srv.port
        await srv.shutdown(1.0)
        assert await asyncio.wait_for(reader.read(), 5) == b""    # idle connection closed
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    loop.run_until_complete(main())


def test_config_limits_are_checked():
    with pytest.raises(ConfigError):
        ServerConfig(path="dm")
    with pytest.raises(ConfigError):
        ServerConfig(max_sessions=0)
    assert ServerConfig(max_msg_size=100, max_body_slack=10).max_body == 110


def test_random_bytes_never_break_the_server(loop):
    """Whatever a connection sends, the server answers with an HTTP status or closes it, and
    a well-behaved client on another connection is still served afterwards."""
    import random

    rng = random.Random(5)
    seeds = [b"POST /dm HTTP/1.1\r\n", b"Content-Type: application/vnd.syncml.dm+wbxml\r\n",
             b"Content-Length: 12\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n",
             b"\x03\x01\x6a\x00\x6d\x6c", b"GET /content/x HTTP/1.0\r\n", b"0\r\n\r\n",
             b"Expect: 100-continue\r\n", b"\xff\xfe\x00", b"Host: a\r\n"]

    async def one(port: int, data: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        writer.write_eof()
        out = await asyncio.wait_for(reader.read(), 5)   # closes after answering or at EOF
        writer.close()
        for part in out.split(b"HTTP/1.1 ")[1:]:
            assert part[:3].isdigit(), out

    async def main():
        srv, _, _ = await _server(request_timeout=2.0)
        try:
            for _ in range(120):
                data = b"".join(rng.choice(seeds) if rng.random() < 0.7 else
                                bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
                                for _ in range(rng.randint(1, 8)))
                await one(srv.port, data)
            (status, _, _), = await _exchange(srv.port, b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status == 405
            assert srv.pending == 0
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


# --- file parts of GET routes: streamed, flow-controlled ------------------------------------------


def _file_route(path, length=None, offset=0):
    """A GET route answering like content.ContentResponse: a head, then a file part."""
    import types

    async def route(request):
        n = length if length is not None else os.path.getsize(path) - offset
        return types.SimpleNamespace(status=200, body=b"", path=str(path), offset=offset,
                                     length=n, head=False,
                                     headers=[("Content-Type", "application/octet-stream"),
                                              ("Content-Length", str(n))])
    return route


async def _small_window_connection(port: int):
    """A client whose receive buffer is small: the server's send buffers fill quickly."""
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=64 * 1024)


async def _drain_until_closed(reader: asyncio.StreamReader) -> int:
    n = 0
    try:
        while block := await asyncio.wait_for(reader.read(1 << 20), 5):
            n += len(block)
    except ConnectionError:
        pass
    return n


def _pattern(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def test_stalled_download_is_cut_off_buffers_stay_bounded_others_served(loop, tmp_path):
    """A device that stops reading mid-download: the server stops reading the file (its
    transport buffer stays near one chunk), cuts the device off after keepalive_timeout, and
    other connections are served meanwhile, pipelined requests in order."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)            # sparse: 64 MB of zeros, no disk used
    small = tmp_path / "small"
    data = _pattern(3 * 1024 * 1024 + 512)
    small.write_bytes(data)

    async def main():
        chunk = 64 * 1024
        srv, _, _ = await _server(keepalive_timeout=0.5, send_chunk=chunk)
        srv.add_get_route("/big", _file_route(big))
        srv.add_get_route("/small", _file_route(small))
        try:
            r, w = await _small_window_connection(srv.port)
            w.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")     # waits behind the download
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert b"200 OK" in head and b"Content-Length: 67108864" in head
            await r.readexactly(100_000)
            # ... and reads nothing more.  The server soon waits for the device:
            conn = None
            for _ in range(200):
                conn = next((c for c in srv.connections if c.sending and c.write_paused), None)
                if conn is not None:
                    break
                await asyncio.sleep(0.01)
            assert conn is not None, "the sender never saw the transport's buffer full"
            assert conn.transport.get_write_buffer_size() <= 4 * chunk
            assert conn.queue and conn.busy           # the pipelined GET /dm waits its turn

            # another device meanwhile: a whole file and a pipelined request, in order
            r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
            w2.write(b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")
            s1, h1, b1 = await _read_response(r2)
            s2, _, _ = await _read_response(r2)
            s3, _, b3 = await _read_response(r2)
            assert (s1, s2, s3) == (200, 405, 200) and b1 == data and b3 == data
            assert h1["content-length"] == str(len(data))

            # the stalled device is cut off: far less than the file, its GET /dm never answered
            for _ in range(500):
                if conn not in srv.connections:
                    break
                await asyncio.sleep(0.01)
            got = await _drain_until_closed(r)
            assert got < 64 * 1024 * 1024 - 100_000
            assert conn not in srv.connections and srv.pending == 0
            w.close()
            w2.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_file_shorter_than_promised_aborts_the_connection(loop, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 300_000)

    async def main():
        srv, _, _ = await _server(send_chunk=64 * 1024)
        srv.add_get_route("/short", _file_route(path, length=1_000_000))
        srv.add_get_route("/gone", _file_route(tmp_path / "missing", length=10))
        try:
            for url in (b"/short", b"/gone"):
                r, w = await asyncio.open_connection("127.0.0.1", srv.port)
                w.write(b"GET " + url + b" HTTP/1.1\r\nHost: t\r\n\r\n"
                        b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                assert b"200 OK" in head
                got = await _drain_until_closed(r)     # the body stops short; no 405 after it
                assert got == (300_000 if url == b"/short" else 0)
                w.close()
            # the server is fine
            (status, _, _), = await _exchange(srv.port, b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status == 405 and srv.pending == 0
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_streamed_part_with_offset_head_and_connection_close(loop, tmp_path):
    path = tmp_path / "f"
    data = _pattern(1_000_000)
    path.write_bytes(data)

    async def main():
        srv, _, _ = await _server(send_chunk=100_000)
        srv.add_get_route("/part", _file_route(path, length=250_001, offset=123_456))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.write(b"HEAD /part HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"GET /part HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"GET /part HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                    b"GET /dm HTTP/1.1\r\nHost: t\r\n\r\n")          # after close: unanswered
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert b"Content-Length: 250001" in head
            for _ in range(2):
                status, headers, body = await _read_response(r)
                assert status == 200 and body == data[123_456:123_456 + 250_001]
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            for _ in range(100):
                if srv.pending == 0 and not srv.connections:
                    break
                await asyncio.sleep(0.01)
            assert srv.pending == 0 and not srv.connections
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_streamed_part_over_tls_and_shutdown_mid_download(loop, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    small = tmp_path / "small"
    data = _pattern(2 * 1024 * 1024 + 256)
    small.write_bytes(data)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(256 * 1024 * 1024)           # sparse

    async def main():
        srv, _, _ = await _server(tls_cert=str(cert_file), tls_key=str(key_file),
                                  send_chunk=64 * 1024)
        srv.add_get_route("/small", _file_route(small))
        srv.add_get_route("/big", _file_route(big))
        (status, _, body), = await _exchange(
            srv.port, b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n", ssl_ctx=client_ctx)
        assert status == 200 and body == data
        r, w = await asyncio.open_connection("127.0.0.1", srv.port, ssl=client_ctx)
        w.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        await r.readexactly(200_000)
        await srv.shutdown(0.1)                   # mid-download: the device is cut off
        assert not srv._tasks and not srv.connections
        got = await _drain_until_closed(r)
        assert got < 256 * 1024 * 1024 - 200_000
        w.close()
    loop.run_until_complete(main())


def test_replies_queued_for_the_loop_turn_keep_their_order(loop):
    """Keep-alive replies go out at the end of the loop turn (one burst); a reply that
    closes the connection, and the close itself, still come after the replies queued
    before it."""
    async def main():
        srv, _, _ = await _server()
        try:
            raw = (post("/dm", b"x", "text/plain") + post("/elsewhere", b"y")
                   + post("/dm", b"x", "text/plain")
                   + b"GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(raw)
            got = [await _read_response(reader) for _ in range(4)]
            assert [r[0] for r in got] == [415, 404, 415, 404]
            assert got[3][1].get("connection") == "close"
            assert await reader.read() == b""                    # closed after the last
            writer.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_100_continue_waits_for_the_replies_to_earlier_pipelined_requests(loop):
    """Expect: 100-continue on a request pipelined behind one still being answered: the
    interim 100 goes out after that answer (before it, the client would take it as the
    first request's), then the body is read and answered."""
    from dmengine import _wbxml
    from dmengine.message import Command, Item, Message, SyncHdr

    class SlowFirst(MemoryDeviceHandler):
        calls = 0

        async def account_for(self, dev_id, username):
            SlowFirst.calls += 1
            if SlowFirst.calls == 1:
                await asyncio.sleep(0.1)        # the first request is still being answered
            return None

    def pkg1(dev: str) -> bytes:
        return _wbxml.encode(Message(
            hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1",
                        target="http://t/dm", source=dev),
            commands=[Command(name="Alert", cmd_id="1", data="1201"),
                      Command(name="Replace", cmd_id="2", items=[Item(source="./DevInfo/DevId", data=dev)])],
            final=True))

    async def main():
        srv = DmServer(ServerConfig(host="127.0.0.1", port=0, require_auth="none"), SlowFirst())
        await srv.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            second = pkg1("IMEI:2")
            writer.write(post("/dm", pkg1("IMEI:1")) +
                         (f"POST /dm HTTP/1.1\r\nHost: t\r\nContent-Type: {WBXML}\r\n"
                          f"Content-Length: {len(second)}\r\nExpect: 100-continue\r\n\r\n").encode())
            first = await _read_response(reader)
            assert first[0] == 200                  # not preceded by the second request's 100
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(second)
            status, _, body = await _read_response(reader)
            assert status == 200 and _wbxml.decode(body).hdr.target == "IMEI:2"
            writer.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())


def test_100_continue_at_once_when_nothing_is_ahead(loop):
    async def main():
        srv, _, _ = await _server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write((f"POST /dm HTTP/1.1\r\nHost: t\r\nContent-Type: {WBXML}\r\n"
                          f"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n").encode())
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"abc")
            status, _, _ = await _read_response(reader)
            assert status == 400                    # not a SyncML message: but read and answered
            writer.close()
        finally:
            await srv.shutdown(0.1)
    loop.run_until_complete(main())
