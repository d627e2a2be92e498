"""The device port: OMA DM over HTTP on uvloop + httptools (L3).

One ``DeviceConnection`` (an ``asyncio.Protocol``) per TCP connection feeds an
``httptools.HttpRequestParser``; complete requests go, in order, through

    admission (503) -> codec decode -> session table -> DmSession.receive -> handler hooks
    -> DmSession.next_message -> codec encode -> HTTP reply in the request's encoding.

The session engine (``_session.pyx``) and the codecs never see a socket, a clock or a
future; this module owns all of those.  Services plug in through a *device handler* with
two async hooks (``DeviceHandler``); ``MemoryDeviceHandler`` is the one tests and
``dmengine serve`` use until the services layer exists.

Requests normally finish without ever suspending (the handler hooks answer from memory), so
the coroutine of a request is driven by hand and only becomes an ``asyncio.Task`` when a
hook really waits (``_drive``): one message costs no task, no future and no extra loop turn.

Limits are ``ServerConfig`` fields with the module-level defaults below.  Every limit has its
own answer: 413 body too large, 431 header block too large, 408 request too slow, 503 (with
``Retry-After``) for the session and pending-work caps, checked before the body is decoded.

Slow or hostile peers cannot hold the port: connections are capped in all and per address
(``max_connections_per_address``; an IPv6 peer counts by its /64), an idle connection closes
after ``keepalive_timeout`` and a request must arrive whole within ``request_timeout``, one
connection queues at most ``4 * max_pipeline`` requests, and while the server has bytes
waiting for a device (a download, or replies the transport could not take) the device must
take ``min_send_rate`` bytes/s, measured over every ``send_rate_window``: else it is cut off.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket as _socket
import ssl as _ssl
import struct
import threading
import time
import types
import urllib.parse
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Protocol

import httptools

from ._devport import ENCODING_BY_TYPE, ConnBase, Port
from .logs import session_label
from ._devport import HEADER_LENGTHS as _HEADER_LENGTHS  # noqa: F401  (kept for importers)
from ._devport import HEADERS as _HEADERS  # noqa: F401
from ._devport import REASONS as _REASONS  # noqa: F401
from ._devport import HttpLimit as _HttpLimit
from ._devport import Req as _Req
from ._devport import _ENCODING_BY_BTYPE  # noqa: F401
from ._devport import accepts_utf8 as _accepts_utf8  # noqa: F401
from ._devport import http as _http
from ._dmcore import Entry as _Entry
from ._dmcore import ServerCore
from ._dmcore import (_HEADS, _CODECS, _TOKEN_POOL, _clean_end, _codecs,  # noqa: F401  (shared)
                      _end_reason, _ended, _error_reply, _is_package1, _load_codec, _token)
from .authguard import AuthGuard, AuthGuardConfig
from .errors import ConfigError, DmError
from ._metrics import DeviceCounters
from .metrics import DeviceMetrics

__all__ = [
    "ServerConfig", "DeviceHandler", "MemoryDeviceHandler", "DmServer", "DeviceConnection",
    "HttpResponse", "ENCODING_BY_TYPE", "start_server", "serve_forever", "tune_gc",
]

log = logging.getLogger("dmengine.server")

# --- limits and defaults -----------------------------------------------------------------

DEFAULT_PATH = "/dm"
DEFAULT_MAX_MSG_SIZE = 16 * 1024          # our advertised MaxMsgSize
DEFAULT_MAX_BODY_SLACK = 1024             # bytes tolerated above MaxMsgSize before 413
DEFAULT_MAX_HEADER_BYTES = 8 * 1024       # request line + headers
DEFAULT_MAX_CONNECTIONS = 10_000
# Connections open at once from one peer address (an IPv6 peer: its /64).  Not small: a
# carrier's NAT gateway (CGNAT, or the APN's own gateway) puts hundreds to thousands of phones
# behind one public address, and a campaign wakes many of them together; a DM session holds
# its connection for seconds, so 256 leaves room for a busy NAT address while one host
# can no longer take all of max_connections.  Behind a load balancer or a WAP proxy that
# hides device addresses, raise it to max_connections (the cap then never applies).
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 256
DEFAULT_MAX_SESSIONS = 200_000            # sessions in the table (in flight)
DEFAULT_MAX_PENDING = 2_000               # requests received but not yet answered, all conns
DEFAULT_MAX_PIPELINE = 16                 # queued requests per connection before pausing reads
DEFAULT_REQUEST_TIMEOUT = 30.0            # first byte of a request -> its last byte
DEFAULT_KEEPALIVE_TIMEOUT = 60.0          # idle connection between requests
DEFAULT_SESSION_IDLE_TIMEOUT = 300.0      # DM session without a message
DEFAULT_AUTH_TIMEOUT = 30.0               # session that has not authenticated, waiting for a retry
DEFAULT_RETRY_AFTER = 5                   # seconds, in 503 answers
DEFAULT_TICK = 1.0                        # period of the timeout sweep
DEFAULT_SHUTDOWN_DEADLINE = 30.0
DEFAULT_SEND_CHUNK = 256 * 1024          # bytes per file read when a GET route sends a file part
# While the server has bytes waiting for a device (a download, or replies the transport could
# not take), the device must take at least this many bytes/s, measured over each
# send_rate_window (default: keepalive_timeout; the first window is the grace period).  1 KB/s
# is below the worst GPRS link a phone downloads firmware over; a reader slower than that
# would hold its connection for hours.  0 keeps only "no byte taken in a whole window".
DEFAULT_MIN_SEND_RATE = 1024

# ENCODING_BY_TYPE (media type -> encoding), the header tables, _http, _Req and the hot
# path of a connection live in _devport.pyx


#: media type -> "HTTP/1.1 200 OK ... Content-Length: " of DM replies (built on first use)
# --- configuration -------------------------------------------------------------------------


@dataclasses.dataclass
class ServerConfig:
    """Everything the device port needs; limits have named defaults."""

    host: str = "127.0.0.1"
    port: int = 0                              # 0 = pick a free port
    path: str = DEFAULT_PATH
    server_id: str = "dmengine"
    public_url: str | None = None              # base of RespURI/server URI; default from Host
    session_config: Any = None                 # a _session.SessionConfig; built when None
    require_auth: str = "md5"
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    max_body_slack: int = DEFAULT_MAX_BODY_SLACK
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_pending: int = DEFAULT_MAX_PENDING
    max_pipeline: int = DEFAULT_MAX_PIPELINE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    session_idle_timeout: float = DEFAULT_SESSION_IDLE_TIMEOUT
    #: a session that has not authenticated (its package 1 was challenged) is kept this long
    #: for the device's retry, not session_idle_timeout: strangers get little of our memory
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    #: failed-authentication backoff per account and per address (None: off)
    brute_force: AuthGuardConfig | None = dataclasses.field(default_factory=AuthGuardConfig)
    retry_after: int = DEFAULT_RETRY_AFTER
    tick: float = DEFAULT_TICK
    shutdown_deadline: float = DEFAULT_SHUTDOWN_DEADLINE
    send_chunk: int = DEFAULT_SEND_CHUNK        # file part reads (GET routes)
    min_send_rate: int = DEFAULT_MIN_SEND_RATE  # bytes/s a device must take of what it is owed
    send_rate_window: float | None = None       # seconds per rate check; None: keepalive_timeout
    tls_cert: str | None = None
    tls_key: str | None = None
    ssl_context: _ssl.SSLContext | None = None  # overrides tls_cert/tls_key
    reuse_port: bool = False
    #: a port of this process alone (0: any free one), named by the RespURIs it hands out.
    #: With several processes on one device port (``reuse_port``, ``serve --device-processes``)
    #: the kernel gives each new connection to any of them, but a session lives in one: its
    #: next messages must come to that process's own port.  None: RespURIs name the device port
    session_port: int | None = None
    #: With ``reuse_port``: ``(share, processes)`` — this process (which must bind the port
    #: first) gets ``share`` (0..1) of the new connections and the other ``processes - 1``
    #: the rest evenly (a classic BPF program on the port's group, SO_ATTACH_REUSEPORT_CBPF),
    #: instead of the kernel's even spread: the main process also runs the scheduler and the
    #: API, so an even spread leaves it the busiest.  None: the kernel's spread
    steer: tuple[float, int] | None = None
    backlog: int = 1024

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or self.path.endswith("/") or len(self.path) < 2:
            raise ConfigError(f"device path must look like /dm, got {self.path!r}", key="path")
        for key in ("max_msg_size", "max_header_bytes", "max_connections",
                    "max_connections_per_address", "max_sessions", "max_pending",
                    "max_pipeline", "send_chunk"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive", key=key)
        if self.min_send_rate < 0:
            raise ConfigError("min_send_rate must not be negative", key="min_send_rate")
        if self.send_rate_window is not None and self.send_rate_window <= 0:
            raise ConfigError("send_rate_window must be positive", key="send_rate_window")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together", key="tls_cert")

    @property
    def max_body(self) -> int:
        return self.max_msg_size + self.max_body_slack

    @property
    def rate_window(self) -> float:
        """Seconds per check of ``min_send_rate``."""
        w = self.send_rate_window
        return self.keepalive_timeout if w is None else w

    def make_ssl_context(self) -> _ssl.SSLContext | None:
        if self.ssl_context is not None:
            return self.ssl_context
        if self.tls_cert is None:
            return None
        ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, _ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate/key: {exc}", key="tls_cert") from exc
        return ctx


# --- the handler the services layer provides -------------------------------------------------


class DeviceHandler(Protocol):
    """What the server calls; the services layer implements it.

    ``on_session_closed`` is optional: the server calls it when it ends a session itself
    (idle timeout, shutdown, a device restarting its session, an unrecoverable error).
    """

    async def account_for(self, dev_id: str | None, username: str | None) -> Any: ...

    async def on_events(self, session: Any, events: list[Any]) -> None: ...


class MemoryDeviceHandler:
    """A ``DeviceHandler`` over an in-memory dict, for tests and ``dmengine serve``.

    ``accounts`` maps the device id (``IMEI:…``) or the user name to a ``DmAccount``;
    ``account_factory(dev_id, username)`` makes accounts for devices not in it (the
    simulator's derivation, for ``serve`` next to ``simulate``).  Rotated nonces
    (NonceIssued, ServerNonceReceived) are written back into the account, as a store would.
    Every event is appended to ``events`` as ``(device_id, event)``.  ``queue_on_connect``
    maps a device id to commands queued the first time that device's session reports
    events (the handle of a command is ``(device_id, index)``).
    """

    def __init__(self, accounts: dict[str, Any] | None = None, *,
                 account_factory: Callable[[str | None, str | None], Any] | None = None) -> None:
        self.accounts: dict[str, Any] = dict(accounts or {})
        self.account_factory = account_factory
        self.events: list[tuple[str | None, Any]] = []
        self.queue_on_connect: dict[str, list[Any]] = {}
        self.closed: list[tuple[str | None, str]] = []
        self.record = True

    def add_account(self, account: Any) -> None:
        self.accounts[account.dev_id] = account
        if getattr(account, "username", None):
            self.accounts[account.username] = account

    async def account_for(self, dev_id: str | None, username: str | None) -> Any:
        acc = self.accounts.get(dev_id) if dev_id else None
        if acc is None and username:
            acc = self.accounts.get(username)
        if acc is None and self.account_factory is not None:
            acc = self.account_factory(dev_id, username)
            if acc is not None:
                self.add_account(acc)
        return acc

    async def on_events(self, session: Any, events: list[Any]) -> None:
        dev = session.device_id
        authenticated = getattr(session, "authenticated", False)
        for ev in events:
            if self.record:
                self.events.append((dev, ev))
            kind = type(ev).__name__
            if authenticated and kind in ("NonceIssued", "ServerNonceReceived"):
                # persist the rotated nonce, as a store would
                acc = self.accounts.get(getattr(ev, "dev_id", None) or dev or "")
                if acc is not None:
                    if kind == "NonceIssued":
                        acc.client_nonce = ev.nonce
                    else:
                        acc.server_nonce = ev.nonce
        if dev is not None and self.queue_on_connect and not _ended(session):
            cmds = self.queue_on_connect.pop(dev, None)
            if cmds:
                for i, cmd in enumerate(cmds):
                    session.queue((dev, i), cmd)

    async def on_session_closed(self, session: Any, reason: str) -> None:
        self.closed.append((session.device_id, reason))

    def events_of(self, kind: str) -> list[tuple[str | None, Any]]:
        return [(d, e) for d, e in self.events if type(e).__name__ == kind]


# --- extra HTTP routes -----------------------------------------------------------------------


@dataclasses.dataclass
class HttpResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class HttpRequest:
    """What a GET route handler receives."""
    method: str
    path: str
    query: str
    headers: dict[str, str]


GetRoute = Callable[[HttpRequest], Awaitable[HttpResponse]]


# --- driving a request coroutine without a task when it never waits ---------------------------


@types.coroutine
def _resume(coro: Any, first: Any) -> Any:
    """Continue ``coro`` inside a Task after it yielded ``first`` from a hand-driven send."""
    pending = first
    while True:
        try:
            yield pending
        except BaseException as exc:  # cancellation and the like go into the coroutine
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(None)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Any, first: Any) -> Any:
    return await _resume(coro, first)


# --- the session table -------------------------------------------------------------------------


class DmServer(ServerCore):
    """The device port: listening sockets, the session table, admission control.

    Use ``await DmServer(config, handler).start()`` then ``await server.shutdown()``; or
    ``serve_forever`` for a process that stops on SIGTERM.
    """

    def __init__(self, config: ServerConfig, handler: Any, *,
                 metrics: DeviceMetrics | None = None,
                 session_factory: Callable[..., Any] | None = None,
                 random_token: Callable[[], str] | None = None) -> None:
        self.config = config
        self.handler = handler
        if metrics is not None and not isinstance(metrics, DeviceCounters):
            # the device port counts through DeviceCounters' C methods (_metrics.pxd)
            raise ConfigError(f"metrics must be a DeviceMetrics or None, got "
                              f"{type(metrics).__name__}", key="metrics")
        self.metrics = metrics
        self.sessions: dict[str, _Entry] = {}
        self.by_key: dict[str, str] = {}
        self.guard = AuthGuard(config.brute_force) if config.brute_force is not None else None
        #: token -> auth deadline of sessions in the table that have not authenticated, in
        #: insertion order (one timeout for all: the order is the deadlines' order)
        self._unauthenticated: dict[str, float] = {}
        self.connections: set[DeviceConnection] = set()
        #: open connections per peer address (``_address_key``); an address leaves at zero
        self.connections_by_address: dict[str, int] = {}
        self.draining = False
        self.get_routes: dict[str, GetRoute] = {}
        self._session_factory = session_factory
        self._new_token = random_token or _token
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session_config: Any = config.session_config
        self._session_configs: dict[str, Any] = {}
        self._on_closed = getattr(handler, "on_session_closed", None)
        self._take_events = True     # cleared when the session class has no take_events()
        self._keep_bytes = True      # the session keeps the encoded reply (keep_reply_bytes)
        self._checked_cls: type | None = None
        self._path = config.path.encode()
        self._prefix = self._path + b"/"
        self._idle_event: asyncio.Event | None = None
        self.scheme = "https" if (config.tls_cert or config.ssl_context) else "http"
        self.port: int | None = None
        self.session_port: int | None = None     # see ServerConfig.session_port
        self._session_server: asyncio.AbstractServer | None = None
        self._bases: dict[bytes | None, str] = {}
        #: what every connection reads and counts on each request, in C fields (pending
        #: requests, the path, the caps, the dicts above)
        self._port = Port(self)

    @property
    def pending(self) -> int:
        """Requests received and not yet answered, over all connections."""
        return self._port.pending

    @pending.setter
    def pending(self, n: int) -> None:
        self._port.pending = n

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> "DmServer":
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        self._server = await self._loop.create_server(
            lambda: DeviceConnection(self), cfg.host, cfg.port,
            ssl=cfg.make_ssl_context(), reuse_port=cfg.reuse_port or None,
            backlog=cfg.backlog)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        if cfg.reuse_port and cfg.steer is not None:
            for each in self._server.sockets:
                steer_reuseport_group(each.fileno(), *cfg.steer)
        if cfg.session_port is not None:
            self._session_server = await self._loop.create_server(
                lambda: DeviceConnection(self), cfg.host, cfg.session_port,
                ssl=cfg.make_ssl_context(), backlog=cfg.backlog)
            self.session_port = self._session_server.sockets[0].getsockname()[1]
        self._sweeper = self._loop.call_later(cfg.tick, self._sweep)
        return self

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}{self.config.path}"

    def base_url(self, host: bytes | None) -> str:
        """``scheme://host/path`` for RespURIs: ``public_url``, else from the Host header."""
        base = self._bases.get(host)
        if base is None:
            base = self.config.public_url
            if base is None:
                h = (host or f"{self.config.host}:{self.port}".encode()).decode("latin-1")
                base = f"{self.scheme}://{h}{self.config.path}"
            if self.session_port is not None:
                base = with_port(base, self.session_port)
            if len(self._bases) < 64:
                self._bases[host] = base
        return base

    def add_get_route(self, prefix: str, route: GetRoute) -> None:
        """Serve GET (and HEAD) for paths starting with ``prefix`` (e.g. ``/content/``)."""
        if not prefix.startswith("/"):
            raise ConfigError(f"route prefix must start with '/': {prefix!r}", key="prefix")
        self.get_routes[prefix] = route

    async def shutdown(self, deadline: float | None = None) -> None:
        """Stop accepting; let running DM sessions finish up to ``deadline`` seconds; close."""
        if deadline is None:
            deadline = self.config.shutdown_deadline
        self.draining = self._port.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        for token in list(self._unauthenticated):
            # challenged and never answered: nothing of theirs is worth waiting for
            entry = self.sessions.get(token)
            if entry is not None and not entry.busy:
                self._end(token, "shutdown")
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while (self.sessions or self.pending) and loop.time() < end:
            await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
        for token in list(self.sessions):
            self._end(token, "shutdown")
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._tasks:      # handler hooks still running (e.g. on_session_closed writes)
            await asyncio.wait(set(self._tasks), timeout=max(0.5, end - loop.time()))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._session_server is not None:
            # open until here: a device whose session is finishing may connect again to it
            self._session_server.close()
            await self._session_server.wait_closed()

    # --- sessions -------------------------------------------------------------------------------

    def _insert(self, entry: _Entry) -> None:
        assert self._loop is not None
        now = self._loop.time()
        entry.deadline = now + self.config.session_idle_timeout
        self.sessions[entry.token] = entry
        entry.inserted = True
        if entry.key is not None:
            self.by_key[entry.key] = entry.token
        if not getattr(entry.session, "authenticated", True):
            self._unauthenticated[entry.token] = now + self.config.auth_timeout

    def _touch(self, entry: _Entry) -> None:
        # re-insert so the table stays ordered by last activity: the sweep stops early
        assert self._loop is not None
        entry.deadline = self._loop.time() + self.config.session_idle_timeout
        sessions = self.sessions
        del sessions[entry.token]
        sessions[entry.token] = entry

    def _end_entry(self, entry: _Entry, reason: str) -> None:
        if entry.inserted:
            self._end(entry.token, reason)
        elif not entry.closed:
            entry.inserted = True        # table bookkeeping only once
            self.sessions[entry.token] = entry
            self._end(entry.token, reason)

    def _end(self, token: str, reason: str) -> None:
        entry = self.sessions.pop(token, None)
        if entry is None:
            return
        entry.closed = True
        self._unauthenticated.pop(token, None)
        if entry.key is not None and self.by_key.get(entry.key) == token:
            del self.by_key[entry.key]
        if self.metrics is not None:
            self.metrics.session_ended(reason, entry.t0)
        session = entry.session
        if not _ended(session):
            # the server ends it (timeout, shutdown, restart, error): tell the engine, the
            # handler, and hand over what the engine says about it (CommandNotDelivered, …)
            close = getattr(session, "close", None)
            more: Any = None
            try:
                if close is not None:
                    more = close(reason)
                else:
                    session.abort(reason)
            except Exception:  # the engine may refuse to close an unidentified session
                log.debug("closing session %s", session_label(token), exc_info=True)
            if self._on_closed is not None:
                self.spawn(self._on_closed(session, reason))
            if not more and self._take_events:
                more = session.take_events()
            if more:
                self.spawn(self.handler.on_events(session, list(more)))

    def spawn(self, coro: Any) -> None:
        """Runs ``coro`` hand-driven; a Task only if it waits.  Errors are logged."""
        try:
            first = coro.send(None)
        except StopIteration:
            return
        except Exception:
            log.exception("handler hook failed")
            return
        assert self._loop is not None
        task = self._loop.create_task(_finish(coro, first))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handler hook failed", exc_info=task.exception())

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        expired = []
        for token, entry in self.sessions.items():
            if entry.deadline > now:
                break
            if not entry.busy:
                expired.append(token)
        for token in expired:
            self._end(token, "timeout")
        if self._unauthenticated:
            self._sweep_unauthenticated(now)
        for conn in list(self.connections):
            if conn.deadline <= now:
                conn.timed_out()
        self._sweeper = loop.call_later(self.config.tick, self._sweep)

    def _sweep_unauthenticated(self, now: float) -> None:
        """Ends sessions still unauthenticated ``auth_timeout`` after their challenge."""
        due = []
        for token, deadline in self._unauthenticated.items():
            if deadline > now:
                break
            due.append(token)
        for token in due:
            entry = self.sessions.get(token)
            if entry is None or getattr(entry.session, "authenticated", True):
                del self._unauthenticated[token]       # gone, or it authenticated since
            elif not entry.busy:
                self._end(token, "auth_timeout")

    # --- one DM request ---------------------------------------------------------------------------

    async def handle_get(self, req: _Req, route: GetRoute, path: str, query: str) -> bytes:
        """Runs a GET route.  The route answers with an object carrying ``status``,
        ``headers`` (a list of pairs) and either ``body`` or a file part (``path``,
        ``offset``, ``length``), like ``HttpResponse`` or ``content.ContentResponse``."""
        head_only = req.method == b"HEAD"
        try:
            resp = await route(HttpRequest(req.method.decode(), path, query, req.headers or {}))
        except DmError as exc:
            return _http(400, f"{exc}\n".encode(), close=not req.keep_alive)
        body = getattr(resp, "body", b"") or b""
        fpath = getattr(resp, "path", None)
        head_only = head_only or bool(getattr(resp, "head", False))
        clen = len(body)
        part = None
        if fpath:
            body = b""
            clen = int(getattr(resp, "length", 0))
            if clen > 0 and not head_only:
                # sent after the head, in chunks, by DeviceConnection._send_part: never
                # read whole into memory
                part = (fpath, int(getattr(resp, "offset", 0)), clen)
        headers = list(getattr(resp, "headers", None) or [])
        ctype = getattr(resp, "content_type", None)
        names = {k.lower() for k, _ in headers}
        if ctype and "content-type" not in names:
            headers.append(("Content-Type", ctype))
        if "content-length" not in names:
            headers.append(("Content-Length", str(clen)))
        if "cache-control" not in names:
            headers.append(("Cache-Control", "no-store, private"))
        lines = [b"HTTP/1.1 %d %s\r\n" % (resp.status, _REASONS.get(resp.status, b"Status"))]
        for k, v in headers:
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        if not req.keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if head_only:
            body = b""
        if part is not None:
            # close_after routes _write_reply off its common path, to _start_part (which
            # closes afterwards only if the request asked for it)
            req.part = part
            req.close_after = True
        return b"".join(lines) + body


class _FileReader:
    """``pread`` in executor threads on a descriptor the loop may give up at any moment
    (device gone, task cancelled): the descriptor is closed by whoever finishes last, never
    under a read still running."""

    __slots__ = ("fd", "lock", "users", "closed")

    def __init__(self) -> None:
        self.fd = -1
        self.lock = threading.Lock()
        self.users = 0
        self.closed = False

    def open(self, path: str) -> None:          # executor thread
        with self.lock:
            if self.closed:
                return
            self.users += 1
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        finally:
            with self.lock:
                self.users -= 1
                self.fd = fd
                self._close_if_unused()

    def read(self, n: int, pos: int) -> bytes:  # executor thread
        with self.lock:
            if self.closed or self.fd < 0:
                return b""
            self.users += 1
        try:
            return os.pread(self.fd, n, pos)
        finally:
            with self.lock:
                self.users -= 1
                self._close_if_unused()

    def close(self) -> None:                    # loop thread; never waits for a read
        with self.lock:
            self.closed = True
            self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self.closed and not self.users and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: SO_ATTACH_REUSEPORT_CBPF (asm-generic/socket.h); not in Python's socket module
_SO_ATTACH_REUSEPORT_CBPF = 51
#: a random number (SKF_AD_OFF + SKF_AD_RANDOM, linux/filter.h), as a load's offset
_BPF_RANDOM = 0xFFFFF000 + 56


def reuseport_program(share: float, processes: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program that picks a socket of a SO_REUSEPORT group for a new
    connection: the first socket (index 0, bound first) with probability ``share``, else one
    of the other ``processes - 1`` at random.  ``(code, jt, jf, k)`` instructions."""
    if not 0.0 <= share <= 1.0 or processes < 2:
        raise ConfigError("steer: share must be within 0..1 and processes at least 2",
                          key="steer")
    ld_rand, mod_k, add_k, jge_k = 0x20, 0x94, 0x04, 0x35
    ret_k, ret_a = 0x06, 0x16
    return [
        (ld_rand, 0, 0, _BPF_RANDOM),
        (mod_k, 0, 0, 10_000),
        (jge_k, 1, 0, round(share * 10_000)),     # at or above the share: another process
        (ret_k, 0, 0, 0),
        (ld_rand, 0, 0, _BPF_RANDOM),
        (mod_k, 0, 0, processes - 1),
        (add_k, 0, 0, 1),
        (ret_a, 0, 0, 0),
    ]


def steer_reuseport_group(fd: int, share: float, processes: int) -> None:
    """Attaches :func:`reuseport_program` to the SO_REUSEPORT group of listening socket
    ``fd`` (the whole group's choice, whichever member attaches it).  An index the program
    returns that no socket has (a device process being restarted) makes the kernel fall back
    to its own spread for that connection."""
    import ctypes
    prog = reuseport_program(share, processes)
    insns = (ctypes.c_uint8 * (8 * len(prog)))()
    for i, (code, jt, jf, k) in enumerate(prog):
        struct.pack_into("=HBBI", insns, 8 * i, code, jt, jf, k)
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}: the kernel copies
    # the instructions during the call, while ``insns`` is alive
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(insns))   # native alignment
    sock = _socket.socket(fileno=os.dup(fd))
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    finally:
        sock.close()


def with_port(url: str, port: int) -> str:
    """``url`` with its port replaced by ``port`` (an IPv6 literal keeps its brackets)."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return urllib.parse.urlunsplit((u.scheme, f"{host}:{port}", u.path, u.query, u.fragment))


def _consume(fut: asyncio.Future[Any]) -> None:
    """Done callback of an abandoned executor read: its error is nobody's business now."""
    if not fut.cancelled():
        fut.exception()


async def _ready(out: bytes) -> bytes:
    return out


def _address_key(peer: Any) -> str | None:
    """The key a peer's connections are counted under (``max_connections_per_address``):
    its IPv4 address; for IPv6 its /64, since one IPv6 host is handed a whole /64 (or more)
    and would otherwise get a fresh address for every connection; an IPv4-mapped IPv6 peer
    (dual-stack listener) as its IPv4 address.  None (not counted) for anything else."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    host = peer[0]
    if ":" not in host:
        return host
    try:
        addr = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


class _SendMeter:
    """What a device took of the bytes it is owed, checked every ``send_rate_window``
    (``DeviceConnection._check_rate``).  ``mark`` is the transport's buffer at the last
    check, ``given`` what the file part sender wrote since: taken = mark + given - buffer."""

    __slots__ = ("timer", "mark", "given")

    def __init__(self, timer: asyncio.TimerHandle, mark: int) -> None:
        self.timer = timer
        self.mark = mark
        self.given = 0


# --- one connection ---------------------------------------------------------------------------

_IDLE, _READING, _BUSY = 0, 1, 2


class DeviceConnection(ConnBase, asyncio.Protocol):
    """One device TCP connection: parse, queue in order, answer in order.  The state and
    the per-request path (parser callbacks, ``data_received``, ``_pump``, ``_write_reply``)
    are compiled in ``_devport.ConnBase``; the rest is here."""

    # meter: the send rate check while the device owes us reading (None otherwise); the
    # peer's key (ConnBase.address) is in server.connections_by_address (None: not counted)
    __slots__ = ("meter",)

    def __init__(self, server: DmServer) -> None:
        self.server = server
        self.address: str | None = None
        self.meter: _SendMeter | None = None
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: _Req | None = None
        self.queue: deque[_Req] = deque()
        self.busy = False
        self.state = _IDLE
        self.deadline = float("inf")
        self.hdr_bytes = 0        # header names + values of the current request
        self.raw_hdr = 0          # raw bytes received while its header block is unfinished
        self.in_headers = True
        self.closing = False      # no more reading: answer what is queued, then close
        self.paused = False       # reading paused: too many queued requests
        self.write_paused = False
        self.dropped = False      # counted out of server.pending already
        self.sending = False      # a file part is being sent (the connection is busy)
        self.writable: asyncio.Future[None] | None = None   # the part sender waits on it
        self._loop = server._loop
        self.shared = server._port
        cfg = server.config              # limits read on every request: cached once
        self._max_hdr = cfg.max_header_bytes
        self._max_body = cfg.max_body
        self._req_timeout = cfg.request_timeout
        self._max_pipeline = cfg.max_pipeline
        self._keepalive = cfg.keepalive_timeout

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        cfg = srv.config
        assert self._loop is not None
        if len(srv.connections) >= cfg.max_connections or srv.draining:
            self._refuse("connections")
            return
        key = _address_key(transport.get_extra_info("peername"))
        if key is not None:
            counts = srv.connections_by_address
            n = counts.get(key, 0)
            if n >= cfg.max_connections_per_address:
                self._refuse("connections_per_address")
                return
            counts[key] = n + 1
            self.address = key
        srv.connections.add(self)
        if srv.metrics is not None:
            srv.metrics.connection_opened()
        self.deadline = self._loop.time() + cfg.keepalive_timeout

    def _refuse(self, cap: str) -> None:
        """A connection over a cap: 503 with Retry-After, then close (nothing is read)."""
        srv = self.server
        if srv.metrics is not None:
            srv.metrics.rejected(cap)
        assert self.transport is not None
        self.transport.write(_http(503, b"too many connections\n", close=True,
                                   extra=[("Retry-After", str(srv.config.retry_after))]))
        self.transport.close()
        self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        if self in srv.connections:
            srv.connections.discard(self)
            key = self.address
            if key is not None:
                self.address = None
                counts = srv.connections_by_address
                n = counts.get(key, 0) - 1
                if n > 0:
                    counts[key] = n
                else:
                    counts.pop(key, None)
            if srv.metrics is not None:
                srv.metrics.connection_closed()
        self._stop_meter()
        self.closing = True
        self.drop_out()
        if not self.dropped:
            self.dropped = True
            srv.pending -= len(self.queue)
        self.queue.clear()
        if self.writable is not None:
            self._wake_writer()

    def pause_writing(self) -> None:
        # the device does not read its replies: answer nothing more until it does (the
        # pipeline cap then stops reading its requests too), and it must read them at
        # min_send_rate meanwhile
        self.write_paused = True
        self._start_meter()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.sending:
            self._stop_meter()
        if self.writable is not None:
            self._wake_writer()
        if not self.closing:
            self._pump()

    # --- the minimum send rate ----------------------------------------------------------------------

    def _start_meter(self) -> None:
        """The device owes us reading (a download runs, or the transport's buffer is full):
        from now on it must take ``min_send_rate`` bytes/s, checked every window."""
        transport = self.transport
        if self.meter is not None or transport is None or transport.is_closing():
            return
        assert self._loop is not None
        timer = self._loop.call_later(self.server.config.rate_window, self._check_rate)
        self.meter = _SendMeter(timer, transport.get_write_buffer_size())

    def _stop_meter(self) -> None:
        meter = self.meter
        if meter is not None:
            self.meter = None
            meter.timer.cancel()

    def _check_rate(self) -> None:
        """Every ``send_rate_window`` while a device owes us reading: it took fewer than
        ``min_send_rate`` bytes/s (at least one byte) of what it was given -> cut off.  No
        verdict when the transport's buffer is empty (the device took everything: the server
        was the slow one) or grew by more than the part sender gave (another reply was
        written in the window: measured from now on)."""
        meter = self.meter
        transport = self.transport
        if meter is None or transport is None or transport.is_closing():
            self.meter = None
            return
        if not (self.sending or self.write_paused):
            self.meter = None
            return
        cfg = self.server.config
        window = cfg.rate_window
        buffered = transport.get_write_buffer_size()
        taken = meter.mark + meter.given - buffered
        meter.mark = buffered
        meter.given = 0
        need = max(1, int(cfg.min_send_rate * window))
        if buffered and 0 <= taken < need:
            self.meter = None
            log.info("device %s took %d bytes in %.1f s (minimum %d bytes/s): too slow, "
                     "cut off%s", self.address or "?", taken, window, cfg.min_send_rate,
                     " mid-download" if self.sending else "")
            metrics = self.server.metrics
            if metrics is not None and hasattr(metrics, "cut_off"):
                metrics.cut_off("send_rate")
            self.reset()
            self._wake_writer()
            return
        assert self._loop is not None
        meter.timer = self._loop.call_later(window, self._check_rate)

    def _wake_writer(self) -> None:
        w = self.writable
        self.writable = None
        if w is not None and not w.done():
            w.set_result(None)

    # --- processing --------------------------------------------------------------------------------

    def _route(self, path: bytes) -> GetRoute | None:
        routes = self.server.get_routes
        if not routes:
            return None
        p = path.decode("latin-1")
        for prefix, route in routes.items():
            if p.startswith(prefix):
                return route
        return None

    def _count(self, status: int) -> None:
        if self.server.metrics is not None:
            self.server.metrics.http_error(status)

    def _overloaded(self, cap: str) -> bytes:
        srv = self.server
        if srv.metrics is not None:
            srv.metrics.rejected(cap)
        req = self.req
        return _http(503, b"server busy\n", close=req is not None and not req.keep_alive,
                     extra=[("Retry-After", str(srv.config.retry_after))])

    def _fail(self, status: int, text: bytes) -> None:
        """A request we cannot parse on: answer it after the queued ones, then close."""
        if self.closing:
            return
        req = _Req()
        req.reply = _http(status, text, close=True)
        req.close_after = True
        if status not in (413,):
            self._count(status)
        self.req = None
        self.state = _IDLE
        self.queue.append(req)
        self.server.pending += 1
        self.closing = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _spawn_request(self, coro: Any, first: Any, req: _Req) -> None:
        """``_pump``: the request's coroutine waits (it yielded ``first``); a task finishes it."""
        assert self._loop is not None
        srv = self.server
        task = self._loop.create_task(_finish(coro, first))
        srv._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, req=req))

    def _done(self, task: asyncio.Task[Any], *, req: _Req) -> None:
        self.server._tasks.discard(task)
        self.busy = False
        if task.cancelled():
            out = _http(503, b"shutting down\n", close=True)
            self._write_reply(out, req, close=True)
        elif task.exception() is not None:
            log.error("request failed", exc_info=task.exception())
            self._write_reply(_http(500, b"internal error\n", close=True), req, close=True)
        else:
            self._write_reply(task.result(), req)
        self._pump()

    def _drop_queue(self) -> None:
        """Requests that will never be answered (the connection closes): out of pending."""
        if self.queue:
            if not self.dropped:
                self.server.pending -= len(self.queue)
            self.queue.clear()

    # --- file parts (GET routes) -------------------------------------------------------------------

    def _start_part(self, req: _Req) -> None:
        """The head of ``req`` is written; its file part follows from a task.  The connection
        stays busy meanwhile: pipelined requests wait their turn."""
        part = req.part
        assert part is not None and self._loop is not None
        self.flush_out()
        req.part = None
        self.busy = self.sending = True
        self._start_meter()     # a download: the rate is measured over all of it
        srv = self.server
        task = self._loop.create_task(self._send_part(part, not req.keep_alive))
        srv._tasks.add(task)
        task.add_done_callback(srv._task_done)

    async def _send_part(self, part: tuple[str, int, int], close_after: bool) -> None:
        """Sends ``length`` bytes of ``path`` from ``offset``: ``send_chunk`` bytes per read
        in the executor (the next read runs while the device drains the last chunk), and no
        more while the transport's buffer is above its high-water mark.  A device that takes
        less than ``min_send_rate`` bytes/s over a ``send_rate_window`` of the download is cut
        off (``_check_rate``; the window does not restart with each chunk).  If the file ends
        early or cannot be read, the connection is aborted (the head promised ``length``
        bytes)."""
        path, pos, left = part
        loop = self._loop
        transport = self.transport
        assert loop is not None and transport is not None
        chunk = self.server.config.send_chunk
        reader = _FileReader()
        nxt: asyncio.Future[bytes] | None = None
        complete = False
        try:
            await loop.run_in_executor(None, reader.open, path)
            nxt = loop.run_in_executor(None, reader.read, min(chunk, left), pos)
            while True:
                data = await nxt
                nxt = None
                if transport.is_closing():
                    break                       # the device went away during the read
                if not data:
                    log.error("%s: ends at byte %d, %d bytes short of the promised length",
                              path, pos, left)
                    break
                transport.write(data)
                meter = self.meter
                if meter is not None:
                    meter.given += len(data)
                pos += len(data)
                left -= len(data)
                if left <= 0:
                    complete = True
                    break
                # the next read runs while the device drains this chunk
                nxt = loop.run_in_executor(None, reader.read, min(chunk, left), pos)
                if self.write_paused and not await self._drained():
                    break
        except OSError as exc:
            log.error("cannot send %s: %s", path, exc)
        finally:
            if nxt is not None:
                nxt.add_done_callback(_consume)
            reader.close()
            self.busy = self.sending = False
            if not self.write_paused:
                self._stop_meter()
        self._part_done(complete, close_after)

    async def _drained(self) -> bool:
        """Waits until the transport takes data again.  False when the connection is gone
        (``_check_rate`` aborts a device that reads too slowly or not at all)."""
        loop = self._loop
        transport = self.transport
        assert loop is not None and transport is not None
        try:
            while self.write_paused and not transport.is_closing():
                self.writable = loop.create_future()
                await self.writable
        finally:
            self.writable = None
        return not transport.is_closing()

    def _part_done(self, complete: bool, close_after: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not complete:
            self.abort()            # the head promised bytes that were never sent
            return
        assert self._loop is not None
        if close_after:
            self.closing = True
            self._drop_queue()
            # a device that stops reading the tail is aborted by the sweep (timed_out)
            self.deadline = self._loop.time() + self.server.config.keepalive_timeout
            self.flush_out()
            transport.close()
            return
        if self.paused and len(self.queue) <= self.server.config.max_pipeline // 2:
            self.paused = False
            transport.resume_reading()
        self._pump()

    # --- one request --------------------------------------------------------------------------------

    def _process(self, req: _Req) -> Any:
        """The coroutine that answers ``req`` (set up here, without an extra frame)."""
        srv = self.server
        p = req.path
        if p == srv._path and req.method == b"POST":    # the common case: package 1 etc.
            return srv.handle_dm(req, req.encoding or "xml", None, srv.base_url(req.host),
                                 self.address)
        path = p.split(b"?", 1)
        p = path[0]
        if req.method in (b"GET", b"HEAD"):
            route = self._route(p)
            assert route is not None
            return srv.handle_get(req, route, p.decode("latin-1"),
                                  path[1].decode("latin-1") if len(path) > 1 else "")
        token = None
        if p != srv._path:
            token = p[len(srv._prefix):].decode("latin-1")
            if not token or "/" in token:
                self._count(404)
                return _ready(_http(404, b"not found\n", close=not req.keep_alive))
        return srv.handle_dm(req, req.encoding or "xml", token, srv.base_url(req.host),
                             self.address)

    # --- timeouts and shutdown ---------------------------------------------------------------------

    def timed_out(self) -> None:
        transport = self.transport
        if transport is None:
            return
        self.flush_out()
        if self.sending or transport.get_write_buffer_size():
            # in the middle of a body, or the device does not read what it was sent: a
            # close would wait for it forever, and no status can be said any more
            self.deadline = float("inf")
            self.abort()
            return
        if self.closing:
            return
        if self.state == _READING:
            self._count(408)
            transport.write(_http(408, b"request too slow\n", close=True))
        self.closing = True
        self.deadline = float("inf")
        transport.close()

    def close_if_idle(self) -> None:
        if not self.queue and not self.busy and self.state == _IDLE and self.transport is not None:
            self.closing = True
            self.flush_out()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.abort()

    def reset(self) -> None:
        """``abort`` with a TCP reset: what the kernel still holds for the device is dropped
        too (a plain close leaves it to trickle out to a slow reader for as long as it reads)."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
            except (OSError, AttributeError, ValueError):
                pass
        self.abort()


_LINGER_RESET = struct.pack("ii", 1, 0)      # SO_LINGER on, 0 s: close() sends a reset


# --- entry points ---------------------------------------------------------------------------------


async def start_server(config: ServerConfig, handler: Any, *,
                       metrics: DeviceMetrics | None = None, **kw: Any) -> DmServer:
    """Creates and starts a ``DmServer`` on the running loop."""
    return await DmServer(config, handler, metrics=metrics, **kw).start()


async def serve_forever(config: ServerConfig, handler: Any, *,
                        metrics: DeviceMetrics | None = None,
                        on_started: Callable[[DmServer], None] | None = None) -> None:
    """Runs the device port until SIGTERM/SIGINT, then shuts down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # handlers first: a SIGTERM right after on_started (which announces the port) must
    # already mean "shut down gracefully", not the default "die"
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    server = await start_server(config, handler, metrics=metrics)
    tune_gc()
    if on_started is not None:
        on_started(server)
    await stop.wait()
    log.info("stopping: draining %d sessions", len(server.sessions))
    await server.shutdown()


#: gen0 allocations; gen1, gen2 collection ratios.  A busy server holds a large young
#: population that is alive but not for long — thousands of sessions' coroutines, futures,
#: commands and records — and a generation-0 collection scans all of it: at 20,000 the
#: collector ran ~550 times in a 100k-device campaign, 21 ms each, 15.7 s of the server's
#: 107 s of CPU (bench_campaign, 2026-12-06).  At 200,000 most of those objects are gone
#: before a collection comes: 7 collections, 1.0 s, and the campaign's server CPU 93 s
#: (the same peak RSS: reference counting frees nearly everything; only cycles wait for
#: the collector).  The price: a collection pauses the loop ~0.14 s instead of ~0.02 s.
DEFAULT_GC_THRESHOLDS = (200_000, 10, 20)


def tune_gc(thresholds: tuple[int, int, int] = DEFAULT_GC_THRESHOLDS, *, freeze: bool = True) -> None:
    """For a server process, once start-up is done: ``gc.freeze()`` moves everything alive
    (modules, codec tables, configuration) out of the collector's sight, and a higher
    generation-0 threshold makes collections rarer (a DM request allocates a few hundred
    short-lived objects, nearly all freed by reference counting; parked sessions hold no
    cycles).  The process-wide setting is why only the entry points call it."""
    gc.collect()
    if freeze:
        gc.freeze()
    gc.set_threshold(*thresholds)


def install_uvloop() -> None:
    """Use uvloop for new event loops (the device port is measured on it)."""
    if os.environ.get("DMENGINE_LOOP", "uvloop") == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())



