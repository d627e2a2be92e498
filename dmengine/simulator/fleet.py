"""N virtual devices driven concurrently over real HTTP (``dmengine simulate``).

The HTTP client is a raw ``asyncio.Protocol`` with ``httptools.HttpResponseParser`` and
keep-alive connections (aiohttp's client costs several times more per request, and the
simulator must keep up with the server on one core).  Devices receive package-0
notifications through ``Fleet.on_pkg0`` — the callback a ``LoopbackGateway`` calls — and
then start their server-initiated session (Alert 1200 with the pkg-0 SessionID).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import collections.abc
import csv
import dataclasses
import gc
import io
import random
import ssl as _ssl
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httptools

from ..errors import CodecError, DmError
from ..notify.pkg0 import parse_pkg0
from ._lane import MAX_HEAD, MAX_RESPONSE, Conn, HttpError, Lane
from .device import ClientSession, DeviceProfile, FaultPlan, Job, VirtualDevice, _next_version

__all__ = ["HttpClient", "HttpError", "FaultShares", "Fleet", "SessionReport", "FleetStats",
           "LazyDevices", "account_for_username", "registration_csv"]

DEFAULT_TIMEOUT = 30.0
#: generation-0 threshold while Fleet.run drives load (why: server.DEFAULT_GC_THRESHOLDS)
DEFAULT_GC_THRESHOLD0 = 200_000


# the connection (``_Conn``) and the load lanes are compiled: dmengine/simulator/_lane.pyx
_Conn = Conn


def _header_dict(head: bytes) -> dict[str, str]:
    """Raw response head (status line and header lines) → {lower-case name: value}."""
    out: dict[str, str] = {}
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return out


def _retry_after(head: bytes) -> str:
    return _header_dict(head).get("retry-after", "1")


class HttpClient:
    """Keep-alive HTTP/1.1 connections by (scheme, host, port); one request per connection
    at a time.  ``request`` returns ``(status, headers, body)`` or raises ``HttpError``.

    Per message it costs a future, one write and a parse: the request head is built once per
    (method, URL, headers) and reused; timeouts are checked by one sweeper per client (a
    request times out between ``timeout`` and ``timeout`` + ``timeout``/4, at most 1 s late)
    instead of a timer per request."""

    def __init__(self, *, ssl_context: _ssl.SSLContext | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_idle_per_host: int = 1024) -> None:
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.max_idle = max_idle_per_host
        #: idle keep-alive connections per (scheme, host, port), taken oldest first: each
        #: is used in turn, so requests spread over a server's processes as the kernel
        #: spread the connections (``serve --main-device-share``) — as for phones, which each
        #: connect anew.  Newest first, the connections of the process that answered last
        #: were used again and again, and its share grew beyond what the server set
        self.idle: dict[tuple[str, str, int], collections.deque[_Conn]] = \
            collections.defaultdict(collections.deque)
        self.connects = 0
        self._splits: dict[str, tuple[tuple[str, str, int], str, str]] = {}
        self._heads: dict[str, tuple[str, tuple[tuple[str, str], ...],
                                     tuple[tuple[str, str, int], bytes, bool]]] = {}
        # "http://netloc" -> (headers, method, pool key, head after the path)
        self._bases: dict[str, tuple[tuple[tuple[str, str], ...], str, tuple[str, str, int],
                                     bytes]] = {}
        self._waiting: set[_Conn] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None
        self._sweep_every = max(0.01, min(1.0, timeout / 4))

    async def connect(self, scheme: str, host: str, port: int) -> _Conn:
        loop = asyncio.get_running_loop()
        ctx = None
        if scheme == "https":
            ctx = self.ssl_context or _ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop), host, port, ssl=ctx),
                self.timeout)
        except (OSError, asyncio.TimeoutError, _ssl.SSLError) as exc:
            raise HttpError(f"cannot connect to {host}:{port}: {exc}") from exc
        self.connects += 1
        return conn

    def split(self, url: str) -> tuple[tuple[str, str, int], str, str]:
        hit = self._splits.get(url)
        if hit is None:
            hit = self._split(url)
            if len(self._splits) >= 4096:
                self._splits.clear()
            self._splits[url] = hit
        return hit

    @staticmethod
    def _split(url: str) -> tuple[tuple[str, str, int], str, str]:
        if url.startswith("http://"):
            # the common case (a RespURI per session): no urlsplit
            slash = url.find("/", 7)
            netloc = url[7:] if slash < 0 else url[7:slash]
            path = "/" if slash < 0 else url[slash:]
            host, sep, port = netloc.rpartition(":")
            if netloc and "@" not in netloc and "[" not in netloc and "?" not in netloc \
                    and "#" not in url and \
                    (not sep or (port.isdigit() and host)):
                if not sep:
                    host, port = netloc, "80"
                return ("http", host.lower(), int(port)), path, netloc
        u = urlsplit(url)
        scheme = u.scheme or "http"
        port_number = u.port or (443 if scheme == "https" else 80)
        host = u.hostname or "127.0.0.1"
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        return (scheme, host, port_number), path, u.netloc

    def _head(self, method: str, url: str,
              headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str, int], bytes, bool]:
        """(pool key, request head up to the Content-Length value, whether to send one).

        Kept by URL with the method and headers it was built for (a device's headers are one
        shared tuple, so the check is an identity test)."""
        got = self._heads.get(url)
        if got is not None and got[1] is headers and got[0] == method:
            return got[2]
        slash = url.find("/", 7) if url.startswith("http://") else -1
        if slash > 7 and "#" not in url:
            # a session's RespURI: the server's head, with this path (not kept by URL)
            base = self._bases.get(url[:slash])
            if base is not None and base[0] is headers and base[1] == method:
                return (base[2], b"%s %s%s" % (method.encode(), url[slash:].encode("latin-1"),
                                                base[3]), method == "POST")
        key, path, hosthdr = self.split(url)
        tail = [f" HTTP/1.1\r\nHost: {hosthdr}\r\n"]
        for k, v in headers:
            tail.append(f"{k}: {v}\r\n")
        tail_b = "".join(tail).encode("latin-1")
        hit = (key, f"{method} {path}".encode("latin-1") + tail_b, method == "POST")
        if len(self._heads) >= 4096:
            self._heads.clear()
        self._heads[url] = (method, headers, hit)
        if slash > 7 and "#" not in url and path == url[slash:] and \
                (hosthdr == url[7:slash]):
            if len(self._bases) >= 256:
                self._bases.clear()
            self._bases[url[:slash]] = (headers, method, key, tail_b)
        return hit

    def _sweep(self) -> None:
        self._sweeper = None
        waiting = self._waiting
        if not waiting:
            return
        loop = self._sweep_loop
        assert loop is not None
        now = loop.time()
        for c in [c for c in waiting if c.deadline <= now]:
            waiting.discard(c)
            w = c.waiter
            if w is not None and not w.done():
                w.set_exception(HttpError(f"no answer within {self.timeout} s"))
            d = c.driver
            if d is not None:
                c.driver = None
                c.close()
                d.failed(c, HttpError(f"no answer within {self.timeout} s"))
        if waiting:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    async def request(self, method: str, url: str, *, body: bytes = b"",
                      headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                      drop_after: int | None = None) -> tuple[int, dict[str, str], bytes]:
        """One exchange.  ``drop_after`` sends only that many body bytes, then closes
        (a device losing coverage mid-upload); it raises ``HttpError``."""
        status, raw, rbody = await self.exchange(method, url, body, tuple(headers), drop_after)
        return status, _header_dict(raw), rbody

    async def exchange(self, method: str, url: str, body: bytes,
                       headers: tuple[tuple[str, str], ...],
                       drop_after: int | None = None
                       ) -> tuple[int, bytes, bytes]:
        """``request`` with the response head as raw bytes (``_header_dict`` splits it)."""
        key, head, post = self._head(method, url, headers)
        pool = self.idle[key]
        conn = None
        while pool:
            c = pool.popleft()
            if not c.closed:
                conn = c
                break
        fresh = conn is None
        if conn is None:
            conn = await self.connect(*key)
        if body or post:
            data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        else:
            data = head + b"\r\n"
        transport = conn.transport
        assert transport is not None
        if drop_after is not None:
            transport.write(data[:len(data) - len(body) + drop_after])
            transport.abort()
            conn.closed = True
            raise HttpError("connection dropped by the device (simulated)")
        loop = conn._loop
        fut: asyncio.Future[tuple[int, bytes, bytes]] = loop.create_future()
        conn.waiter = fut
        transport.write(data)
        conn.deadline = loop.time() + self.timeout
        waiting = self._waiting
        waiting.add(conn)
        if self._sweeper is None or self._sweep_loop is not loop:
            self._arm(loop)
        try:
            result = await fut
        except HttpError:
            conn.close()
            if not fresh and not fut.cancelled() and "no answer" not in str(fut.exception()):
                # a keep-alive connection the server closed meanwhile: retry once
                return await self.exchange(method, url, body, headers)
            raise
        finally:
            waiting.discard(conn)
        if conn.keep_alive and not conn.closed and len(pool) < self.max_idle:
            pool.append(conn)
        else:
            conn.close()
        return result

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_loop = loop
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def post_now(self, url: str, body: bytes,
                 headers: tuple[tuple[str, str], ...]) -> _Conn | None:
        """The fast path of a POST: sends on an idle keep-alive connection and returns it;
        the caller awaits ``conn.waiter`` (the connection goes back to its pool when the
        answer is complete) and calls ``recover`` on ``HttpError``.  None when no connection
        is idle (use ``exchange``)."""
        got = self._heads.get(url)
        if got is not None and got[1] is headers and got[0] == "POST":
            key, head, _ = got[2]
        else:
            key, head, _ = self._head("POST", url, headers)
        pool = self.idle[key]
        while pool:
            conn = pool.popleft()
            if not conn.closed:
                break
        else:
            return None
        loop = conn._loop
        conn.waiter = loop.create_future()
        conn.pool = pool
        conn.client_waiting = self._waiting
        conn.max_idle = self.max_idle
        conn.transport.write(b"%sContent-Length: %d\r\n\r\n%s"  # type: ignore[union-attr]
                             % (head, len(body), body))
        conn.deadline = loop.time() + self.timeout
        self._waiting.add(conn)
        if self._sweeper is None or self._sweep_loop is not loop:
            self._arm(loop)
        return conn

    async def recover(self, conn: _Conn, fut: asyncio.Future[Any], exc: HttpError,
                      url: str, body: bytes, headers: tuple[tuple[str, str], ...]
                      ) -> tuple[int, bytes, bytes]:
        """A fast-path POST failed: a keep-alive connection the server closed meanwhile is
        retried once on a new one (as ``exchange`` does); a timeout is raised."""
        self._waiting.discard(conn)
        conn.pool = None
        conn.close()
        if fut.cancelled() or "no answer" in str(exc):
            raise exc
        return await self.exchange("POST", url, body, headers)

    def close(self) -> None:
        for pool in self.idle.values():
            for c in pool:
                c.close()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


# --- the fleet ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultShares:
    """Share (0..1) of devices showing each fault; ``fail_update_code`` for failing updates."""

    timeout: float = 0.0
    drop: float = 0.0
    wrong_credentials: float = 0.0
    decline_optin: float = 0.0
    fail_update: float = 0.0
    fail_update_code: int = 410

    def plan(self, rng: random.Random) -> FaultPlan:
        return FaultPlan(
            timeout=rng.random() < self.timeout,
            drop=rng.random() < self.drop,
            wrong_credentials=rng.random() < self.wrong_credentials,
            decline_optin=rng.random() < self.decline_optin,
            fail_update=self.fail_update_code if rng.random() < self.fail_update else None)

    def plan_for(self, seed: int, index: int) -> FaultPlan:
        """The plan of device ``index``, from ``(seed, index)`` alone (a lazy fleet makes a
        device when it is needed, in any order, and must give it the same faults every
        time).  Devices without a fault share one plan object (nobody writes to it)."""
        shares = (self.timeout, self.drop, self.wrong_credentials, self.decline_optin,
                  self.fail_update)
        if not any(shares):
            return _NO_FAULTS
        hit = [s > 0.0 and _unit(seed, index, k) < s for k, s in enumerate(shares)]
        if not any(hit):
            return _NO_FAULTS
        return FaultPlan(timeout=hit[0], drop=hit[1], wrong_credentials=hit[2],
                         decline_optin=hit[3],
                         fail_update=self.fail_update_code if hit[4] else None)


_NO_FAULTS = FaultPlan()
_MASK64 = (1 << 64) - 1


def _unit(seed: int, index: int, salt: int) -> float:
    """A uniform number in [0, 1) from (seed, index, salt): splitmix64's finaliser."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9
         + (salt + 1) * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) / 18446744073709551616.0


@dataclasses.dataclass(slots=True)
class SessionReport:
    dev_id: str
    outcome: str
    messages: int
    seconds: float
    detail: str = ""
    alert: int = 1201


@dataclasses.dataclass(slots=True)
class FleetStats:
    sessions: int = 0
    messages: int = 0
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)
    session_seconds: list[float] = dataclasses.field(default_factory=list)
    downloads: int = 0
    download_bytes: int = 0
    notifications: int = 0
    rejected_503: int = 0
    drops: int = 0                 # connections dropped mid-message (FaultPlan.drop)
    report_retries: int = 0        # sessions started again to report a Generic Alert
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def summary(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3)

        return {
            "sessions": self.sessions, "messages": self.messages,
            "outcomes": dict(self.outcomes), "elapsed_s": round(elapsed, 3),
            "messages_per_s": round(self.messages / elapsed, 1) if elapsed else None,
            "sessions_per_s": round(self.sessions / elapsed, 1) if elapsed else None,
            "latency_p50_ms": pct(0.50), "latency_p99_ms": pct(0.99),
            "session_p50_s": round(statistics.median(self.session_seconds), 4)
            if self.session_seconds else None,
            "downloads": self.downloads, "download_bytes": self.download_bytes,
            "notifications": self.notifications, "rejected_503": self.rejected_503,
            "drops": self.drops, "report_retries": self.report_retries,
        }


def account_for_username(username: str | None, profile: DeviceProfile) -> Any:
    """The server-side account of simulated device ``dev<i>`` (for ``serve`` next to a
    simulator run): the same derivation ``VirtualDevice`` uses."""
    if not username or not username.startswith("dev") or not username[3:].isdigit():
        return None
    return VirtualDevice(int(username[3:]), profile).account()


#: the DM account's auth scheme on the server for each ``DeviceProfile.auth``
AUTH_SCHEMES = {"md5": "DIGEST", "basic": "BASIC", "hmac": "HMAC", "none": "NONE"}
REGISTRATION_COLUMNS = ("dev_id", "imei", "msisdn", "capability", "server_id", "auth_scheme",
                        "client_name", "client_password", "client_nonce", "server_password",
                        "server_nonce")


def registration_csv(devices: Iterable[VirtualDevice], *, capability: str | None = None,
                     block: int = 5000) -> Iterator[bytes]:
    """The devices as an importDeviceInstances CSV (header first, then ``block`` rows per
    piece): DevId, IMEI, MSISDN and the DM account with the credentials and starting nonces
    the device derives from its index — what the server must hold for its sessions to
    authenticate.  ``capability`` is recorded on every device when given."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(REGISTRATION_COLUMNS)
    cap = capability or ""
    n = 0
    for d in devices:
        imei = d.dev_id[5:] if d.dev_id.startswith("IMEI:") else ""
        w.writerow((d.dev_id, imei, d.msisdn, cap, d.profile.server_id,
                    AUTH_SCHEMES.get(d.profile.auth, "DIGEST"), d.username, d.client_secret,
                    base64.b64encode(d.client_nonce).decode(), d.server_secret,
                    base64.b64encode(d.server_nonce).decode()))
        n += 1
        if n % block == 0:
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    if out.tell():
        yield out.getvalue().encode()


class LazyDevices(collections.abc.Sequence):  # type: ignore[type-arg]
    """``Fleet.devices`` of a lazy fleet: device ``i`` is the live one when it is in a session,
    else made afresh from its index (and not kept — changes to it are lost)."""

    __slots__ = ("fleet",)

    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet

    def __len__(self) -> int:
        return self.fleet.n

    def __getitem__(self, i: Any) -> Any:
        f = self.fleet
        if isinstance(i, slice):
            return [f.peek(f.first_index + k) for k in range(*i.indices(f.n))]
        if i < 0:
            i += f.n
        if not 0 <= i < f.n:
            raise IndexError(i)
        return f.peek(f.first_index + i)

    def __iter__(self) -> Iterator[VirtualDevice]:
        f = self.fleet
        for k in range(f.first_index, f.first_index + f.n):
            yield f.peek(k)


class Fleet:
    """Many ``VirtualDevice``s sharing one ``DeviceProfile`` and one HTTP client.

    ``lazy=True``: no device is made up front.  A device is made from its index when package 0
    names it (its identity, credentials and faults derive from the index) and dropped when its
    sessions are over, keeping only what it changed that matters later — the client nonce the
    server issued and whether its firmware was updated — in flat per-index tables (17 bytes a
    device).  A million-device campaign then holds only the devices in a session: a full
    ``VirtualDevice`` costs ~1.2 KB before its first session and more after it."""

    def __init__(self, profile: DeviceProfile, n: int, *, faults: FaultShares | None = None,
                 seed: int = 1, first_index: int = 0, client: HttpClient | None = None,
                 keep_latencies: bool = True, retry_503: int = 3, lazy: bool = False,
                 report_retries: int = 0, report_delay: float = 1.0) -> None:
        self.profile = profile
        self.rng = random.Random(seed)
        self.seed = seed
        self.n = n
        self.first_index = first_index
        self.lazy = lazy
        shares = self.shares = faults or FaultShares()
        #: FUMO result of each device's last update: 0 none, 1 succeeded, 2 failed
        self.results = bytearray(n)
        if lazy:
            self.devices: Any = LazyDevices(self)
            self.by_msisdn: dict[str, VirtualDevice] = {}
            self.by_dev_id: dict[str, VirtualDevice] = {}
            self._live: dict[int, VirtualDevice] = {}
            self._holds: dict[int, int] = {}
            self._nonces = bytearray(16 * n)     # client nonce the server issued last
            self._odd_nonces: dict[int, bytes] = {}
            self._flags = bytearray(n)           # 1: nonce kept, 2: firmware updated
        else:
            self.devices = [VirtualDevice(first_index + i, profile,
                                          faults=shares.plan(self.rng)) for i in range(n)]
            self.by_msisdn = {d.msisdn: d for d in self.devices}
            self.by_dev_id = {d.dev_id: d for d in self.devices}
        self.client = client or HttpClient()
        self.stats = FleetStats()
        self.reports: list[SessionReport] = []
        self.keep_latencies = keep_latencies
        self.keep_reports = True
        self.retry_503 = retry_503
        #: a session that failed while the device still had a Generic Alert to deliver (a
        #: FUMO result) is tried again, as a phone does, up to ``report_retries`` times with
        #: exponential backoff from ``report_delay`` seconds (0: the alert waits for the
        #: device's next session, whenever something else starts one)
        self.report_retries = report_retries
        self.report_delay = report_delay
        self._report_tries: dict[int, int] = {}
        self.gc_threshold0 = DEFAULT_GC_THRESHOLD0     # 0: leave the collector alone
        self.tasks: set[asyncio.Task[Any]] = set()

    def accounts(self) -> list[Any]:
        return [d.account() for d in self.devices]

    # --- devices of a lazy fleet ------------------------------------------------------------------

    def _make(self, index: int) -> VirtualDevice:
        dev = VirtualDevice(index, self.profile, faults=self.shares.plan_for(self.seed, index))
        k = index - self.first_index
        flags = self._flags[k]
        if flags & 1:
            dev.client_nonce = self._odd_nonces.get(k) or bytes(self._nonces[16 * k:16 * k + 16])
        if flags & 2:
            dev.fwv = _next_version(self.profile.fwv)
            dev.swv = dev.fwv + "_r1"
        return dev

    def peek(self, index: int) -> VirtualDevice:
        """Device ``index``: the live one, else one made afresh and not kept."""
        if not self.lazy:
            return self.devices[index - self.first_index]
        dev = self._live.get(index)
        return dev if dev is not None else self._make(index)

    def device(self, index: int) -> VirtualDevice:
        """Device ``index``, kept live until the end of the session it is wanted for."""
        if not self.lazy:
            return self.devices[index - self.first_index]
        dev = self._live.get(index)
        if dev is None:
            dev = self._live[index] = self._make(index)
        return dev

    def find_msisdn(self, msisdn: str) -> VirtualDevice | None:
        if not self.lazy:
            return self.by_msisdn.get(msisdn)
        # VirtualDevice's MSISDN is "+4479" and the index in (at least) eight digits
        if not msisdn.startswith("+4479") or not msisdn[5:].isdigit() or len(msisdn) < 13:
            return None
        index = int(msisdn[5:])
        if not self.first_index <= index < self.first_index + self.n or \
                msisdn != f"+4479{index:08d}":
            return None
        return self.device(index)

    def _hold(self, dev: VirtualDevice) -> None:
        i = dev.index
        self._holds[i] = self._holds.get(i, 0) + 1
        self._live.setdefault(i, dev)

    def _release(self, dev: VirtualDevice) -> None:
        i = dev.index
        left = self._holds.get(i, 1) - 1
        if left > 0:
            self._holds[i] = left
            return
        self._holds.pop(i, None)
        self._evict(dev)

    def _evict(self, dev: VirtualDevice) -> None:
        """Drops a device that has nothing left to do (a device still holding a result to
        report, or a job, stays: its next session needs them)."""
        i = dev.index
        if dev.pending_alerts or dev.jobs or self._holds.get(i) or self._live.get(i) is not dev:
            return
        del self._live[i]
        k = i - self.first_index
        nonce = dev.client_nonce
        flags = self._flags[k] | 1
        if len(nonce) == 16:
            self._nonces[16 * k:16 * k + 16] = nonce
            self._odd_nonces.pop(k, None)
        else:
            self._odd_nonces[k] = nonce
        if dev.fwv != self.profile.fwv:
            flags |= 2
        self._flags[k] = flags

    @property
    def live(self) -> int:
        """Devices held in memory (all of them unless lazy)."""
        return len(self._live) if self.lazy else self.n

    def summary(self) -> dict[str, Any]:
        """``stats.summary()`` and what the fleet's devices did: FUMO updates that succeeded
        and failed (each device's last result), devices live, Generic Alerts not delivered."""
        out = self.stats.summary()
        pending = sum(len(d.pending_alerts) for d in
                      (self._live.values() if self.lazy else self.devices))
        out.update(updates_succeeded=self.results.count(1), updates_failed=self.results.count(2),
                   devices=self.n, devices_live=self.live, alerts_pending=pending,
                   sessions_open=len(self.tasks))
        return out

    # --- package 0 -----------------------------------------------------------------------------------

    async def on_pkg0(self, msisdn: str, pkg0: bytes) -> bool:
        """The loopback gateway's callback: verify, then start the session in the background.

        Returns False (no such device) for an unknown MSISDN; a package 0 whose digest does
        not verify is dropped silently, as a phone does."""
        return self.deliver_pkg0(msisdn, pkg0)

    def deliver_pkg0(self, msisdn: str, pkg0: bytes) -> bool:
        """``on_pkg0`` without a coroutine (for a listener that calls it per request)."""
        dev = self.find_msisdn(msisdn)
        if dev is None:
            return False
        self.stats.notifications += 1
        try:
            p = parse_pkg0(pkg0, dev.server_secret, dev.server_nonce, accept_resync=True)
        except CodecError as exc:
            self._report(SessionReport(dev.dev_id, "pkg0_rejected", 0, 0.0, str(exc), 1200))
            if self.lazy:
                self._evict(dev)
            return True
        if p.resync and dev.profile.resync:
            # the server re-synchronises: this session runs on the well-known nonce both
            # ways, and the server's Chal gives us a fresh one (PROTOCOL.md §8.2)
            dev.client_nonce = dev.server_nonce = p.nonce or b""
        elif p.resync:
            self._report(SessionReport(dev.dev_id, "pkg0_rejected", 0, 0.0,
                                       "re-synchronisation nonce (not supported)", 1200))
            if self.lazy:
                self._evict(dev)
            return True
        self.spawn(self.run_session(dev, alert=1200, session_id=p.session_id_text))
        return True

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Waits until every background session (from package 0 or later reports) ended."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.tasks:
            left = None if end is None else max(0.0, end - time.monotonic())
            if left == 0.0:
                break
            await asyncio.wait(set(self.tasks), timeout=left)

    # --- one session -----------------------------------------------------------------------------------

    def _report(self, rep: SessionReport) -> SessionReport:
        self.stats.sessions += 1
        self.stats.outcomes[rep.outcome] += 1
        self.stats.session_seconds.append(rep.seconds) if self.keep_latencies else None
        if self.keep_reports:
            self.reports.append(rep)
        return rep

    def _ended(self, want: bool, dev: VirtualDevice, outcome: str, messages: int, t0: float,
               detail: str, alert: int) -> SessionReport | None:
        """Counts a finished session; the report object only when someone wants it."""
        seconds = time.perf_counter() - t0
        if outcome != "completed" and dev.pending_alerts and self.report_retries:
            self._retry_report(dev)
        if want or self.keep_reports:
            return self._report(SessionReport(dev.dev_id, outcome, messages, seconds, detail,
                                              alert))
        stats = self.stats
        stats.sessions += 1
        stats.outcomes[outcome] += 1
        if self.keep_latencies:
            stats.session_seconds.append(seconds)
        return None

    def _retry_report(self, dev: VirtualDevice) -> None:
        tries = self._report_tries.get(dev.index, 0)
        if tries >= self.report_retries:
            return
        self._report_tries[dev.index] = tries + 1
        self.spawn(self._report_later(
            dev, self.report_delay * 2 ** tries * self.rng.uniform(0.5, 1.5)))

    async def _report_later(self, dev: VirtualDevice, delay: float) -> None:
        """A new session, after ``delay``, to deliver what a failed one could not."""
        if self.lazy:
            self._hold(dev)
        try:
            await asyncio.sleep(delay)
            if dev.pending_alerts:
                self.stats.report_retries += 1
                await self.run_session(dev, alert=1201, _want=False)
        finally:
            if self.lazy:
                self._release(dev)
        if not dev.pending_alerts:
            self._report_tries.pop(dev.index, None)

    async def run_session(self, dev: VirtualDevice, *, alert: int = 1201,
                          session_id: str | None = None,
                          _want: bool = True) -> SessionReport:
        """Runs one DM session of ``dev`` to its end; FUMO jobs run as configured.
        (``_want=False``: no report object unless ``keep_reports``.)"""
        t0 = time.perf_counter()
        if not self.lazy:
            cs = dev.session(session_id=session_id, alert=alert, rng=self.rng)
            return await self._drive(dev, cs, cs.first(), t0, alert, _want)  # type: ignore
        self._hold(dev)
        try:
            cs = dev.session(session_id=session_id, alert=alert, rng=self.rng)
            return await self._drive(dev, cs, cs.first(), t0, alert, _want)  # type: ignore
        finally:
            self._release(dev)

    async def _drive(self, dev: VirtualDevice, cs: ClientSession, out: Any, t0: float,
                     alert: int, _want: bool, messages: int = 0,
                     resume: tuple[Any, ...] | None = None) -> SessionReport | None:
        """The session loop from message ``out`` on.  ``resume`` picks up a session a
        ``_lane.Lane`` started: ``("response", status, head, body)`` (an answer to ``out`` that
        arrived and was counted, not yet looked at) or ``("received",)`` (``cs`` took the
        answer and has jobs to run)."""
        dropped = False
        retries = 0
        later_jobs: list[Job] = []
        stats = self.stats
        client = self.client
        exchange, post_now = client.exchange, client.post_now
        faults = dev.faults
        keep_latencies = self.keep_latencies
        clock = time.perf_counter
        while out is not None:
            if resume is None:
                drop_after = None
                if faults.drop and not dropped and messages == 1:
                    drop_after = len(out.body) // 2
                    dropped = True
                t1 = clock()
                try:
                    conn = post_now(out.url, out.body, out.wire_headers) \
                        if drop_after is None else None
                    if conn is not None:
                        fut = conn.waiter
                        assert fut is not None
                        try:
                            status, hdrs, body = await fut   # the connection is back in its pool
                        except HttpError as exc:
                            status, hdrs, body = await client.recover(
                                conn, fut, exc, out.url, out.body, out.wire_headers)
                    else:
                        status, hdrs, body = await exchange("POST", out.url, out.body,
                                                            out.wire_headers, drop_after)
                except HttpError as exc:
                    if drop_after is not None:
                        stats.drops += 1
                        continue                  # reconnect and send the same message again
                    return self._ended(_want, dev, "http_error", messages, t0, str(exc), alert)
                if keep_latencies:
                    stats.latencies.append(clock() - t1)
                messages += 1
                stats.messages += 1
            elif resume[0] == "response":
                status, hdrs, body = resume[1:]
            if resume is None or resume[0] == "response":
                resume = None
                if status == 503 and retries < self.retry_503:
                    stats.rejected_503 += 1
                    retries += 1
                    await asyncio.sleep(min(float(_retry_after(hdrs) or 1), 5.0)
                                        * self.rng.uniform(0.05, 0.2))
                    continue
                if status != 200:
                    return self._ended(_want, dev, f"http_{status}", messages, t0,
                                       body[:200].decode("latin-1"), alert)
                cs.receive(body)
            resume = None
            if cs.jobs:
                jobs, cs.jobs = cs.jobs, []
                if self.profile.report_in_same_session:
                    for job in jobs:
                        await self.run_job(dev, job)
                else:
                    later_jobs.extend(jobs)
            if faults.timeout and messages >= 1 and not cs.done:
                return self._ended(_want, dev, "device_timeout", messages, t0,
                                   "stopped answering (simulated)", alert)
            out = cs.next()
        outcome = cs.outcome or "completed"
        rep = self._ended(_want, dev, outcome, messages, t0, cs.detail, alert)
        if later_jobs:
            for job in later_jobs:
                await self.run_job(dev, job)
        if later_jobs or (dev.pending_alerts and outcome == "completed"):
            # Results the session could not carry (a job that finished after the device's
            # last message, or jobs run after the session) go out in a new session, as a
            # phone reports a FUMO result after its update.
            self.spawn(self.run_session(dev, alert=1201))
        return rep

    async def _lane_retry(self, exc: HttpError, dev: VirtualDevice, cs: ClientSession,
                          out: Any, messages: int, t0: float) -> None:
        """A lane's exchange failed: as ``HttpClient.recover``, a keep-alive connection the
        server closed meanwhile is retried once on a new one; a timeout ends the session."""
        if "no answer" in str(exc):
            self._ended(False, dev, "http_error", messages, t0, str(exc), 1201)
            return
        t1 = time.perf_counter()
        try:
            status, head, body = await self.client.exchange("POST", out.url, out.body,
                                                            out.wire_headers)
        except HttpError as exc2:
            self._ended(False, dev, "http_error", messages, t0, str(exc2), 1201)
            return
        if self.keep_latencies:
            self.stats.latencies.append(time.perf_counter() - t1)
        self.stats.messages += 1
        await self._drive(dev, cs, out, t0, 1201, False, messages + 1,
                          ("response", status, head, body))

    async def run_job(self, dev: VirtualDevice, job: Job) -> int:
        """Download (and install) a FUMO package; records the result on the device (and, for
        an update, in ``results``)."""
        result = await self._run_job(dev, job)
        if job.kind != "download":
            k = dev.index - self.first_index
            if 0 <= k < self.n:
                self.results[k] = 1 if 200 <= result < 300 else 2
        return result

    async def _run_job(self, dev: VirtualDevice, job: Job) -> int:
        result = 200
        if job.kind in ("download", "downloadandupdate"):
            url = job.url or ""
            if not url.startswith(("http://", "https://")):
                return _finish(dev, job, 411)
            try:
                status, hdrs, body = await self.client.request("GET", url)
            except HttpError:
                return _finish(dev, job, 503)
            if status != 200:
                return _finish(dev, job, 406 if status in (401, 403) else 500)
            self.stats.downloads += 1
            self.stats.download_bytes += len(body)
            job.nbytes = len(body)
            expected = int(hdrs["content-length"]) if hdrs.get("content-length", "").isdigit() \
                else None
            result = dev.update_result(len(body), expected) if job.kind == "downloadandupdate" \
                else (402 if expected is not None and expected != len(body) else 200)
            if job.kind == "download" and result == 200:
                dev.pkg_data = body
        else:
            result = dev.update_result(len(dev.pkg_data or b""), None) if dev.pkg_data else 410
        return _finish(dev, job, result)

    # --- load generation ---------------------------------------------------------------------------------

    async def run(self, *, duration: float | None = None, sessions_per_device: int = 1,
                  concurrency: int = 100) -> FleetStats:
        """Client-initiated sessions: each device runs ``sessions_per_device`` sessions (or
        sessions until ``duration`` seconds passed), ``concurrency`` devices at a time.

        Each of the ``concurrency`` lanes is a ``_lane.Lane``: driven by the response callbacks of
        its keep-alive connection (no task, future or coroutine per message or session);
        anything out of the ordinary goes to ``_drive``."""
        queue: collections.deque[VirtualDevice] = collections.deque()
        for _ in range(sessions_per_device if duration is None else 1):
            queue.extend(self.devices)
        end = None if duration is None else time.perf_counter() + duration
        self.stats.started = time.perf_counter()
        run = _Run(self, queue, end, max(1, concurrency))
        # a session allocates many short-lived objects that reference counting frees: rarer
        # generation-0 collections while the load runs (restored afterwards)
        thresholds = gc.get_threshold()
        if self.gc_threshold0 and thresholds[0] < self.gc_threshold0:
            gc.set_threshold(self.gc_threshold0, *thresholds[1:])
        try:
            for lane in run.lanes:
                lane.next_session()
            await run.done
            await self.wait_idle(timeout=30.0)
        finally:
            gc.set_threshold(*thresholds)
            run.close()
        return self.stats

    def close(self) -> None:
        self.client.close()


# --- callback-driven load lanes (Fleet.run) ---------------------------------------------------------


class _Run:
    """One ``Fleet.run``: the device queue, the deadline, its lanes and their end."""

    __slots__ = ("fleet", "queue", "end", "lanes", "active", "done")

    def __init__(self, fleet: Fleet, queue: collections.deque[VirtualDevice],
                 end: float | None, n: int) -> None:
        self.fleet = fleet
        self.queue = queue
        self.end = end
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lanes = [Lane(self) for _ in range(n)]
        self.active = n

    def lane_done(self) -> None:
        """A lane ran out of work."""
        self.active -= 1
        if self.active == 0 and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def close(self) -> None:
        for lane in self.lanes:
            lane.park()


def _finish(dev: VirtualDevice, job: Job, result: int) -> int:
    dev.finish_job(job, result)
    return result
