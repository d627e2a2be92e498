"""A small keep-alive HTTP/1.1 client for the package-0 gateway's POSTs to one origin (L3).

A campaign hands the SMS centre hundreds of notifications a second, all to one URL.  Through
aiohttp's client each POST cost about 0.15 ms of the event loop (request and response
objects, payload registry, connector bookkeeping): a tenth of the server's CPU in the
campaign benchmark.  This client does only what that path needs: ``POST`` a bytes body with
fixed headers on a pooled connection, parse the answer with httptools (the parser the device
port uses), return ``(status, body)``.

* At most ``max_connections`` are open; a request waits for a free one beyond that.  They
  are kept alive and reused (most recently used first).  A request sent on a reused connection that the peer had closed meanwhile
  (no byte of an answer came) is sent once more on a new connection.
* With a ``guard`` (:class:`dmengine.urlguard.UrlGuard`), every new connection resolves the
  host through it, so each address is checked when connecting (DNS rebinding), and redirects
  are never followed (a 3xx is returned as it is).
* ``timeout`` bounds a whole request (connect, send, answer).  Answers larger than
  ``max_reply`` bytes are cut there and their connection is not reused.
"""
from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import urllib.parse
import httptools

from dmengine.errors import GatewayError
from dmengine.urlguard import UrlGuard

__all__ = ["HttpPool"]


class _Conn(asyncio.Protocol):
    """One connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self, max_reply: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.max_reply = max_reply
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.got_bytes = False
        self.headers_done = False
        self.closed = False
        self.reusable = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(GatewayError(f"bad HTTP answer: {exc}", retryable=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and self.waiter is not None:
            # an answer whose body ends with the connection (no length given)
            self.on_message_complete()
            return
        self._fail(ConnectionResetError("the connection closed before the answer came"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        room = self.max_reply - self.size
        if room > 0:
            self.body.append(data[:room])
        self.size += len(data)

    def on_message_complete(self) -> None:
        w = self.waiter
        self.waiter = None
        self.reusable = (not self.closed and self.parser.should_keep_alive()
                         and self.size <= self.max_reply)
        if w is not None and not w.done():
            w.set_result((self.parser.get_status_code(), b"".join(self.body)))

    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.body = []
        self.size = 0
        self.got_bytes = False
        self.headers_done = False
        self.reusable = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpPool:
    """``await pool.post(body)`` → ``(status, answer bytes)`` on a kept-alive connection.

    Raises ``OSError`` / ``TimeoutError`` for connection trouble, ``GatewayError`` for an
    answer that is not HTTP, and the guard's ``UrlRefused`` for a refused address."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None,
                 timeout: float, guard: UrlGuard | None = None, max_connections: int = 64,
                 max_reply: int = 64 * 1024, ssl_context: ssl.SSLContext | None = None) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.scheme = u.scheme
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.guard = guard
        self.timeout = timeout
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.max_connections = max_connections
        self.max_reply = max_reply
        self.ssl = (ssl_context or ssl.create_default_context()) if u.scheme == "https" else None
        target = u.path or "/"
        if u.query:
            target += "?" + u.query
        host_header = u.netloc.rpartition("@")[2]        # never the URL's user:password
        lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}"]
        for name, value in (headers or {}).items():
            if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
                raise ValueError(f"bad HTTP header {name!r}")
            lines.append(f"{name}: {value}")
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[_Conn] = []          # kept alive, most recently used last
        self._busy = 0                        # connections (or slots for one) in use
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._closed = False

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._closed:
            raise GatewayError("the gateway's HTTP client is closed", retryable=False)
        data = b"".join((self._head, b"Content-Length: %d\r\n\r\n" % len(body), body))
        async with asyncio.timeout(self.timeout):
            conn = await self._acquire()
            try:
                if conn is not None:
                    try:
                        return await self._exchange(conn, data)
                    except OSError:
                        if conn.got_bytes:
                            raise                 # the peer answered something: no replay
                        # a kept-alive connection the peer had closed: try a new one
                conn = await self._connect()
                return await self._exchange(conn, data)
            finally:
                self._release(conn)

    async def _acquire(self) -> _Conn | None:
        """A kept-alive connection, or None: the caller opens one.  Waits while
        ``max_connections`` are busy (an SMS centre is not handed hundreds of sockets)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                self._busy += 1
                return conn
        if self._busy >= self.max_connections:
            w: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            try:
                return await w                    # handed over by _release, already counted
            except BaseException:
                if w.done() and not w.cancelled():
                    self._release(w.result())     # handed over as we gave up: pass it on
                elif w in self._waiters:
                    self._waiters.remove(w)
                raise
        self._busy += 1
        return None

    def _release(self, conn: _Conn | None) -> None:
        usable = conn is not None and conn.reusable and not conn.closed and not self._closed
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(conn if usable else None)   # the slot goes to the waiter
                return
        self._busy -= 1
        if usable and len(self._idle) < self.max_connections:
            self._idle.append(conn)                      # type: ignore[arg-type]
        elif conn is not None:
            conn.close()

    async def _exchange(self, conn: _Conn, data: bytes) -> tuple[int, bytes]:
        try:
            return await conn.request(data)
        except BaseException:
            conn.close()
            raise

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self.guard is not None:
            addrs = await self.guard.addresses(self.host, self.port)   # each one checked
        else:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addrs = [info[4][0] for info in infos]
        last: BaseException | None = None
        for addr in addrs:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Conn(self.max_reply), host=addr, port=self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
                return conn
            except OSError as exc:
                last = exc
        raise last if last is not None else OSError(f"{self.host!r} has no address")

    async def close(self) -> None:
        self._closed = True
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(GatewayError("the gateway's HTTP client is closed",
                                             retryable=False))
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @property
    def idle(self) -> int:
        """Connections kept open for the next request."""
        return sum(1 for c in self._idle if not c.closed)
