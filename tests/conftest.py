"""Shared test fixtures: where the protocol vectors and benchmark messages live."""
from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("DMENGINE_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors"
BENCH_MESSAGES = SHARED / "bench-messages"


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
