"""Content ingestion and download (dmengine/content.py).

Ingest: streamed to disk, sha256 and size checked, size limit, atomic rename, record in the
store (MemoryStore; one test on LmdbStore).  Serving: RFC 7233 single ranges over real HTTP
(an aiohttp server in this file that calls ``ContentService.serve`` and streams with
``iter_body``), resume of an interrupted download, 416 cases, download counting.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from dmengine.content import (CONTENT_PREFIX, UNSATISFIABLE, ByteRange, ContentResponse, ContentService,
                              content_id_from_path, download_url, iter_body, parse_range)
from dmengine.errors import (AlreadyExists, ContentError, ContentMismatch, ContentTooLarge,
                             DmError, NoContentFits, NotFound, ServiceError)
from dmengine.store.memory import MemoryStore

# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: Any) -> Callable[[Awaitable[Any]], Any]:
    """Runs a coroutine on a fresh loop of each kind; stray loop errors fail the test."""
    def runner(coro: Awaitable[Any]) -> Any:
        loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            assert not errors, errors
    return runner


def payload(n: int, seed: int = 1) -> bytes:
    """``n`` deterministic, non-repeating-looking bytes."""
    out = bytearray()
    block = seed.to_bytes(8, "big")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


async def chunks(data: bytes, size: int = 7000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


class Producer:
    """An endless upload that records how far it was read and whether it was closed."""

    def __init__(self, piece: bytes) -> None:
        self.piece = piece
        self.sent = 0
        self.closed = False

    async def gen(self) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                self.sent += len(self.piece)
                yield self.piece
        finally:
            self.closed = True


def files_in(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --- ingest ---------------------------------------------------------------------------------


def test_ingest_with_sha256_stores_file_and_record(run: Any, tmp_path: pathlib.Path) -> None:
    data = payload(300_001)

    async def main() -> Any:
        store = MemoryStore()
        svc = ContentService(store, tmp_path, chunk=64 * 1024)
        c = await svc.ingest(chunks(data), name="fw 2.0", sha256=sha(data).upper(),
                             size=len(data), capability="cap1", from_version="1.0",
                             to_version="2.0", content_type="application/vnd.oma.fw")
        return c, await svc.get(c.content_id), svc

    c, again, svc = run(main())
    assert c == again
    assert c.size == len(data) and c.sha256 == sha(data)
    assert (c.capability, c.from_version, c.to_version) == ("cap1", "1.0", "2.0")
    assert c.content_type == "application/vnd.oma.fw" and c.created > 0
    assert files_in(tmp_path) == [c.content_id]                 # no temp file left
    assert pathlib.Path(svc.file_of(c)).read_bytes() == data


def test_ingest_without_sha256_computes_it(run: Any, tmp_path: pathlib.Path) -> None:
    data = payload(10_000, seed=2)

    async def main() -> Any:
        svc = ContentService(MemoryStore(), tmp_path)
        a = await svc.ingest(chunks(data, 333), name="a")
        empty = await svc.ingest(chunks(b""), name="empty")
        return a, empty

    a, empty = run(main())
    assert a.sha256 == sha(data) and a.size == len(data)
    assert empty.size == 0 and empty.sha256 == sha(b"")


def test_wrong_sha256_stores_nothing(run: Any, tmp_path: pathlib.Path) -> None:
    data = payload(5000)

    async def main() -> Any:
        store = MemoryStore()
        svc = ContentService(store, tmp_path)
        with pytest.raises(ContentMismatch) as ei:
            await svc.ingest(chunks(data), name="x", sha256=sha(data + b"!"))
        return ei.value, (await store.list_content()).items

    err, items = run(main())
    assert err.where == "sha256" and "sha256" in str(err) and isinstance(err, ServiceError)
    assert items == [] and files_in(tmp_path) == []


def test_bad_sha256_syntax_and_bad_metadata_fail_before_reading(run: Any,
                                                              tmp_path: pathlib.Path) -> None:
    prod = Producer(b"x" * 100)

    async def main() -> Any:
        svc = ContentService(MemoryStore(), tmp_path)
        with pytest.raises(ContentMismatch) as e1:
            await svc.ingest(prod.gen(), name="x", sha256="abc")
        with pytest.raises(ContentError) as e2:
            await svc.ingest(prod.gen(), name="x" * 300)
        with pytest.raises(ContentMismatch) as e3:
            await svc.ingest(prod.gen(), name="x", size=-1)
        return e1.value, e2.value, e3.value

    e1, e2, e3 = run(main())
    assert e1.where == "sha256"
    assert e2.where == "$.name"
    assert e3.where == "size"
    assert prod.sent == 0 and files_in(tmp_path) == []


def test_over_size_limit_stops_reading_and_removes_partial(run: Any,
                                                         tmp_path: pathlib.Path) -> None:
    prod = Producer(b"z" * 4096)
    seen: list[list[str]] = []

    class Spy(MemoryStore):
        async def create_content(self, content: Any) -> Any:   # must never be reached
            raise AssertionError("record written for an oversized upload")

    async def main() -> Any:
        svc = ContentService(Spy(), tmp_path, max_size=100_000, chunk=8192)
        gen = prod.gen()

        async def watched() -> AsyncIterator[bytes]:
            async for p in gen:
                seen.append(files_in(tmp_path))               # the temp file exists meanwhile
                yield p
        with pytest.raises(ContentTooLarge) as ei:
            await svc.ingest(watched(), name="big")
        await gen.aclose()
        return ei.value

    err = run(main())
    assert "max_size=100000" in str(err) and err.limit == 100_000 and err.where == "size"
    assert err.http_status == 413
    assert prod.sent <= 100_000 + 2 * 4096                    # stopped right after the limit
    assert any(n.startswith(".tmp-") for n in seen[-1])
    assert files_in(tmp_path) == []                           # partial file removed


def test_declared_size_too_big_for_limit_refused_up_front(run: Any,
                                                        tmp_path: pathlib.Path) -> None:
    prod = Producer(b"a")

    async def main() -> Any:
        svc = ContentService(MemoryStore(), tmp_path, max_size=1000)
        with pytest.raises(ContentTooLarge):
            await svc.ingest(prod.gen(), name="x", size=1001)

    run(main())
    assert prod.sent == 0


def test_declared_size_mismatch(run: Any, tmp_path: pathlib.Path) -> None:
    data = payload(10_000)

    async def main() -> Any:
        store = MemoryStore()
        svc = ContentService(store, tmp_path)
        with pytest.raises(ContentMismatch) as short:
            await svc.ingest(chunks(data), name="x", size=len(data) + 1)
        prod = Producer(b"q" * 1000)
        with pytest.raises(ContentMismatch) as long:
            await svc.ingest(prod.gen(), name="x", size=2500)
        return short.value, long.value, prod, (await store.list_content()).items

    short, long, prod, items = run(main())
    assert short.where == "size" and "10001" in str(short) and "10000" in str(short)
    assert long.where == "size" and "2500" in str(long)
    assert prod.closed and prod.sent <= 3000                   # stopped at the declared size
    assert items == [] and files_in(tmp_path) == []


def test_record_write_failure_removes_file(run: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> Any:
        store = MemoryStore()
        svc = ContentService(store, tmp_path)
        await svc.ingest(chunks(b"one"), name="a", content_id="fixed")
        # the same id again: the file name exists -> refused before writing anything
        with pytest.raises(ContentError):
            await svc.ingest(chunks(b"two"), name="b", content_id="fixed")
        # the record exists but not its file (a crash after delete): the store refuses
        os.unlink(tmp_path / "fixed")
        with pytest.raises(AlreadyExists):
            await svc.ingest(chunks(b"three"), name="b", content_id="fixed")
        return files_in(tmp_path)

    assert run(main()) == []


def test_concurrent_uploads_of_one_id_never_clobber(run: Any, tmp_path: pathlib.Path) -> None:
    a, b = payload(300_000, seed=11), payload(300_000, seed=12)

    async def main() -> Any:
        store = MemoryStore()
        svc = ContentService(store, tmp_path, chunk=10_000)
        res = await asyncio.gather(svc.ingest(chunks(a, 5000), name="a", content_id="same"),
                                   svc.ingest(chunks(b, 5000), name="b", content_id="same"),
                                   return_exceptions=True)
        return res, await store.get_content("same"), svc

    res, rec, svc = run(main())
    ok = [r for r in res if not isinstance(r, BaseException)]
    failed = [r for r in res if isinstance(r, BaseException)]
    assert len(ok) == 1 and len(failed) == 1 and isinstance(failed[0], DmError), res
    body = pathlib.Path(svc.file_of(rec)).read_bytes()
    assert sha(body) == rec.sha256 and body == (a if rec.name == "a" else b)
    assert files_in(tmp_path) == ["same"]


def test_bad_ids(run: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path)
        with pytest.raises(ContentError) as e:
            await svc.ingest(chunks(b"x"), name="x", content_id="a/../b")
        assert e.value.where == "$.content_id"
        with pytest.raises(ContentError) as e:
            await svc.ingest(chunks(b"x"), name="x", content_id="")
        for cid in ("", "a\x00b", "x" * 500, "../etc/passwd", "a b"):
            assert (await svc.serve(cid, "bytes=0-")).status == 404
        for path in ("/content/", "/content/a/b", "/elsewhere"):
            assert (await svc.serve_request("GET", path, {})).status == 404

    run(main())
    assert files_in(tmp_path) == []


def test_upstream_error_removes_partial(run: Any, tmp_path: pathlib.Path) -> None:
    class Broken(Exception):
        pass

    async def gen() -> AsyncIterator[bytes]:
        yield b"x" * 5000
        raise Broken()

    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path, chunk=1000)
        with pytest.raises(Broken):
            await svc.ingest(gen(), name="x")

    run(main())
    assert files_in(tmp_path) == []


def test_delete_removes_record_and_file(run: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path)
        c = await svc.ingest(chunks(b"abc"), name="a")
        assert files_in(tmp_path) == [c.content_id]
        await svc.delete(c.content_id)
        assert files_in(tmp_path) == []
        with pytest.raises(NotFound):
            await svc.get(c.content_id)
        with pytest.raises(NotFound):
            await svc.delete(c.content_id)
        r = await svc.serve(c.content_id, None)
        assert r.status == 404

    run(main())


def test_sweep_temp_removes_only_old_temp_files(tmp_path: pathlib.Path) -> None:
    svc = ContentService(MemoryStore(), tmp_path, clock=lambda: 10_000.0)
    (tmp_path / ".tmp-old").write_bytes(b"x")
    os.utime(tmp_path / ".tmp-old", (100.0, 100.0))
    (tmp_path / ".tmp-new").write_bytes(b"x")
    os.utime(tmp_path / ".tmp-new", (9_999.0, 9_999.0))
    (tmp_path / "c1").write_bytes(b"x")
    os.utime(tmp_path / "c1", (100.0, 100.0))
    assert svc.sweep_temp(max_age=3600) == 1
    assert files_in(tmp_path) == [".tmp-new", "c1"]


def test_ingest_on_lmdb_store(run: Any, tmp_path: pathlib.Path) -> None:
    from dmengine.store.lmdb import LmdbStore
    data = payload(200_000, seed=9)

    async def main() -> Any:
        store = LmdbStore(tmp_path / "db")
        try:
            svc = ContentService(store, tmp_path / "files", chunk=50_000)
            c = await svc.ingest(chunks(data), name="fw", sha256=sha(data), size=len(data),
                                 capability="cap", from_version="1", to_version="2")
            with pytest.raises(ContentMismatch):
                await svc.ingest(chunks(data), name="fw", sha256=sha(b""))
            r = await svc.serve(c.content_id, "bytes=100-199")
            body = b"".join([b async for b in iter_body(r)])
            full = await svc.serve(c.content_id, None)
            again = await svc.get(c.content_id)
            picked = await svc.pick_for_update("cap", "1")
            listing = (await store.list_content()).items
        finally:
            await store.close()
        # reopen: the record is durable
        store2 = LmdbStore(tmp_path / "db")
        try:
            durable = await store2.get_content(c.content_id)
        finally:
            await store2.close()
        return c, r, body, full, again, picked, listing, durable

    c, r, body, full, again, picked, listing, durable = run(main())
    assert r.status == 206 and body == data[100:200]
    assert full.status == 200 and again.downloads == 1 and durable.downloads == 1
    assert picked.content_id == c.content_id and [x.content_id for x in listing] == [c.content_id]
    assert files_in(tmp_path / "files") == [c.content_id]


# --- FUMO package choice ----------------------------------------------------------------------


def test_pick_for_update(run: Any, tmp_path: pathlib.Path) -> None:
    clock = iter(range(1, 1000))

    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path, clock=lambda: float(next(clock)))

        async def add(cid: str, cap: str | None, frm: str | None, to: str | None) -> None:
            await svc.ingest(chunks(cid.encode()), name=cid, capability=cap, from_version=frm,
                             to_version=to, content_id=cid)

        await add("d-1.0-1.9", "capA", "1.0", "1.9")
        await add("d-1.0-1.10", "capA", "1.0", "1.10")     # 1.10 > 1.9 (natural order)
        await add("d-1.10-2.0", "capA", "1.10", "2.0")
        await add("full-3.0", "capA", None, "3.0")
        await add("other-cap", "capB", "1.0", "9.9")
        await add("generic", None, None, None)

        assert (await svc.pick_for_update("capA", "1.0")).content_id == "d-1.0-1.10"
        assert (await svc.pick_for_update("capA", "1.10")).content_id == "d-1.10-2.0"
        # no delta from 2.0: the full image
        assert (await svc.pick_for_update("capA", "2.0")).content_id == "full-3.0"
        with pytest.raises(NoContentFits) as e:
            await svc.pick_for_update("capA", "3.0")         # already on the full image's version
        assert e.value.where == "from_version" and "3.0" in str(e.value)
        with pytest.raises(NoContentFits) as e:
            await svc.pick_for_update("capZ", "1.0")
        assert e.value.where == "capability" and "capZ" in str(e.value)

        # named
        assert (await svc.pick_for_update("capA", "1.0", "d-1.0-1.9")).content_id == "d-1.0-1.9"
        assert (await svc.pick_for_update("capA", "7", "full-3.0")).content_id == "full-3.0"
        assert (await svc.pick_for_update("capQ", "7", "generic")).content_id == "generic"
        for cid, cap, ver, where in [("other-cap", "capA", "1.0", "capability"),
                                     ("d-1.10-2.0", "capA", "1.0", "from_version"),
                                     ("full-3.0", "capA", "3.0", "to_version"),
                                     ("nope", "capA", "1.0", "content_id")]:
            with pytest.raises(NoContentFits) as e:
                await svc.pick_for_update(cap, ver, cid)
            assert e.value.where == where, (cid, e.value)
            assert e.value.http_status == 404 and isinstance(e.value, DmError)

        # a tie on to_version: the newest upload wins
        await add("d-1.0-1.10-new", "capA", "1.0", "1.10")
        assert (await svc.pick_for_update("capA", "1.0")).content_id == "d-1.0-1.10-new"

    run(main())


# --- ranges (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize("header,size,want", [
    (None, 100, None),
    ("bytes=0-9", 100, ByteRange(0, 10)),
    ("bytes=10-", 100, ByteRange(10, 90)),
    ("bytes=-10", 100, ByteRange(90, 10)),
    ("bytes=-1000", 100, ByteRange(0, 100)),
    ("bytes=90-1000", 100, ByteRange(90, 10)),
    ("bytes=99-99", 100, ByteRange(99, 1)),
    ("BYTES = 5 - 6", 100, ByteRange(5, 2)),
    ("bytes=100-", 100, UNSATISFIABLE),
    ("bytes=100-200", 100, UNSATISFIABLE),
    ("bytes=-0", 100, UNSATISFIABLE),
    ("bytes=0-", 0, UNSATISFIABLE),
    ("bytes=-5", 0, UNSATISFIABLE),
    ("bytes=5-4", 100, None),            # invalid syntax -> ignored
    ("bytes=0-1,5-6", 100, None),        # multi-range -> whole
    ("bytes=a-b", 100, None),
    ("bytes=-", 100, None),
    ("bytes=", 100, None),
    ("items=0-5", 100, None),            # unknown unit -> ignored
    ("0-5", 100, None),
    ("bytes=1-2-3", 100, None),
    ("bytes=0-99999999999999999999999", 100, ByteRange(0, 100)),
])
def test_parse_range(header: str | None, size: int, want: ByteRange | None) -> None:
    assert parse_range(header, size) == want


def test_download_url_and_path() -> None:
    url = download_url("c 1/x", "http://dm.example:8080/")
    assert url == "http://dm.example:8080/content/c%201%2Fx"
    assert content_id_from_path("/content/c%201%2Fx") == "c 1/x"
    assert content_id_from_path("/content/abc?x=1") == "abc"
    assert content_id_from_path("/content/") is None
    assert content_id_from_path("/content/a/b") is None
    assert content_id_from_path("/dm") is None


# --- serving over real HTTP --------------------------------------------------------------------


async def aiohttp_handler(svc: ContentService, request: web.Request) -> web.StreamResponse:
    """How an HTTP server sends a ContentResponse: headers, then streamed file chunks."""
    r: ContentResponse = await svc.serve(request.match_info["cid"], request.headers.get("Range"),
                                         head=request.method == "HEAD",
                                         if_range=request.headers.get("If-Range"))
    resp = web.StreamResponse(status=r.status)
    for k, v in r.headers:
        if k == "Content-Length":
            resp.content_length = int(v)
        else:
            resp.headers[k] = v
    await resp.prepare(request)
    async for block in iter_body(r, chunk=svc.read_chunk):
        await resp.write(block)
    await resp.write_eof()
    return resp


class DevicePort:
    """The real device port (dmengine.server, httptools) with the content route plugged in."""

    def __init__(self, svc: ContentService) -> None:
        self.svc = svc
        self.server: Any = None
        self.base = ""

    async def __aenter__(self) -> "DevicePort":
        from dmengine.server import DmServer, MemoryDeviceHandler, ServerConfig
        self.server = await DmServer(ServerConfig(host="127.0.0.1", port=0),
                                     MemoryDeviceHandler()).start()
        self.server.add_get_route(CONTENT_PREFIX, self.svc.device_route())
        self.base = f"http://127.0.0.1:{self.server.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.shutdown(1.0)


@pytest.fixture(params=["device_port", "aiohttp"])
def Http(request: Any) -> Any:
    """Each HTTP test runs against the device port and against an aiohttp server."""
    return DevicePort if request.param == "device_port" else AiohttpServer


class AiohttpServer:
    """A minimal aiohttp server that calls ContentService.serve and streams with iter_body."""

    def __init__(self, svc: ContentService) -> None:
        self.svc = svc
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def __aenter__(self) -> "AiohttpServer":
        app = web.Application()

        async def h(request: web.Request) -> web.StreamResponse:
            return await aiohttp_handler(self.svc, request)
        app.router.add_get("/content/{cid}", h)            # answers HEAD too
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]   # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def test_http_range_forms(run: Any, Http: Any, tmp_path: pathlib.Path) -> None:
    data = payload(1_000_003, seed=5)

    async def main() -> None:
        store = MemoryStore()
        svc = ContentService(store, tmp_path, read_chunk=65_536)
        c = await svc.ingest(chunks(data, 100_000), name="fw", sha256=sha(data))
        url = download_url(c.content_id, "")
        etag = f'"{c.sha256}"'
        size = len(data)
        async with Http(svc) as srv, aiohttp.ClientSession(srv.base) as http:
            async def get(rng: str | None, **kw: str) -> tuple[int, Any, bytes]:
                headers = dict(kw)
                if rng is not None:
                    headers["Range"] = rng
                async with http.get(url, headers=headers) as resp:
                    return resp.status, resp.headers, await resp.read()

            st, h, body = await get(None)
            assert st == 200 and body == data
            assert h["Content-Length"] == str(size) and h["Accept-Ranges"] == "bytes"
            assert h["ETag"] == etag and "Content-Range" not in h

            cases = [("bytes=0-99", 0, 100), ("bytes=500000-", 500_000, size - 500_000),
                     ("bytes=-1234", size - 1234, 1234), ("bytes=999999-2000000", 999_999, 4),
                     ("bytes=-99999999", 0, size), (f"bytes={size - 1}-{size - 1}", size - 1, 1)]
            for rng, start, length in cases:
                st, h, body = await get(rng)
                assert st == 206, rng
                assert h["Content-Range"] == f"bytes {start}-{start + length - 1}/{size}", rng
                assert h["Content-Length"] == str(length) and body == data[start:start + length]
                assert h["ETag"] == etag

            # multi-range, bad syntax, other unit: the whole body, 200
            for rng in ("bytes=0-1,10-20", "bytes=9-3", "pages=1-2", "bytes=x-"):
                st, h, body = await get(rng)
                assert st == 200 and body == data and "Content-Range" not in h, rng

            # If-Range with another ETag: 200 whole; with ours: 206
            st, _, body = await get("bytes=10-19", **{"If-Range": '"' + "0" * 64 + '"'})
            assert st == 200 and body == data
            st, _, body = await get("bytes=10-19", **{"If-Range": etag})
            assert st == 206 and body == data[10:20]

            # 416
            for rng in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
                st, h, body = await get(rng)
                assert st == 416, rng
                assert h["Content-Range"] == f"bytes */{size}" and body == b""

            # HEAD: headers only, not counted
            before = (await svc.get(c.content_id)).downloads
            async with http.head(url, headers={"Range": "bytes=0-9"}) as resp:
                assert resp.status == 206 and resp.headers["Content-Length"] == "10"
                assert resp.headers["Content-Range"] == f"bytes 0-9/{size}"
            async with http.head(url) as resp:
                assert resp.status == 200 and resp.headers["Content-Length"] == str(size)
            assert (await svc.get(c.content_id)).downloads == before

            # unknown content
            async with http.get("/content/nope") as resp:
                assert resp.status == 404

        # counted: every 200/206 GET starting at 0:
        # full, 0-99, -99999999, 4 ignored-range 200s, If-Range mismatch 200
        assert (await svc.get(c.content_id)).downloads == 8

    run(main())


def test_http_resume_interrupted_download(run: Any, Http: Any,
                                          tmp_path: pathlib.Path) -> None:
    data = payload(3 * 1024 * 1024 + 17, seed=7)

    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path, read_chunk=32 * 1024)
        c = await svc.ingest(chunks(data, 256 * 1024), name="fw", sha256=sha(data),
                             size=len(data), capability="cap", from_version="1",
                             to_version="2")
        async with Http(svc) as srv:
            url = download_url(c.content_id, srv.base)
            got = bytearray()
            # first attempt: the device reads ~1 MB, then the connection drops
            async with aiohttp.ClientSession() as http:
                resp = await http.get(url)
                assert resp.status == 200
                etag = resp.headers["ETag"]
                while len(got) < 1_000_000:
                    got += await resp.content.read(50_000)
                resp.close()                                # the TCP connection is dropped
            assert 1_000_000 <= len(got) < len(data)
            # resume (a new connection, as a device would), a few interruptions more
            for stop_after in (700_000, 300_001, None):
                async with aiohttp.ClientSession() as http:
                    resp = await http.get(url, headers={"Range": f"bytes={len(got)}-",
                                                        "If-Range": etag})
                    assert resp.status == 206
                    assert resp.headers["Content-Range"] == \
                        f"bytes {len(got)}-{len(data) - 1}/{len(data)}"
                    if stop_after is None:
                        got += await resp.read()
                    else:
                        part = bytearray()
                        while len(part) < stop_after:
                            part += await resp.content.read(stop_after - len(part))
                        got += part
                        resp.close()
        assert bytes(got) == data and hashlib.sha256(got).hexdigest() == c.sha256
        assert (await svc.get(c.content_id)).downloads == 1   # resumes are not counted

    run(main())


def test_serve_empty_content(run: Any, Http: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path)
        c = await svc.ingest(chunks(b""), name="empty")
        async with Http(svc) as srv, aiohttp.ClientSession(srv.base) as http:
            url = download_url(c.content_id, "")
            async with http.get(url) as resp:
                assert resp.status == 200 and await resp.read() == b""
                assert resp.headers["Content-Length"] == "0"
            for rng in ("bytes=0-", "bytes=-1", "bytes=0-0"):
                async with http.get(url, headers={"Range": rng}) as resp:
                    assert resp.status == 416 and resp.headers["Content-Range"] == "bytes */0"

    run(main())


def test_serve_detects_damaged_or_missing_file(run: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path)
        c = await svc.ingest(chunks(b"0123456789"), name="a")
        with open(svc.file_of(c), "ab") as f:
            f.write(b"extra")
        assert (await svc.serve(c.content_id, None)).status == 500
        os.unlink(svc.file_of(c))
        assert (await svc.serve(c.content_id, None)).status == 404
        assert (await svc.get(c.content_id)).downloads == 0
        # a response whose file shrinks after the headers: iter_body raises, never hangs
        # (content streamed from its file: none kept in memory)
        svc = ContentService(svc.store, tmp_path, memory_body=0)
        d = await svc.ingest(chunks(b"abcdefghij"), name="b")
        r = await svc.serve(d.content_id, "bytes=2-")
        os.truncate(svc.file_of(d), 5)
        with pytest.raises(ContentError):
            async for _ in iter_body(r):
                pass

    run(main())


def test_small_content_is_served_from_memory_after_a_checked_read(
        run: Any, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        svc = ContentService(MemoryStore(), tmp_path, memory_body=64, memory_total=100)
        c = await svc.ingest(chunks(b"0123456789"), name="a")
        # same size, other bytes: the first read checks the sha256
        with open(svc.file_of(c), "r+b") as f:
            f.write(b"X")
        assert (await svc.serve(c.content_id, None)).status == 500
        with open(svc.file_of(c), "r+b") as f:
            f.write(b"0")
        r = await svc.serve(c.content_id, None)
        assert r.status == 200 and r.path is None and r.body == b"0123456789"
        os.unlink(svc.file_of(c))            # from memory now: the file is not read again
        r = await svc.serve(c.content_id, "bytes=2-4")
        assert r.status == 206 and r.body == b"234"
        assert r.header("Content-Range") == "bytes 2-4/10"
        assert (await svc.serve(c.content_id, None, head=True)).header("Content-Length") == "10"
        assert (await svc.get(c.content_id)).downloads == 1      # the 206 from 2 not counted
        # bounded: bigger than memory_body streams from the file; the total is capped
        big = await svc.ingest(chunks(b"b" * 65), name="big")
        assert (await svc.serve(big.content_id, None)).path is not None
        for i in range(12):
            x = await svc.ingest(chunks(bytes([65 + i]) * 30), name=f"x{i}")
            assert (await svc.serve(x.content_id, None)).body == bytes([65 + i]) * 30
            assert svc._bodies_bytes <= 100
        with pytest.raises(ValueError, match="memory_body"):
            ContentService(MemoryStore(), tmp_path, memory_body=-1)

    run(main())


def test_http_download_memory_is_bounded(run: Any, Http: Any, tmp_path: pathlib.Path) -> None:
    """A 24 MB download never holds the file in memory (server or client side of this test)."""
    import tracemalloc
    size = 24 * 1024 * 1024
    path = tmp_path / "src"
    with open(path, "wb") as f:                     # written in pieces, never whole in memory
        for i in range(size // (1024 * 1024)):
            f.write(payload(1024 * 1024, seed=i))

    async def upload() -> AsyncIterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(256 * 1024):
                yield block

    async def main() -> tuple[int, int, str]:
        svc = ContentService(MemoryStore(), tmp_path / "files")
        tracemalloc.start()
        try:
            c = await svc.ingest(upload(), name="big", size=size)
            async with Http(svc) as srv, aiohttp.ClientSession(srv.base) as http:
                async with http.get(download_url(c.content_id, "")) as resp:
                    h = hashlib.sha256()
                    got = 0
                    tracemalloc.reset_peak()
                    async for block in resp.content.iter_chunked(64 * 1024):
                        h.update(block)
                        got += len(block)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert h.hexdigest() == c.sha256
        return got, peak, c.sha256

    got, peak, _ = run(main())
    assert got == size
    assert peak < 6 * 1024 * 1024, f"peak traced memory {peak} bytes for a {size} byte download"
