"""The gateway contract: token bucket, retry policy, loopback gateway (no network)."""
from __future__ import annotations

import asyncio
import random

import pytest

from dmengine.errors import GatewayError
from dmengine.notify.base import RetryPolicy, TokenBucket, check_msisdn
from dmengine.notify.loopback import LoopbackGateway
from dmengine.notify.pkg0 import build_pkg0, parse_pkg0

PKG0 = build_pkg0("acme-dms", "s", b"n", 0x42)


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, d: float) -> None:
        self.slept.append(d)
        self.now += d


def test_bucket_burst_then_rate():
    t = FakeTime()
    b = TokenBucket(rate=4.0, burst=2, clock=t.clock, sleep=t.sleep)
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()
    t.now += 0.25                     # one token back
    assert b.try_acquire() and not b.try_acquire()
    t.now += 100                      # refill is capped at the burst
    assert b.tokens == 2.0


def test_bucket_acquire_waits_exactly_for_the_deficit():
    t = FakeTime()
    b = TokenBucket(rate=5.0, burst=1, clock=t.clock, sleep=t.sleep)

    async def main():
        return [await b.acquire() for _ in range(4)]

    waits = asyncio.run(main())
    assert waits == pytest.approx([0.0, 0.2, 0.2, 0.2])
    assert t.now == pytest.approx(0.6)          # 4 messages at 5/s after a burst of 1


def test_bucket_cancelled_waiter_returns_its_token():
    t = FakeTime()
    async def main():
        ev = asyncio.Event()

        async def blocking_sleep(d):
            await ev.wait()

        b = TokenBucket(rate=1.0, burst=1, clock=t.clock, sleep=blocking_sleep)
        await b.acquire()
        task = asyncio.ensure_future(b.acquire())
        await asyncio.sleep(0)
        assert b.tokens == -1.0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return b.tokens

    assert asyncio.run(main()) == 0.0


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (1, 0)])
def test_bucket_refuses_bad_parameters(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_retry_delays():
    p = RetryPolicy(attempts=5, base_delay=0.5, factor=3.0, max_delay=2.0, jitter=0.0)
    assert [p.delay(k) for k in (1, 2, 3, 4)] == [0.5, 1.5, 2.0, 2.0]
    pj = RetryPolicy(base_delay=1.0, jitter=0.25)
    rng = random.Random(1)
    ds = [pj.delay(1, rng) for _ in range(200)]
    assert all(0.75 <= d <= 1.25 for d in ds) and len(set(ds)) > 100


@pytest.mark.parametrize("good", ["4915112345678", "+4915112345678", "123"])
def test_msisdn_ok(good):
    assert check_msisdn(good) == good


@pytest.mark.parametrize("bad", ["", "12", "+", "49 151", "49151\n", "4915&x=1", "1" * 21, None])
def test_msisdn_refused(bad):
    with pytest.raises(GatewayError) as ei:
        check_msisdn(bad)
    assert not ei.value.retryable


def test_loopback_delivers_the_bytes():
    got = []

    async def receiver(msisdn, pkg0):
        got.append((msisdn, pkg0))

    async def main():
        async with LoopbackGateway(receiver) as gw:
            return await gw.send("4915112345678", PKG0)

    d = asyncio.run(main())
    assert d.accepted and d.gateway == "loopback"
    assert got == [("4915112345678", PKG0)]
    assert parse_pkg0(got[0][1], "s", b"n").session_id_text == "42"


def test_loopback_retries_retryable_errors():
    t = FakeTime()
    calls = []

    async def receiver(msisdn, pkg0):
        calls.append(msisdn)
        if len(calls) < 3:
            raise GatewayError("device asleep", retryable=True)

    async def main():
        gw = LoopbackGateway(receiver, retry=RetryPolicy(attempts=3, base_delay=1, jitter=0),
                             sleep=t.sleep)
        return await gw.send("4915112345678", PKG0), gw

    d, gw = asyncio.run(main())
    assert d.attempts == 3 and len(calls) == 3 and t.slept == [1, 2] and gw.retries == 2


@pytest.mark.parametrize("behaviour", ["false", "bug", "fatal"])
def test_loopback_non_retryable(behaviour):
    calls = []

    async def receiver(msisdn, pkg0):
        calls.append(msisdn)
        if behaviour == "false":
            return False
        if behaviour == "bug":
            raise KeyError("oops")
        raise GatewayError("barred", retryable=False)

    async def main():
        gw = LoopbackGateway(receiver, retry=RetryPolicy(attempts=5, base_delay=0))
        with pytest.raises(GatewayError) as ei:
            await gw.send("4915112345678", PKG0)
        return ei.value

    err = asyncio.run(main())
    assert not err.retryable and len(calls) == 1


def test_payload_bounds():
    async def receiver(msisdn, pkg0):
        raise AssertionError("must not be called")

    async def main():
        gw = LoopbackGateway(receiver)
        for bad in (b"", b"x" * 1025):
            with pytest.raises(GatewayError) as ei:
                await gw.send("4915112345678", bad)
            assert not ei.value.retryable

    asyncio.run(main())


def test_gateway_from_config():
    from dmengine.errors import ConfigError
    from dmengine.notify import gateway_from_config
    from dmengine.notify.http import HttpCallbackGateway
    from dmengine.notify.kannel import KannelGateway

    k = gateway_from_config({"type": "kannel", "url": "http://127.0.0.1:1", "username": "u",
                             "password": "p", "sender": "12345", "rate": 7, "burst": 3,
                             "attempts": 2, "method": "POST"})
    assert isinstance(k, KannelGateway) and k.method == "POST" and k.sender == "12345"
    assert k.limiter.rate == 7 and k.limiter.burst == 3 and k.retry.attempts == 2
    h = gateway_from_config({"type": "http", "url": "http://127.0.0.1:1/x", "headers": {"a": "b"}})
    assert isinstance(h, HttpCallbackGateway) and h.headers == {"a": "b"}
    with pytest.raises(ConfigError) as ei:
        gateway_from_config({"type": "kannel", "url": "http://x"})
    assert ei.value.key == "username"
    with pytest.raises(ConfigError) as ei:
        gateway_from_config({"type": "http", "url": "http://x", "usr": "typo"})
    assert "usr" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        gateway_from_config({"type": "smpp"})
    assert ei.value.key == "type"
