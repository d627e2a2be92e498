"""`python -m bench [NAME ...] [--quick]`: runs bench/bench_NAME.py modules.

Each module defines ``NAME`` and ``run(quick: bool) -> None`` (which calls
``common.write_results``).  Without names every module runs but those in ``ON_REQUEST``.
Results land in bench/results/NAME.json, tables on stdout and in bench/results/README.md.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import traceback

HERE = pathlib.Path(__file__).resolve().parent
#: run only when named (``python -m bench campaign``, ``make bench-campaign``): the campaign
#: takes tens of minutes at its default million devices
ON_REQUEST = frozenset({"campaign"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke tests")
    args = ap.parse_args(argv)
    available = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    names = args.names or [n for n in available if n not in ON_REQUEST]
    failed = []
    for name in names:
        if name not in available:
            print(f"unknown benchmark {name!r}; available: {', '.join(available)}", file=sys.stderr)
            return 2
        mod = importlib.import_module(f"bench.bench_{name}")
        print(f"== {name}", flush=True)
        try:
            mod.run(quick=args.quick)
        except Exception:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
    tables = []
    import json

    from bench.common import Row, table
    for p in sorted((HERE / "results").glob("*.json")):
        doc = json.loads(p.read_text())
        tables.append(table(doc["benchmark"], [Row(**r) for r in doc["rows"]]))
    (HERE / "results" / "README.md").write_text(
        "# Benchmark results (written by `make bench`)\n\n" + "\n".join(tables))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
