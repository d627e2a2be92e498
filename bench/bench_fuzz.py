"""The fuzz record (``python -m bench fuzz``): ``fuzz/run.py`` over both decoders on the current
code, its outcome counts and wall time kept in ``bench/results/fuzz.json`` so that the figures
quoted in the README and fuzz/README.md come from a committed file (issue 18).

One run of what ``make fuzz`` runs (1,000,000 inputs, each through the WBXML and the XML
decoder; ``--quick``: 20,000), seed 51.  A run that ends with anything but exit 0 (an input
broke the invariant: it is in ``fuzz/crashes/``) fails the benchmark instead of writing rows.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

from bench.common import ROOT, Row, write_results

NAME = "fuzz"
SEED = 51


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                       text=True)
    return r.stdout.strip() or "unknown"


def run(quick: bool = False) -> None:
    runs = 20_000 if quick else 1_000_000
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), "--runs", str(runs),
                           "--stats", "--seed", str(SEED)], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"fuzz/run.py exited {proc.returncode}: {out[-2000:]}")
    m = re.search(r"stats: (.*)", out)
    if m is None:
        raise RuntimeError(f"fuzz/run.py printed no stats: {out[-2000:]}")
    stats = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    if stats["inputs"] != runs or stats["xml_ok"] + stats["xml_codec_error"] != runs:
        raise RuntimeError(f"not every input went through both decoders: {stats}")
    case = f"fuzz/run.py --runs {runs} --stats --seed {SEED} (both decoders, code {_commit()})"
    rows = [Row(case, "inputs", stats["inputs"], "count"),
            Row(case, "WBXML decoded to a Message (re-encoded, decoded equal)",
                stats["wbxml_ok"], "count"),
            Row(case, "WBXML CodecError", stats["wbxml_codec_error"], "count"),
            Row(case, "XML decoded to a Message (through the WBXML codec)", stats["xml_ok"],
                "count"),
            Row(case, "XML refused by _wbxml.encode", stats["xml_not_wbxml_encodable"], "count"),
            Row(case, "XML CodecError", stats["xml_codec_error"], "count"),
            Row(case, "other outcomes (invariant broken)", 0, "count"),
            Row(case, "wall time", round(wall, 1), "s")]
    write_results(NAME, rows)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
