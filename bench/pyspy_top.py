"""``python -m bench.pyspy_top FILE [N]``: the top of a py-spy raw recording.

``py-spy record --format raw --threads`` writes one line per distinct stack, ``frame;frame;…
COUNT`` (the first frame names the thread).  This prints the samples per thread, then the
functions with the largest self and inclusive shares of all samples (a function is
``name (file)``: its lines are added up).  ``bench_campaign`` records the server this way when
``DMENGINE_CAMPAIGN_PROFILE`` names a file.
"""
from __future__ import annotations

import collections
import re
import sys

_LINE = re.compile(r":\d+\)$")


def _func(frame: str) -> str:
    return _LINE.sub(")", frame)


def summarize(path: str, top: int = 25) -> str:
    threads: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip()
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue  # py-spy writes a thread's empty stack without a count
            n = int(count)
            total += n
            frames = stack.split(";")
            thread = frames[0]
            if thread.startswith("thread ("):
                thread = thread.split(":", 1)[-1].strip() or thread
                frames = frames[1:]
            threads[thread] += n
            funcs = [_func(f) for f in frames]
            if funcs:
                self_[funcs[-1]] += n
            for fn in set(funcs):
                incl[fn] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "per thread:"]
    out += [f"  {100 * n / total:5.1f} %  {t}" for t, n in threads.most_common()]
    out += ["", "self (function, share of all samples):"]
    out += [f"  {100 * n / total:5.1f} %  {fn}" for fn, n in self_.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f} %  {fn}" for fn, n in incl.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
