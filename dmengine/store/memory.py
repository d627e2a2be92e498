"""The in-memory store (L3) for unit tests: the same contract and logic as LMDB (``kv.py``) over
sorted in-memory tables.  Each write runs alone and is undone completely if it fails."""
from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import StoreClosed
from .kv import DBS, KVStore, Op, WriteCtx, ensure_schema

R = TypeVar("R")


class _Table:
    __slots__ = ("data", "keys")

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.keys: list[bytes] = []      # sorted

    def put(self, k: bytes, v: bytes) -> None:
        if k not in self.data:
            bisect.insort(self.keys, k)
        self.data[k] = v

    def delete(self, k: bytes) -> bool:
        if k not in self.data:
            return False
        del self.data[k]
        i = bisect.bisect_left(self.keys, k)
        del self.keys[i]
        return True


class MemTxn:
    """``kv.KVTxn`` over the tables, with an undo journal for rollback."""

    def __init__(self, tables: dict[str, _Table]) -> None:
        self.tables = tables
        self.undo: list[tuple[str, bytes, bytes | None]] = []

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.tables[db].data.get(key)

    def get_many(self, db: str, keys: list[bytes]) -> dict[bytes, bytes]:
        d = self.tables[db].data
        return {k: d[k] for k in keys if k in d}

    def put(self, db: str, key: bytes, value: bytes) -> None:
        t = self.tables[db]
        self.undo.append((db, key, t.data.get(key)))
        t.put(bytes(key), bytes(value))

    def delete(self, db: str, key: bytes) -> bool:
        t = self.tables[db]
        old = t.data.get(key)
        if old is None:
            return False
        self.undo.append((db, key, old))
        return t.delete(key)

    def scan(self, db: str, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        t = self.tables[db]
        keys = t.keys
        i = bisect.bisect_left(keys, start)
        while i < len(keys):
            k = keys[i]
            if end is not None and k >= end:
                return
            yield k, t.data[k]
            i += 1

    def count(self, db: str) -> int:
        return len(self.tables[db].data)

    @property
    def writes(self) -> int:
        return len(self.undo)

    def rollback(self) -> None:
        for db, key, old in reversed(self.undo):
            t = self.tables[db]
            if old is None:
                t.delete(key)
            else:
                t.put(key, old)
        self.undo.clear()


class MemoryStore(KVStore):
    """Same contract as :class:`~dmengine.store.lmdb.LmdbStore`, nothing on disk."""

    def __init__(self) -> None:
        self._tables = {db: _Table() for db in DBS}
        self._closed = False
        txn = MemTxn(self._tables)
        ensure_schema(txn, time.time())

    async def _write(self, op: Op[R], prefetch: tuple[str, bytes] | None = None) -> R:
        if self._closed:
            raise StoreClosed("memory store is closed")
        txn = MemTxn(self._tables)
        ctx = WriteCtx(txn, time.time())
        try:
            res = op(ctx)
            ctx.finish()
        except BaseException:
            txn.rollback()
            raise
        return res

    async def _read(self, fn: Callable[[Any], R], big: bool = False) -> R:
        if self._closed:
            raise StoreClosed("memory store is closed")
        # scans see a consistent state: writes run synchronously between awaits
        return fn(MemTxn(self._tables))

    def _read_now(self, fn: Callable[[Any], R]) -> R:
        if self._closed:
            raise StoreClosed("memory store is closed")
        return fn(MemTxn(self._tables))

    async def close(self) -> None:
        self._closed = True

    def fault(self) -> str | None:
        return "memory store is closed" if self._closed else None


__all__ = ["MemoryStore"]
