"""Fixtures of the hot-path benchmarks (``bench/hot``; ``make bench`` runs them with
``--benchmark-compare`` against the baseline saved in ``bench/results/hot``, ``make
bench-baseline`` saves a new one).

These are pytest-benchmark suites, not tests with time limits: nothing here asserts a
duration.  A change that makes a hot path slower shows in the comparison with the saved
baseline, and ``make bench`` fails when a path got slower than the threshold the Makefile
names (``HOT_FAIL``).  Each benchmark shares a ``group`` with a same-process baseline (lxml,
libwbxml through ctypes, the codec alone, a bare aiohttp handler, raw LMDB, an idle pass),
so the table's relative column reads as a ratio to it.

``pyproject.toml`` collects ``tests/`` only, so ``make test`` never runs these;
``tests/test_bench_hot_smoke.py`` runs each of them once with ``--benchmark-disable`` so
they cannot rot.
"""
from __future__ import annotations

import asyncio
import gc
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
SHARED = pathlib.Path(os.environ.get("DMENGINE_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors"
BENCH_MESSAGES = SHARED / "bench-messages"


def shared_file(base: pathlib.Path, name: str) -> pathlib.Path:
    """A file of ../shared; a missing one fails the benchmark naming it (never a skip)."""
    path = base / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the protocol vectors and benchmark messages "
                                f"of ../shared are missing (set DMENGINE_SHARED)")
    return path


@pytest.fixture(scope="session", autouse=True)
def server_gc() -> Iterator[None]:
    """The collector as ``dmengine serve`` sets it (start-up objects frozen, generation-0
    threshold 20,000): the hot paths run under it in the product."""
    from dmengine.server import tune_gc

    old = gc.get_threshold()
    tune_gc()
    yield
    gc.unfreeze()
    gc.set_threshold(*old)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop event loop of the module's own; benchmarks drive it with
    ``run_until_complete`` (both sides of a group pay that the same)."""
    lp = uvloop.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    lp.run_until_complete(lp.shutdown_asyncgens())
    asyncio.set_event_loop(None)
    lp.close()


@pytest.fixture(scope="module")
def ram_dir() -> Iterator[pathlib.Path]:
    """A directory in /dev/shm (tmpfs) for LMDB stores: fsync there costs nothing, so the
    store's and the scheduler's own work is measured rather than the shared disk's sync latency
    (which moved a batch's time by 1.6x between runs here).  ``bench store`` measures durable
    commits on disk."""
    base = pathlib.Path("/dev/shm")
    if not base.is_dir():
        raise RuntimeError("/dev/shm (tmpfs) is missing: the hot store benchmarks need it")
    path = pathlib.Path(tempfile.mkdtemp(prefix="dmengine-hot-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)
