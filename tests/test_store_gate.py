"""The store's gate (``store/_kv.pyx`` ``Gate``): readers in, the resizer out — ``set_mapsize``
runs with no read transaction of this process open, and no reader enters while it runs.
Readers on several threads against a resizer, with the GIL switching as often as it can."""
from __future__ import annotations

import sys
import threading
import time

import lmdb

from dmengine.store._kv import Gate


def test_the_resizer_runs_alone_and_readers_wait_for_it() -> None:
    gate = Gate()
    inside = 0                # readers inside the gate now (counted by the test itself)
    seen_inside = []          # readers the resizer saw inside while it ran: must stay empty
    lock = threading.Lock()
    stop = time.monotonic() + 1.5
    reads = [0]

    def reader() -> None:
        nonlocal inside
        while time.monotonic() < stop:
            gate.enter()
            with lock:
                inside += 1
            with lock:
                inside -= 1
                reads[0] += 1
            gate.leave()

    def resize() -> None:
        with lock:
            if inside:
                seen_inside.append(inside)
        assert gate.active == 0 and gate.resizing

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        resizes = 0
        while time.monotonic() < stop:
            gate.exclusive(resize)
            resizes += 1
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert seen_inside == [] and resizes > 10 and reads[0] > 1000
    assert gate.active == 0 and not gate.resizing


def test_get_reads_one_key_and_leaves_the_gate_even_when_lmdb_refuses(tmp_path) -> None:
    env = lmdb.open(str(tmp_path), max_dbs=2, max_spare_txns=1)
    db = env.open_db(b"d")
    with env.begin(write=True, db=db) as t:
        t.put(b"k", b"v")
    gate = Gate()
    assert gate.get(env, db, b"k") == b"v"
    assert gate.get(env, db, b"absent") is None
    assert gate.active == 0
    try:
        gate.get(env, db, b"")                 # LMDB refuses an empty key
    except lmdb.Error:
        pass
    else:
        raise AssertionError("an empty key should be refused")
    assert gate.active == 0
    env.close()
