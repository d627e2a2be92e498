"""The notification gateway contract (L3): send one package #0 to one MSISDN.

``Gateway.send(msisdn, pkg0)`` waits for the gateway's rate limiter, calls the subclass's
``_send_once`` and retries retryable failures (``GatewayError(retryable=True)``) with
exponential backoff.  It returns a ``Delivery`` saying whether the gateway *accepted* the
message for delivery or only *queued* it (Kannel's "3: Queued for later delivery": the SMSC
is not connected, so nothing has left yet).  When all attempts fail, or the failure is not
retryable, it raises ``GatewayError``.

Clocks and sleeps are injectable so tests check the limiter's arithmetic without timing.
"""
from __future__ import annotations

import abc
import asyncio
import enum
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dmengine.errors import GatewayError

__all__ = [
    "DEFAULT_RATE",
    "DEFAULT_BURST",
    "DEFAULT_ATTEMPTS",
    "DeliveryState",
    "Delivery",
    "TokenBucket",
    "RetryPolicy",
    "Gateway",
    "check_msisdn",
]

DEFAULT_RATE = 50.0          # messages per second per gateway
DEFAULT_BURST = 50           # messages that may go at once after an idle period
DEFAULT_ATTEMPTS = 4         # first try + 3 retries
DEFAULT_BASE_DELAY = 0.25    # seconds before the first retry
DEFAULT_MAX_DELAY = 10.0
MAX_PKG0_BYTES = 1024        # nothing sane is longer; the SMS gateways check tighter limits

_MSISDN = re.compile(r"\+?[0-9]{3,20}")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class DeliveryState(enum.Enum):
    ACCEPTED = "accepted"    # the gateway took it for delivery (Kannel "0: Accepted")
    QUEUED = "queued"        # the gateway holds it for later (Kannel "3: Queued"), not sent yet


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a gateway said about one package #0."""

    gateway: str
    msisdn: str
    state: DeliveryState
    attempts: int
    detail: str = ""                 # the gateway's reply text
    message_id: str | None = None    # when the gateway returns one
    wire: dict[str, bytes] = field(default_factory=dict)   # bytes handed over (e.g. udh, body)

    @property
    def accepted(self) -> bool:
        return self.state is DeliveryState.ACCEPTED


def check_msisdn(msisdn: str) -> str:
    """An MSISDN is 3..20 digits with an optional leading '+'; anything else is refused."""
    if not isinstance(msisdn, str) or not _MSISDN.fullmatch(msisdn):
        raise GatewayError(f"not an MSISDN: {msisdn!r}", retryable=False)
    return msisdn


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored; ``acquire`` waits for one.

    Waiters are served in arrival order: each takes a token at once, possibly driving the
    balance negative, and sleeps until the refill has paid its debt.  A cancelled waiter
    gives its token back.
    """

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_acquire(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> float:
        """Take one token; returns the seconds waited for it (0.0 when one was there)."""
        self._refill()
        self._tokens -= 1
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        try:
            await self._sleep(wait)
        except BaseException:
            self._tokens += 1
            raise
        return wait


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all; delay before retry k (1-based) is ``base * factor**(k-1)``,
    capped at ``max_delay``, times a random factor in ``[1 - jitter, 1 + jitter]``."""

    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    factor: float = 2.0
    max_delay: float = DEFAULT_MAX_DELAY
    jitter: float = 0.1

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        d = min(self.max_delay, self.base_delay * self.factor ** (retry - 1))
        if self.jitter:
            d *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, d)


class Gateway(abc.ABC):
    """Sends package #0 to devices.  Subclasses implement ``_send_once``.

    ``rate``/``burst`` set the per-gateway token bucket (``rate=None``: no limit); ``retry``
    the backoff.  ``clock`` and ``sleep`` are injectable for tests.
    """

    name = "gateway"

    def __init__(self, *, rate: float | None = DEFAULT_RATE, burst: int = DEFAULT_BURST,
                 retry: RetryPolicy | None = None, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, rng: random.Random | None = None) -> None:
        self.limiter = TokenBucket(rate, burst, clock=clock, sleep=sleep) if rate else None
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.sent = 0          # deliveries accepted or queued
        self.failed = 0        # send() calls that ended in GatewayError
        self.retries = 0       # retries made

    @abc.abstractmethod
    async def _send_once(self, msisdn: str, pkg0: bytes) -> Delivery:
        """One attempt; raise ``GatewayError(retryable=...)`` on failure.

        The returned Delivery's ``attempts`` is overwritten by ``send``."""

    def check_payload(self, pkg0: bytes) -> None:
        """Refuse what this gateway cannot carry (``GatewayError(retryable=False)``)."""
        if not pkg0 or len(pkg0) > MAX_PKG0_BYTES:
            raise GatewayError(f"package #0 of {len(pkg0)} bytes refused (1..{MAX_PKG0_BYTES})",
                               retryable=False)

    async def send(self, msisdn: str, pkg0: bytes) -> Delivery:
        check_msisdn(msisdn)
        pkg0 = bytes(pkg0)
        try:
            self.check_payload(pkg0)
        except GatewayError:
            self.failed += 1
            raise
        attempt = 0
        while True:
            attempt += 1
            if self.limiter is not None:
                await self.limiter.acquire()
            try:
                delivery = await self._send_once(msisdn, pkg0)
            except GatewayError as exc:
                if not exc.retryable or attempt >= self.retry.attempts:
                    self.failed += 1
                    if exc.retryable:
                        raise GatewayError(f"{self.name}: gave up after {attempt} attempts: {exc}",
                                           retryable=True) from exc
                    raise
                self.retries += 1
                await self._sleep(self.retry.delay(attempt, self._rng))
                continue
            self.sent += 1
            return Delivery(gateway=delivery.gateway, msisdn=delivery.msisdn, state=delivery.state,
                            attempts=attempt, detail=delivery.detail,
                            message_id=delivery.message_id, wire=delivery.wire)

    async def send_bootstrap(self, msisdn: str, body: bytes, content_type: str) -> Delivery:
        """Delivers a DM-profile bootstrap message (WBXML, SEC/MAC in ``content_type``).

        A bootstrap is several hundred bytes: over SMS it needs concatenated WAP push, which
        the gateways here do not do yet, so the default refuses (not retryable); gateways that
        can carry it (loopback, HTTP callback) override this."""
        raise GatewayError(f"{self.name}: cannot deliver a bootstrap message of {len(body)} "
                           f"bytes (needs concatenated SMS)", retryable=False)

    async def close(self) -> None:
        """Release connections; the default has none."""

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
