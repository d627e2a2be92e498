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


# --- instruction counts (callgrind) ------------------------------------------------------------


class HttpConn:
    """A blocking keep-alive HTTP/1.1 connection: one request, then its whole response (what
    the instruction counts send with, one request at a time)."""

    def __init__(self, port: int) -> None:
        import socket
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        clen = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                clen = int(value)
        while len(self.buf) < clen:
            self._more()
        body, self.buf = self.buf[:clen], self.buf[clen:]
        return status, body

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the measured server closed the connection")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def callgrind_total(path: str) -> int:
    """Instructions (Ir) of one callgrind dump."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise ValueError(f"{path}: no summary/totals line in the callgrind dump")


class Callgrind:
    """A process run under ``valgrind --tool=callgrind`` whose counters are zeroed before and
    dumped after each thing measured (:meth:`count`), so that only that is counted.

    It runs with address-space randomisation off (``setarch -R``) and a fixed hash seed: with
    either on, two runs of the same server place objects differently, and CPython's
    type-attribute cache collisions (and dict layouts) with them, which moved the counts of two
    servers by a few per cent (bench_metrics found it comparing metrics on and off)."""

    def __init__(self, argv: list[str], out: str, **popen: Any) -> None:
        import shutil
        import subprocess
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            raise RuntimeError("valgrind (Debian package valgrind: make deps) is needed for "
                               "instruction counts")
        self.out = out
        self.dumps = 0
        popen.setdefault("stderr", subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            ["setarch", "-R", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             "--dump-instr=no", *argv], cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED="0"),
            **popen)

    def _control(self, flag: str) -> None:
        import subprocess
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    def count(self, fn: Callable[[], Any]) -> tuple[int, Any]:
        """(instructions the process ran while ``fn`` ran, what ``fn`` answered)."""
        self._control("-z")
        got = fn()
        self._control("-d")
        self.dumps += 1
        return callgrind_total(f"{self.out}.{self.dumps}"), got
