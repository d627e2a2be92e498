"""Shared test fixtures: where the protocol vectors and benchmark messages live; the time
limits of the API tests' clients and scenarios."""
from __future__ import annotations

import asyncio
import os
import pathlib
from typing import Any, Awaitable, TypeVar

import aiohttp
import pytest
from aiohttp import web

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("DMENGINE_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors"
BENCH_MESSAGES = SHARED / "bench-messages"


#: One API request of a test, and one whole scenario (engine up, requests, engine down): a bug
#: or a mutant that blocks a handler, a lock or a shutdown fails that test with the step named,
#: instead of hanging it (mutmut's "forced fail" run, every function made to raise, hung for
#: ever on the API tests: issue 18).  Far above what any test here needs.
REQUEST_TIMEOUT = 30.0
SCENARIO_TIMEOUT = 150.0
T = TypeVar("T")


def api_client(**kw: Any) -> aiohttp.ClientSession:
    """The HTTP client of the API tests: every request gives up after REQUEST_TIMEOUT s."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT), **kw)


async def local_http(*routes: web.RouteDef) -> tuple[web.AppRunner, int]:
    """A small aiohttp server on loopback answering ``routes`` (a carrier, a webhook
    receiver, ...): its runner (``cleanup()`` when done) and its port."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def bounded(step: Awaitable[T], what: str = "the test's scenario") -> T:
    """``step`` within SCENARIO_TIMEOUT s, else an AssertionError naming it."""
    try:
        return await asyncio.wait_for(step, SCENARIO_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"{what} did not end within {SCENARIO_TIMEOUT:g} s") from None


def shared_files(base: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    """The files of ``base`` matching ``pattern``, sorted.  Test modules build parameter lists
    from these at import, where an empty list would only make pytest skip the tests ("got empty
    parameter set"); so a missing ../shared fails the module's collection here, naming it."""
    found = sorted(base.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} in {base}: the protocol vectors and benchmark "
                                f"messages of ../shared are missing (set DMENGINE_SHARED)")
    return found


@pytest.fixture(scope="session")
def vectors_dir() -> pathlib.Path:
    assert VECTORS.is_dir(), f"protocol vectors not found at {VECTORS} (set DMENGINE_SHARED)"
    return VECTORS


@pytest.fixture(scope="session")
def bench_messages_dir() -> pathlib.Path:
    assert BENCH_MESSAGES.is_dir(), f"bench messages not found at {BENCH_MESSAGES}"
    return BENCH_MESSAGES


class Clock:
    """A clock the test moves (``clock.now = …``); services take it as their ``clock``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
