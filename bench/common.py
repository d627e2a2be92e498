"""Shared benchmark plumbing: timing loops, the results file shape of DESIGN.md §8, tables."""
from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("DMENGINE_SHARED", ROOT.parent / "shared"))


@dataclass
class Row:
    case: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None

    @classmethod
    def versus(cls, case: str, metric: str, value: float, unit: str,
               baseline: str, baseline_value: float, *, higher_is_better: bool = True) -> "Row":
        """A row with its ratio against a baseline measured in the same run."""
        if higher_is_better:
            ratio = value / baseline_value if baseline_value else None
        else:
            ratio = baseline_value / value if value else None
        return cls(case, metric, value, unit, baseline, baseline_value,
                   round(ratio, 3) if ratio is not None else None)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def rate(fn: Callable[[], object], *, min_time: float = 0.2, repeats: int = 7,
         clock: Callable[[], float] = time.perf_counter) -> float:
    """Calls per second of ``fn``: the median of ``repeats`` timed batches of ~``min_time`` s.
    ``clock=time.thread_time`` counts this thread's CPU seconds instead of wall-clock ones
    (on a shared machine, time spent preempted is then not charged to ``fn``)."""
    n = 1
    while True:  # calibrate the batch size
        t0 = clock()
        for _ in range(n):
            fn()
        dt = clock() - t0
        if dt >= min_time / 4:
            break
        n *= 4
    n = max(1, int(n * (min_time / max(dt, 1e-9))))
    samples = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(n):
            fn()
        samples.append(n / max(clock() - t0, 1e-9))
    return statistics.median(samples)


def paired(step: Callable[[int], object], base: Callable[[], object], *, batch: int, pairs: int,
           clock: Callable[[], float] = time.perf_counter) -> list[tuple[float, float]]:
    """Times ``step`` and ``base`` in many short alternating batches: ``pairs`` times,
    ``batch`` calls of each, the order flipped every other pair (so neither always runs on
    the cache the other warmed).  Returns (seconds per step call, seconds per base call) for
    every pair.  ``step`` gets a running call number (to take the next object of a pool).

    On a shared, noisy machine a disturbance lands in one short batch and moves one pair's
    ratio; the median over many pairs then compares like with like, where a few long
    alternating rounds let one disturbed round of either side move the whole result."""
    out = []
    k = 0
    for p in range(pairs):
        def run_step() -> float:
            nonlocal k
            t0 = clock()
            for _ in range(batch):
                step(k)
                k += 1
            return (clock() - t0) / batch

        def run_base() -> float:
            t0 = clock()
            for _ in range(batch):
                base()
            return (clock() - t0) / batch

        if p % 2:
            b = run_base()
            a = run_step()
        else:
            a = run_step()
            b = run_base()
        out.append((a, b))
    return out


def write_results(name: str, rows: list[Row], **extra: Any) -> pathlib.Path:
    """Writes ``bench/results/NAME.json`` in the shape DESIGN.md §8 fixes, and prints a table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": name,
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": [asdict(r) for r in rows],
    }
    doc.update(extra)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(name, rows))
    return path


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def table(name: str, rows: list[Row]) -> str:
    """A Markdown table of the rows (pasted into the README)."""
    out = [f"### {name}", "", "| case | metric | value | unit | baseline | baseline value | ratio |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.case} | {r.metric} | {_fmt(r.value)} | {r.unit} | {r.baseline or ''} | "
                   f"{_fmt(r.baseline_value)} | {_fmt(r.ratio)} |")
    return "\n".join(out) + "\n"
