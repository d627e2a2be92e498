# cython: language_level=3
# (boundscheck, wraparound, initializedcheck and cdivision come from setup.py, so that
#  DMENGINE_DEBUG=1 can turn the checks on; build with `make build`, not bare cythonize)
"""The store's write hot path in Cython (L3): the buffered LMDB write transaction and the
task transition's common case (no field changes, no outbox entries).

Both do exactly what their Python counterparts did (``store/lmdb.py``'s buffered write
transaction and ``KVStore.transition_op`` in ``store/kv.py``, which still handles every other
case); they only cost less interpreter time per transition, and the writer thread shares the
GIL with the event loop, so every microsecond here is one the callers do not get.
"""
cimport cython

import threading

import lmdb
import msgspec

from dmengine.errors import (Conflict, CorruptRecord, InvalidTransition, NotFound,
                             ValidationError)
from dmengine.model import FINAL_TASK_STATES, TASK_TRANSITIONS, HistoryEntry, Task, TaskState

cdef object _TASK_DEC = msgspec.msgpack.Decoder(Task)
cdef object _ENC = msgspec.msgpack.Encoder()
cdef object _DECODE_ERROR = msgspec.DecodeError
cdef object _FINAL = FINAL_TASK_STATES
cdef dict _TRANSITIONS = dict(TASK_TRANSITIONS)
cdef bytes SEP = b"\x00"
cdef bytes EMPTY = b""
cdef str TASKS = "tasks"
cdef str JSTATE = "task_jstate"
cdef str HISTORY = "history"
cdef str DUE = "task_due"
cdef str DL = "task_dl"
#: state → its key part (``state.encode()``), built once
cdef dict _STATE_KEY = {s: (<str>s.value).encode() for s in TaskState}
#: the largest cause a transition takes (HistoryEntry.cause / Task.cause are ``Text``)
cdef Py_ssize_t MAX_CAUSE = 1024


cdef class Gate:
    """Readers in, resizer out: ``set_mapsize`` runs only with no transaction of this process
    open (LMDB's rule), and a reader waits while it runs.

    Every store read passes here (two per API lookup, a dozen per campaign device), so the
    readers' side is C: under the GIL, with no Python call between them, the check of
    ``resizing`` and the change of ``active`` are one step, no lock needed.  The resizer takes
    the condition's lock, sets ``resizing`` and waits for ``active`` to reach 0; a reader
    leaving last while it waits takes the lock to wake it (it cannot miss the wake-up: the
    resizer holds the lock from its check of ``active`` until it waits).  It was a Python
    class taking a lock twice per read: a third of a single-key read's interpreter time."""

    cdef readonly Py_ssize_t active
    cdef readonly bint resizing
    cdef object _cond

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self.active = 0
        self.resizing = False

    cpdef enter(self):
        if not self.resizing:
            self.active += 1
            return
        with self._cond:
            while self.resizing:
                self._cond.wait()
            self.active += 1

    cpdef leave(self):
        self.active -= 1
        if self.active == 0 and self.resizing:
            with self._cond:
                self._cond.notify_all()

    def exclusive(self, fn):
        """Runs ``fn`` with no reader inside (the caller holds no transaction)."""
        with self._cond:
            while self.resizing:
                self._cond.wait()
            self.resizing = True
            try:
                while self.active:
                    self._cond.wait()
                fn()
            finally:
                self.resizing = False
                self._cond.notify_all()

    def get(self, env, dbi, bytes key):
        """The value of ``key`` in database ``dbi`` (None if absent), read in a transaction of
        its own inside the gate; ``lmdb.MapResizedError`` when another process grew the map
        (the caller adopts the new size, then reads again), other ``lmdb.Error`` as raised."""
        self.enter()
        try:
            txn = env.begin(db=dbi, buffers=False)
            try:
                return txn.get(key)
            finally:
                txn.abort()
        finally:
            self.leave()


cdef inline bytes _us(double t):
    return (<object>int(t * 1_000_000)).to_bytes(8, "big")


cdef class WriteBuffer:
    """A write transaction that buffers puts and deletes in a dict per database and applies
    them at :meth:`flush` (sorted, one ``putmulti`` per database): py-lmdb releases the GIL
    around every single call, and with the event loop busy in the other thread each release
    can cost a thread switch, so the writer makes as few calls as it can.  Reads see the
    buffer first, then the prefetched values, then LMDB."""

    cdef public object t          # the lmdb.Transaction
    cdef public dict d            # db name → lmdb database handle
    cdef public dict over         # db name → {key: value or None (deleted)}
    cdef public dict pre          # db name → {key: value or None (absent)} read ahead
    cdef public Py_ssize_t writes
    cdef public frozenset watch   # db names whose written keys are noted (read caches)
    cdef public list touched      # (db, key) written in ``watch``ed databases so far

    def __init__(self, txn, dict dbs, frozenset watch=frozenset()):
        self.t = txn
        self.d = dbs
        self.over = {}
        self.pre = {}
        self.writes = 0
        self.watch = watch
        self.touched = []

    def prefetch(self, dict wanted):
        """Reads many keys with one ``getmulti`` per database (ops declare them; a key not
        found is looked up again by the op that wants it)."""
        for db, keys in wanted.items():
            if keys:
                cur = self.t.cursor(db=self.d[db])
                try:
                    self.pre[db] = dict(cur.getmulti(keys))
                finally:
                    cur.close()

    cdef dict _lmdb_many(self, str db, list keys):
        if not keys:
            return {}
        cur = self.t.cursor(db=self.d[db])
        try:
            return dict(cur.getmulti(sorted(keys)))
        finally:
            cur.close()

    cpdef object get(self, str db, bytes key):
        cdef object o = self.over.get(db)
        if o is not None and key in <dict>o:
            return (<dict>o)[key]
        o = self.pre.get(db)
        if o is not None and key in <dict>o:
            return (<dict>o)[key]
        return self.t.get(key, db=self.d[db])

    def get_many(self, str db, list keys):
        cdef dict o = self.over.get(db) or {}
        cdef dict out = self._lmdb_many(db, [k for k in keys if k not in o])
        for k in keys:
            if k in o:
                v = o[k]
                if v is not None:
                    out[k] = v
        return out

    def count(self, str db):
        return int(self.t.stat(self.d[db])["entries"])

    cpdef put(self, str db, bytes key, bytes value):
        self.writes += 1
        cdef object o = self.over.get(db)
        if o is None:
            o = self.over[db] = {}
        (<dict>o)[key] = value

    cpdef bint delete(self, str db, bytes key):
        self.writes += 1
        cdef object o = self.over.get(db)
        if o is None:
            o = self.over[db] = {}
        (<dict>o)[key] = None
        return True

    def scan(self, str db, bytes start, end):
        self.flush()
        return _scan(self.t, self.d[db], start, end)

    def flush(self):
        """Applies the buffered deletes and puts (one ``putmulti`` per database).  Keys are
        not sorted for it: a batch of transitions touches one leaf page per task whatever the
        order, and sorting cost more than it saved.  Keys that arrive ascending (an import of
        ascending ids) go in with MDB_APPEND past the database's last key."""
        self.pre.clear()      # flushed writes now live in LMDB; prefetched values may be stale
        t = self.t
        cdef dict o
        cdef list puts
        cdef bint ascending
        cdef bytes prev, kb
        for db, ov in self.over.items():
            o = <dict>ov
            if not o:
                continue
            if db in self.watch:
                for k in o:
                    self.touched.append((db, k))
            h = self.d[db]
            puts = []
            ascending = True
            prev = None
            for k, v in o.items():
                kb = <bytes>k
                if v is None:
                    t.delete(kb, db=h)
                    continue
                if ascending and prev is not None and kb <= prev:
                    ascending = False
                prev = kb
                puts.append((kb, v))
            if puts:
                cur = t.cursor(db=h)
                try:
                    if ascending:
                        _put_sorted(cur, puts)
                    else:
                        cur.putmulti(puts)
                finally:
                    cur.close()
        self.over.clear()


cdef _put_sorted(cur, list items):
    """Puts ``items`` (sorted by key, keys unique).  The ones after the database's last key
    go in with MDB_APPEND: no search, and pages filled up instead of split in half (a bulk
    import of ascending ids, tasks of one job); the others with ordinary puts."""
    cdef Py_ssize_t lo = 0, hi = len(items), mid
    cdef bytes last
    if cur.last():
        last = cur.key()
        while lo < hi:                   # first item whose key is > last
            mid = (lo + hi) // 2
            if <bytes>(<tuple>items[mid])[0] <= last:
                lo = mid + 1
            else:
                hi = mid
    if lo == len(items):
        cur.putmulti(items)
        return
    if lo:
        cur.putmulti(items[:lo])
    tail = items[lo:] if lo else items
    consumed, added = cur.putmulti(tail, append=True)
    if added != consumed:                # cannot happen (keys ascend past the last one), but
        cur.putmulti(tail)               # an append refused is dropped silently: put them


def _scan(txn, h, bytes start, end):
    cur = txn.cursor(db=h)
    try:
        if not cur.set_range(start):
            return
        for k, v in cur.iternext():
            if end is not None and k >= end:
                return
            yield k, v
    finally:
        cur.close()


def check_transition_args(to_state, cause, dm_status, result_code):
    """The transition's arguments, checked before anything is queued; returns the state."""
    if to_state.__class__ is not TaskState:
        try:
            to_state = TaskState(to_state)
        except ValueError:
            raise ValidationError(f"no task state {to_state!r}", where="$.state") from None
    if cause is not None:
        if not isinstance(cause, str):
            raise ValidationError(f"cause must be a string, got {type(cause).__name__}",
                                  where="$.cause")
        if len(<str>cause) > MAX_CAUSE:
            raise ValidationError("cause longer than 1024", where="$.cause")
    if dm_status is not None and (not isinstance(dm_status, int) or isinstance(dm_status, bool)):
        raise ValidationError(f"dm_status must be an int, got {type(dm_status).__name__}",
                              where="$.dm_status")
    if result_code is not None and (not isinstance(result_code, int)
                                    or isinstance(result_code, bool)):
        raise ValidationError(f"result_code must be an int, got {type(result_code).__name__}",
                              where="$.result_code")
    return to_state


#: Transition's "leave next_attempt as it is"
KEEP = object()


@cython.no_gc
cdef class Transition:
    """The op of a plain transition (``op(ctx)``, see ``store/kv.py``): read the task, check
    the move, write the task, move its job-state index row (and drop its due/deadline rows
    when it ends), append a history entry, move the job's counters (cached per transaction,
    written once by ``WriteCtx.finish``).  Raises before its first write."""

    cdef readonly bytes key
    cdef readonly str task_id
    cdef object to_state
    cdef object cause
    cdef object dm_status
    cdef object result_code
    cdef object expect_state
    cdef object next_attempt      # KEEP (unchanged), None (cleared) or a time (checked >= 0)
    cdef object attempts          # None: unchanged, else an int >= 0 (checked)

    def __init__(self, str task_id, to_state, cause=None, dm_status=None, result_code=None,
                 expect_state=None, next_attempt=KEEP, attempts=None):
        self.task_id = task_id
        self.key = task_id.encode()
        self.to_state = to_state
        self.cause = cause
        self.dm_status = dm_status
        self.result_code = result_code
        self.expect_state = expect_state
        self.next_attempt = next_attempt
        self.attempts = attempts

    def __call__(self, ctx):
        cdef object txn = ctx.txn
        cdef bint fast = type(txn) is WriteBuffer
        cdef WriteBuffer wb
        cdef bytes key = self.key
        cdef object raw
        if fast:
            wb = <WriteBuffer>txn
            raw = wb.get(TASKS, key)
        else:
            raw = txn.get(TASKS, key)
        if raw is None:
            raise NotFound("task", self.task_id)
        try:
            t = _TASK_DEC.decode(raw)          # a fresh object: changed in place below
        except _DECODE_ERROR as exc:
            raise CorruptRecord("tasks", key, str(exc)) from None
        frm = t.state
        to_state = self.to_state
        if self.expect_state is not None and frm != self.expect_state:
            raise Conflict("task", self.task_id,
                           f"task {self.task_id!r} is {frm}, not {self.expect_state}")
        if to_state not in _TRANSITIONS[frm]:
            raise InvalidTransition("task", self.task_id, frm, to_state)
        now = ctx.now
        cdef object n = t.history_len + 1
        cdef object old_due = t.next_attempt
        t.state = to_state
        t.version += 1
        t.history_len = n
        t.updated = now
        if self.next_attempt is not KEEP:
            t.next_attempt = self.next_attempt
        if self.attempts is not None:
            t.attempts = self.attempts
        if self.cause is not None:
            t.cause = self.cause
        cdef bint final_to = to_state in _FINAL
        if final_to:
            t.finished = now
        data = _ENC.encode(t)
        job_id = t.job_id
        job = None
        if job_id is not None and frm != to_state:
            job = (<dict>ctx.jobs).get(job_id)
            if job is None:
                job = ctx.job(job_id)          # NotFound before any write
        h = HistoryEntry(task_id=self.task_id, seq=n, time=now, from_state=frm,
                         to_state=to_state, cause=self.cause, dm_status=self.dm_status,
                         result_code=self.result_code)
        hdata = _ENC.encode(h)
        hkey = key + SEP + (<object>n).to_bytes(4, "big")
        # --- writes
        cdef bytes j, sq
        if fast:
            wb.put(TASKS, key, data)
            if frm != to_state:
                if job_id is not None:
                    j = (<str>job_id).encode() + SEP
                    sq = SEP + (<object>t.seq).to_bytes(8, "big")
                    wb.delete(JSTATE, j + <bytes>_STATE_KEY[frm] + sq)
                    wb.put(JSTATE, j + <bytes>_STATE_KEY[to_state] + sq, key)
                if final_to and frm not in _FINAL and t.deadline is not None:
                    wb.delete(DL, _us(t.deadline) + key)
            # the due row: there while the task is open and has a next attempt
            if frm not in _FINAL and old_due is not None and (
                    final_to or t.next_attempt is None or t.next_attempt != old_due):
                wb.delete(DUE, _us(old_due) + key)
            if not final_to and t.next_attempt is not None and (
                    frm in _FINAL or old_due is None or t.next_attempt != old_due):
                wb.put(DUE, _us(t.next_attempt) + key, b"")
            wb.put(HISTORY, hkey, hdata)
        else:
            put = ctx.put
            delete = ctx.delete
            put(TASKS, key, data)
            if frm != to_state:
                if job_id is not None:
                    j = (<str>job_id).encode() + SEP
                    sq = SEP + (<object>t.seq).to_bytes(8, "big")
                    delete(JSTATE, j + <bytes>_STATE_KEY[frm] + sq)
                    put(JSTATE, j + <bytes>_STATE_KEY[to_state] + sq, key)
                if final_to and frm not in _FINAL and t.deadline is not None:
                    delete(DL, _us(t.deadline) + key)
            if frm not in _FINAL and old_due is not None and (
                    final_to or t.next_attempt is None or t.next_attempt != old_due):
                delete(DUE, _us(old_due) + key)
            if not final_to and t.next_attempt is not None and (
                    frm in _FINAL or old_due is None or t.next_attempt != old_due):
                put(DUE, _us(t.next_attempt) + key, b"")
            put(HISTORY, hkey, hdata)
        cdef dict counts
        if job is not None:
            counts = job.test_counts if t.test_cycle else job.counts
            c = counts.get(frm, 0) - 1
            if c:
                counts[frm] = c
            else:
                del counts[frm]
            counts[to_state] = counts.get(to_state, 0) + 1
            job.updated = now
        return t


# --- the writer's per-batch loops ---------------------------------------------------------


def collect_prefetch(list batch, dict errors):
    """{db: [keys]} the batch's ops will read (a plain transition reads its task; other ops
    name a (db, key) in the queue item), skipping ops that failed already."""
    cdef dict wanted = {}
    cdef Py_ssize_t i
    cdef tuple item
    cdef list w
    for i in range(len(batch)):
        item = <tuple>batch[i]
        op = item[0]
        if errors and i in errors:
            continue
        if type(op) is Transition:
            db = TASKS
            key = (<Transition>op).key
        else:
            pf = item[3]
            if pf is None:
                continue
            db = (<tuple>pf)[0]
            key = (<tuple>pf)[1]
        w = wanted.get(db)
        if w is None:
            wanted[db] = [key]
        else:
            w.append(key)
    return wanted


def run_ops(list batch, ctx, list results, dict errors, tuple passthrough, lmdb_error,
            store_error):
    """Runs every op of the batch not in ``errors`` on ``ctx``; their results go to
    ``results``.  An op that raises is recorded in ``errors``; returns "restart" when the
    transaction must be rolled back and replayed without it (it may have written, or LMDB
    refused it), else None.  ``passthrough`` exceptions (map full/resized) propagate."""
    cdef Py_ssize_t i, w0
    cdef Py_ssize_t n = len(batch)
    cdef WriteBuffer wb = <WriteBuffer?>ctx.txn
    for i in range(n):
        if errors and i in errors:
            continue
        w0 = wb.writes
        try:
            results[i] = (<tuple>batch[i])[0](ctx)
        except passthrough:
            raise
        except lmdb_error as exc:          # e.g. a key LMDB refuses: this op's fault only
            errors[i] = store_error(f"LMDB refused the operation: {exc}")
            return "restart"
        except Exception as exc:
            errors[i] = exc
            if wb.writes != w0 or not isinstance(exc, store_error):
                return "restart"           # it may have written: roll everything back
    return None


def resolve(list futs, list results, dict errors):
    """Answers the callers' futures (runs on their event loop): ``errors`` maps an index of
    ``futs`` to its exception, every other future gets its result."""
    cdef Py_ssize_t i
    for i in range(len(futs)):
        fut = futs[i]
        if fut.done():                     # cancelled by its caller meanwhile
            continue
        if errors and i in errors:
            fut.set_exception(errors[i])
        else:
            fut.set_result(results[i])


def split_by_loop(list batch, list results, dict errors):
    """[(loop, futures, results, errors)] for the batch's callers, one entry per event loop
    (nearly always one: then no list is copied)."""
    cdef Py_ssize_t i, n = len(batch)
    cdef tuple item
    if n == 0:
        return []
    loop0 = (<tuple>batch[0])[2]
    cdef bint same = True
    cdef list futs = [None] * n
    for i in range(n):
        item = <tuple>batch[i]
        futs[i] = item[1]
        if item[2] is not loop0:
            same = False
    if same:
        return [(loop0, futs, results, errors)]
    cdef dict groups = {}
    for i in range(n):
        item = <tuple>batch[i]
        g = groups.get(item[2])
        if g is None:
            g = groups[item[2]] = ([], [], {})
        if i in errors:
            (<dict>g[2])[len(<list>g[0])] = errors[i]
        (<list>g[0]).append(item[1])
        (<list>g[1]).append(results[i])
    return [(lp, g[0], g[1], g[2]) for lp, g in groups.items()]


# --- bulk import ---------------------------------------------------------------------------

cdef str DEVICES = "devices"
cdef str MSISDN = "dev_msisdn"
cdef str IMEI = "dev_imei"
cdef str TAC = "dev_tac"
cdef str CAP = "dev_cap"


def import_row(Py_ssize_t i, dev, bytes data):
    """What the import keeps of a validated device until its chunk is written: its position,
    key parts and record bytes, all plain bytes (a tuple of them leaves the cyclic GC's
    watch; holding 20,000 Device structs per chunk made full collections most of an
    import's time)."""
    m = dev.msisdn
    im = dev.imei
    cap = dev.capability
    return (i, (<str>dev.dev_id).encode(), (<str>m).encode() if m else None,
            (<str>im).encode() if im else None, (<str>cap).encode() if cap else None, data)


def import_chunk(ctx, list rows, bint replace, on_replace):
    """Writes a chunk of :func:`import_row` rows: a device whose id exists is replaced (or
    refused when ``replace`` is false), a MSISDN or IMEI owned by another device (stored, or
    earlier in this chunk) is refused.  New devices get their four index rows here;
    ``on_replace(ctx, key, raw_old, data)`` writes a replaced one's index changes and returns
    (new record bytes, old msisdn or None, old imei or None).  Returns
    (created, replaced, [(position, where, message)])."""
    cdef Py_ssize_t created = 0, replaced = 0
    cdef list rejected = []
    cdef tuple row
    txn = ctx.txn
    keys = [(<tuple>r)[1] for r in rows]
    # one multi-get per database instead of three lookups per device; the dicts then follow
    # this chunk's own changes so duplicates inside the chunk are caught too
    cdef dict stored = dict(txn.get_many(DEVICES, keys))
    cdef dict msisdn_owner = dict(txn.get_many(
        MSISDN, [(<tuple>r)[2] for r in rows if (<tuple>r)[2] is not None]))
    cdef dict imei_owner = dict(txn.get_many(
        IMEI, [(<tuple>r)[3] for r in rows if (<tuple>r)[3] is not None]))
    put = ctx.put
    for r in rows:
        row = <tuple>r
        i = row[0]
        key = <bytes>row[1]
        m = row[2]
        im = row[3]
        cap = row[4]
        data = row[5]
        raw = stored.get(key)
        if raw is not None and not replace:
            rejected.append((i, "$.dev_id", f"device {key.decode()!r} already exists"))
            continue
        if m is not None:
            owner = msisdn_owner.get(m)
            if owner is not None and owner != key:
                rejected.append((i, "$.msisdn", f"msisdn {m.decode()!r} already exists"))
                continue
        if im is not None:
            owner = imei_owner.get(im)
            if owner is not None and owner != key:
                rejected.append((i, "$.imei", f"imei {im.decode()!r} already exists"))
                continue
        if raw is not None:
            data, old_m, old_im = on_replace(ctx, key, raw, data)
            put(DEVICES, key, data)
            if old_m is not None:
                msisdn_owner[old_m] = None
            if old_im is not None:
                imei_owner[old_im] = None
            replaced += 1
        else:
            put(DEVICES, key, data)
            if m is not None:
                put(MSISDN, m, key)
            if im is not None:
                put(IMEI, im, key)
                put(TAC, (<bytes>im)[:8] + SEP + key, EMPTY)
            if cap is not None:
                put(CAP, <bytes>cap + SEP + key, EMPTY)
            created += 1
        stored[key] = data
        if m is not None:
            msisdn_owner[m] = key
        if im is not None:
            imei_owner[im] = key
    return created, replaced, rejected
