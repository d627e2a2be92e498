"""The hot-path benchmarks (bench/hot) cannot rot: each runs once here with
``--benchmark-disable`` (every benchmarked call made once, nothing timed), and ``make test``'s
pytest run does not collect them as tests (they are benchmarks, not timed tests)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOT = ROOT / "bench" / "hot"
SUITES = ("test_hot_codec.py", "test_hot_session.py", "test_hot_store.py", "test_hot_api.py",
          "test_hot_scheduler.py")


def test_every_hot_suite_runs_once_with_benchmarks_disabled():
    for name in SUITES:
        assert (HOT / name).is_file(), f"bench/hot/{name} is missing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/hot", "-q", "-p",
                          "no:cacheprovider", "--benchmark-disable"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    m = re.search(r"(\d+) passed", out.stdout)
    assert m is not None, tail
    # 24 codec + 6 session/device port + 2 store + 2 API + 2 scheduler benchmarks
    assert int(m.group(1)) >= 36, tail
    assert "skipped" not in out.stdout.splitlines()[-1], tail


def test_make_test_does_not_collect_the_benchmarks():
    """``make test`` runs plain ``pytest``: only ``tests/`` is collected, so bench/hot never runs
    as tests with time limits (``make bench`` runs them as benchmarks)."""
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests"]
    assert not HOT.is_relative_to(ROOT / "tests")
    make = (ROOT / "Makefile").read_text()
    assert "--benchmark-compare-fail" in make and "bench/hot" in make
