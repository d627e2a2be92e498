"""Crash loop: a child writing tasks and history through the real group-commit path is killed
with SIGKILL at random moments, many times; after every kill each write the child had been told
was durable is in the store, and the checker finds every index in agreement with its records."""
from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from dmengine.model import HistoryEntry, Task
from dmengine.store import admin
from dmengine.store.kv import dec
from dmengine.store.lmdb import LmdbTxn, open_dbs, open_env

CHILD = pathlib.Path(__file__).with_name("store_crash_child.py")
KILLS = int(os.environ.get("DMENGINE_CRASH_KILLS", "20"))


def _run_child(path: pathlib.Path, run_id: str, kill_after: float) -> tuple[list[str], int]:
    proc = subprocess.Popen([sys.executable, str(CHILD), str(path), run_id, "16", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            s = raw.decode()
            if not s.endswith("\n"):
                break            # cut by the kill: never acknowledged as a whole line
            if s == "READY\n":
                ready.set()
                continue
            lines.append(s.rstrip("\n"))
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        assert ready.wait(30), "child did not start: " + (proc.stderr.read().decode()
                                                           if proc.poll() is not None else "")
        time.sleep(kill_after)
        assert proc.poll() is None, "child exited before the kill: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    th.join(10)
    assert proc.stderr is not None
    proc.stderr.close()
    assert proc.stdout is not None
    proc.stdout.close()
    return lines, proc.returncode


def _verify(path: pathlib.Path, acked: dict[str, int]) -> None:
    env = open_env(path)
    try:
        dbs = open_dbs(env, create=False)
        with env.begin() as raw:
            txn = LmdbTxn(raw, dbs)
            for tid, n in acked.items():
                k = tid.encode()
                v = txn.get("tasks", k)
                assert v is not None, f"acknowledged task {tid} lost"
                t = dec(Task, v)
                assert t.history_len >= n, f"task {tid}: acknowledged history {n}, store has {t.history_len}"
                h = txn.get("history", k + b"\x00" + n.to_bytes(4, "big"))
                assert h is not None, f"task {tid}: acknowledged history entry {n} lost"
                assert dec(HistoryEntry, h).seq == n
    finally:
        env.close()


@pytest.mark.slow
def test_sigkill_loop_loses_no_acknowledged_write(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "env"
    rnd = random.Random(1234)
    acked: dict[str, int] = {}
    total_lines = 0
    for i in range(KILLS):
        lines, rc = _run_child(path, f"r{i}", rnd.uniform(0.05, 0.6))
        assert rc == -signal.SIGKILL
        for line in lines:
            parts = line.split()
            if parts[0] == "C":
                acked.setdefault(parts[1], 1)
            elif parts[0] == "T":
                acked[parts[1]] = max(acked.get(parts[1], 0), int(parts[2]))
            else:
                raise AssertionError(f"unexpected child output {line!r}")
        total_lines += len(lines)
        problems = admin.check(path)
        assert problems == [], problems[:10]
        _verify(path, acked)
    # the loop must really have written under the kills, not idled
    assert total_lines > KILLS * 10, total_lines
    assert len(acked) > KILLS
