"""The LMDB store (L3): one environment, named databases, group commit, crash-safe.

Writes: every caller's write is a small function (an *op*, see ``store/kv.py``) appended to a
deque; the caller's thread wakes the writer thread only when the deque was empty (one wakeup
per batch, not one per op: a queue put per op cost a futex wake and a GIL fight each).  The
writer takes what is queued (up to ``batch_size``); when callers are writing concurrently it
lingers up to ``max_delay`` seconds, but only until as many ops are queued as its last batch
had (the callers it answered are back).  It runs the ops in ONE write transaction (the common
ones are Cython, ``store/_kv.pyx``; puts and deletes are buffered and applied sorted at the
end), commits it with a real sync (the environment is opened ``sync=True, metasync=True``:
acknowledged means on disk), and only then resolves every caller's future with one
``call_soon_threadsafe`` per event loop.  An op that fails is answered with its error and, if
it had written anything, the transaction is rolled back and replayed without it.

``MDB_MAP_FULL`` grows the map (doubling, up to ``max_map_size``) and replays the batch; the
writer also grows it between batches once it is ``GROW_AT`` full, so that rarely happens;
``MDB_MAP_RESIZED`` (another process grew it) adopts the new size.  Resizing needs every
transaction of this process closed, so reads pass a gate that the resize waits on.

Reads: small ones run inline on the event loop (a read transaction costs about a microsecond);
pages larger than ``inline_read_limit``, the checker and counts run on a small thread pool.

Several processes may open the same environment: LMDB's lock file serialises their writers and
each has its own group-commit thread.  Stale reader slots (dead processes) are cleared at open
and every ``reader_check_interval`` seconds.

While a store is open it holds a shared ``flock`` on ``IN_USE_FILE`` in the environment's
directory (:func:`try_lock_in_use`); ``store restore`` takes it exclusively, without waiting,
so it refuses to replace the data file under a running server, and a server cannot open the
environment while a restore replaces it.  The kernel drops the lock when the process dies
(``kill -9`` included), so a crashed server never blocks a restore.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import pathlib
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import lmdb
import msgspec

from ..bounded import BoundedDict
from ..errors import NotFound, StoreClosed, StoreError
from ..model import Content, Device, Task
from ._kv import Gate, WriteBuffer, collect_prefetch, resolve, run_ops, split_by_loop
from .kv import (DBS, IDENTITY_GEN, MAX_KEY, KVStore, Op, WriteCtx, _e, check_txn, dec,
                 ensure_schema)

R = TypeVar("R")

_LOG_HEAD = struct.Struct(">q8s")      # a log entry's head: microseconds, the writer's mark
_LOG_KEYS = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_LOG_ENCODE = msgspec.msgpack.Encoder().encode


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")

DEFAULT_MAP_SIZE = 256 << 20          #: initial map size (grows on demand)
DEFAULT_MAX_MAP_SIZE = 1 << 40        #: never grow past this (1 TiB of address space)
DEFAULT_BATCH_SIZE = 2000             #: ops per write transaction at most
DEFAULT_MAX_DELAY = 0.002             #: seconds the writer lingers for more ops under load
DEFAULT_MAX_READERS = 256
DEFAULT_READER_CHECK_INTERVAL = 10.0  #: seconds between stale-reader sweeps
DEFAULT_READ_THREADS = 2
#: mapped store pages this process may hold resident before the writer remaps the map (see
#: :meth:`LmdbStore._trim_mapped`); None: never
DEFAULT_MAX_MAPPED = 1 << 30
MAPPED_CHECK_INTERVAL = 2.0           #: seconds between looks at the process's mapped pages
#: databases whose records the read cache keeps (see LmdbStore._get; subscription topics for
#: has_subscribers), and how many records.  Tasks: getTaskById is polled (an OSS waiting for
#: a task's end asks again and again, mostly for a task that has not changed), and a read
#: that is not a cache hit was half of its store work; a task written drops out like any
#: other record, so a campaign's task writes cost only the drop.
DEFAULT_READ_CACHE_SIZE = 100_000
READ_CACHE_DBS = frozenset({"devices", "content", "caps", "sub_topic", "tasks"})
#: The written-keys log (its own database, not in kv.DBS: no record lives there): every commit
#: that writes a key of READ_CACHE_DBS also writes, under its transaction id, which keys those
#: were and which process wrote them.  Another process with the store open (a second device
#: process, a CLI verb) reads the entries it has not seen before it answers from its read
#: cache, and forgets those keys (see LmdbStore._catch_up).
CACHE_LOG_DB = "cachelog"
CACHE_LOG_FLOOR = b"floor"               #: its key: the highest transaction id pruned away
CACHE_LOG_KEEP = 30.0                    #: seconds an entry is kept
CACHE_LOG_PRUNE_INTERVAL = 5.0           #: seconds between prunes (in a writer's transaction)
GROW_AT = 0.8                         #: map fill ratio at which the writer grows it early

IN_USE_FILE = "dmengine.lock"         #: flock'ed shared by every open store, exclusive by restore

#: exceptions an op may raise that concern the whole transaction, not the op
_PASS = (lmdb.MapFullError, lmdb.MapResizedError)


class LmdbTxn:
    """``kv.KVTxn`` over an lmdb.Transaction."""

    __slots__ = ("t", "d")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.t = txn
        self.d = dbs

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.t.get(key, db=self.d[db])  # type: ignore[return-value]  # buffers=False

    def get_many(self, db: str, keys: list[bytes]) -> dict[bytes, bytes]:
        if not keys:
            return {}
        cur = self.t.cursor(db=self.d[db])
        try:
            return dict(cur.getmulti(sorted(keys)))  # type: ignore[arg-type]  # buffers=False
        finally:
            cur.close()

    def count(self, db: str) -> int:
        return int(self.t.stat(self.d[db])["entries"])

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self.t.put(key, value, db=self.d[db])

    def delete(self, db: str, key: bytes) -> bool:
        return self.t.delete(key, db=self.d[db])

    def scan(self, db: str, start: bytes, end: bytes | None):  # type: ignore[no-untyped-def]
        cur = self.t.cursor(db=self.d[db])
        try:
            if not cur.set_range(start):
                return
            for k, v in cur.iternext():
                if end is not None and k >= end:  # type: ignore[operator]  # buffers=False
                    return
                yield k, v
        finally:
            cur.close()


#: The buffered write transaction (puts and deletes applied sorted at flush, reads see them
#: first): a Cython class, ``store/_kv.pyx``, since it is on every write's path.
LmdbWriteTxn = WriteBuffer


def open_env(path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE,
             max_readers: int = DEFAULT_MAX_READERS, readonly: bool = False) -> lmdb.Environment:
    """Opens (creates) the environment with durable settings and every named database.

    ``max_spare_txns=1``: py-lmdb keeps the last read transaction, reset, and renews it for
    the next (its default, 0, allocates and zeroes a new one per read: 40 % of a single-key
    read's instructions).  A reset transaction keeps its reader slot but no snapshot, so it
    holds back no page reuse; py-lmdb's caution is about ``fork()`` with the environment open
    (the child inherits the slot), which this program never does (it only spawns)."""
    p = pathlib.Path(path)
    if not readonly:
        p.mkdir(parents=True, exist_ok=True)
    try:
        env = lmdb.open(str(p), map_size=map_size, max_dbs=len(DBS) + 4, max_readers=max_readers,
                        sync=True, metasync=True, writemap=False, map_async=False,
                        readahead=False, readonly=readonly, create=not readonly, lock=True,
                        max_spare_txns=1)
    except lmdb.Error as exc:
        raise StoreError(f"cannot open LMDB environment {str(p)!r}: {exc}") from exc
    return env


def try_lock_in_use(path: str | os.PathLike[str], *, exclusive: bool) -> int | None:
    """Takes the environment's in-use lock (an ``flock`` on ``path/IN_USE_FILE``, created):
    shared for a store that opens the environment, exclusive for a restore.  Never waits:
    None when the other kind is held (an exclusive one by any open store, in this process or
    another).  Returns the descriptor; closing it releases the lock."""
    p = pathlib.Path(path) / IN_USE_FILE
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open the in-use lock {str(p)!r}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {str(p)!r}: {exc.strerror}") from exc
    return fd


def open_dbs(env: lmdb.Environment, *, create: bool = True) -> dict[str, Any]:
    dbs: dict[str, Any] = {}
    if create:
        with env.begin(write=True) as txn:
            for name in DBS:
                dbs[name] = env.open_db(name.encode(), txn=txn, create=True)
    else:
        for name in DBS:
            try:
                dbs[name] = env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                raise StoreError(f"not a dmengine store: no database {name!r}") from None
    return dbs


class LmdbStore(KVStore):
    """The real store.  ``LmdbStore(path)`` opens (or creates) the environment at ``path``."""

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE,
                 max_map_size: int = DEFAULT_MAX_MAP_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_delay: float = DEFAULT_MAX_DELAY, max_readers: int = DEFAULT_MAX_READERS,
                 reader_check_interval: float = DEFAULT_READER_CHECK_INTERVAL,
                 read_threads: int = DEFAULT_READ_THREADS,
                 migrations: dict[int, Callable[[Any], None]] | None = None,
                 schema_version: int | None = None,
                 read_cache_size: int = DEFAULT_READ_CACHE_SIZE,
                 max_mapped: int | None = DEFAULT_MAX_MAPPED) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if read_cache_size < 0:
            raise ValueError("read_cache_size must be >= 0")
        if max_mapped is not None and max_mapped < 16 << 20:
            raise ValueError("max_mapped must be None or >= 16 MiB")
        self.max_mapped = max_mapped
        self.map_trims = 0
        # the file pages mapped before the store: the interpreter and its libraries
        self._rss_file_base = _rss_file()
        #: decoded records of READ_CACHE_DBS by (db, key), oldest first; see :meth:`_get`
        self._cache: BoundedDict[tuple[str, bytes], Any] = BoundedDict(max(1, read_cache_size))
        self._cache_size = read_cache_size
        self._cache_gen = 0                # bumped by every commit that wrote a cached db
        self._cache_lock = threading.Lock()
        self._topics: dict[str, bool] = {}      # has_subscribers, by topic
        #: count_download: per content id, the count not yet taken by its write op and that
        #: op's future (see count_download); the lock orders the loop's adds and the op's take
        self._downloads: dict[str, list[Any]] = {}
        self._downloads_lock = threading.Lock()
        self._watch = READ_CACHE_DBS        # written keys noted: the caches forget them
        #: this store's mark in the written-keys log (its own entries need no reading)
        self._writer_mark = os.urandom(8)
        self._seen_txn = 0         # the log is read up to this transaction id
        self._turn_checked = False  # the log was looked at in this turn of the event loop
        self._next_prune = 0.0
        self.path = str(path)
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.max_map_size = max_map_size
        self.reader_check_interval = reader_check_interval
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        in_use = try_lock_in_use(path, exclusive=False)
        if in_use is None:
            raise StoreError(f"store {self.path!r} is being restored by another process; "
                             f"open it when the restore is done")
        self._in_use: int | None = in_use
        try:
            self.env = open_env(path, map_size=map_size, max_readers=max_readers)
        except BaseException:
            self._release_in_use()
            raise
        self.stale_readers_cleared = self.env.reader_check()
        self._psize = int(self.env.stat()["psize"])
        self._gate = Gate()       # readers in, resizer out (store/_kv.pyx)
        self.map_grows = 0
        self.commit_seconds = 0.0     # time spent in commit (write + fsync), for benchmarks
        self.write_seconds = 0.0      # time spent running batches, commits included
        self.writer_cpu_seconds = 0.0  # CPU time of the writer thread in batches
        #: writer CPU seconds by phase: prefetch, running ops, flushing puts, commit (+fsync)
        self.phase_cpu = [0.0, 0.0, 0.0, 0.0]
        self.batches = 0
        self.ops = 0
        #: called by the writer thread after each batch with (ops, seconds from the batch's
        #: start to its commit, fsync included): dmengine.metrics.StoreMetrics sets it
        self.on_commit: Callable[[int, float], None] | None = None
        try:
            self._dbs = open_dbs(self.env)
            with self.env.begin(write=True) as txn:
                self._dbs[CACHE_LOG_DB] = self.env.open_db(CACHE_LOG_DB.encode(), txn=txn,
                                                           create=True)
            self._log_db = self._dbs[CACHE_LOG_DB]
            self._seen_txn = int(self.env.info()["last_txnid"])   # the cache is empty now
            # schema record / migrations (through the normal write path: grows the map if needed)
            self.schema = self._run_sync(lambda ctx: ensure_schema(ctx.txn, ctx.now, migrations,
                                                                   schema_version))
        except BaseException:
            self.env.close()
            self._release_in_use()
            raise
        #: queued (op, future, loop, prefetch): appended on the callers' threads, taken by
        #: the writer (deque append/popleft are atomic)
        self._pending: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()    # set when the first op is queued after a pause
        self._full = threading.Event()    # set when a full batch is queued (ends a linger)
        self._stopping = False
        self._want = 0     # while the writer lingers: the queue length that ends the linger
        self._closed = False
        self._dead: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="lmdb-read")
        self._thread = threading.Thread(target=self._writer, name="lmdb-writer", daemon=True)
        self._thread.start()

    # --- writes -----------------------------------------------------------------------------

    def _write(self, op: Op[R],  # type: ignore[override]
               prefetch: tuple[str, bytes] | None = None) -> "asyncio.Future[R]":
        # a plain function returning the future (no coroutine frame: this is the hot path)
        if self._closed or self._dead is not None:
            raise StoreClosed(f"store {self.path!r} is closed"
                              + (f" (writer died: {self._dead!r})" if self._dead else ""))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        p = self._pending
        p.append((op, fut, loop, prefetch))
        # wake the writer once per batch, not once per op: a queue put per op woke the writer
        # thread (a futex wake and a GIL fight) for every single caller
        n = len(p)
        if n <= 1:
            self._wake.set()
        elif n == self._want:
            self._full.set()
        return fut

    def _run_sync(self, op: Op[R]) -> R:
        """Runs one op in its own transaction on the calling thread (open/migrations)."""
        box: list[Any] = [None, None]

        def deliver(_loop: Any, _futs: list[Any], res: list[Any],
                    errs: dict[int, BaseException]) -> None:
            box[0], box[1] = res[0], errs.get(0)
        self._commit([(op, None, None, None)], deliver)
        if box[1] is not None:
            raise box[1]
        return box[0]   # type: ignore[no-any-return]

    def _writer(self) -> None:
        pending = self._pending
        wake = self._wake
        full = self._full
        last_n = 0
        next_check = time.monotonic() + self.reader_check_interval
        next_trim = time.monotonic() + MAPPED_CHECK_INTERVAL
        try:
            while True:
                if not pending:
                    if self._stopping:
                        break
                    wake.wait(self.reader_check_interval)
                    wake.clear()
                now = time.monotonic()
                if now >= next_check:
                    self.reader_check()
                    next_check = now + self.reader_check_interval
                if now >= next_trim:
                    self._trim_mapped()
                    next_trim = now + MAPPED_CHECK_INTERVAL
                if not pending:
                    continue
                # callers are writing concurrently: linger (up to max_delay) so they share
                # the transaction, but only until as many ops are queued as the last batch
                # had (the callers it answered are back) or a full batch is; a lone caller
                # never waits
                want = min(last_n, self.batch_size)
                if want > 1 and self.max_delay > 0 and len(pending) < want \
                        and not self._stopping:
                    full.clear()
                    self._want = want
                    if len(pending) < want:
                        full.wait(self.max_delay)
                    self._want = 0
                pop = pending.popleft
                batch = [pop() for _ in range(min(len(pending), self.batch_size))]
                last_n = len(batch)
                try:
                    self._commit(batch, _deliver_threadsafe)
                except Exception as exc:   # a bug in the writer itself: fail this batch only
                    err = StoreError(f"store writer failed: {exc!r}")
                    for _, fut, loop, _ in batch:
                        _deliver_threadsafe(loop, [fut], [None], {0: err})
        except BaseException as exc:   # the writer must never die silently
            self._dead = exc
            _fail_pending(pending, StoreClosed(f"store writer died: {exc!r}"))
            raise

    def _commit(self, batch: list[tuple[Op[Any], Any, Any, Any]],
                deliver: Callable[[Any, list[Any], list[Any], dict[int, BaseException]], None]
                ) -> None:
        n = len(batch)
        a0 = time.perf_counter()
        c0 = time.thread_time()
        results, errors = self._run(batch)
        self.batches += 1
        self.ops += n
        self.write_seconds += time.perf_counter() - a0
        hook = self.on_commit
        if hook is not None:
            hook(n, time.perf_counter() - a0)
        self.writer_cpu_seconds += time.thread_time() - c0
        for loop, futs, res, errs in split_by_loop(batch, results, errors):
            deliver(loop, futs, res, errs)
        self._grow_early()     # after answering: the batch is on disk whatever happens here

    def _run(self, batch: list[tuple[Op[Any], Any, Any, Any]]
             ) -> tuple[list[Any], dict[int, BaseException]]:
        """Runs the batch to a commit (growing the map, replaying without failed ops)."""
        n = len(batch)
        results: list[Any] = [None] * n
        errors: dict[int, BaseException] = {}
        while True:
            outcome = self._attempt(batch, results, errors)
            if outcome == "done":
                break
            if outcome == "full":
                if self._grow():
                    continue
                live = [i for i in range(n) if i not in errors]
                if len(live) > 1:   # at the size limit: let every op that fits on its own land
                    for i in live:
                        r, e = self._run([batch[i]])
                        results[i] = r[0]
                        if e:
                            errors[i] = e[0]
                    break
                err = StoreError(f"LMDB map full at max_map_size={self.max_map_size}")
                for i in range(n):
                    errors.setdefault(i, err)
                break
            elif outcome == "resized":
                self._gate.exclusive(lambda: self.env.set_mapsize(0))
            elif isinstance(outcome, lmdb.Error):   # disk full, I/O error: nothing is durable
                err = StoreError(f"LMDB write failed: {outcome}")
                for i in range(n):
                    errors.setdefault(i, err)
                break
            # "restart": an op failed after writing; replay the batch without it
        return results, errors

    def _attempt(self, batch: list[tuple[Op[Any], Any, Any, Any]], results: list[Any],
                 errors: dict[int, BaseException]) -> Any:
        """One try at the batch in one transaction: "done", "restart", "full", "resized" or
        the lmdb.Error that stopped it."""
        self._gate.enter()
        txn = None
        try:
            txn = self.env.begin(write=True)
            wt = WriteBuffer(txn, self._dbs, self._watch)
            wanted = collect_prefetch(batch, errors)
            tt = time.thread_time
            ph = self.phase_cpu
            c0 = tt()
            if wanted:
                wt.prefetch(wanted)
            c1 = tt()
            ph[0] += c1 - c0
            ctx = WriteCtx(wt, time.time())
            if run_ops(batch, ctx, results, errors, _PASS, lmdb.Error, StoreError):
                return "restart"
            ctx.finish()
            c2 = tt()
            wt.flush()
            if wt.touched:
                self._log_written(txn, wt.touched, ctx.now)
            c3 = tt()
            t, txn = txn, None
            a0 = time.perf_counter()
            t.commit()
            if wt.touched:
                self._forget(wt.touched)   # before any caller hears of the commit
                if ctx.fresh and self._cache_size:
                    self._keep_written(ctx.fresh)
            self.commit_seconds += time.perf_counter() - a0
            c4 = tt()
            ph[1] += c2 - c1
            ph[2] += c3 - c2
            ph[3] += c4 - c3
            return "done"
        except lmdb.MapFullError:
            return "full"
        except lmdb.MapResizedError:
            return "resized"
        except lmdb.Error as exc:
            return exc
        finally:
            if txn is not None:
                txn.abort()
            self._gate.leave()

    def _grow_early(self) -> None:
        """Grows the map between batches once it is ``GROW_AT`` full, so that a batch rarely
        meets MDB_MAP_FULL (which costs running it twice)."""
        try:
            i = self.env.info()
            if (i["last_pgno"] + 1) * self._psize > i["map_size"] * GROW_AT \
                    and i["map_size"] < self.max_map_size:
                self._grow()
        except lmdb.Error:    # not fatal: a batch that meets MDB_MAP_FULL grows the map itself
            pass

    def _trim_mapped(self) -> bool:
        """Remaps the map (same size) once this process holds more than ``max_mapped`` bytes
        of it resident; returns whether it did.

        Why: every store page the server reads or writes stays mapped in its address space,
        so the process's RSS grows with the store (4 KB a device: 2.2 GB peak at a million
        devices) although those pages are the kernel's page cache, shared and reclaimable.
        A remap drops the mappings, not the cached pages: the next read of a page maps it
        again with a minor fault (no disk read).  It runs in the writer thread between
        batches, with no reader inside (the gate that map growth uses), a few times per
        million devices."""
        if self.max_mapped is None:
            return False
        mapped = _rss_file() - self._rss_file_base
        if mapped <= self.max_mapped:
            return False
        try:
            self._gate.exclusive(lambda: self.env.set_mapsize(self.env.info()["map_size"]))
        except lmdb.Error:        # not fatal: the pages stay mapped until the next look
            return False
        self.map_trims += 1
        return True

    def _grow(self) -> bool:
        cur = self.env.info()["map_size"]
        if cur >= self.max_map_size:
            return False
        new = min(cur * 2, self.max_map_size)
        self._gate.exclusive(lambda: self.env.set_mapsize(new))
        self.map_grows += 1
        return True

    # --- reads -------------------------------------------------------------------------------

    async def _get(self, db: str, cls: type[R], key: str, kind: str) -> R:
        return self._get_sync(db, cls, key, kind)

    # the records read most (every API poll of a task; a dozen reads of its device per
    # campaign device): read without the generic path's second coroutine
    async def get_task(self, task_id: str) -> Task:
        return self._get_sync("tasks", Task, task_id, "task")

    async def get_device(self, dev_id: str) -> Device:
        return self._get_sync("devices", Device, dev_id, "device")

    def _get_sync(self, db: str, cls: type[R], key: str, kind: str) -> R:
        """A record by key; those of READ_CACHE_DBS come from the read cache when they can.

        A device in a session is read a dozen times (its account for each message, the
        session's record, its commands, the charging event) and every device of a campaign
        reads the same package and capability: decoding and validating them each time was a
        tenth of the server's CPU; an API client polls its task.  Callers treat records as
        immutable (they change them with ``msgspec.structs.replace``), so the cached object
        itself is returned.

        Coherence: a commit that wrote a cached key drops it (:meth:`_forget`, in the writer
        thread, before the commit's callers are answered) and bumps ``_cache_gen``; a read
        caches what it decoded only if no such commit happened since it began (under the
        lock), so a record read from a snapshot older than a commit is never kept."""
        k = _e(key)
        if db not in self._watch or not self._cache_size:
            return self._get_now(db, cls, k, key, kind)
        if not self._turn_checked:
            self._others_wrote()
        ck = (db, k)
        rec = self._cache.get(ck)
        if rec is not None:
            return rec   # type: ignore[no-any-return]
        gen = self._cache_gen
        rec = self._get_now(db, cls, k, key, kind)
        self._keep(self._cache, ck, rec, gen)
        return rec

    def _get_now(self, db: str, cls: type[R], k: bytes, key: str, kind: str) -> R:
        """``KVStore._get``'s read, inline and lean: one read transaction bound to ``db``, no
        closure, no transaction wrapper, no coroutine frame (two of these per API lookup and
        a dozen per campaign device: the generic path's layers were a third of a read)."""
        if len(k) > MAX_KEY:
            raise NotFound(kind, key)
        raw = self._get_raw(db, k)
        if raw is None:
            raise NotFound(kind, key)
        return dec(cls, raw, db, k)

    def _get_raw(self, db: str, k: bytes) -> bytes | None:
        """The value of one key (None if absent), read now on the calling thread."""
        if self._closed:
            raise StoreClosed(f"store {self.path!r} is closed")
        try:
            return self._gate.get(self.env, self._dbs[db], k)
        except lmdb.MapResizedError:
            pass                               # another process grew the map: the slow path
        except lmdb.Error as exc:
            raise StoreError(f"LMDB read failed: {exc}") from exc
        # (adopts the new map size, then reads)
        return self._read_sync(lambda t: t.get(db, k))

    def identity_generation(self) -> int:
        raw = self._get_raw("meta", IDENTITY_GEN)
        return int.from_bytes(raw, "big") if raw else 0

    def _keep(self, into: dict[Any, Any], key: Any, value: Any, gen: int) -> None:
        """Keeps what a read found in one of the caches, unless a commit that wrote a
        watched key happened since the read began (``gen``: ``_cache_gen`` then)."""
        with self._cache_lock:
            if gen != self._cache_gen:
                return
            into[key] = value                 # (the read cache drops its oldest when full)

    def _keep_written(self, fresh: dict[tuple[str, bytes], tuple[bytes, Any]]) -> None:
        """After a commit (and its :meth:`_forget`): the records ops wrote and declared
        (``WriteCtx.fresh``) go into the read cache, each only if the committed bytes are
        the ones it was encoded to (a later op of the batch may have written the key again;
        a byte compare, no decode).  Reads that began before the commit cannot keep their
        older copy over it: ``_forget`` bumped the generation they check.  Runs in the
        writer thread, inside the gate, before any caller is answered."""
        dbs = self._dbs
        with self.env.begin(buffers=False) as r, self._cache_lock:
            for (db, key), (data, rec) in fresh.items():
                if r.get(key, db=dbs[db]) == data:
                    self._cache[(db, key)] = rec

    # --- the written-keys log: the read cache kept coherent with other processes ------------

    def _log_written(self, txn: Any, touched: list[tuple[str, bytes]], now: float) -> None:
        """In the writer's transaction, before its commit: the log entry of the cached keys it
        wrote, and now and then the pruning of entries older than ``CACHE_LOG_KEEP``."""
        txn.put(_u64(txn.id()), _LOG_HEAD.pack(int(now * 1e6), self._writer_mark)
                + _LOG_ENCODE(touched), db=self._log_db)
        mono = time.monotonic()
        if mono < self._next_prune:
            return
        self._next_prune = mono + CACHE_LOG_PRUNE_INTERVAL
        cutoff = int((now - CACHE_LOG_KEEP) * 1e6)
        floor = None
        with txn.cursor(db=self._log_db) as cur:
            if cur.first():
                while True:
                    k = cur.key()
                    if len(k) != 8 or _LOG_HEAD.unpack_from(cur.value())[0] >= cutoff:
                        break
                    floor = k
                    if not cur.delete():     # (moves to the next entry)
                        break
        if floor is not None:
            txn.put(CACHE_LOG_FLOOR, floor, db=self._log_db)

    def _others_wrote(self) -> None:
        """Before an answer from the read cache: forgets what other processes' commits wrote
        since this store last looked.  Looked at once per turn of the event loop, at the
        first cached read: every request served in that turn was received before the look,
        so a commit that another process made before a request came (a device's nonces saved
        by the process that had its last session, a task cancelled through the API) counts
        for that request.  Off the loop (a thread, a CLI verb), every cached read looks."""
        if self._turn_checked:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._catch_up()
            return
        self._turn_checked = True
        loop.call_soon(self._next_turn)
        self._catch_up()

    def _next_turn(self) -> None:
        self._turn_checked = False

    def _catch_up(self) -> None:
        if self._closed:
            return
        try:
            last = self.env.info()["last_txnid"]
        except lmdb.Error:
            last = -1
        if last == self._seen_txn:
            return                        # no commit since the last look (a dict, no txn)
        mark = self._writer_mark
        unpack = _LOG_HEAD.unpack_from

        def read(t: LmdbTxn) -> tuple[int, list[Any] | None]:
            upto = t.t.id()
            raw = t.get(CACHE_LOG_DB, CACHE_LOG_FLOOR)
            if raw is not None and int.from_bytes(raw, "big") > self._seen_txn:
                return upto, None         # entries not read yet were pruned: forget all
            keys: list[Any] = []
            for k, v in t.scan(CACHE_LOG_DB, _u64(self._seen_txn + 1), CACHE_LOG_FLOOR):
                if unpack(v)[1] != mark:
                    keys.extend(_LOG_KEYS.decode(v[_LOG_HEAD.size:]))
            return upto, keys
        upto, keys = self._read_sync(read)
        if keys is None:
            with self._cache_lock:
                self._cache_gen += 1
                self._cache.clear()
                self._topics.clear()
        elif keys:
            self._forget([(db, key) for db, key in keys])
        self._seen_txn = max(self._seen_txn, upto)

    def _forget(self, keys: list[tuple[str, bytes]]) -> None:
        with self._cache_lock:
            self._cache_gen += 1
            pop = self._cache.pop
            for k in keys:
                if k[0] == "sub_topic":
                    self._topics.clear()          # a subscription came or went
                else:
                    pop(k, None)

    def count_download(  # type: ignore[override]
            self, content_id: str) -> "asyncio.Future[Content]":
        """One more download of ``content_id``; answers the record as committed, like
        ``KVStore.count_download``, but the downloads counted while one write of that record
        waits for the writer go in that same write: every device of a campaign downloads the
        same package, and one write op per download (read, decode, encode, write the record)
        was a sixth of a campaign device's store writes.  Each caller still waits for the
        commit that holds its count.  Replay-safe: once the op has taken the count, later
        downloads start a new op, so a batch run again adds the same number."""
        with self._downloads_lock:
            pending = self._downloads.get(content_id)
            if pending is not None:
                pending[0] += 1
                # shielded: a caller that is cancelled (its device went away) must not
                # cancel the write the others wait for
                return asyncio.shield(pending[1])
            pending = self._downloads[content_id] = [1, None]

        def taken() -> int:        # (in the writer thread, when the op runs)
            with self._downloads_lock:
                if self._downloads.get(content_id) is pending:
                    del self._downloads[content_id]
                return pending[0]  # type: ignore[no-any-return]
        op = self._download_op(content_id, taken)
        try:
            fut = pending[1] = self._write(op)
        except BaseException:
            with self._downloads_lock:
                if self._downloads.get(content_id) is pending:
                    del self._downloads[content_id]
            raise
        return asyncio.shield(fut)

    async def has_subscribers(self, topic: str) -> bool:
        """Cached per topic until a commit writes a subscription (see :meth:`_forget`)."""
        if not self._turn_checked:
            self._others_wrote()
        known = self._topics.get(topic)
        if known is not None:
            return known
        gen = self._cache_gen
        found = await super().has_subscribers(topic)
        self._keep(self._topics, topic, found, gen)
        return found

    def _read_sync(self, fn: Callable[[Any], R]) -> R:
        env = self.env
        while True:
            self._gate.enter()
            try:
                try:
                    txn = env.begin(buffers=False)
                except lmdb.MapResizedError:
                    resized = True
                except lmdb.Error as exc:     # readers full, environment gone …
                    raise StoreError(f"LMDB read failed: {exc}") from exc
                else:
                    resized = False
                    try:
                        return fn(LmdbTxn(txn, self._dbs))
                    except lmdb.Error as exc:
                        raise StoreError(f"LMDB read failed: {exc}") from exc
                    finally:
                        txn.abort()
            finally:
                self._gate.leave()
            if resized:
                self._gate.exclusive(lambda: env.set_mapsize(0))

    def _read_now(self, fn: Callable[[Any], R]) -> R:
        if self._closed:
            raise StoreClosed(f"store {self.path!r} is closed")
        return self._read_sync(fn)

    async def _read(self, fn: Callable[[Any], R], big: bool = False) -> R:
        if self._closed:
            raise StoreClosed(f"store {self.path!r} is closed")
        if not big:
            return self._read_sync(fn)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read_sync, fn)

    # --- admin -------------------------------------------------------------------------------

    async def backup(self, dest: str | os.PathLike[str]) -> None:
        """Online, compacting copy of the environment into the empty directory ``dest``."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._backup_sync, dest)

    def _backup_sync(self, dest: str | os.PathLike[str]) -> None:
        p = pathlib.Path(dest)
        p.mkdir(parents=True, exist_ok=True)
        self._gate.enter()
        try:
            self.env.copy(str(p), compact=True)
        except lmdb.Error as exc:
            raise StoreError(f"backup to {str(p)!r} failed: {exc}") from exc
        finally:
            self._gate.leave()

    def info(self) -> dict[str, Any]:
        st = os.stat(os.path.join(self.path, "data.mdb"))
        i = self.env.info()
        return {"map_size": i["map_size"], "last_pgno": i["last_pgno"],
                "page_size": self.env.stat()["psize"], "file_bytes": st.st_size,
                "used_bytes": (i["last_pgno"] + 1) * self.env.stat()["psize"],
                "map_grows": self.map_grows, "map_trims": self.map_trims,
                "batches": self.batches, "ops": self.ops,
                "readers": i["num_readers"]}

    def reader_check(self) -> int:
        """Frees reader slots of dead processes; returns how many.  The writer thread also
        calls it every ``reader_check_interval`` seconds."""
        n = self.env.reader_check()
        self.stale_readers_cleared += n
        return n

    def check_sync(self) -> list[str]:
        return self._read_sync(check_txn)

    # --- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._shutdown()

    def close_sync(self) -> None:
        """Closes from plain (non-async) code; pending writes are committed first."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._shutdown()

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self._gate.exclusive(self.env.close)
        self._release_in_use()

    def _release_in_use(self) -> None:
        fd, self._in_use = self._in_use, None
        if fd is not None:
            os.close(fd)

    # --- health ------------------------------------------------------------------------------

    def fault(self) -> str | None:
        """None while the group-commit writer runs; else why writes cannot succeed.  The writer
        dies only on an error outside a batch (a batch's own errors fail that batch): from then
        on every write raises StoreClosed, so /health must say so."""
        dead = self._dead
        if dead is not None:
            return f"store writer thread died: {dead!r}"
        if self._closed:
            return f"store {self.path!r} is closed"
        if not self._thread.is_alive():
            return "store writer thread is not running"
        return None


def _rss_file() -> int:
    """Bytes of file-backed pages resident in this process (``RssFile`` of /proc/self/status;
    0 where there is none)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _deliver_threadsafe(loop: Any, futs: list[Any], results: list[Any],
                       errors: dict[int, BaseException]) -> None:
    try:
        loop.call_soon_threadsafe(resolve, futs, results, errors)
    except RuntimeError:   # the caller's loop is closed: nobody is waiting any more
        pass


def _fail_pending(pending: "collections.deque[Any]", exc: BaseException) -> None:
    while True:
        try:
            item = pending.popleft()
        except IndexError:
            return
        _deliver_threadsafe(item[2], [item[1]], [None], {0: exc})


__all__ = ["LmdbStore", "open_env", "open_dbs", "LmdbTxn", "try_lock_in_use", "IN_USE_FILE", "DEFAULT_MAP_SIZE",
           "DEFAULT_MAX_MAP_SIZE", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_DELAY", "DEFAULT_MAX_MAPPED"]
