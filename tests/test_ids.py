"""Record ids (dmengine/model.py ``new_id``): 48-bit time + 64 random bits, the random bits
drawn from os.urandom 4 KiB at a time — never handed out twice, whichever thread asks, and
not shared with a forked child."""
from __future__ import annotations

import os
import re
import threading

from dmengine import model
from dmengine.model import new_id

ID = re.compile(r"^t[0-9a-f]{12}[0-9a-f]{16}$")


def test_ids_are_unique_across_threads_and_well_formed():
    got: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        for _ in range(20_000):
            out.append(new_id("t"))
    threads = [threading.Thread(target=make, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for out in got for i in out]
    assert len(set(ids)) == len(ids) == 80_000
    assert all(ID.match(i) for i in ids)
    # the random parts alone are unique too (ids made in the same millisecond)
    assert len({i[13:] for i in ids}) == len(ids)


def test_random_bits_come_4_kib_at_a_time(monkeypatch):
    calls: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        calls.append(n)
        return real(n)
    monkeypatch.setattr(model.os, "urandom", counted)
    model._reset_id_pool()
    for _ in range(1000):                      # 8,000 bytes: two draws
        new_id()
    assert calls == [4096, 4096]


def test_a_forked_child_does_not_reuse_the_parents_pool():
    new_id()                                   # the pool holds bytes not handed out yet
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                               # the child: its next id's random part
        try:
            os.write(w, new_id()[12:].encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    parent = new_id()[12:]
    assert len(child) == len(parent) == 16 and child != parent
