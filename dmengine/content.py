"""Content ingestion and download (L4): firmware packages and other content for devices.

External systems upload content (``ContentService.ingest``); devices fetch it during FUMO from
``Download/PkgURL`` over HTTP, resuming interrupted transfers with ``Range`` requests
(``ContentService.serve``).

Ingest, step by step (never more than ``chunk`` bytes in memory):

1. the metadata is checked first (a bad name, sha256 or size fails before a byte is read);
2. the stream is written to ``root_dir/.tmp-<random>`` while sha256 and the byte count are
   computed; past ``max_size`` (or past the declared ``size``) reading stops, the partial file
   is deleted and :class:`ContentTooLarge` / :class:`ContentMismatch` is raised;
3. the byte count and the digest are compared with the declared ones (mismatch: the file is
   deleted, :class:`ContentMismatch` with ``where`` = ``size`` or ``sha256``, nothing stored);
4. the file is fsynced, put in place as ``root_dir/<content_id>`` atomically (a hard link,
   which fails rather than replace a file a concurrent upload of the same id put there; then
   the temp name is removed) and the directory fsynced;
5. the record is created in the store; if that fails, the file is removed.

Blocking file work (writes, fsync, reads for serving) runs in the loop's default executor.

Serving (RFC 7233, single byte ranges): ``serve`` returns a :class:`ContentResponse` that says
status, headers and *which bytes of which file* to send; the transport sends them with
:func:`iter_body` (chunked reads) or ``sendfile``.  ``bytes=a-b``, ``bytes=a-`` and
``bytes=-n`` give 206 with ``Content-Range``; a range starting past the end gives 416 with
``Content-Range: bytes */size``; no Range, another unit, bad syntax, several ranges or an
``If-Range`` that does not match the ETag give 200 with the whole file (all allowed by the RFC).
``ETag`` is the quoted sha256; ``Accept-Ranges: bytes`` is always sent.  A range position
too long to be a real offset (thousands of digits) counts as "past any end" rather than being
converted (Python refuses ``int()`` of over 4300 digits): a start gives 416, an end or a suffix
length is cut to the size.

The content type is written into the response headers, so it is checked on ingest
(:func:`media_type_problem`: RFC 7231 ``type/subtype`` with parameters, printable ASCII, at
most :data:`MAX_MEDIA_TYPE` characters) and again when served: a stored one that fails (a
record from before the check) is sent as ``application/octet-stream``, never raw.

Download counting rule: a download is counted once per GET response (not HEAD) with status
200 or 206 whose first byte is offset 0 — i.e. each time a device starts fetching the package
from its beginning.  Resumed transfers (``Range: bytes=N-`` with N > 0) are not counted again.
A ``bytes=0-0`` probe therefore counts as a start.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import msgspec

from .errors import (ContentError, ContentMismatch, ContentTooLarge, NoContentFits, NotFound,
                     ValidationError)
from .model import Content, new_id, validate
from .store.base import Page, all_pages

__all__ = [
    "ContentService", "ContentResponse", "ByteRange", "parse_range", "iter_body",
    "download_url", "content_id_from_path", "DEFAULT_MAX_SIZE", "DEFAULT_CHUNK",
    "DEFAULT_READ_CHUNK", "CONTENT_PREFIX", "MAX_MEDIA_TYPE", "media_type_problem",
]

log = logging.getLogger("dmengine.content")

DEFAULT_MAX_SIZE = 2 * 1024 ** 3          #: largest content accepted by ingest (2 GiB)
DEFAULT_CHUNK = 1024 * 1024               #: bytes buffered before one write+hash on ingest
DEFAULT_READ_CHUNK = 256 * 1024           #: bytes per read when streaming a response body
DEFAULT_TEMP_MAX_AGE = 3600.0             #: age after which a leftover temp file is swept
#: content up to this size is served from memory once read (every device of a campaign
#: downloads the same few-KB package: a stat, an open and a read in executor threads per
#: download were 5 % of the server's CPU); larger content is streamed from its file
DEFAULT_MEMORY_BODY = 256 * 1024
DEFAULT_MEMORY_TOTAL = 64 * 1024 * 1024   #: bytes of content kept in memory at most
CONTENT_PREFIX = "/content/"              #: URL path prefix of downloads on the device port
_TMP = ".tmp-"
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
DEFAULT_MEDIA_TYPE = "application/octet-stream"
MAX_MEDIA_TYPE = 128                      #: longest content type accepted (Content.content_type)


# --- media types (RFC 7231 §3.1.1.1) -------------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[ !#-\[\]-~]|\\[ -~])*"'        # printable ASCII only (no obs-text, no HTAB)
_MEDIA_TYPE_RE = re.compile(rf"{_TOKEN}/{_TOKEN}(?: *; *{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*",
                            re.ASCII)


def media_type_problem(value: object) -> str | None:
    """Why ``value`` cannot be a content type sent in a response header, or None if it can.

    The grammar is RFC 7231's ``type "/" subtype *( OWS ";" OWS parameter )`` restricted to
    printable ASCII: a CR or LF would split the response (header injection) and a character
    outside Latin-1 cannot be sent at all.
    """
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_MEDIA_TYPE:
        return f"is longer than {MAX_MEDIA_TYPE} characters"
    if not value.isascii() or not value.isprintable():
        return "must be printable ASCII"
    if _MEDIA_TYPE_RE.fullmatch(value) is None:
        return "is not a media type (type/subtype, optionally ; name=value)"
    return None


# --- byte ranges (RFC 7233) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ByteRange:
    """A resolved range: ``start`` .. ``start + length - 1`` of a representation."""
    start: int
    length: int


#: parse_range's answer for "the range cannot be satisfied" (-> 416)
UNSATISFIABLE = ByteRange(-1, 0)

_SPEC_RE = re.compile(r"^[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$")
#: digits past which a range position is "larger than any representation" (10**18 bytes)
_MAX_DIGITS = 18
_PAST_ANY_END = 1 << 62


def _position(digits: str) -> int:
    """A range position; an absurdly long one (thousands of digits) is never converted: it
    stands for "past any end", which the callers cut or answer 416 to."""
    d = digits.lstrip("0")
    if len(d) > _MAX_DIGITS:
        return _PAST_ANY_END
    return int(d or "0")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Resolve a ``Range`` header against a representation of ``size`` bytes.

    Returns None for "send the whole representation" (no header, a unit other than bytes,
    bad syntax, or more than one range), :data:`UNSATISFIABLE` for 416, else the range.
    """
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p for p in specs.split(",") if p.strip()]
    if len(parts) != 1:
        return None          # multi-range (or empty): 200 with the whole body is allowed
    m = _SPEC_RE.match(parts[0])
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":                                    # suffix: the last n bytes
        n = _position(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        n = min(n, size)
        return ByteRange(size - n, n)
    a = _position(first)
    if last != "":
        b = _position(last)
        if b < a:
            return None      # syntactically invalid: ignore the header
    else:
        b = size - 1
    if a >= size:
        return UNSATISFIABLE
    b = min(b, size - 1)
    return ByteRange(a, b - a + 1)


# --- what the transport sends ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ContentResponse:
    """An answer to a download request, independent of the HTTP server that sends it.

    Send ``status`` and ``headers`` (they include ``Content-Length``); then, unless ``head``,
    the ``length`` bytes of ``path`` starting at ``offset`` (with :func:`iter_body` or
    ``sendfile``), or ``body`` when ``path`` is None (short error texts).
    """
    status: int
    headers: list[tuple[str, str]]
    path: str | None = None
    offset: int = 0
    length: int = 0
    body: bytes = b""
    head: bool = False
    content: Content | None = None

    def header(self, name: str) -> str | None:
        n = name.lower()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return None


async def iter_body(resp: ContentResponse, *,
                    chunk: int = DEFAULT_READ_CHUNK) -> AsyncIterator[bytes]:
    """The body bytes of ``resp``, ``chunk`` bytes at a time (file reads in the executor).

    Raises :class:`ContentError` if the file is gone or shorter than promised (the transport
    should then abort the connection: the headers are already sent).
    """
    if resp.head:
        return
    if resp.path is None:
        if resp.body:
            yield resp.body
        return
    loop = asyncio.get_running_loop()
    try:
        fd = await loop.run_in_executor(None, os.open, resp.path, os.O_RDONLY)
    except OSError as exc:
        raise ContentError(f"content file unreadable: {exc.strerror}", where="path") from None
    try:
        pos, left = resp.offset, resp.length
        while left > 0:
            data = await loop.run_in_executor(None, os.pread, fd, min(chunk, left), pos)
            if not data:
                raise ContentError(f"content file ended at {pos}, {left} bytes short",
                                   where="path")
            pos += len(data)
            left -= len(data)
            yield data
    finally:
        os.close(fd)


def download_url(content_id: str, base_url: str) -> str:
    """The URL a device downloads ``content_id`` from, under ``base_url``.

    ``base_url`` is the device port's public origin (``http://host:port``, any path after it is
    kept as a prefix): ``download_url("c1", "http://dm.example:8080")`` →
    ``http://dm.example:8080/content/c1``.
    """
    return base_url.rstrip("/") + CONTENT_PREFIX + urllib.parse.quote(content_id, safe="")


def content_id_from_path(path: str, prefix: str = CONTENT_PREFIX) -> str | None:
    """``/content/<id>`` → ``<id>`` (percent-decoded); None if the path is not one of ours."""
    i = path.find(prefix)
    if i < 0:
        return None
    rest = path[i + len(prefix):].split("?", 1)[0]
    if not rest or "/" in rest:
        return None
    return urllib.parse.unquote(rest)


# --- the service -------------------------------------------------------------------------------


def _version_key(v: str | None) -> tuple[Any, ...]:
    """Natural sort key: ``1.10`` after ``1.9``."""
    if v is None:
        return ()
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                 for p in re.findall(r"\d+|[^\d]+", v))


def _write_and_hash(fd: int, h: "hashlib._Hash", data: bytes) -> None:
    view = memoryview(data)
    h.update(view)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:   # pragma: no cover - disk trouble; nothing better to do
        log.warning("cannot remove %s: %s", path, exc)


def _read_file(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


class ContentService:
    """Firmware packages and other content: ingest, lookup, FUMO selection, serving.

    ``root_dir`` holds one file per content (named by its id) and temp files while uploads
    run.  ``max_size`` caps one content; ``chunk`` is the ingest buffer (bytes written and
    hashed per executor call); ``read_chunk`` the serving read size.
    """

    def __init__(self, store: Any, root_dir: str | os.PathLike[str], *,
                 max_size: int = DEFAULT_MAX_SIZE, chunk: int = DEFAULT_CHUNK,
                 read_chunk: int = DEFAULT_READ_CHUNK,
                 memory_body: int = DEFAULT_MEMORY_BODY,
                 memory_total: int = DEFAULT_MEMORY_TOTAL,
                 clock: Any = time.time) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        if chunk <= 0 or read_chunk <= 0:
            raise ValueError("chunk sizes must be positive")
        if memory_body < 0 or memory_total < 0:
            raise ValueError("memory_body and memory_total must be >= 0")
        self.memory_body = min(memory_body, memory_total)
        self.memory_total = memory_total
        #: content id → (sha256, file path, bytes) of small content, checked against its
        #: sha256 when read (a record re-created with other bytes has another sha256); oldest
        #: first: the oldest go when a new one would pass the budget
        self._bodies: OrderedDict[str, tuple[str, str, bytes]] = OrderedDict()
        self._bodies_bytes = 0
        self.store = store
        self.root_dir = os.path.abspath(os.fspath(root_dir))
        self.max_size = max_size
        self.chunk = chunk
        self.read_chunk = read_chunk
        self._clock = clock
        #: dmengine.metrics.ContentMetrics (the engine sets it): downloads, bytes, ranges
        self.metrics: Any = None
        os.makedirs(self.root_dir, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------------

    def file_of(self, content: Content) -> str:
        """Absolute path of the content's file (the record keeps only the file name)."""
        name = content.path or content.content_id
        if not _FILE_RE.match(name) or name.startswith(_TMP):
            raise ContentError(f"content {content.content_id!r} has a bad file name {name!r}",
                               where="path")
        return os.path.join(self.root_dir, name)

    def sweep_temp(self, *, max_age: float = DEFAULT_TEMP_MAX_AGE) -> int:
        """Removes temp files of uploads that died (older than ``max_age`` s); returns how many."""
        n = 0
        limit = self._clock() - max_age
        for entry in os.scandir(self.root_dir):
            if entry.name.startswith(_TMP) and entry.stat().st_mtime < limit:
                _unlink_quiet(entry.path)
                n += 1
        return n

    # --- ingest ---------------------------------------------------------------------------------

    async def ingest(self, stream: AsyncIterable[bytes], *, name: str, sha256: str | None = None,
                     size: int | None = None, capability: str | None = None,
                     from_version: str | None = None, to_version: str | None = None,
                     content_type: str = DEFAULT_MEDIA_TYPE,
                     content_id: str | None = None) -> Content:
        """Streams ``stream`` to disk and records it; see the module docstring for the steps."""
        if sha256 is not None:
            if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
                raise ContentMismatch("sha256 must be 64 hex digits", where="sha256")
            sha256 = sha256.lower()
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ContentMismatch(f"size must be a non-negative integer, got {size!r}",
                                      where="size")
            if size > self.max_size:
                raise ContentTooLarge(size, self.max_size)
        problem = media_type_problem(content_type)
        if problem is not None:
            raise ContentError(f"content type {content_type!r} {problem}", where="content_type")
        cid = new_id("c") if content_id is None else content_id
        record = Content(content_id=cid, name=name, size=size or 0, sha256="0" * 64,
                         capability=capability, from_version=from_version,
                         to_version=to_version, path=cid, content_type=content_type,
                         created=self._clock())
        try:
            validate(record)                   # bad metadata fails before a byte is read
        except ValidationError as exc:
            raise ContentError(str(exc), where=exc.where) from None
        if not _FILE_RE.match(cid):
            raise ContentError(f"content id {cid!r} cannot name a file", where="$.content_id")
        final = os.path.join(self.root_dir, cid)
        if os.path.lexists(final):
            raise ContentError(f"content {cid!r} already exists", where="$.content_id")

        loop = asyncio.get_running_loop()
        tmp = os.path.join(self.root_dir, f"{_TMP}{cid}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        h = hashlib.sha256()
        total = 0
        limit = self.max_size if size is None else size
        buf = bytearray()
        ok = False
        exhausted = False
        try:
            try:
                async for piece in stream:
                    if not piece:
                        continue
                    total += len(piece)
                    if total > limit:
                        if total > self.max_size:
                            raise ContentTooLarge(total, self.max_size)
                        raise ContentMismatch(
                            f"more than the declared size {size} bytes arrived", where="size")
                    buf += piece
                    if len(buf) >= self.chunk:
                        data, buf = bytes(buf), bytearray()
                        await loop.run_in_executor(None, _write_and_hash, fd, h, data)
                exhausted = True
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None and not exhausted:   # stop the producer
                    try:
                        await aclose()
                    except Exception:  # pragma: no cover - the producer's own trouble
                        pass
            if buf:
                await loop.run_in_executor(None, _write_and_hash, fd, h, bytes(buf))
                buf = bytearray()
            if size is not None and total != size:
                raise ContentMismatch(f"declared size {size} bytes, received {total}",
                                      where="size")
            digest = h.hexdigest()
            if sha256 is not None and digest != sha256:
                raise ContentMismatch(f"sha256 mismatch: declared {sha256}, content is {digest}",
                                      where="sha256")
            await loop.run_in_executor(None, os.fsync, fd)
            os.close(fd)
            fd = -1
            try:   # link, not rename: never replaces a file another upload put there
                await loop.run_in_executor(None, os.link, tmp, final)
            except FileExistsError:
                raise ContentError(f"content {cid!r} already exists",
                                   where="$.content_id") from None
            _unlink_quiet(tmp)
            try:
                await loop.run_in_executor(None, _fsync_dir, self.root_dir)
            except BaseException:
                # no record will name the file: it goes, else the id stays taken ("already
                # exists") by a file nothing can delete or sweep
                _unlink_quiet(final)
                raise
            ok = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not ok:
                _unlink_quiet(tmp)

        record = msgspec.structs.replace(record, size=total, sha256=digest)
        try:
            return await self.store.create_content(record)
        except BaseException:
            _unlink_quiet(final)
            try:
                _fsync_dir(self.root_dir)
            except OSError:  # pragma: no cover
                pass
            raise

    # --- lookup and delete -----------------------------------------------------------------------

    async def get(self, content_id: str) -> Content:
        """The record; :class:`~dmengine.errors.NotFound` if there is none."""
        return await self.store.get_content(content_id)

    async def delete(self, content_id: str) -> None:
        """Removes the record, then the file (a download already streaming may fail)."""
        content = await self.store.get_content(content_id)
        await self.store.delete_content(content_id)
        path = self.file_of(content)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _unlink_quiet, path)

    async def all_content(self) -> list[Content]:
        return await all_pages(lambda c: self.store.list_content(cursor=c))

    async def list_page(self, *, capability: str | None = None, cursor: str | None = None,
                        limit: int = 100) -> Page[Content]:
        """listContent: one page of the records, by id; ``capability``: only the packages
        for it (a page may then hold fewer than ``limit``: page on until no cursor)."""
        page = await self.store.list_content(cursor=cursor, limit=limit)
        if capability is None:
            return page
        return Page([c for c in page.items if c.capability == capability], page.next_cursor)

    # --- FUMO package choice ------------------------------------------------------------------

    async def pick_for_update(self, capability_oid: str, current_fw_version: str | None,
                              content_id: str | None = None) -> Content:
        """The package to send to a device of ``capability_oid`` running ``current_fw_version``.

        Named (``content_id``): it must exist, and its ``capability`` and ``from_version`` must
        match (a package without ``from_version`` is a full image and fits any version; one
        without ``capability`` fits any capability).  Not named: among packages of that
        capability whose ``from_version`` equals the device's version and whose ``to_version``
        differs from it, the highest ``to_version`` (natural order; newest upload on a tie);
        if there is none, the same among full images (no ``from_version``).  Otherwise
        :class:`NoContentFits`, with ``where`` naming the field that failed.
        """
        if content_id is not None:
            try:
                c = await self.store.get_content(content_id)
            except NotFound:
                raise NoContentFits(f"no content {content_id!r}", where="content_id") from None
            if c.capability is not None and c.capability != capability_oid:
                raise NoContentFits(
                    f"content {content_id!r} is for capability {c.capability!r}, "
                    f"the device is {capability_oid!r}", where="capability")
            if c.from_version is not None and c.from_version != current_fw_version:
                raise NoContentFits(
                    f"content {content_id!r} updates from firmware {c.from_version!r}, "
                    f"the device runs {current_fw_version!r}", where="from_version")
            if c.to_version is not None and c.to_version == current_fw_version:
                raise NoContentFits(
                    f"content {content_id!r} updates to {c.to_version!r}, which the device "
                    f"already runs", where="to_version")
            return c
        mine = [c for c in await self.all_content() if c.capability == capability_oid]
        if not mine:
            raise NoContentFits(f"no package for capability {capability_oid!r}",
                                where="capability")

        def best(cands: list[Content]) -> Content | None:
            cands = [c for c in cands if c.to_version is None or c.to_version != current_fw_version]
            if not cands:
                return None
            return max(cands, key=lambda c: (_version_key(c.to_version), c.created))

        choice = best([c for c in mine if c.from_version is not None
                       and c.from_version == current_fw_version])
        if choice is None:
            choice = best([c for c in mine if c.from_version is None])
        if choice is None:
            have = sorted({str(c.from_version) for c in mine})
            raise NoContentFits(
                f"no package of capability {capability_oid!r} updates from firmware "
                f"{current_fw_version!r} (packages update from: {', '.join(have)})",
                where="from_version")
        return choice

    # --- serving ---------------------------------------------------------------------------------

    async def serve(self, content_id: str, range_header: str | None, *, head: bool = False,
                    if_range: str | None = None) -> ContentResponse:
        """The answer to ``GET``/``HEAD /content/<content_id>`` (see the module docstring)."""
        try:
            content = await self.store.get_content(content_id)
        except (NotFound, ValidationError):
            return _text(404, f"no content {content_id!r}\n", head)
        size = content.size
        body: bytes | None = None
        try:
            path = self.file_of(content)
            if size <= self.memory_body:
                body = await self._small_body(content, path)
            else:
                st = await asyncio.get_running_loop().run_in_executor(None, os.stat, path)
                if st.st_size != size:
                    log.error("content %s: file has %d bytes, record says %d", content_id,
                              st.st_size, size)
                    return _text(500, "content file damaged\n", head)
        except ContentMismatch as exc:          # the file is not what its record says
            log.error("content %s: %s", content_id, exc)
            return _text(500, "content file damaged\n", head)
        except (ContentError, OSError) as exc:
            log.error("content %s: file missing or bad: %s", content_id, exc)
            return _text(404, f"content {content_id!r} is not available\n", head)
        etag = f'"{content.sha256}"'
        ctype = content.content_type
        if media_type_problem(ctype) is not None:     # stored before ingest checked it
            log.warning("content %s: stored content type %r is not a media type; sent as %s",
                        content_id, ctype, DEFAULT_MEDIA_TYPE)
            ctype = DEFAULT_MEDIA_TYPE
        common = [("Accept-Ranges", "bytes"), ("ETag", etag), ("Content-Type", ctype)]
        rng = parse_range(range_header, size)
        if rng is not None and if_range is not None and if_range.strip() != etag:
            rng = None        # If-Range: the device holds another version -> whole body
        if rng is UNSATISFIABLE:
            return ContentResponse(416, common[:2] + [("Content-Range", f"bytes */{size}"),
                                                      ("Content-Length", "0")],
                                   head=head, content=content)
        if rng is None:
            status, start, length = 200, 0, size
            headers = common + [("Content-Length", str(size))]
        else:
            status, start, length = 206, rng.start, rng.length
            headers = common + [
                ("Content-Range", f"bytes {start}-{start + length - 1}/{size}"),
                ("Content-Length", str(length))]
        if start == 0 and not head:
            content = await self.store.count_download(content_id)
        if body is not None:
            return ContentResponse(status, headers, body=body[start:start + length], head=head,
                                   content=content)
        return ContentResponse(status, headers, path=path, offset=start, length=length,
                               head=head, content=content)

    async def _small_body(self, content: Content, path: str) -> bytes:
        """The bytes of a small content, from memory after the first read (which checks
        them against the record's size and sha256)."""
        kept = self._bodies.get(content.content_id)
        if kept is not None and kept[0] == content.sha256 and kept[1] == path:
            return kept[2]
        data = await asyncio.get_running_loop().run_in_executor(None, _read_file, path,
                                                                content.size + 1)
        if len(data) != content.size:
            raise ContentMismatch(f"file has {len(data)} bytes or more, record says "
                                  f"{content.size}", where="size")
        if hashlib.sha256(data).hexdigest() != content.sha256:
            raise ContentMismatch("file's sha256 is not the record's", where="sha256")
        old = self._bodies.pop(content.content_id, None)
        if old is not None:
            self._bodies_bytes -= len(old[2])
        while self._bodies and self._bodies_bytes + len(data) > self.memory_total:
            _, dropped = self._bodies.popitem(last=False)      # the oldest
            self._bodies_bytes -= len(dropped[2])
        if self._bodies_bytes + len(data) <= self.memory_total:
            self._bodies[content.content_id] = (content.sha256, path, data)
            self._bodies_bytes += len(data)
        return data

    async def serve_request(self, method: str, path: str,
                            headers: Any) -> ContentResponse:
        """``serve`` for a raw request: ``path`` is ``…/content/<id>``, ``headers`` a mapping
        with lower-case names (``range``, ``if-range``)."""
        head = method.upper() == "HEAD"
        cid = content_id_from_path(path)
        if cid is None:
            resp = _text(404, "not found\n", head)
        else:
            resp = await self.serve(cid, headers.get("range"), head=head,
                                    if_range=headers.get("if-range"))
        if self.metrics is not None and not head:
            self.metrics.download(resp.status, resp.length if resp.path else len(resp.body),
                                  headers.get("range") is not None and resp.status in (206, 416))
        return resp

    def device_route(self) -> Any:
        """The GET/HEAD route of the device port:
        ``dm_server.add_get_route(CONTENT_PREFIX, content_service.device_route())``.

        It answers with a :class:`ContentResponse`; the server sends its ``headers`` (they
        carry Content-Type and Content-Length) and then ``body``, or the ``length`` bytes of
        ``path`` from ``offset`` (nothing for ``head``).
        """
        service = self

        async def route(request: Any) -> ContentResponse:
            return await service.serve_request(request.method, request.path, request.headers)
        return route


def _text(status: int, text: str, head: bool) -> ContentResponse:
    body = text.encode()
    return ContentResponse(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body)))],
                           body=body, head=head)
