"""Stubs for dmengine/simulator/_lane.pyx: the simulator's keep-alive HTTP connection and the
callback-driven load lanes of ``Fleet.run``."""
from __future__ import annotations

import asyncio
import collections
from typing import Any

from dmengine.errors import DmError

MAX_RESPONSE: int
MAX_HEAD: int


class HttpError(DmError):
    """The HTTP exchange failed (connection refused, reset, timeout, bad response)."""


class Conn(asyncio.Protocol):  # a protocol by its methods (a cdef class cannot subclass it)
    """One keep-alive connection (an asyncio protocol); answers go to ``driver`` (a Lane)
    when set, else to the future ``waiter``."""

    transport: asyncio.Transport | None
    parser: Any
    waiter: asyncio.Future[tuple[int, bytes, bytes]] | None
    pool: collections.deque[Conn] | None
    client_waiting: set[Conn]
    _loop: asyncio.AbstractEventLoop
    driver: Lane | None
    status: int
    head: bytes
    head_done: bool
    closed: bool
    keep_alive: bool
    chunks: list[bytes]
    size: int
    max_idle: int
    deadline: float

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def eof_received(self) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def on_body(self, chunk: bytes) -> None: ...
    def on_message_complete(self) -> None: ...
    def close(self) -> None: ...


class Lane:
    """One of ``Fleet.run``'s ``concurrency`` slots; ``run`` is its ``fleet._Run``."""

    run: Any
    fleet: Any
    client: Any
    stats: Any
    key: tuple[str, str, int] | None
    dev: Any
    cs: Any
    out: Any
    conn: Conn | None
    t0: float
    t1: float
    messages: int
    finished: bool

    def __init__(self, run: Any) -> None: ...
    def next_session(self) -> None: ...
    def failed(self, conn: Conn, exc: HttpError) -> None: ...
    def park(self) -> None: ...
