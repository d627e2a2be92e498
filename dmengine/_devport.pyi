"""Stubs for dmengine/_devport.pyx: the device port's per-request HTTP path (``ConnBase``,
subclassed by ``server.DeviceConnection``), the request object ``Req`` and the HTTP helpers
``server.py`` shares with it."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Iterable

from dmengine.errors import DmError

ENCODING_BY_TYPE: dict[str, str]
_ENCODING_BY_BTYPE: dict[bytes, str]
HEADERS: dict[bytes, int]
HEADER_LENGTHS: frozenset[int]
REASONS: dict[int, bytes]
IDLE: int
READING: int
BUSY: int


def accepts_utf8(value: bytes) -> bool: ...
def http(status: int, body: bytes = ..., ctype: bytes = ..., *, close: bool = ...,
         extra: Iterable[tuple[str, str]] = ...) -> bytes: ...


class HttpLimit(DmError):
    status: int

    def __init__(self, status: int, msg: str) -> None: ...


class Req:
    """One HTTP request."""

    path: bytes
    method: bytes
    ctype: bytes | None
    host: bytes | None
    hmac: bytes | None
    body: bytes | bytearray | None
    reply: bytes | None          # a ready answer (errors, 503)
    headers: dict[str, str] | None
    encoding: str | None
    part: tuple[str, int, int] | None   # GET: (path, offset, length) sent after the head
    clen: int
    expect: bool
    keep_alive: bool
    close_after: bool
    t0: float


class ConnBase:
    """State and hot path of one device connection."""

    server: Any
    transport: asyncio.Transport | None
    parser: Any
    req: Req | None
    queue: deque[Req]
    writable: asyncio.Future[None] | None
    _loop: asyncio.AbstractEventLoop | None
    busy: bool
    in_headers: bool
    closing: bool
    paused: bool
    write_paused: bool
    dropped: bool
    sending: bool
    state: int
    deadline: float
    _req_timeout: float
    _keepalive: float
    hdr_bytes: int
    raw_hdr: int
    _max_hdr: int
    _max_body: int
    _max_pipeline: int

    def data_received(self, data: bytes) -> None: ...
    def on_message_begin(self) -> None: ...
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, chunk: bytes) -> None: ...
    def on_message_complete(self) -> None: ...
    def _pump(self) -> None: ...
    def _write_reply(self, out: bytes, req: Req, *, close: bool = ...) -> None: ...
    shared: Port

    def flush_out(self) -> None: ...
    def drop_out(self) -> None: ...


class Port:
    """What every connection of one server reads or counts on each request."""

    pending: int
    max_pending: int
    max_sessions: int
    draining: bool
    path: bytes
    prefix: bytes
    sessions: dict[str, Any]
    get_routes: dict[str, Any]
    bases: dict[bytes | None, str]
    public_url: str | None
    metrics: Any                  # the server's DeviceMetrics (None: no metrics)

    def __init__(self, server: Any) -> None: ...
