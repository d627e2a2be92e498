"""Issue 18, mutmut on dmengine/content.py: byte ranges (RFC 7233) and media types resolved
against their edges, each answer compared whole; small bodies served from memory within their
budget, and a file that is not what its record says (a real LMDB store and files on disk)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os

import pytest
from prometheus_client import CollectorRegistry

from dmengine import content as C
from dmengine.errors import NoContentFits, NotFound
from dmengine.metrics import ContentMetrics
from dmengine.model import Content
from dmengine.store.lmdb import LmdbStore

R, U = C.ByteRange, C.UNSATISFIABLE


@pytest.mark.parametrize("header,size,want", [
    (None, 10, None),
    ("bytes=0-4", 10, R(0, 5)),
    ("Bytes = 2-", 10, R(2, 8)),                 # unit in any case, spaces around "="
    ("bytes=\t3 - 3 ", 10, R(3, 1)),
    ("bytes=5-100", 10, R(5, 5)),                # cut at the end
    ("bytes=9-9", 10, R(9, 1)),                  # the last byte
    ("bytes=10-", 10, U),                        # starts past the end
    ("bytes=10-20", 10, U),
    ("bytes=0-", 0, U),
    ("bytes=-3", 10, R(7, 3)),                   # suffix
    ("bytes=-10", 10, R(0, 10)),
    ("bytes=-11", 10, R(0, 10)),
    ("bytes=-0", 10, U),
    ("bytes=-5", 0, U),
    ("bytes=" + "9" * 40 + "-", 10, U),         # a position past any end
    ("bytes=-" + "9" * 40, 10, R(0, 10)),
    ("bytes=0-" + "9" * 40, 10, R(0, 10)),
    ("bytes=" + "0" * 30 + "1-2", 10, R(1, 2)),  # leading zeros are not "long"
    ("bytes=5-4", 10, None),                     # last < first: the header is ignored
    ("bytes=-", 10, None),
    ("bytes=a-b", 10, None),
    ("bytes=0-1,3-4", 10, None),                 # several ranges: the whole body
    ("bytes=0-1, ", 10, R(0, 2)),                # an empty element is not a range
    ("bytes=", 10, None),
    ("items=0-1", 10, None),
    ("bytes 0-1", 10, None),
])
def test_parse_range(header, size, want):
    assert C.parse_range(header, size) == want


def test_position_digits():
    assert C._position("0000") == 0
    assert C._position("1" * 18) == int("1" * 18)
    assert C._position("1" * 19) == C._PAST_ANY_END
    assert C._position("0" * 50 + "7") == 7


@pytest.mark.parametrize("value,problem", [
    ("application/octet-stream", None),
    ("application/vnd.oma.dd+xml; charset=utf-8", None),
    ('text/plain;a="b c";x=y', None),
    (7, "must be a string"),
    ("", "must not be empty"),
    ("a/" + "b" * C.MAX_MEDIA_TYPE, f"is longer than {C.MAX_MEDIA_TYPE} characters"),
    ("text/plain\r\nX-Injected: 1", "must be printable ASCII"),
    ("text/pläin", "must be printable ASCII"),
    ("textplain", "is not a media type (type/subtype, optionally ; name=value)"),
    ("text/plain; charset", "is not a media type (type/subtype, optionally ; name=value)"),
])
def test_media_type_problem(value, problem):
    assert C.media_type_problem(value) == problem


def test_media_type_length_limit_is_inclusive():
    at = "a/" + "b" * (C.MAX_MEDIA_TYPE - 2)
    assert len(at) == C.MAX_MEDIA_TYPE and C.media_type_problem(at) is None
    assert C.media_type_problem(at + "b") == f"is longer than {C.MAX_MEDIA_TYPE} characters"


# --- serving small content from memory, and its file checked against the record -----------

def _with_service(tmp_path, scenario, **kw):
    async def main():
        store = LmdbStore(tmp_path / "env")
        try:
            svc = C.ContentService(store, tmp_path / "files", **kw)
            await scenario(store, svc)
        finally:
            await store.close()
    asyncio.run(main())


async def _one(data: bytes):
    yield data


async def _put(svc, name, data, **kw):
    return await svc.ingest(_one(data), name=name, **kw)


def test_a_damaged_file_is_a_500_and_a_missing_one_a_404(tmp_path):
    async def scenario(store, svc):
        a = await _put(svc, "a.bin", b"a" * 100)
        b = await _put(svc, "b.bin", b"b" * 100)
        m = await _put(svc, "m.bin", b"m" * 100)
        with open(svc.file_of(a), "wb") as f:
            f.write(b"A" * 100)                       # same size, other bytes
        with open(svc.file_of(b), "wb") as f:
            f.write(b"b" * 99)                        # shorter
        os.unlink(svc.file_of(m))
        for cid, status, text in ((a.content_id, 500, "content file damaged\n"),
                                  (b.content_id, 500, "content file damaged\n"),
                                  (m.content_id, 404, f"content {m.content_id!r} is not available\n"),
                                  ("nope", 404, "no content 'nope'\n")):
            r = await svc.serve(cid, None)
            assert (r.status, r.body) == (status, text.encode())
            assert r.headers == [("Content-Type", "text/plain; charset=utf-8"),
                                 ("Content-Length", str(len(text.encode())))]
        r = await svc.serve_request("GET", "/elsewhere/x", {})
        assert (r.status, r.body, r.head) == (404, b"not found\n", False)
        r = await svc.serve_request("HEAD", f"/content/{a.content_id}", {})
        assert r.status == 500 and r.head
    _with_service(tmp_path, scenario)


def test_small_bodies_are_kept_in_memory_within_the_budget(tmp_path):
    """Served once, a small body comes from memory (a later change of its file does not show);
    past ``memory_total`` the oldest kept one makes room and is read (and checked) again."""
    async def scenario(store, svc):
        a = await _put(svc, "a.bin", b"a" * 1500)
        b = await _put(svc, "b.bin", b"b" * 1500)
        c = await _put(svc, "c.bin", b"c" * 1000)
        for x, byte in ((a, b"a"), (b, b"b")):
            r = await svc.serve(x.content_id, None)
            assert r.status == 200 and r.body == byte * x.size
        for x in (a, b):
            with open(svc.file_of(x), "wb") as f:
                f.write(b"Z" * x.size)
        assert (await svc.serve(a.content_id, None)).body == b"a" * 1500      # from memory
        assert (await svc.serve(b.content_id, None)).body == b"b" * 1500
        r = await svc.serve(c.content_id, "bytes=10-19")                      # 3000 + 1000 > 3000
        assert r.status == 206 and r.body == b"c" * 10
        assert (await svc.serve(b.content_id, None)).body == b"b" * 1500      # still kept
        assert (await svc.serve(a.content_id, None)).status == 500            # the oldest: dropped, re-read
        assert (await svc.serve(c.content_id, None)).body == b"c" * 1000
    _with_service(tmp_path, scenario, memory_body=2000, memory_total=3000)


def test_list_page_by_capability_and_version_order(tmp_path):
    async def scenario(store, svc):
        x = await _put(svc, "x", b"x", capability="cap-x")
        await _put(svc, "y", b"y", capability="cap-y")
        z = await _put(svc, "z", b"z", capability="cap-x")
        page = await svc.list_page(capability="cap-x")
        assert sorted(c.content_id for c in page.items) == sorted([x.content_id, z.content_id])
        assert len((await svc.list_page()).items) == 3
        assert len((await svc.list_page(limit=2)).items) == 2
        assert len(await svc.all_content()) == 3
    _with_service(tmp_path, scenario)
    assert sorted(["1.10", "1.9", "1.2", "1.2a", "2", "1.10.1"], key=C._version_key) == \
        ["1.2", "1.2a", "1.9", "1.10", "1.10.1", "2"]
    assert C._version_key(None) == ()
    assert C._version_key("v2") < C._version_key("v10")


@pytest.mark.parametrize("memory_body", [0, 1 << 20], ids=["from the file", "from memory"])
def test_download_answers_whole(tmp_path, memory_body):
    """Every answer of a download as the device port sends it: status, the headers in order
    and spelling, what is sent, HEAD, and the record of the download counted (start at 0)."""
    data = bytes(range(256)) * 8                              # 2048 bytes

    async def scenario(store, svc):
        c = await _put(svc, "fw.bin", data, content_type="application/vnd.acme.fw")
        etag = f'"{c.sha256}"'
        common = [("Accept-Ranges", "bytes"), ("ETag", etag),
                  ("Content-Type", "application/vnd.acme.fw")]

        def sent(r):
            if r.path is None:
                return r.body
            assert r.body == b"" and r.path == svc.file_of(c)
            with open(r.path, "rb") as f:
                f.seek(r.offset)
                return f.read(r.length)

        r = await svc.serve(c.content_id, None)
        assert (r.status, r.headers, r.head) == (200, common + [("Content-Length", "2048")], False)
        assert sent(r) == data and r.content.downloads == 1
        r = await svc.serve(c.content_id, "bytes=100-199")
        assert (r.status, r.headers) == (206, common + [("Content-Range", "bytes 100-199/2048"),
                                                        ("Content-Length", "100")])
        assert sent(r) == data[100:200] and r.content.downloads == 1   # a resumed download
        r = await svc.serve(c.content_id, "bytes=0-9", head=True)
        assert (r.status, r.head) == (206, True) and r.content.downloads == 1   # HEAD: not one
        r = await svc.serve(c.content_id, "bytes=0-9")
        assert sent(r) == data[:10] and r.content.downloads == 2
        r = await svc.serve(c.content_id, "bytes=5000-")
        assert (r.status, r.head, r.body) == (416, False, b"")
        assert r.headers == common[:2] + [("Content-Range", "bytes */2048"), ("Content-Length", "0")]
        assert r.content.content_id == c.content_id
        r = await svc.serve(c.content_id, "bytes=0-9", if_range='"other"')  # another version
        assert r.status == 200 and sent(r) == data
        r = await svc.serve(c.content_id, "bytes=0-9", if_range=f" {etag} ")
        assert r.status == 206
        r = await svc.serve_request("HEAD", f"/content/{c.content_id}", {"range": "bytes=1-2"})
        assert (r.status, r.head) == (206, True)
        r = await svc.serve_request("GET", f"/x/content/{c.content_id}",
                                    {"range": "bytes=1-2", "if-range": etag})
        assert r.status == 206 and sent(r) == data[1:3]
    _with_service(tmp_path, scenario, memory_body=memory_body)


def test_memory_body_limit_is_inclusive(tmp_path):
    async def scenario(store, svc):
        c = await _put(svc, "fw.bin", b"x" * 100)
        assert (await svc.serve(c.content_id, None)).path is None      # 100 <= 100: memory
        d = await _put(svc, "fw2.bin", b"y" * 101)
        assert (await svc.serve(d.content_id, None)).path == svc.file_of(d)
    _with_service(tmp_path, scenario, memory_body=100)


def test_ingest_limits_and_metadata_errors(tmp_path):
    """Each refusal of an upload, whole (message and field), and nothing left on disk; the
    size limits are inclusive."""
    from dmengine.errors import ContentError, ContentMismatch, ContentTooLarge

    async def chunks(*parts):
        for p in parts:
            yield p

    async def scenario(store, svc):
        empty = await svc.ingest(chunks(), name="empty", size=0)
        assert (empty.size, empty.sha256) == (0, hashlib.sha256(b"").hexdigest())
        full = await svc.ingest(chunks(b"a" * 60, b"", b"b" * 40), name="full", size=100,
                                sha256=hashlib.sha256(b"a" * 60 + b"b" * 40).hexdigest().upper())
        assert full.size == 100 and full.sha256 == hashlib.sha256(b"a" * 60 + b"b" * 40).hexdigest()
        with open(svc.file_of(full), "rb") as f:
            assert f.read() == b"a" * 60 + b"b" * 40             # written in 32-byte chunks
        assert (await svc.ingest(chunks(b"x" * 100), name="no size")).size == 100
        for kw, parts, exc, message, where in (
                (dict(size=-1), (), ContentMismatch, "size must be a non-negative integer, got -1", "size"),
                (dict(size=True), (), ContentMismatch, "size must be a non-negative integer, got True", "size"),
                (dict(size=101), (), ContentTooLarge,
                 "content larger than the limit max_size=100 bytes (at least 101 bytes)", "size"),
                (dict(sha256="abc"), (), ContentMismatch, "sha256 must be 64 hex digits", "sha256"),
                (dict(), (b"x" * 60, b"x" * 41), ContentTooLarge,
                 "content larger than the limit max_size=100 bytes (at least 101 bytes)", "size"),
                (dict(size=10), (b"x" * 11,), ContentMismatch,
                 "more than the declared size 10 bytes arrived", "size"),
                (dict(size=10), (b"x" * 9,), ContentMismatch, "declared size 10 bytes, received 9",
                 "size"),
                (dict(content_type="text"), (), ContentError,
                 "content type 'text' is not a media type (type/subtype, optionally ; name=value)",
                 "content_type"),
                (dict(content_id="../x"), (), ContentError, "content id '../x' cannot name a file",
                 "$.content_id"),
                (dict(content_id=full.content_id), (), ContentError,
                 f"content {full.content_id!r} already exists", "$.content_id")):
            with pytest.raises(exc) as ei:
                await svc.ingest(chunks(*parts), name="bad", **kw)
            assert (str(ei.value), ei.value.where) == (message, where), kw
        # the three accepted contents' files and nothing else (no temp file left behind)
        assert sorted(os.listdir(svc.root_dir)) == sorted(c.content_id for c in await svc.all_content())
        assert len(os.listdir(svc.root_dir)) == 3
    _with_service(tmp_path, scenario, max_size=100, chunk=32)


def test_a_large_file_of_another_size_is_a_500(tmp_path):
    async def scenario(store, svc):
        c = await _put(svc, "fw.bin", b"z" * 1000)
        with open(svc.file_of(c), "ab") as f:
            f.write(b"!")
        for head in (False, True):
            r = await svc.serve(c.content_id, None, head=head)
            assert (r.status, r.body, r.head) == (500, b"content file damaged\n", head)
            assert r.headers == [("Content-Type", "text/plain; charset=utf-8"),
                                 ("Content-Length", "21")]
    _with_service(tmp_path, scenario, memory_body=0)


# --- the survivors of the content.py run on 2026-12-06 (issue 18): memory accounting, paging,
# --- package choice and its refusals whole, the download metrics ----------------------------

def test_the_memory_budget_counts_what_is_kept(tmp_path):
    """The bytes kept in memory are counted exactly: a body read again (its record changed)
    replaces its old copy, an evicted one is subtracted."""
    async def scenario(store, svc):
        await _put(svc, "b.bin", b"b" * 5, content_id="cb")
        await _put(svc, "a.bin", b"a" * 4, content_id="ca")
        await svc.serve("cb", None)
        await svc.serve("ca", None)
        assert (list(svc._bodies), svc._bodies_bytes) == (["cb", "ca"], 9)
        # ca re-uploaded with other bytes (another sha256): read again, its old copy replaced
        # (9 - 4 + 3 fits: cb stays)
        await svc.delete("ca")
        await _put(svc, "a2.bin", b"A" * 3, content_id="ca")
        assert (await svc.serve("ca", None)).body == b"AAA"
        assert (list(svc._bodies), svc._bodies_bytes) == (["cb", "ca"], 8)
        await _put(svc, "c.bin", b"c" * 4, content_id="cc")        # 8 + 4 > 10: cb goes
        assert (await svc.serve("cc", None)).body == b"cccc"
        assert (list(svc._bodies), svc._bodies_bytes) == (["ca", "cc"], 7)
    _with_service(tmp_path, scenario, memory_body=8, memory_total=10)


def test_file_names_of_records(tmp_path):
    svc = C.ContentService(None, tmp_path / "files")
    assert svc.file_of(Content(content_id="c1", name="n", size=0, sha256="0" * 64, path="p1")) \
        == str(tmp_path / "files" / "p1")
    assert svc.file_of(Content(content_id="c1", name="n", size=0, sha256="0" * 64)) \
        == str(tmp_path / "files" / "c1")
    for bad in ("../x", ".tmp-c1-0a0b", "a/b"):
        with pytest.raises(C.ContentError) as e:
            svc.file_of(Content(content_id="c1", name="n", size=0, sha256="0" * 64, path=bad))
        assert (str(e.value), e.value.where) == (
            f"content 'c1' has a bad file name {bad!r}", "path")


def test_a_small_body_that_is_not_its_record_says_why(tmp_path, caplog):
    async def scenario(store, svc):
        a = await _put(svc, "a.bin", b"abc")
        with open(svc.file_of(a), "wb") as f:
            f.write(b"abcd")
        with pytest.raises(C.ContentMismatch) as e:
            await svc._small_body(a, svc.file_of(a))
        assert (str(e.value), e.value.where) == ("file has 4 bytes or more, record says 3",
                                                 "size")
        with open(svc.file_of(a), "wb") as f:
            f.write(b"abd")
        with pytest.raises(C.ContentMismatch) as e:
            await svc._small_body(a, svc.file_of(a))
        assert (str(e.value), e.value.where) == ("file's sha256 is not the record's", "sha256")
        with caplog.at_level(logging.ERROR, logger="dmengine.content"):
            assert (await svc.serve(a.content_id, None)).status == 500
        assert [r.getMessage() for r in caplog.records] == [
            f"content {a.content_id}: file's sha256 is not the record's"]
    _with_service(tmp_path, scenario)


def test_listing_pages_past_the_first_hundred(tmp_path):
    async def scenario(store, svc):
        for i in range(105):
            await store.create_content(Content(content_id=f"c{i:03d}", name="n", size=1,
                                               sha256="0" * 64,
                                               capability="cap-a" if i % 2 else "cap-b"))
        first = await svc.list_page()
        assert [c.content_id for c in first.items] == [f"c{i:03d}" for i in range(100)]
        assert first.next_cursor is not None
        rest = await svc.list_page(cursor=first.next_cursor)
        assert [c.content_id for c in rest.items] == [f"c{i:03d}" for i in range(100, 105)]
        assert rest.next_cursor is None
        a = await svc.list_page(capability="cap-a", limit=10)
        assert [c.content_id for c in a.items] == [f"c{i:03d}" for i in range(1, 10, 2)]
        assert a.next_cursor is not None               # the filter keeps the cursor
        a2 = await svc.list_page(capability="cap-a", limit=10, cursor=a.next_cursor)
        assert [c.content_id for c in a2.items] == [f"c{i:03d}" for i in range(11, 20, 2)]
        assert [c.content_id for c in await svc.all_content()] == \
            [f"c{i:03d}" for i in range(105)]
    _with_service(tmp_path, scenario)


def test_version_order_puts_numbers_before_text():
    assert sorted(["1.a", "1.5", "1.10", "1.9"], key=C._version_key) == \
        ["1.5", "1.9", "1.10", "1.a"]
    assert sorted(["beta", "10", "2"], key=C._version_key) == ["2", "10", "beta"]


def _pkg(cid, *, created, **kw):
    return Content(content_id=cid, name="n", size=1, sha256="0" * 64, created=created, **kw)


async def _fits(svc, cap, fw, cid=None):
    with pytest.raises(NoContentFits) as e:
        await svc.pick_for_update(cap, fw, cid)
    return str(e.value), e.value.where


def test_pick_for_update_choices_and_refusals_whole(tmp_path):
    async def scenario(store, svc):
        # the highest version wins, not the newest upload
        await store.create_content(_pkg("p3", created=1.0, capability="cap", from_version="1.0",
                                        to_version="3.0"))
        await store.create_content(_pkg("p2", created=2.0, capability="cap", from_version="1.0",
                                        to_version="2.0"))
        await store.create_content(_pkg("q", created=3.0, capability="cap", from_version="0.9",
                                        to_version="1.0"))
        await store.create_content(_pkg("other", created=4.0, capability="cap-o"))
        assert (await svc.pick_for_update("cap", "1.0")).content_id == "p3"
        assert await _fits(svc, "cap", "2.5") == (
            "no package of capability 'cap' updates from firmware '2.5' (packages update "
            "from: 0.9, 1.0)", "from_version")
        assert await _fits(svc, "cap", "1.0", "gone") == ("no content 'gone'", "content_id")
        assert await _fits(svc, "cap", "1.0", "other") == (
            "content 'other' is for capability 'cap-o', the device is 'cap'", "capability")
        assert await _fits(svc, "cap", "2.0", "p2") == (
            "content 'p2' updates from firmware '1.0', the device runs '2.0'", "from_version")
        assert await _fits(svc, "cap", "1.0", "q") == (
            "content 'q' updates from firmware '0.9', the device runs '1.0'", "from_version")
        await store.create_content(_pkg("same", created=5.0, capability="cap", to_version="1.0"))
        assert await _fits(svc, "cap", "1.0", "same") == (
            "content 'same' updates to '1.0', which the device already runs", "to_version")
    _with_service(tmp_path, scenario)


def test_download_metrics_count_gets_by_result_bytes_and_ranges(tmp_path):
    async def scenario(store, svc):
        svc.metrics = m = ContentMetrics(CollectorRegistry())
        big = await _put(svc, "big.bin", b"x" * 5000)          # from the file
        small = await _put(svc, "s.bin", b"y" * 10)             # from memory
        etag = f'"{big.sha256}"'
        p = f"/content/{big.content_id}"
        await svc.serve_request("GET", p, {})
        await svc.serve_request("HEAD", p, {"range": "bytes=0-9"})          # no download
        await svc.serve_request("GET", p, {"range": "bytes=10-19"})
        await svc.serve_request("GET", p, {"range": "bytes=9999-"})         # 416
        await svc.serve_request("GET", p, {"range": "bytes=0-9", "if-range": '"other"'})
        await svc.serve_request("GET", p, {"range": "bytes=0-9", "if-range": etag})
        await svc.serve_request("GET", f"/content/{small.content_id}", {"range": "bytes=-4"})
        await svc.serve_request("GET", "/content/nope", {})
        assert m.downloads == {"full": 2, "partial": 3, "unsatisfiable": 1, "not_found": 1}
        assert m.sent_bytes == 5000 + 10 + 0 + 5000 + 10 + 4 + len(b"no content 'nope'\n")
        assert m.ranges == 4       # 206 and 416 answers to a Range; not the If-Range miss
    _with_service(tmp_path, scenario, memory_body=100)


def test_iter_body_reads_the_slice_in_chunks_and_names_a_bad_file(tmp_path):
    async def main():
        p = tmp_path / "f"
        p.write_bytes(bytes(range(20)))
        resp = C.ContentResponse(200, [], path=str(p), offset=3, length=10)
        got = [b async for b in C.iter_body(resp, chunk=3)]
        assert got == [bytes([3, 4, 5]), bytes([6, 7, 8]), bytes([9, 10, 11]), bytes([12])]
        whole = C.ContentResponse(200, [], path=str(p), offset=0, length=20)
        assert b"".join([b async for b in C.iter_body(whole, chunk=7)]) == bytes(range(20))
        assert [b async for b in C.iter_body(C.ContentResponse(200, [], path=str(p),
                                                              length=0))] == []
        short = C.ContentResponse(200, [], path=str(p), offset=15, length=10)
        with pytest.raises(C.ContentError) as e:
            _ = [b async for b in C.iter_body(short, chunk=4)]
        assert (str(e.value), e.value.where) == ("content file ended at 20, 5 bytes short",
                                                 "path")
        gone = C.ContentResponse(200, [], path=str(tmp_path / "gone"), length=5)
        with pytest.raises(C.ContentError) as e:
            _ = [b async for b in C.iter_body(gone)]
        assert (str(e.value), e.value.where) == (
            "content file unreadable: No such file or directory", "path")
    asyncio.run(main())


def test_download_paths_and_urls_edges():
    assert C.content_id_from_path("/content/c1?x=1?y=2") == "c1"
    assert C.content_id_from_path("/content/a/content/b") is None     # the first /content/
    assert C.content_id_from_path("/dm/content/c%2F1") == "c/1"
    assert C.download_url("c1", "http://hostX/") == "http://hostX/content/c1"
    assert C.download_url("a b", "http://h//") == "http://h/content/a%20b"


def test_sweep_temp_counts_each_file_and_keeps_one_exactly_at_the_age(tmp_path):
    svc = C.ContentService(None, tmp_path / "files", clock=lambda: 10_000.0)
    for name, mtime in ((".tmp-a", 9_000.0), (".tmp-b", 9_899.0), (".tmp-edge", 9_900.0),
                        (".tmp-new", 9_990.0), ("c1", 1.0)):
        f = tmp_path / "files" / name
        f.write_bytes(b"x")
        os.utime(f, (mtime, mtime))
    assert svc.sweep_temp(max_age=100.0) == 2
    assert sorted(os.listdir(tmp_path / "files")) == [".tmp-edge", ".tmp-new", "c1"]


def test_what_a_download_that_cannot_be_served_logs_and_answers_to_head(tmp_path, caplog):
    async def scenario(store, svc):
        big = await _put(svc, "big.bin", b"x" * 300)                  # served from its file
        gone = await _put(svc, "gone.bin", b"g" * 300)
        odd = await _put(svc, "odd.bin", b"o" * 300)
        with open(svc.file_of(big), "ab") as f:
            f.write(b"more")
        os.unlink(svc.file_of(gone))
        await store.update_content(odd.content_id, {"content_type": "text/plain\nX: y"})
        caplog.set_level(logging.WARNING, logger="dmengine.content")
        r = await svc.serve(big.content_id, None, head=True)
        assert (r.status, r.head, r.body) == (500, True, b"content file damaged\n")
        good = await _put(svc, "good.bin", b"G" * 300)                # HEAD from the file
        r = await svc.serve(good.content_id, "bytes=1-2", head=True)
        assert (r.status, r.head, r.path, r.offset, r.length) == (
            206, True, svc.file_of(good), 1, 2)
        assert [b async for b in C.iter_body(r)] == []
        r = await svc.serve(good.content_id, "bytes=300-", head=True)
        assert (r.status, r.head, r.header("Content-Range")) == (416, True, "bytes */300")
        r = await svc.serve(gone.content_id, None, head=True)
        assert (r.status, r.head) == (404, True)
        r = await svc.serve("nope", None, head=True)
        assert (r.status, r.head, r.body) == (404, True, b"no content 'nope'\n")
        r = await svc.serve(odd.content_id, None)
        assert r.status == 200 and r.header("Content-Type") == "application/octet-stream"
        msgs = [r.getMessage() for r in caplog.records]
        assert msgs[0] == f"content {big.content_id}: file has 304 bytes, record says 300"
        assert msgs[1].startswith(f"content {gone.content_id}: file missing or bad: ")
        assert "No such file or directory" in msgs[1]
        assert msgs[2] == (f"content {odd.content_id}: stored content type 'text/plain\\nX: y' "
                           f"is not a media type; sent as application/octet-stream")
        assert len(msgs) == 3
    _with_service(tmp_path, scenario, memory_body=100)


def test_an_ingested_record_and_its_file_whole(tmp_path):
    async def scenario(store, svc):
        old = os.umask(0o022)
        try:
            rec = await _put(svc, "fw.bin", b"abc", capability="cap-1", from_version="1",
                             to_version="2")
        finally:
            os.umask(old)
        assert rec.content_id.startswith("c") and len(rec.content_id) == 1 + 12 + 16
        assert (rec.path, rec.created, rec.size, rec.sha256) == (
            rec.content_id, 1234.5, 3, hashlib.sha256(b"abc").hexdigest())
        st = os.stat(svc.file_of(rec))
        assert st.st_mode & 0o777 == 0o640            # not world-readable
        with pytest.raises(C.ContentError) as e:
            await _put(svc, "n" * 300, b"x")
        assert (str(e.value), e.value.where) == (
            "Content: Expected `str` of length <= 256 - at `$.name`", "$.name")
    _with_service(tmp_path, scenario, clock=lambda: 1234.5)


def test_a_file_that_cannot_be_removed_is_logged(tmp_path, caplog):
    d = tmp_path / "adir"
    d.mkdir()
    with caplog.at_level(logging.WARNING, logger="dmengine.content"):
        C._unlink_quiet(str(d))
        C._unlink_quiet(str(tmp_path / "gone"))         # already gone: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot remove {d}: [Errno 21] Is a directory: '{d}'"]


# --- the survivors of the content.py run of 10:09 (issue 18): the service's own limits, the
# --- upload's buffer and its stream, a concurrent upload that links first, a temp file on fd 0

def test_the_services_limits_are_checked_and_the_smallest_ones_work(tmp_path):
    """Each limit refused at 0 (or below), with its message, and working at its smallest:
    a 1-byte ``max_size``, 1-byte chunks, no memory for bodies at all."""
    root = tmp_path / "files"
    for kw, message in ((dict(max_size=0), "max_size must be positive"),
                        (dict(chunk=0), "chunk sizes must be positive"),
                        (dict(read_chunk=0), "chunk sizes must be positive"),
                        (dict(memory_total=-1), "memory_body and memory_total must be >= 0"),
                        (dict(memory_body=-1), "memory_body and memory_total must be >= 0")):
        with pytest.raises(ValueError) as e:
            C.ContentService(None, root, **kw)
        assert str(e.value) == message, kw

    async def smallest(store, svc):
        one = await _put(svc, "one.bin", b"1")
        with pytest.raises(C.ContentTooLarge) as e:
            await _put(svc, "two.bin", b"22")
        assert (str(e.value), e.value.where) == (
            "content larger than the limit max_size=1 bytes (at least 2 bytes)", "size")
        r = await svc.serve(one.content_id, None)      # no memory: from the file, 1 byte a read
        assert (r.status, r.path, r.offset, r.length) == (200, svc.file_of(one), 0, 1)
        assert [b async for b in C.iter_body(r, chunk=svc.read_chunk)] == [b"1"]
        assert (svc.read_chunk, svc.memory_body, svc._bodies_bytes) == (1, 0, 0)
    _with_service(tmp_path, smallest, max_size=1, chunk=1, read_chunk=1, memory_total=0)

    async def chunked(store, svc):
        rec = await _put(svc, "abc.bin", b"abc")          # written one byte at a time
        with open(svc.file_of(rec), "rb") as f:
            assert f.read() == b"abc"
    _with_service(tmp_path / "b", chunked, chunk=1, read_chunk=1)


def test_more_than_declared_is_a_mismatch_up_to_the_size_limit_itself(tmp_path):
    """A declared size passed: a mismatch (422), even when exactly ``max_size`` bytes came;
    only past ``max_size`` is it too large (413)."""
    async def scenario(store, svc):
        with pytest.raises(C.ContentMismatch) as e:
            await _put(svc, "x", b"x" * 100, size=10)
        assert (str(e.value), e.value.where) == ("more than the declared size 10 bytes arrived",
                                                 "size")
        with pytest.raises(C.ContentTooLarge) as e:
            await _put(svc, "x", b"x" * 101, size=10)
        assert (str(e.value), e.value.where) == (
            "content larger than the limit max_size=100 bytes (at least 101 bytes)", "size")
        assert os.listdir(svc.root_dir) == []
    _with_service(tmp_path, scenario, max_size=100)


def test_a_full_buffer_is_written_before_the_next_piece_is_read(tmp_path):
    """Never more than ``chunk`` bytes in memory: once the buffer holds ``chunk`` bytes they
    are on disk before the upload's next piece is asked for."""
    on_disk = []

    async def scenario(store, svc):
        async def stream():
            yield b"abcd"                               # exactly one chunk
            (tmp,) = [n for n in os.listdir(svc.root_dir) if n.startswith(".tmp-")]
            on_disk.append(os.path.getsize(os.path.join(svc.root_dir, tmp)))
            yield b"ef"
            on_disk.append(os.path.getsize(os.path.join(svc.root_dir, tmp)))
        rec = await svc.ingest(stream(), name="n")
        with open(svc.file_of(rec), "rb") as f:
            assert f.read() == b"abcdef"
    _with_service(tmp_path, scenario, chunk=4)
    assert on_disk == [4, 4]                # "ef" (less than a chunk) waits for the stream's end


class _Stream:
    """An upload that is an async iterable, not a generator: ``aclose`` only if given one."""

    def __init__(self, pieces, *, closable: bool) -> None:
        self.pieces = list(pieces)
        self.closed = 0
        if closable:
            self.aclose = self._aclose

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if not self.pieces:
            raise StopAsyncIteration
        return self.pieces.pop(0)

    async def _aclose(self) -> None:
        self.closed += 1


def test_an_upload_stream_is_closed_only_when_it_is_not_read_to_its_end(tmp_path):
    async def scenario(store, svc):
        plain = _Stream([b"ab", b"c"], closable=False)      # any AsyncIterable will do
        assert (await svc.ingest(plain, name="plain")).size == 3
        done = _Stream([b"ab", b"c"], closable=True)
        assert (await svc.ingest(done, name="done")).size == 3
        assert done.closed == 0                             # it ended by itself
        big = _Stream([b"x" * 8, b"x" * 8, b"never read"], closable=True)
        with pytest.raises(C.ContentTooLarge):
            await svc.ingest(big, name="big")
        assert (big.closed, big.pieces) == (1, [b"never read"])   # stopped, not drained
        with pytest.raises(C.ContentTooLarge):
            await svc.ingest(_Stream([b"x" * 11], closable=False), name="big")
        assert sorted(os.listdir(svc.root_dir)) == sorted(
            c.content_id for c in await svc.all_content())
    _with_service(tmp_path, scenario, max_size=10)


def test_an_upload_that_loses_the_race_for_its_id_is_refused_whole(tmp_path):
    """Two uploads of one id both pass the first check; the one that puts its file in place
    second is refused with the same answer as one that came later, and leaves nothing."""
    async def scenario(store, svc):
        asked, go = asyncio.Event(), asyncio.Event()

        async def slow():
            yield b"slow"
            asked.set()
            await go.wait()
            yield b"er"
        first = asyncio.ensure_future(svc.ingest(slow(), name="slow", content_id="same"))
        await asked.wait()                                  # past its check, writing its temp
        won = await _put(svc, "fast", b"fast", content_id="same")
        go.set()
        with pytest.raises(C.ContentError) as e:
            await first
        assert (type(e.value), str(e.value), e.value.where) == (
            C.ContentError, "content 'same' already exists", "$.content_id")
        assert os.listdir(svc.root_dir) == ["same"]        # no temp file left
        with open(svc.file_of(won), "rb") as f:
            assert f.read() == b"fast"
        assert (await store.get_content("same")).name == "fast"
    _with_service(tmp_path, scenario)


def test_a_refused_uploads_temp_file_is_closed_even_as_fd_0(tmp_path):
    """A server started with its stdin closed (``<&-``) hands out descriptor 0 like any other:
    a refused upload's temp file that got it is closed all the same (no descriptor leaks)."""
    async def scenario(store, svc):
        try:
            saved = os.dup(0)
        except OSError:                                     # closed already
            saved = None
        try:
            if saved is not None:
                os.close(0)
            with pytest.raises(C.ContentMismatch):
                await _put(svc, "x", b"abc", sha256="0" * 64)
            with pytest.raises(OSError):                    # closed again: EBADF
                os.fstat(0)
        finally:
            if saved is not None:
                os.dup2(saved, 0)
                os.close(saved)
        assert os.listdir(svc.root_dir) == []
    _with_service(tmp_path, scenario)


def test_a_directory_sync_that_fails_after_the_link_leaves_no_file_and_the_id_free(
        tmp_path, monkeypatch):
    """The content directory's fsync fails once the file is linked into place (an I/O error
    on the directory): the upload fails, and no file stays under its id — else every later
    upload of that id is "already exists" while no record names the file (DELETE is a 404,
    the sweep leaves it)."""
    async def scenario(store, svc):
        real = C._fsync_dir
        calls = []

        def failing(path):
            calls.append(path)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
            real(path)
        monkeypatch.setattr(C, "_fsync_dir", failing)
        with pytest.raises(OSError):
            await _put(svc, "fw", b"first", content_id="fw")
        assert os.listdir(svc.root_dir) == []
        with pytest.raises(NotFound):
            await store.get_content("fw")
        again = await _put(svc, "fw", b"again", content_id="fw")  # the id is free
        with open(svc.file_of(again), "rb") as f:
            assert f.read() == b"again"
    _with_service(tmp_path, scenario)
