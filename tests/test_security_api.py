"""Issue 13: attacks on the API port and on content downloads, driven over real HTTP against
the real engine (LMDB store in a tmp dir, device port and API port on loopback).

Each test is named after what must hold; the finding it covers is in its docstring.  Where
aiohttp's client would refuse to send the bytes (a chunked body that never ends, a header
value that is not UTF-8), the request is written on a raw socket.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import lmdb
import pytest
import trustme
import uvloop

from conftest import api_client, bounded
from dmengine.content import UNSATISFIABLE, ByteRange, parse_range
from dmengine.engine import Engine, EngineConfig
from dmengine.store.lmdb import LmdbStore

KEY = "k-security-tests-0123456789"
IMEI = "356938035643809"
DEV = {"devId": f"IMEI:{IMEI}", "imei": IMEI, "msisdn": "+491701234567"}


# --- harness ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engine(tmp_path: Any, *, store: Any = None, **cfg: Any) -> AsyncIterator[Engine]:
    cfg.setdefault("api_key", KEY)
    e = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0, **cfg),
               store=store)
    await e.start()
    try:
        yield e
    finally:
        await e.stop()


def hdrs() -> dict[str, str]:
    return {"X-API-Key": KEY}


def api_addr(e: Engine) -> tuple[str, int]:
    u = urlsplit(e.api_url)
    return u.hostname or "127.0.0.1", u.port or 0


def device_addr(e: Engine) -> tuple[str, int]:
    u = urlsplit(e.device_url)
    return u.hostname or "127.0.0.1", u.port or 0


class Raw:
    """An HTTP/1.1 answer read off a raw socket: status, header lines as bytes, body."""

    def __init__(self, status: int, head: bytes, body: bytes) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = []
        for line in head.split(b"\r\n")[1:]:
            if line:
                k, _, v = line.partition(b":")
                self.headers.append((k.strip().lower(), v.strip()))

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> Raw:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split(b" ", 2)[1])
    raw = Raw(status, head[:-4], b"")
    n = raw.header(b"content-length")
    if n is not None:
        raw.body = await asyncio.wait_for(reader.readexactly(int(n)), timeout)
    return raw


async def raw_request(addr: tuple[str, int], data: bytes, *, timeout: float = 10.0) -> Raw:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader, timeout)
    finally:
        writer.close()


def assert_error_shape(body: Any, where: str | None = None) -> None:
    assert set(body) == {"error", "message", "where"}, body
    if where is not None:
        assert body["where"] == where, body


async def upload(e: Engine, data: bytes, **query: str) -> aiohttp.ClientResponse:
    q = {"name": "fw.bin", **query}
    async with api_client() as http:
        async with http.post(e.api_url + "v1/content", params=q, data=io.BytesIO(data),
                             headers=hdrs()) as r:
            await r.read()
            return r


# --- finding 9: secrets in task and device answers --------------------------------------------


def test_bootstrap_task_answer_shows_no_password_or_nonce(tmp_path):
    """Finding 9: GET /v1/tasks/{id} of a bootstrap task showed the generated client and
    server passwords and nonces (TaskData.record.op.account); the device answer showed the
    nonces."""
    async def main() -> None:
        async with engine(tmp_path) as e, api_client(headers=hdrs()) as http:
            async with http.post(e.api_url + "v1/devices", json=DEV) as r:
                assert r.status == 201, await r.text()
            async with http.post(e.api_url + "v1/bootstrap",
                                 json={"target": {"devId": DEV["devId"]}}) as r:
                assert r.status == 201, await r.text()
                task_id = (await r.json())["taskId"]
            stored_dev = await e.store.get_device(DEV["devId"])
            stored_task = await e.store.get_task(task_id)
            accounts = [stored_dev.pending_account, stored_task.op.account]
            secrets = {getattr(acc, f) for acc in accounts
                       for f in ("client_password", "server_password", "client_nonce",
                                 "server_nonce", "client_key", "server_key")} - {None, ""}
            assert len(secrets) >= 4          # the two passwords and the two nonces at least
            answers = []
            for path in (f"v1/tasks/{task_id}", f"v1/devices/{DEV['devId']}"):
                async with http.get(e.api_url + path) as r:
                    assert r.status == 200
                    answers.append(await r.read())
            task_answer = json.loads(answers[0])
            assert task_answer["operation"] == "BOOTSTRAP"
            acc = task_answer["op"]["account"]
            assert acc["clientPassword"] == "***" and acc["clientName"]
            for body in answers:
                for s in secrets:
                    assert s.encode() not in body
                    assert json.dumps(s)[1:-1].encode() not in body
    uvloop.run(bounded(main()))


# --- finding 11a: a chunked JSON body past the limit ------------------------------------------


@pytest.mark.parametrize("path", ["/v1/devices", "/v1/capabilities", "/v1/operations",
                                  "/v1/bootstrap"])
def test_chunked_json_body_past_the_limit_is_refused_while_reading(tmp_path, path):
    """Finding 11a: without Content-Length a chunked body was buffered up to the 2 GiB upload
    limit.  The server must answer 413 once 1 MiB has arrived, without waiting for the end of
    a body that never ends."""
    async def main() -> None:
        async with engine(tmp_path) as e:
            reader, writer = await asyncio.open_connection(*api_addr(e))
            try:
                writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                             "Content-Type: application/json\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n".encode())
                piece = b" " * 65536
                writer.write(b"%x\r\n%s\r\n" % (1, b"{"))
                for _ in range(24):                 # 1.5 MiB of whitespace, never terminated
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                ans = await read_answer(reader, timeout=10)
            finally:
                writer.close()
            assert ans.status == 413
            assert_error_shape(ans.json(), "$")
            assert ans.json()["error"] == "too_large"
            # a small chunked body still goes through
            body = json.dumps(DEV).encode()
            ok = await raw_request(api_addr(e), (
                f"POST /v1/devices HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                "Connection: close\r\n\r\n").encode()
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            assert ok.status == 201, ok.body
            # and the content upload is not held to the JSON limit
            big = os.urandom(3 * 1024 * 1024)
            r = await upload(e, big, sha256=hashlib.sha256(big).hexdigest())
            assert r.status == 201
    uvloop.run(bounded(main()))


# --- finding 11b: the content type --------------------------------------------------------


@pytest.mark.parametrize("ctype", [
    "text/html\r\nSet-Cookie: session=stolen",
    "text/html\nX-Injected: 1",
    "application/x-\u20ac",                 # not Latin-1: the download answered 500
    "application/x-caf\u00e9",              # Latin-1, but not ASCII
    "application/octet-stream\x00",
    "",
    "octet-stream",
    "application/",
    "/x",
    "application/x" + "a" * 200,
    "text/plain; charset",
])
def test_bad_content_type_is_refused_at_upload(tmp_path, ctype):
    """Finding 11b: the ``type`` query parameter of uploadContent went raw into the download
    response headers.  It must be a media type (``type/subtype`` with parameters, printable
    ASCII, at most 128 characters) or the upload is refused with 400 naming ``type``."""
    async def main() -> None:
        async with engine(tmp_path) as e:
            r = await upload(e, b"firmware", type=ctype)
            assert r.status == 400
            assert_error_shape(await r.json(), "type")
            assert (await e.store.list_content()).items == []
            assert [n for n in os.listdir(e.content.root_dir)] == []
    uvloop.run(bounded(main()))


@pytest.mark.parametrize("ctype", ["application/vnd.oma.dd+xml", "application/octet-stream",
                                   'text/plain; charset="utf-8"', "application/x-fw; v=2.4"])
def test_good_content_type_is_kept_and_served(tmp_path, ctype):
    async def main() -> None:
        async with engine(tmp_path) as e:
            r = await upload(e, b"firmware", type=ctype)
            assert r.status == 201, await r.text()
            cid = (await r.json())["contentId"]
            ans = await raw_request(device_addr(e), f"GET /content/{cid} HTTP/1.1\r\n"
                                    "Host: x\r\nConnection: close\r\n\r\n".encode())
            assert ans.status == 200 and ans.body == b"firmware"
            assert ans.header(b"content-type") == ctype.encode()
    uvloop.run(bounded(main()))


@pytest.mark.parametrize("stored", ["text/html\r\nX-Injected: 1", "application/x-\u20ac",
                                    "text/html\nX-Injected: 1"])
def test_download_never_sends_a_broken_content_type_header(tmp_path, stored):
    """Finding 11b, the serving side: a record whose type was stored before the upload check
    existed must not split the response (CR/LF) nor make it fail (not Latin-1)."""
    async def main() -> None:
        async with engine(tmp_path) as e:
            r = await upload(e, b"firmware")
            cid = (await r.json())["contentId"]
            await e.store.update_content(cid, {"content_type": stored})   # an old record
            ans = await raw_request(device_addr(e), f"GET /content/{cid} HTTP/1.1\r\n"
                                    "Host: x\r\nConnection: close\r\n\r\n".encode())
            assert ans.status == 200 and ans.body == b"firmware"
            assert b"x-injected" not in ans.head.lower()
            assert ans.header(b"content-type") == b"application/octet-stream"
            assert all(re.fullmatch(rb"[\x20-\x7e]*", v) for _, v in ans.headers)
    uvloop.run(bounded(main()))


# --- finding 11c: absurd Range values -----------------------------------------------------------


DIGITS = "9" * 5000


@pytest.mark.parametrize("rng,status,first_byte", [
    (f"bytes={DIGITS}-", 416, None),                 # starts past any end
    (f"bytes=0-{DIGITS}", 206, 0),                   # last byte past the end: clamped
    (f"bytes=-{DIGITS}", 206, 0),                    # suffix longer than the file: all of it
    (f"bytes={DIGITS}-9", 200, 0),                   # end before start: header ignored
    (f"bytes={'0' * 5000}1-", 206, 1),               # many leading zeros are still a number
])
def test_absurd_range_is_416_or_ignored_never_500(tmp_path, rng, status, first_byte):
    """Finding 11c: a Range of thousands of digits made int() raise (Python's 4300-digit
    limit) and the download answered 500."""
    async def main() -> None:
        async with engine(tmp_path) as e:
            data = bytes(range(256)) * 4
            r = await upload(e, data)
            cid = (await r.json())["contentId"]
            ans = await raw_request(device_addr(e), f"GET /content/{cid} HTTP/1.1\r\nHost: x\r\n"
                                    f"Range: {rng}\r\nConnection: close\r\n\r\n".encode())
            assert ans.status == status, ans.head
            if first_byte is not None:
                assert ans.body == data[first_byte:]
            else:
                assert ans.header(b"content-range") == b"bytes */%d" % len(data)
    uvloop.run(bounded(main()))


def test_parse_range_never_raises_on_long_numbers():
    assert parse_range(f"bytes={DIGITS}-", 10) is UNSATISFIABLE
    assert parse_range(f"bytes=2-{DIGITS}", 10) == ByteRange(2, 8)
    assert parse_range(f"bytes=-{DIGITS}", 10) == ByteRange(0, 10)
    assert parse_range(f"bytes={'0' * 9000}3-4", 10) == ByteRange(3, 2)


# --- finding 11d: an API key that is not ASCII ------------------------------------------------


@pytest.mark.parametrize("header", [b"X-API-Key: \xff\xfe", b"X-API-Key: caf\xc3\xa9",
                                    b"Authorization: Bearer \xff", b"X-API-Key: \x80" + b"a" * 40])
def test_non_ascii_api_key_is_401(tmp_path, header):
    """Finding 11d: a key header with bytes that are not UTF-8 made hmac.compare_digest (or the
    encode before it) raise, and the API answered 500."""
    async def main() -> None:
        async with engine(tmp_path) as e:
            ans = await raw_request(api_addr(e), b"GET /v1/tasks/t1 HTTP/1.1\r\nHost: x\r\n"
                                    + header + b"\r\nConnection: close\r\n\r\n")
            assert ans.status == 401, ans.head
            assert_error_shape(ans.json(), "X-API-Key")
    uvloop.run(bounded(main()))


# --- finding 12: where the API listens, TLS, the key and the log ----------------------------


def test_api_stays_on_loopback_when_the_device_port_is_public(tmp_path):
    """Finding 12: ``--host`` put the API and the unauthenticated /metrics wherever the device
    port went.  The API has its own bind address, loopback by default."""
    async def main() -> None:
        async with engine(tmp_path, host="0.0.0.0") as e:
            assert e.server is not None
            dev_socks = [s.getsockname()[0] for s in e.server._server.sockets]
            assert dev_socks and set(dev_socks) == {"0.0.0.0"}
            api = e.api_runner.addresses
            assert api and all(a[0] == "127.0.0.1" for a in api), api
            assert e.api_url.startswith("http://127.0.0.1:")
            async with api_client() as http:
                async with http.get(e.api_url + "health") as r:
                    assert r.status == 200
        async with engine(tmp_path, host="127.0.0.1", api_host="::1") as e:
            assert all(a[0] == "::1" for a in e.api_runner.addresses)
            assert e.api_url.startswith("http://[::1]:")
    uvloop.run(bounded(main()))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "api.pem"))
    cert.private_key_pem.write_to_path(str(d / "api.key"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return str(d / "api.pem"), str(d / "api.key"), str(d / "ca.pem")


def test_api_over_tls(tmp_path, tls_files):
    """Finding 12: the API port can speak TLS (its own certificate, apart from the device
    port's); plain HTTP is then not answered."""
    cert, key, ca = tls_files

    async def main() -> None:
        async with engine(tmp_path, api_tls_cert=cert, api_tls_key=key) as e:
            assert e.api_url.startswith("https://127.0.0.1:")
            assert e.device_url.startswith("http://")        # the device port is untouched
            ctx = ssl.create_default_context(cafile=ca)
            async with api_client(headers=hdrs()) as http:
                async with http.get(e.api_url + "health", ssl=ctx) as r:
                    assert r.status == 200
                async with http.get(e.api_url + "v1/tasks/nope", ssl=ctx) as r:
                    assert r.status == 404
                with pytest.raises(aiohttp.ClientError):
                    async with http.get(e.api_url.replace("https:", "http:") + "health") as r:
                        await r.read()
    uvloop.run(bounded(main()))


def test_api_tls_needs_both_files(tmp_path, tls_files):
    from dmengine.errors import ConfigError
    cert, _, _ = tls_files

    async def main() -> None:
        with pytest.raises(ConfigError) as ei:
            async with engine(tmp_path, api_tls_cert=cert):
                pass
        assert ei.value.key == "api_tls_key"
    uvloop.run(bounded(main()))


def test_api_key_never_reaches_the_log(tmp_path, caplog):
    """Finding 12: the key is printed once by ``serve`` but must not go into the logging
    system, even at DEBUG, while the engine starts and serves API requests (right, wrong and
    missing keys, a bad body, an unknown task)."""
    caplog.set_level(logging.DEBUG)

    async def main() -> str:
        logging.getLogger("dmengine.test").debug("capture works")     # the check sees records
        async with engine(tmp_path, api_key=None) as e:      # generated and kept in DATA
            key = e.api_key
            assert key and (tmp_path / "var" / "api-key").read_text().strip() == key
            async with api_client() as http:
                for path, h in [("health", {}), ("metrics", {}), ("docs", {"X-API-Key": key}),
                                ("v1/tasks/nope", {"X-API-Key": key}),
                                ("v1/tasks/nope", {"Authorization": f"Bearer {key}"}),
                                ("v1/tasks/nope", {"X-API-Key": key + "x"}),
                                ("v1/tasks/nope", {"X-API-Key": key[:-1]})]:
                    async with http.get(e.api_url + path, headers=h) as r:
                        await r.read()
                async with http.post(e.api_url + "v1/devices", data=b"{not json",
                                     headers={"X-API-Key": key}) as r:
                    assert r.status == 400
            await raw_request(api_addr(e), b"GET /v1/tasks/x HTTP/1.1\r\nHost: x\r\n"
                              b"X-API-Key: \xff\r\nConnection: close\r\n\r\n")
            return key
    key = uvloop.run(bounded(main()), debug=True)              # the event loop's debug logging too
    assert any(r.name == "dmengine.test" for r in caplog.records), "log capture is not working"
    for rec in caplog.records:
        text = rec.getMessage() + repr(rec.args) + (rec.exc_text or "")
        if rec.exc_info:
            text += logging.Formatter().formatException(rec.exc_info)
        assert key not in text, f"API key in log record {rec.name}: {rec.getMessage()!r}"
    assert key not in caplog.text
    assert key not in repr(EngineConfig(api_key=key))


LINE = re.compile(r"^(device port|API|docs|metrics|health|content|API key): (\S+)$")


def start_serve(data_dir: str, *extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    p = subprocess.Popen([sys.executable, "-m", "dmengine", "serve", "--data", data_dir,
                          "--device-port", "0", "--api-port", "0", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 30
    assert p.stdout is not None
    while "API key" not in seen:
        assert time.monotonic() < deadline, f"serve printed only {seen}"
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited: {p.wait()} {p.stderr.read() if p.stderr else ''}")
        m = LINE.match(line.strip())
        if m:
            seen[m.group(1)] = m.group(2)
    return p, seen


def stop_serve(p: subprocess.Popen) -> tuple[int, str]:
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return p.returncode, err


def get(url: str, key: str | None = None, ctx: ssl.SSLContext | None = None
        ) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_api_host_and_api_tls_options(tmp_path, tls_files):
    """Finding 12 through the CLI: ``--host`` moves the device port only; ``--api-host`` and
    ``--api-tls-cert/--api-tls-key`` configure the API port."""
    cert, key, ca = tls_files
    p, urls = start_serve(str(tmp_path / "var"), "--host", "0.0.0.0",
                          "--api-tls-cert", cert, "--api-tls-key", key)
    try:
        assert re.fullmatch(r"http://0\.0\.0\.0:\d+/dm", urls["device port"])
        assert re.fullmatch(r"https://127\.0\.0\.1:\d+/", urls["API"])
        ctx = ssl.create_default_context(cafile=ca)
        assert get(urls["health"], ctx=ctx) == (200, b'{"status":"ok"}')
        assert get(urls["API"] + "v1/tasks/nope", urls["API key"], ctx)[0] == 404
    finally:
        rc, err = stop_serve(p)
    assert rc == 0, err
    assert urls["API key"] not in err
    p, urls = start_serve(str(tmp_path / "var"), "--api-host", "::1")
    try:
        assert re.fullmatch(r"http://\[::1\]:\d+/", urls["API"])
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dm", urls["device port"])
        assert get(urls["health"]) == (200, b'{"status":"ok"}')
    finally:
        rc, err = stop_serve(p)
    assert rc == 0, err


# --- finding 13b: /health and a dead store writer ------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_when_the_store_writer_died(tmp_path):
    """Finding 13b: /health said ok while the group-commit writer thread was dead (every write
    would fail).  The fault is injected where a real one surfaces: an lmdb.Error out of the
    writer's periodic stale-reader sweep, outside the per-batch error handling."""
    async def main() -> None:
        store = LmdbStore(tmp_path / "store", reader_check_interval=0.05)
        async with engine(tmp_path, store=store) as e, api_client() as http:
            async with http.get(e.api_url + "health") as r:
                assert (r.status, await r.json()) == (200, {"status": "ok"})

            def sweep_fails() -> int:
                raise lmdb.Error("injected: mdb_reader_check: Input/output error")
            store.reader_check = sweep_fails           # type: ignore[method-assign]
            for _ in range(200):
                if not store._thread.is_alive():
                    break
                await asyncio.sleep(0.01)
            assert not store._thread.is_alive()
            async with http.get(e.api_url + "health") as r:
                assert r.status == 503
                body = await r.json()
            assert_error_shape(body, "store")
            assert body["error"] == "unhealthy"
            assert "writer" in body["message"] and "Input/output error" in body["message"]
            assert store.fault() == body["message"]
    uvloop.run(bounded(main()))


def test_health_is_503_when_the_store_is_closed(tmp_path):
    async def main() -> None:
        async with engine(tmp_path) as e, api_client() as http:
            assert e.broker is not None
            await e.broker.stop()                  # nobody else touches the store meanwhile
            await e.store.close()
            async with http.get(e.api_url + "health") as r:
                assert r.status == 503
                body = await r.json()
            assert_error_shape(body, "store")
            assert "closed" in body["message"]
    uvloop.run(bounded(main()))


def test_memory_store_reports_its_fault():
    from dmengine.store.memory import MemoryStore

    async def main() -> None:
        s = MemoryStore()
        assert s.fault() is None
        await s.close()
        assert "closed" in (s.fault() or "")
    asyncio.run(bounded(main()))


# --- finding 13c: restore --force under a running server ----------------------------------


def test_restore_force_refuses_while_a_server_has_the_store_open(tmp_path):
    """Finding 13c: ``store restore --force`` deleted LMDB's lock file and replaced the data
    file under a running server.  It must refuse (exit 2, saying why) while any process has
    the store open, and work once the server is stopped."""
    data = tmp_path / "var"
    env_dir = str(data / "store")
    bak = str(tmp_path / "bak")

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dmengine", "store", *args],
                              capture_output=True, text=True, timeout=60)

    p, urls = start_serve(str(data))
    try:
        key = urls["API key"]
        req = urllib.request.Request(urls["API"] + "v1/devices", data=json.dumps(DEV).encode(),
                                     headers={"X-API-Key": key,
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 201
        r1 = admin("backup", bak, "--data", env_dir)        # online backup is fine
        assert r1.returncode == 0, r1.stderr
        data_file = os.stat(os.path.join(env_dir, "data.mdb"))
        r2 = admin("restore", bak, "--data", env_dir, "--force")
        assert r2.returncode == 2, r2.stdout + r2.stderr
        assert "in use" in r2.stderr and "stop the server" in r2.stderr
        assert "Traceback" not in r2.stderr
        # nothing was touched: same data file, LMDB's lock file still there, server fine
        assert os.stat(os.path.join(env_dir, "data.mdb")).st_ino == data_file.st_ino
        assert os.path.exists(os.path.join(env_dir, "lock.mdb"))
        assert not os.path.exists(os.path.join(env_dir, "data.mdb.restore"))
        assert get(urls["health"]) == (200, b'{"status":"ok"}')
        assert get(urls["API"] + f"v1/devices/{DEV['devId']}", key)[0] == 200
    finally:
        rc, err = stop_serve(p)
    assert rc == 0, err
    r3 = admin("restore", bak, "--data", env_dir, "--force")
    assert r3.returncode == 0, r3.stderr
    r4 = admin("check", "--data", env_dir)
    assert r4.returncode == 0, r4.stdout + r4.stderr


def test_restore_refused_in_process_while_a_store_is_open(tmp_path):
    """The same rule for the function, with the store open in this very process."""
    from dmengine.errors import StoreError
    from dmengine.store import admin

    async def main() -> None:
        s = LmdbStore(tmp_path / "env")
        await s.close()
        admin.backup(tmp_path / "env", tmp_path / "bak")
        s = LmdbStore(tmp_path / "env")
        try:
            with pytest.raises(StoreError, match="in use"):
                admin.restore(tmp_path / "bak", tmp_path / "env", force=True)
        finally:
            await s.close()
        admin.restore(tmp_path / "bak", tmp_path / "env", force=True)
    asyncio.run(bounded(main()))
