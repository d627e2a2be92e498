"""The store's logic over an ordered key-value transaction (L3), shared by LMDB and memory.

A backend gives :class:`KVStore` two things: ``_write(op)`` runs ``op(ctx)`` in a write
transaction and returns its result once durable (LMDB group-commits many ops per
transaction), and ``_read(fn, big)`` runs ``fn(txn)`` in a read transaction.  Everything
else — key layout, indexes, counters, validation, paging, the consistency checker — is here,
so the two backends cannot drift apart.

Key layout (named databases; ``\\0`` separates parts, ``u64`` is big-endian so keys sort the
way the queries read them; times are microseconds)::

    meta         b"schema" → SchemaRecord; b"seq:task" / b"seq:audit" / b"gen:identity" → u64
    devices      dev_id → Device              dev_msisdn  msisdn → dev_id
    dev_imei     imei → dev_id                dev_tac     tac \\0 dev_id → ""
    dev_cap      oid \\0 dev_id → ""
    caps         oid → Capability             cap_tac     tac → oid
    tasks        task_id → Task               task_job    job \\0 u64(seq) → task_id
    task_jstate  job \\0 state \\0 u64(seq) → task_id
    task_dev     dev_id \\0 u64(seq) → task_id
    task_corr    correlator → task_id         task_due    u64(next_attempt) task_id → ""
    task_dl      u64(deadline) task_id → ""   history     task_id \\0 u32(seq) → HistoryEntry
    jobs         job_id → Job                 job_date    u64(created) job_id → ""
    job_state    state \\0 job_id → ""          (the scheduler's pass reads only open jobs)
    job_targets  job \\0 u64(n) → dev_id       (the devices a job selected, n = 0, 1, …)
    dev_targets  dev_id \\0 job → u64(n)       (a target whose task is not made yet)
    content      content_id → Content
    outbox       entry_id → OutboxEntry       outbox_due  u64(due) entry_id → ""
    audit        u64(seq) → AuditEntry
    api_keys     key_id → ApiKey              api_key_hash  sha256(key) → key_id
    users        name → User
    sessions     sha256(token) → UserSession  session_exp   u64(expires) sha256(token) → ""
    subs         sub_id → Subscription        sub_topic   topic \\0 sub_id → ""
    dead         entry_id → DeadLetter        charging    u64(time) event_id → ChargingEvent

Write ops follow one discipline: read and check first, raise before the first write.  If an
op raises after writing anyway, the backend rolls the whole transaction back and replays the
batch without it (``WriteCtx.writes`` tells the two cases apart), so nothing is half-written.
"""
from __future__ import annotations

import abc

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from .. import model
from ..errors import (AlreadyExists, Conflict, CorruptRecord, InvalidTransition, NotFound,
                      StoreError, ValidationError)
from ..model import (FINAL_TASK_STATES, TASK_TRANSITIONS, ApiKey, AuditEntry, Capability,
                     ChargingEvent, Content, DeadLetter, Device, DmAccount, HistoryEntry, Job,
                     JobState, OutboxEntry, SchemaRecord, Subscription, Task, TaskState, User,
                     UserSession)
from ._kv import KEEP, Transition, check_transition_args, import_chunk, import_row
from .base import (DEFAULT_IMPORT_CHUNK, DEFAULT_PAGE, DEFAULT_QUERY_SCAN, MAX_PAGE, DeviceQuery,
                   ImportReport, Page, Store, Waypoint)

R = TypeVar("R")

DBS = ("meta", "devices", "dev_msisdn", "dev_imei", "dev_tac", "dev_cap", "caps", "cap_tac",
       "tasks", "task_job", "task_jstate", "task_dev", "task_corr", "task_due", "task_dl",
       "history", "jobs", "job_date", "job_state", "job_targets", "dev_targets", "content",
       "outbox",
       "outbox_due", "audit",
       "api_keys", "api_key_hash", "users", "sessions", "session_exp",
       "subs", "sub_topic", "dead", "charging")

SEP = b"\x00"
EMPTY = b""
SCHEMA_KEY = b"schema"
#: meta counter bumped by every write that changes or ends an API key, user or userSession:
#: caches of identities compare it (``identity_generation``)
IDENTITY_GEN = b"gen:identity"
_IDENTITY_DBS = frozenset({"api_keys", "users"})
#: LMDB's key size limit (the default build); longer keys cannot be stored, so never found.
MAX_KEY = 511
#: Rows read per read transaction by big scans (the checker, backups of counts).
SCAN_CHUNK = 5_000


class KVTxn(Protocol):
    """The ordered key-value transaction a backend provides."""

    def get(self, db: str, key: bytes) -> bytes | None: ...

    def get_many(self, db: str, keys: list[bytes]) -> dict[bytes, bytes]:
        """The found ones of ``keys`` (one call for many: the import path)."""
        ...

    def put(self, db: str, key: bytes, value: bytes) -> None: ...

    def delete(self, db: str, key: bytes) -> bool: ...

    def scan(self, db: str, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """Keys in ``[start, end)`` ascending (``end`` None: to the last key)."""
        ...

    def count(self, db: str) -> int:
        """Entries in ``db``."""
        ...


# --- keys --------------------------------------------------------------------------------


class KVWriteTxn(KVTxn, Protocol):
    """A write transaction: ``writes`` counts the puts and deletes made through it."""

    @property
    def writes(self) -> int: ...


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def us(t: float) -> bytes:
    """A time as a sortable key part (µs since the epoch, u64)."""
    return int(t * 1_000_000).to_bytes(8, "big")


def _e(s: str) -> bytes:
    return s.encode()


def prefix_end(p: bytes) -> bytes | None:
    """The first key after every key starting with ``p``."""
    b = bytearray(p)
    while b:
        if b[-1] < 255:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return None


def encode_cursor(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_cursor(cursor: str) -> bytes:
    try:
        key = base64.b64decode(cursor.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValidationError(f"bad cursor {cursor!r}", where="cursor") from None
    if not key:
        raise ValidationError(f"bad cursor {cursor!r}", where="cursor")
    return key


def check_limit(limit: int) -> int:
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit must be 1..{MAX_PAGE}, got {limit!r}", where="limit")
    return limit


def scan_page(txn: KVTxn, db: str, prefix: bytes, cursor: str | None, limit: int,
              *, lo: bytes | None = None, hi: bytes | None = None
              ) -> tuple[list[tuple[bytes, bytes]], str | None]:
    """Up to ``limit`` rows of ``db`` under ``prefix`` (or in ``[lo, hi)``) after ``cursor``."""
    start = prefix if lo is None else lo
    end = prefix_end(prefix) if hi is None else hi
    if cursor is not None:
        ck = decode_cursor(cursor)
        if not ck.startswith(prefix) or ck < start:
            raise ValidationError("cursor does not belong to this listing", where="cursor")
        start = ck + b"\x00"
    rows: list[tuple[bytes, bytes]] = []
    for k, v in txn.scan(db, start, end):
        if len(rows) == limit:
            return rows, encode_cursor(rows[-1][0])
        rows.append((k, v))
    return rows, None


# --- codecs ----------------------------------------------------------------------------

_enc = msgspec.msgpack.Encoder()
_D: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def dec(cls: type[R], raw: bytes, db: str = "?", key: bytes = b"") -> R:
    d = _D.get(cls)
    if d is None:
        d = _D[cls] = msgspec.msgpack.Decoder(cls)
    try:
        return d.decode(raw)
    except msgspec.DecodeError as exc:
        raise CorruptRecord(db, key, str(exc)) from None


def replace_fields(obj: R, changes: Mapping[str, Any], protected: frozenset[str]) -> R:
    bad = protected.intersection(changes)
    if bad:
        f = sorted(bad)[0]
        raise ValidationError(f"{f} cannot be changed here", where=f"$.{f}")
    try:
        return msgspec.structs.replace(obj, **changes)  # type: ignore[type-var]
    except TypeError as exc:
        raise ValidationError(str(exc), where="$") from None


# --- the write context a backend hands to ops --------------------------------------------


class WriteCtx:
    """One write transaction as ops see it: the raw txn, a write counter (for rollback
    decisions), and a per-transaction cache of jobs whose counters ops change (written
    once at :meth:`finish`)."""

    __slots__ = ("txn", "jobs", "now", "put", "delete", "listened", "fresh")
    txn: KVWriteTxn

    def __init__(self, txn: KVWriteTxn, now: float) -> None:
        self.txn = txn
        self.jobs: dict[str, Job] = {}
        #: topic → whether a subscription listens, per transaction: the check is a scan, and
        #: a scan makes the write buffer flush mid-batch (every transition asked it before)
        self.listened: dict[str, bool] = {}
        #: (db, key) -> (the bytes an op put, the record they encode): what a store with a
        #: read cache may keep after the commit instead of dropping the key (write-through;
        #: kept only if those bytes are still the key's last write of the transaction)
        self.fresh: dict[tuple[str, bytes], tuple[bytes, Any]] = {}
        self.now = now
        self.put: Callable[[str, bytes, bytes], None] = txn.put      # bound: one call per put
        self.delete: Callable[[str, bytes], bool] = txn.delete

    @property
    def writes(self) -> int:
        """Puts and deletes so far (the backend's txn counts them)."""
        return self.txn.writes

    def job(self, job_id: str) -> Job:
        """The job for changing (cached for this transaction; counts as a write)."""
        j = self.jobs.get(job_id)
        if j is None:
            raw = self.txn.get("jobs", _e(job_id))
            if raw is None:
                raise NotFound("job", job_id)
            j = self.jobs[job_id] = dec(Job, raw, "jobs", _e(job_id))
        return j

    def finish(self) -> None:
        for jid, j in self.jobs.items():
            self.txn.put("jobs", _e(jid), _enc.encode(j))
        self.jobs.clear()

    def next_seq(self, name: bytes) -> int:
        raw = self.txn.get("meta", name)
        n = (int.from_bytes(raw, "big") if raw else 0) + 1
        self.put("meta", name, u64(n))
        return n


Op = Callable[[WriteCtx], R]
_TASK_DEC = msgspec.msgpack.Decoder(Task)


# --- index helpers ------------------------------------------------------------------------


def _device_index(d: Device) -> list[tuple[str, bytes, bytes]]:
    did = _e(d.dev_id)
    out = []
    if d.msisdn:
        out.append(("dev_msisdn", _e(d.msisdn), did))
    if d.imei:
        out.append(("dev_imei", _e(d.imei), did))
        out.append(("dev_tac", _e(d.imei[:8]) + SEP + did, EMPTY))
    if d.capability:
        out.append(("dev_cap", _e(d.capability) + SEP + did, EMPTY))
    return out


def _task_index(t: Task) -> list[tuple[str, bytes, bytes]]:
    tid = _e(t.task_id)
    seq = u64(t.seq)
    out = [("task_dev", _e(t.dev_id) + SEP + seq, tid)]
    if t.job_id:
        j = _e(t.job_id)
        out.append(("task_job", j + SEP + seq, tid))
        out.append(("task_jstate", j + SEP + _e(t.state) + SEP + seq, tid))
    if t.correlator:
        out.append(("task_corr", _e(t.correlator), tid))
    if t.state not in FINAL_TASK_STATES:
        if t.next_attempt is not None:
            out.append(("task_due", us(t.next_attempt) + tid, EMPTY))
        if t.deadline is not None:
            out.append(("task_dl", us(t.deadline) + tid, EMPTY))
    return out


def _job_state_key(state: JobState | str, job_id: str) -> bytes:
    return _e(JobState(state)) + SEP + _e(job_id)


def _reindex(ctx: WriteCtx, old: list[tuple[str, bytes, bytes]],
             new: list[tuple[str, bytes, bytes]]) -> None:
    if old == new:
        return
    oldk = {(db, k): v for db, k, v in old}
    newk = {(db, k): v for db, k, v in new}
    for dk in oldk.keys() - newk.keys():
        ctx.delete(dk[0], dk[1])
    for dk, v in newk.items():
        if oldk.get(dk) != v:
            ctx.put(dk[0], dk[1], v)


def _replace_imported(ctx: WriteCtx, key: bytes, raw: bytes, data: bytes
                      ) -> tuple[bytes, bytes | None, bytes | None]:
    """An imported device over a stored one: it keeps its creation time, its index rows
    follow.  Returns (record bytes, old msisdn, old imei) for ``_kv.import_chunk``."""
    old = dec(Device, raw, "devices", key)
    dev = dec(Device, data, "devices", key)
    dev = msgspec.structs.replace(dev, created=old.created or dev.created, updated=ctx.now,
                                  version=old.version + 1)
    _reindex(ctx, _device_index(old), _device_index(dev))
    return (_enc.encode(dev), _e(old.msisdn) if old.msisdn else None,
            _e(old.imei) if old.imei else None)


def _device_matcher(q: DeviceQuery, checked: str
                    ) -> Callable[[bytes, bytes], Device | None]:
    """``match(raw, key)`` → the decoded device if it passes every filter of ``q`` that the
    index read (``checked``) does not guarantee, else None.  A string filter is first looked
    for in the raw bytes (msgpack keeps strings as they are), so most records that fail are
    never decoded."""
    cap = q.capability if checked != "dev_cap" else None
    model_, fw = q.model, q.firmware
    after, before = q.contact_after, q.contact_before
    needles = [_e(x) for x in (cap, model_, fw) if x]
    if cap is None and model_ is None and fw is None and after is None and before is None:
        return lambda raw, key: dec(Device, raw, "devices", key)

    def match(raw: bytes, key: bytes) -> Device | None:
        for nd in needles:
            if nd not in raw:
                return None
        d = dec(Device, raw, "devices", key)
        if cap is not None and d.capability != cap:
            return None
        if model_ is not None and d.devinfo.get("./DevInfo/Mod") != model_:
            return None
        if fw is not None and d.devdetail.get("./DevDetail/FwV") != fw:
            return None
        if after is not None or before is not None:
            lc = d.last_contact
            if lc is None or (after is not None and lc < after) or \
                    (before is not None and lc >= before):
                return None
        return d
    return match


def _check_unique(txn: KVTxn, d: Device) -> None:
    """MSISDN and IMEI must not belong to another device."""
    if d.msisdn:
        owner = txn.get("dev_msisdn", _e(d.msisdn))
        if owner is not None and owner != _e(d.dev_id):
            raise AlreadyExists("msisdn", d.msisdn)
    if d.imei:
        owner = txn.get("dev_imei", _e(d.imei))
        if owner is not None and owner != _e(d.dev_id):
            raise AlreadyExists("imei", d.imei)


def _count(job: Job, task: Task, state: TaskState, delta: int) -> None:
    counts = job.test_counts if task.test_cycle else job.counts
    n = counts.get(state, 0) + delta
    if n:
        counts[state] = n
    else:
        counts.pop(state, None)


_TASK_PROTECTED = frozenset({"task_id", "seq", "version", "history_len", "state", "created",
                             "job_id", "dev_id"})
_JOB_PROTECTED = frozenset({"job_id", "total", "counts", "test_counts", "created"})
_DEV_PROTECTED = frozenset({"dev_id", "created", "version"})
_CAP_PROTECTED = frozenset({"oid", "created"})
_CONTENT_PROTECTED = frozenset({"content_id", "created"})
_KEY_PROTECTED = frozenset({"key_id", "key_hash", "created"})
_USER_PROTECTED = frozenset({"name", "created"})


_ENDED_JOB_STATES = frozenset({JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED})


def _plain_changes(changes: Mapping[str, Any]) -> bool:
    """Transition changes the Cython op makes itself: ``next_attempt`` (None or a time >= 0)
    and ``attempts`` (an int >= 0), values checked here."""
    for k, v in changes.items():
        if k == "next_attempt":
            if v is not None and (type(v) not in (float, int) or not v >= 0):
                return False
        elif k == "attempts":
            if type(v) is not int or v < 0:
                return False
        else:
            return False
    return True


def _hash_key(hex_hash: str, *, lookup: bool = False) -> bytes:
    """A SHA-256 given as hex → its 32 bytes (the key of ``api_key_hash`` and ``sessions``).
    For a lookup a malformed one is b"" (found nowhere); for a write it is refused."""
    try:
        h = bytes.fromhex(hex_hash) if isinstance(hex_hash, str) else b""
    except ValueError:
        h = b""
    if len(h) != 32:
        if lookup:
            return b""
        raise ValidationError("not a SHA-256 (64 hex digits)", where="$.key_hash")
    return h


def _take(it: Iterable[R], n: int) -> list[R]:
    out: list[R] = []
    for x in it:
        if len(out) == n:
            break
        out.append(x)
    return out


# --- events (outbox entries the store writes itself) -------------------------------------------


def _subscribed(txn: KVTxn, topic: str) -> bool:
    """Whether some subscription listens to ``topic`` (one seek in ``sub_topic``)."""
    p = _e(topic) + SEP
    for _ in txn.scan("sub_topic", p, prefix_end(p)):
        return True
    return False


def _listened(ctx: WriteCtx, topic: str) -> bool:
    """:func:`_subscribed`, asked once per write transaction (the scan makes the write
    buffer flush); subscription writes forget the answer."""
    known = ctx.listened.get(topic)
    if known is None:
        known = ctx.listened[topic] = _subscribed(ctx.txn, topic)
    return known


def _charging_record(e: OutboxEntry, now: float) -> ChargingEvent:
    """The charging-log record of a ``charging`` entry: its payload as a ChargingEvent whose
    ``event_id`` is the entry's id (``time``: the payload's, else the entry's creation)."""
    d = dict(e.payload)
    d["event_id"] = e.entry_id
    t = d.get("time") or e.created or now
    d["time"] = t
    try:
        rec = msgspec.convert(d, ChargingEvent)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"charging payload: {exc}",
                              where=(model.where_of(exc) or "$").replace("$", "$.payload", 1)
                              ) from None
    model.check_ids(rec)            # (convert checked the rest)
    return rec


#: a job's progress events come at each tenth of its targets
PROGRESS_STEPS = 10


def _final_count(job: Job) -> int:
    return sum(n for s, n in job.counts.items() if s in FINAL_TASK_STATES) + \
        sum(n for s, n in job.test_counts.items() if s in FINAL_TASK_STATES)


def _job_progress(ctx: WriteCtx, job: Job) -> None:
    """After one more of the job's tasks became final: a ``job.progress`` event when the
    final count crossed a tenth of the job's targets."""
    targets = max(job.targets, job.total)
    if not targets:
        return
    after = _final_count(job)
    step = after * PROGRESS_STEPS // targets
    if step > (after - 1) * PROGRESS_STEPS // targets:
        _job_event(ctx, job, "job.progress", percent=min(100, step * 100 // PROGRESS_STEPS),
                   final=after)


def _job_event(ctx: WriteCtx, job: Job, kind: str, **extra: Any) -> None:
    """Queues a job event (only while a ``job`` subscription exists)."""
    if not _listened(ctx, "job"):
        return
    payload: dict[str, Any] = {
        "type": kind, "time": ctx.now, "job_id": job.job_id, "state": str(job.state),
        "owner": job.owner, "name": job.name, "targets": job.targets, "total": job.total,
        "counts": {str(k): v for k, v in job.counts.items()},
        "test_counts": {str(k): v for k, v in job.test_counts.items()},
        "cause": job.cause, **extra}
    e = OutboxEntry(entry_id=model.new_id("ev"), kind="webhook", topic="job", due=ctx.now,
                    payload=payload, created=ctx.now)
    key = _e(e.entry_id)
    ctx.put("outbox", key, _enc.encode(e))
    ctx.put("outbox_due", us(e.due) + key, EMPTY)


# --- the shared store -----------------------------------------------------------------------


class KVStore(Store):
    """:class:`Store` over ``_write``/``_read`` (see the module docstring)."""

    #: pages larger than this are read off the event loop (LMDB backend)
    inline_read_limit = 200

    @abc.abstractmethod
    async def _write(self, op: Op[R], prefetch: tuple[str, bytes] | None = None) -> R:
        """Runs ``op`` in a write transaction; ``prefetch`` names a (db, key) the op will read,
        so a batching backend can read many in one call."""

    @abc.abstractmethod
    async def _read(self, fn: Callable[[KVTxn], R], big: bool = False) -> R:
        """Runs ``fn`` in a read transaction (off the event loop when ``big``)."""

    @abc.abstractmethod
    def _read_now(self, fn: Callable[[KVTxn], R]) -> R:
        """Runs a small ``fn`` in a read transaction on the calling thread (no await)."""

    # --- generic record helpers ---------------------------------------------------------

    async def _get(self, db: str, cls: type[R], key: str, kind: str) -> R:
        k = _e(key)
        if len(k) > MAX_KEY:
            raise NotFound(kind, key)

        def fn(txn: KVTxn) -> R:
            raw = txn.get(db, k)
            if raw is None:
                raise NotFound(kind, key)
            return dec(cls, raw, db, k)
        return await self._read(fn)

    async def _by_index(self, idx: str, key: str, db: str, cls: type[R], kind: str) -> R:
        k = _e(key)
        if len(k) > MAX_KEY:
            raise NotFound(kind, key)

        def fn(txn: KVTxn) -> R:
            rid = txn.get(idx, k)
            if rid is None:
                raise NotFound(kind, key)
            raw = txn.get(db, rid)
            if raw is None:
                raise NotFound(kind, key)
            return dec(cls, raw, db, rid)
        return await self._read(fn)

    async def _page_of_records(self, db: str, cls: type[R], cursor: str | None,
                               limit: int) -> Page[R]:
        check_limit(limit)

        def fn(txn: KVTxn) -> Page[R]:
            rows, nxt = scan_page(txn, db, b"", cursor, limit)
            return Page([dec(cls, v, db, k) for k, v in rows], nxt)
        return await self._read(fn, big=limit > self.inline_read_limit)

    async def _page_via_index(self, idx: str, prefix: bytes, db: str, cls: type[R],
                              cursor: str | None, limit: int, *, id_in_key: bool) -> Page[R]:
        """Index rows under ``prefix`` → records.  ``id_in_key``: the record id is the key part
        after ``prefix`` (``…\\0id → ""``), else the row's value."""
        check_limit(limit)
        n = len(prefix)

        def fn(txn: KVTxn) -> Page[R]:
            rows, nxt = scan_page(txn, idx, prefix, cursor, limit)
            out = []
            for k, v in rows:
                rid = k[n:] if id_in_key else v
                raw = txn.get(db, rid)
                if raw is not None:
                    out.append(dec(cls, raw, db, rid))
            return Page(out, nxt)
        return await self._read(fn, big=limit > self.inline_read_limit)

    async def _due(self, idx: str, db: str, cls: type[R], now: float, limit: int) -> list[R]:
        check_limit(limit)
        hi = us(now) + b"\xff"

        def fn(txn: KVTxn) -> list[R]:
            out: list[R] = []
            for k, _ in txn.scan(idx, b"", hi):
                if len(out) == limit:
                    break
                if k[:8] > us(now):
                    break
                rid = k[8:]
                raw = txn.get(db, rid)
                if raw is not None:
                    out.append(dec(cls, raw, db, rid))
            return out
        return await self._read(fn, big=limit > self.inline_read_limit)

    # --- devices ----------------------------------------------------------------------------

    def _put_device_op(self, dev: Device, *, mode: str) -> Op[Device]:
        """mode: "create" | "put" | "replace" (must exist)."""
        model.validate(dev)
        key = _e(dev.dev_id)

        def op(ctx: WriteCtx) -> Device:
            txn = ctx.txn
            raw = txn.get("devices", key)
            if raw is not None and mode == "create":
                raise AlreadyExists("device", dev.dev_id)
            if raw is None and mode == "replace":
                raise NotFound("device", dev.dev_id)
            _check_unique(txn, dev)
            old = dec(Device, raw, "devices", key) if raw is not None else None
            d = msgspec.structs.replace(
                dev, created=(old.created if old is not None and old.created else
                              (dev.created or ctx.now)), updated=ctx.now,
                version=old.version + 1 if old is not None else 0)
            ctx.put("devices", key, _enc.encode(d))
            _reindex(ctx, _device_index(old) if old is not None else [], _device_index(d))
            return d
        return op

    async def create_device(self, dev: Device) -> Device:
        return await self._write(self._put_device_op(dev, mode="create"))

    async def put_device(self, dev: Device) -> Device:
        return await self._write(self._put_device_op(dev, mode="put"))

    async def update_device(self, dev_id: str, changes: Mapping[str, Any], *,
                            expect_version: int | None = None) -> Device:
        return await self._write(self._update_device_op(dev_id, changes, expect_version))

    async def update_device_and_move(self, dev_id: str, device_changes: Mapping[str, Any],
                                     task_id: str, to_state: TaskState, *, cause: str,
                                     dm_status: int | None = None,
                                     result_code: int | None = None,
                                     expect_state: TaskState | None = None,
                                     changes: Mapping[str, Any] | None = None,
                                     enqueue: Sequence[OutboxEntry] = (),
                                     waypoint: Waypoint | None = None
                                     ) -> tuple[Device, Task | StoreError]:
        """A device update and a move of one of its tasks (``transition``'s arguments) in one
        write op: a session's first message writes the device — its rotated nonces, DevInfo,
        last contact — and starts the task it came for, or ends the one whose result alert it
        carries: one op and one commit to wait for, not two.  The move's refusal (NotFound,
        Conflict, InvalidTransition: the task was cancelled or moved meanwhile) is returned
        in its place, not raised, so the device update is written whatever becomes of the
        move; a move raises before its first write."""
        dev_op = self._update_device_op(dev_id, device_changes, None)
        move = self._move_op(task_id, to_state, cause, dm_status, result_code, expect_state,
                             changes, enqueue)
        if waypoint is not None:
            move = self._through(task_id, waypoint, move)

        def op(ctx: WriteCtx) -> tuple[Device, Task | StoreError]:
            d = dev_op(ctx)
            try:
                return d, move(ctx)
            except (NotFound, Conflict, InvalidTransition) as exc:
                return d, exc
        return await self._write(op, ("tasks", task_id.encode()))

    def _update_device_op(self, dev_id: str, changes: Mapping[str, Any],
                          expect_version: int | None) -> Op[Device]:
        key = _e(dev_id)
        changes = dict(changes)
        bad = _DEV_PROTECTED.intersection(changes)
        if bad:
            f = sorted(bad)[0]
            raise ValidationError(f"{f} cannot be changed", where=f"$.{f}")

        acc_patch = changes.get("account")
        if isinstance(acc_patch, Mapping):
            acc_patch = dict(acc_patch)
            known = set(DmAccount.__struct_fields__)
            for f in sorted(acc_patch):
                if f not in known:
                    raise ValidationError(f"DmAccount has no field {f!r}",
                                          where=f"$.account.{f}")

        def op(ctx: WriteCtx) -> Device:
            raw = ctx.txn.get("devices", key)
            if raw is None:
                raise NotFound("device", dev_id)
            old = dec(Device, raw, "devices", key)
            if expect_version is not None and old.version != expect_version:
                raise Conflict("device", dev_id, f"device {dev_id!r} is at version "
                                                 f"{old.version}, not {expect_version}")
            ch = changes
            if isinstance(acc_patch, dict):
                # merged with the account as stored in this transaction: a nonce a session
                # saved meanwhile is kept
                fields = msgspec.structs.asdict(old.account) if old.account is not None else {}
                fields.update(acc_patch)
                fields = {k: v for k, v in fields.items() if v is not None}
                if "server_id" not in fields:
                    raise ValidationError("a new DM account needs server_id",
                                          where="$.account.server_id")
                ch = {**changes, "account": DmAccount(**fields)}
            d = replace_fields(old, ch, _DEV_PROTECTED)
            d = msgspec.structs.replace(d, updated=ctx.now, version=old.version + 1)
            data = model.validate(d)
            _check_unique(ctx.txn, d)
            ctx.put("devices", key, data)
            # the device's next read (its session's next message) need not decode it again
            ctx.fresh[("devices", key)] = (data, d)
            _reindex(ctx, _device_index(old), _device_index(d))
            return d
        return op

    async def get_device(self, dev_id: str) -> Device:
        return await self._get("devices", Device, dev_id, "device")

    async def get_devices(self, dev_ids: Sequence[str]) -> dict[str, Device]:
        keys = [k for k in map(_e, dev_ids) if len(k) <= MAX_KEY]

        def fn(txn: KVTxn) -> dict[str, Device]:
            return {k.decode(): dec(Device, raw, "devices", k)
                    for k, raw in txn.get_many("devices", keys).items()}
        # a pass's batch (up to job_batch, 5,000) off the loop when large, as pages are
        return await self._read(fn, big=len(keys) > self.inline_read_limit)

    async def _delete(self, db: str, cls: type[R], ident: str, kind: str,
                      unindex: Callable[[WriteCtx, R], None]) -> None:
        """Deletes one record and, through ``unindex``, its index rows (NotFound if absent)."""
        key = _e(ident)

        def op(ctx: WriteCtx) -> None:
            raw = ctx.txn.get(db, key)
            if raw is None:
                raise NotFound(kind, ident)
            old = dec(cls, raw, db, key)
            ctx.delete(db, key)
            unindex(ctx, old)
        await self._write(op)

    async def delete_device(self, dev_id: str) -> None:
        await self._delete("devices", Device, dev_id, "device",
                           lambda ctx, old: _reindex(ctx, _device_index(old), []))

    async def device_by_msisdn(self, msisdn: str) -> Device:
        return await self._by_index("dev_msisdn", msisdn, "devices", Device, "device with msisdn")

    async def device_by_imei(self, imei: str) -> Device:
        return await self._by_index("dev_imei", imei, "devices", Device, "device with imei")

    async def devices_by_tac(self, tac: str, *, cursor: str | None = None,
                             limit: int = DEFAULT_PAGE) -> Page[Device]:
        return await self._page_via_index("dev_tac", _e(tac) + SEP, "devices", Device, cursor,
                                          limit, id_in_key=True)

    async def devices_by_capability(self, oid: str, *, cursor: str | None = None,
                                    limit: int = DEFAULT_PAGE) -> Page[Device]:
        return await self._page_via_index("dev_cap", _e(oid) + SEP, "devices", Device, cursor,
                                          limit, id_in_key=True)

    async def list_devices(self, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[Device]:
        return await self._page_of_records("devices", Device, cursor, limit)

    async def query_devices(self, query: DeviceQuery, *, cursor: str | None = None,
                            limit: int = DEFAULT_PAGE,
                            scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[Device]:
        return await self._query_devices(query, cursor, limit, scan_limit, ids_only=False)

    async def query_device_ids(self, query: DeviceQuery, *, cursor: str | None = None,
                               limit: int = DEFAULT_PAGE,
                               scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[str]:
        return await self._query_devices(query, cursor, limit, scan_limit, ids_only=True)

    async def _query_devices(self, query: DeviceQuery, cursor: str | None, limit: int,
                             scan_limit: int, *, ids_only: bool) -> Page[Any]:
        check_limit(limit)
        if not isinstance(scan_limit, int) or scan_limit < 1:
            raise ValidationError(f"scan_limit must be >= 1, got {scan_limit!r}",
                                  where="scan_limit")
        budget = max(scan_limit, limit)
        if query.tac is not None:
            if len(query.tac) != 8 or not query.tac.isdigit():
                raise ValidationError(f"a TAC is 8 digits, got {query.tac!r}", where="tac")
            idx, prefix, tag = "dev_tac", _e(query.tac) + SEP, b"t"
        elif query.capability is not None:
            idx, prefix, tag = "dev_cap", _e(query.capability) + SEP, b"c"
        else:
            idx, prefix, tag = "devices", EMPTY, b"d"
        if len(prefix) > MAX_KEY:
            return Page([], None)
        match = _device_matcher(query, checked=idx)
        start, end = prefix, prefix_end(prefix)
        if cursor is not None:
            ck = decode_cursor(cursor)
            if ck[:1] != tag or not ck[1:].startswith(prefix):
                raise ValidationError("cursor does not belong to this query", where="cursor")
            start = ck[1:] + b"\x00"
        n = len(prefix)
        via_index = idx != "devices"
        # ids of an index that decides the query alone: the records are never read
        index_only = ids_only and via_index and query.model is None and \
            query.firmware is None and query.contact_after is None and \
            query.contact_before is None and (idx == "dev_cap" or query.capability is None)

        def fn(txn: KVTxn) -> Page[Any]:
            out: list[Any] = []
            scanned = 0
            last = b""
            for k, v in txn.scan(idx, start, end):
                if len(out) == limit or scanned == budget:
                    return Page(out, encode_cursor(tag + last))
                scanned += 1
                last = k
                if index_only:
                    out.append(k[n:].decode())
                    continue
                if via_index:
                    rid = k[n:]
                    raw = txn.get("devices", rid)
                    if raw is None:
                        continue
                else:
                    rid, raw = k, v
                d = match(raw, rid)
                if d is not None:
                    out.append(d.dev_id if ids_only else d)
            return Page(out, None)
        return await self._read(fn, big=budget > self.inline_read_limit)

    async def import_devices(self, devices: Iterable[Device], *, replace: bool = True,
                             chunk: int = DEFAULT_IMPORT_CHUNK) -> ImportReport:
        report = ImportReport()
        batch: list[tuple[Any, ...]] = []
        # one chunk is written while the next is validated (the writer thread runs the LMDB
        # work and the fsync without the GIL); chunks commit in order, each one sees the last
        in_flight: Any = None
        try:
            now = time.time()
            for i, dev in enumerate(devices):
                if dev.__class__ is not Device:
                    report.rejected.append((i, "$", f"expected a Device, got "
                                                    f"{type(dev).__name__}"))
                    continue
                if not dev.created:   # stamped before validation: its bytes are final here
                    dev = msgspec.structs.replace(dev, created=now, updated=now)
                try:
                    data = model.validate(dev)
                except ValidationError as exc:
                    report.rejected.append((i, exc.where, str(exc)))
                    continue
                batch.append(import_row(i, dev, data))
                if len(batch) >= chunk:
                    nxt = await self._submit(self._import_op(batch, replace))
                    if in_flight is not None:
                        self._tally(report, await in_flight)
                    in_flight, batch = nxt, []
                    now = time.time()
            if batch:
                nxt = await self._submit(self._import_op(batch, replace))
                if in_flight is not None:
                    self._tally(report, await in_flight)
                in_flight = nxt
            if in_flight is not None:
                fut, in_flight = in_flight, None
                self._tally(report, await fut)
        finally:
            if in_flight is not None:     # the caller's iterator failed: still wait for it
                await asyncio.wait([in_flight])
        return report

    async def _submit(self, op: Op[R]) -> "asyncio.Future[R]":
        """Queues ``op`` and returns its future without waiting for it (a backend whose
        ``_write`` is a coroutine, the memory store, runs it right here, as ``await`` would)."""
        w = self._write(op)
        if asyncio.isfuture(w):
            return w
        f: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            f.set_result(await w)
        except Exception as exc:
            f.set_exception(exc)
        return f

    @staticmethod
    def _tally(report: ImportReport, res: Any) -> None:
        # counted after the commit: a replayed transaction must not count twice
        report.created += res[0]
        report.replaced += res[1]
        report.rejected.extend(res[2])

    def _import_op(self, rows: list[tuple[Any, ...]], replace: bool) -> Op[Any]:
        def op(ctx: WriteCtx) -> tuple[int, int, list[tuple[int, str | None, str]]]:
            return import_chunk(ctx, rows, replace, _replace_imported)   # store/_kv.pyx
        return op

    # --- capabilities ------------------------------------------------------------------------

    def _cap_write(self, cap: Capability, mode: str,
                   changes: Mapping[str, Any] | None = None) -> Op[Capability]:
        """mode "create" | "put" | "replace"; with ``changes`` they apply to the stored record
        inside the transaction (no lost update between read and write)."""
        if changes is None:
            model.validate(cap)
        else:
            changes = dict(changes)
            replace_fields(cap, changes, _CAP_PROTECTED)     # refuses protected/unknown early
        key = _e(cap.oid)

        def op(ctx: WriteCtx) -> Capability:
            txn = ctx.txn
            raw = txn.get("caps", key)
            if raw is not None and mode == "create":
                raise AlreadyExists("capability", cap.oid)
            if raw is None and mode == "replace":
                raise NotFound("capability", cap.oid)
            old = dec(Capability, raw, "caps", key) if raw is not None else None
            new = cap
            if changes is not None and old is not None:
                new = replace_fields(old, changes, _CAP_PROTECTED)
                model.validate(new)
            for tac in new.tacs:
                owner = txn.get("cap_tac", _e(tac))
                if owner is not None and owner != key:
                    raise AlreadyExists("tac", tac)
            c = msgspec.structs.replace(new, created=old.created if old else (new.created or ctx.now),
                                        updated=ctx.now)
            ctx.put("caps", key, _enc.encode(c))
            _reindex(ctx, [("cap_tac", _e(t), key) for t in old.tacs] if old else [],
                     [("cap_tac", _e(t), key) for t in c.tacs])
            return c
        return op

    async def create_capability(self, cap: Capability) -> Capability:
        return await self._write(self._cap_write(cap, "create"))

    async def put_capability(self, cap: Capability) -> Capability:
        return await self._write(self._cap_write(cap, "put"))

    async def update_capability(self, oid: str, changes: Mapping[str, Any]) -> Capability:
        return await self._write(self._cap_write(Capability(oid=oid), "replace", changes))

    async def get_capability(self, oid: str) -> Capability:
        return await self._get("caps", Capability, oid, "capability")

    async def delete_capability(self, oid: str) -> None:
        def unindex(ctx: WriteCtx, old: Capability) -> None:
            for t in old.tacs:
                ctx.delete("cap_tac", _e(t))
        await self._delete("caps", Capability, oid, "capability", unindex)

    async def capability_by_tac(self, tac: str) -> Capability:
        return await self._by_index("cap_tac", tac, "caps", Capability, "capability with tac")

    async def list_capabilities(self, *, cursor: str | None = None,
                                limit: int = DEFAULT_PAGE) -> Page[Capability]:
        return await self._page_of_records("caps", Capability, cursor, limit)

    # --- jobs --------------------------------------------------------------------------------

    async def create_job(self, job: Job) -> Job:
        job = msgspec.structs.replace(job, total=0, counts={}, test_counts={})
        model.validate(job)
        key = _e(job.job_id)

        def op(ctx: WriteCtx) -> Job:
            if ctx.txn.get("jobs", key) is not None:
                raise AlreadyExists("job", job.job_id)
            j = msgspec.structs.replace(job, created=job.created or ctx.now, updated=ctx.now)
            ctx.put("jobs", key, _enc.encode(j))
            ctx.put("job_date", us(j.created) + key, EMPTY)
            ctx.put("job_state", _job_state_key(j.state, job.job_id), EMPTY)
            return j
        return await self._write(op)

    async def get_job(self, job_id: str) -> Job:
        return await self._get("jobs", Job, job_id, "job")

    async def update_job(self, job_id: str, changes: Mapping[str, Any], *,
                         expect_state: JobState | None = None) -> Job:
        changes = dict(changes)
        bad = _JOB_PROTECTED.intersection(changes)
        if bad:
            f = sorted(bad)[0]
            raise ValidationError(f"{f} cannot be changed", where=f"$.{f}")

        def op(ctx: WriteCtx) -> Job:
            cur = ctx.txn.get("jobs", _e(job_id))
            if cur is None:
                raise NotFound("job", job_id)
            # validate against the stored record before touching the cached one
            probe = replace_fields(dec(Job, cur, "jobs"), changes, _JOB_PROTECTED)
            model.validate(probe)
            j = ctx.job(job_id)      # the cached one carries this transaction's counter moves
            if expect_state is not None and j.state != expect_state:
                raise Conflict("job", job_id, f"job {job_id!r} is {j.state}, not {expect_state}")
            before = j.state
            for k, v in changes.items():
                setattr(j, k, v)
            j.updated = ctx.now
            if j.state != before:
                ctx.delete("job_state", _job_state_key(before, job_id))
                ctx.put("job_state", _job_state_key(j.state, job_id), EMPTY)
                _job_event(ctx, j, "job.state", previous=str(before))
            return dec(Job, _enc.encode(j))    # a copy: later ops may move the counters
        return await self._write(op)

    async def list_jobs(self, *, state: JobState | None = None, cursor: str | None = None,
                        limit: int = DEFAULT_PAGE) -> Page[Job]:
        if state is None:
            return await self._page_of_records("jobs", Job, cursor, limit)
        # through the state index: the cost follows the jobs in that state, not every job
        # stored (a scheduler pass lists the open ones while thousands are long finished)
        try:
            prefix = _job_state_key(state, "")
        except ValueError:
            raise ValidationError(f"no job state {state!r}", where="state") from None
        return await self._page_via_index("job_state", prefix, "jobs", Job, cursor, limit,
                                          id_in_key=True)

    async def jobs_by_date(self, start: float, end: float, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[Job]:
        check_limit(limit)

        def fn(txn: KVTxn) -> Page[Job]:
            rows, nxt = scan_page(txn, "job_date", b"", cursor, limit, lo=us(max(start, 0)),
                                  hi=us(max(end, 0)))
            out = []
            for k, _ in rows:
                raw = txn.get("jobs", k[8:])
                if raw is not None:
                    out.append(dec(Job, raw, "jobs", k[8:]))
            return Page(out, nxt)
        return await self._read(fn, big=limit > self.inline_read_limit)

    async def add_job_targets(self, job_id: str, dev_ids: Sequence[str]) -> int:
        jkey = _e(job_id)
        ids = [_e(d) for d in dev_ids]

        def op(ctx: WriteCtx) -> int:
            j = ctx.job(job_id)                  # NotFound before any write
            n = j.targets
            for i, did in enumerate(ids):
                ctx.put("job_targets", jkey + SEP + u64(n + i), did)
                ctx.put("dev_targets", did + SEP + jkey, u64(n + i))
            j.targets = n + len(ids)
            j.updated = ctx.now
            return j.targets
        return await self._write(op)

    async def job_targets(self, job_id: str, start: int, limit: int) -> list[str]:
        check_limit(limit)
        if not isinstance(start, int) or start < 0:
            raise ValidationError(f"start must be >= 0, got {start!r}", where="start")
        prefix = _e(job_id) + SEP

        def fn(txn: KVTxn) -> list[str]:
            out: list[str] = []
            for _k, v in txn.scan("job_targets", prefix + u64(start), prefix + b"\xff" * 8):
                out.append(v.decode())
                if len(out) == limit:
                    break
            if not out and txn.get("jobs", _e(job_id)) is None:
                raise NotFound("job", job_id)
            return out
        return await self._read(fn, big=limit > self.inline_read_limit)

    async def create_job_tasks(self, job_id: str, expect_total: int,
                               tasks: Sequence[Task], *,
                               moves: Mapping[str, Waypoint] | None = None) -> list[Task]:
        for i, t in enumerate(tasks):
            if t.job_id != job_id:
                raise ValidationError(f"tasks[{i}] is not of job {job_id}", where=f"$[{i}].job_id")
            model.validate(t)
        then: dict[str, Op[Task]] = {}
        if moves:
            ids = {t.task_id for t in tasks}
            for task_id, move in moves.items():
                if task_id not in ids:
                    raise ValidationError(f"moves names task {task_id!r}, not one of these",
                                          where="$.moves")
                then[task_id] = self._waypoint_op(task_id, move)

        def op(ctx: WriteCtx) -> list[Task]:
            j = ctx.job(job_id)
            if j.total != expect_total:
                raise Conflict("job", job_id, f"job {job_id!r} has {j.total} tasks, "
                                              f"not {expect_total}: another claimer made them")
            if j.state != JobState.RUNNING:
                raise Conflict("job", job_id, f"job {job_id!r} is {j.state}, not RUNNING")
            for t in tasks:
                if ctx.txn.get("tasks", _e(t.task_id)) is not None:
                    raise AlreadyExists("task", t.task_id)
            jkey = _e(job_id)
            out = []
            for t in tasks:
                made = self._create_task_body(ctx, t)
                move = then.get(t.task_id)
                out.append(made if move is None else move(ctx))
                ctx.delete("dev_targets", _e(t.dev_id) + SEP + jkey)
            return out
        return await self._write(op)

    async def has_subscribers(self, topic: str) -> bool:
        return await self._read(lambda txn: _subscribed(txn, topic))

    async def pending_job_targets(self, dev_id: str) -> list[str]:
        prefix = _e(dev_id) + SEP
        if len(prefix) > MAX_KEY:
            return []

        def fn(txn: KVTxn) -> list[str]:
            return [k[len(prefix):].decode()
                    for k, _ in txn.scan("dev_targets", prefix, prefix_end(prefix))]
        return await self._read(fn)

    async def start_job_target(self, job_id: str, task: Task, boundary: int) -> Task | None:
        if task.job_id != job_id:
            raise ValidationError(f"the task is not of job {job_id}", where="$.job_id")
        model.validate(task)
        jkey, dkey = _e(job_id), _e(task.dev_id)

        def op(ctx: WriteCtx) -> Task | None:
            raw = ctx.txn.get("dev_targets", dkey + SEP + jkey)
            if raw is None:
                return None
            j = ctx.job(job_id)
            if j.state in _ENDED_JOB_STATES:      # it will never be made: forget it
                ctx.delete("dev_targets", dkey + SEP + jkey)
                return None
            if j.state != JobState.RUNNING or j.total >= min(boundary, j.targets):
                return None
            pos, nxt = int.from_bytes(raw, "big"), j.total
            if pos < nxt:          # made already (an index entry left behind): forget it
                ctx.delete("dev_targets", dkey + SEP + jkey)
                return None
            if pos != nxt:         # trade places with the next target to be made
                other = ctx.txn.get("job_targets", jkey + SEP + u64(nxt))
                if other is None:
                    raise StoreError(f"job {job_id} has no target {nxt}")
                ctx.put("job_targets", jkey + SEP + u64(pos), other)
                ctx.put("job_targets", jkey + SEP + u64(nxt), dkey)
                ctx.put("dev_targets", other + SEP + jkey, u64(pos))
            ctx.delete("dev_targets", dkey + SEP + jkey)
            return self._create_task_body(ctx, task)
        return await self._write(op)

    async def claim_due(self, now: float, limit: int, lease: float) -> list[Task]:
        check_limit(limit)
        hi = us(now) + b"\xff"
        until = us(now + lease)

        def any_due(txn: KVTxn) -> bool:
            for k, _ in txn.scan("task_due", b"", hi):
                return k[:8] <= us(now)
            return False
        if not await self._read(any_due):
            return []        # the common idle pass: no write transaction (nor its latency)

        def op(ctx: WriteCtx) -> list[Task]:
            keys = []
            for k, _ in ctx.txn.scan("task_due", b"", hi):
                if len(keys) == limit or k[:8] > us(now):
                    break
                keys.append(k)
            out = []
            for k in keys:               # reads first: a refusal would write nothing
                rid = k[8:]
                raw = ctx.txn.get("tasks", rid)
                if raw is not None:
                    out.append((k, rid, dec(Task, raw, "tasks", rid)))
            claimed = []
            for k, rid, t in out:
                # the due row moves to the lease's end: no other claimer sees the task until
                # then (a claimer that dies leaves it due again when the lease runs out)
                t = msgspec.structs.replace(t, next_attempt=now + lease, version=t.version + 1,
                                            updated=ctx.now)
                ctx.delete("task_due", k)
                ctx.put("task_due", until + rid, EMPTY)
                ctx.put("tasks", rid, _enc.encode(t))
                claimed.append(t)
            return claimed
        return await self._write(op)

    # --- tasks -------------------------------------------------------------------------------

    def _create_task_body(self, ctx: WriteCtx, task: Task, data_check: None = None) -> Task:
        txn = ctx.txn
        key = _e(task.task_id)
        if txn.get("tasks", key) is not None:
            raise AlreadyExists("task", task.task_id)
        if task.correlator and txn.get("task_corr", _e(task.correlator)) is not None:
            raise AlreadyExists("correlator", task.correlator)
        job = ctx.job(task.job_id) if task.job_id else None   # NotFound before any write
        now = ctx.now
        seq = ctx.next_seq(b"seq:task")
        t = msgspec.structs.replace(task, seq=seq, version=1, history_len=1,
                                    created=task.created or now, updated=now)
        ctx.put("tasks", key, _enc.encode(t))
        for db, k, v in _task_index(t):
            ctx.put(db, k, v)
        h = HistoryEntry(task_id=t.task_id, seq=1, time=now, to_state=t.state, cause=t.cause)
        ctx.put("history", key + SEP + (1).to_bytes(4, "big"), _enc.encode(h))
        if job is not None:
            job.total += 1
            _count(job, t, t.state, +1)
            job.updated = now
        return t

    async def create_task(self, task: Task) -> Task:
        model.validate(task)
        return await self._write(lambda ctx: self._create_task_body(ctx, task))

    async def create_tasks(self, tasks: Sequence[Task]) -> list[Task]:
        for i, t in enumerate(tasks):
            try:
                model.validate(t)
            except ValidationError as exc:
                raise ValidationError(f"tasks[{i}]: {exc}",
                                      where=f"$[{i}]{(exc.where or '$')[1:]}") from None
        seen: set[str] = set()
        for t in tasks:
            if t.task_id in seen:
                raise AlreadyExists("task", t.task_id)
            seen.add(t.task_id)

        def op(ctx: WriteCtx) -> list[Task]:
            for t in tasks:   # checks first, so a refusal writes nothing
                if ctx.txn.get("tasks", _e(t.task_id)) is not None:
                    raise AlreadyExists("task", t.task_id)
                if t.job_id:
                    ctx.job(t.job_id)
            return [self._create_task_body(ctx, t) for t in tasks]
        return await self._write(op)

    async def get_task(self, task_id: str) -> Task:
        return await self._get("tasks", Task, task_id, "task")

    async def update_task(self, task: Task) -> Task:
        model.validate(task)
        key = _e(task.task_id)

        def op(ctx: WriteCtx) -> Task:
            raw = ctx.txn.get("tasks", key)
            if raw is None:
                raise NotFound("task", task.task_id)
            old = dec(Task, raw, "tasks", key)
            if old.version != task.version:
                raise Conflict("task", task.task_id)
            for f in ("state", "seq", "history_len", "job_id", "dev_id", "test_cycle"):
                if getattr(old, f) != getattr(task, f):
                    if f == "state":
                        raise InvalidTransition("task", task.task_id, old.state, task.state)
                    raise ValidationError(f"{f} cannot be changed", where=f"$.{f}")
            if task.correlator and task.correlator != old.correlator:
                owner = ctx.txn.get("task_corr", _e(task.correlator))
                if owner is not None and owner != key:
                    raise AlreadyExists("correlator", task.correlator)
            t = msgspec.structs.replace(task, version=old.version + 1, created=old.created,
                                        updated=ctx.now)
            ctx.put("tasks", key, _enc.encode(t))
            _reindex(ctx, _task_index(old), _task_index(t))
            return t
        return await self._write(op)

    def transition_op(self, task_id: str, to_state: TaskState, *, cause: str | None = None,
                      dm_status: int | None = None, result_code: int | None = None,
                      expect_state: TaskState | None = None,
                      changes: Mapping[str, Any] | None = None,
                      enqueue: Sequence[OutboxEntry] = ()) -> Op[Task]:
        if to_state.__class__ is not TaskState:
            try:
                to_state = TaskState(to_state)
            except ValueError:
                raise ValidationError(f"no task state {to_state!r}", where="$.state") from None
        key = task_id.encode()
        if changes:
            changes = dict(changes)
            bad = _TASK_PROTECTED.intersection(changes)
            if bad:
                f = sorted(bad)[0]
                raise ValidationError(f"{f} cannot be changed by a transition", where=f"$.{f}")
        check_transition_args(to_state, cause, dm_status, result_code)
        entries = [self._outbox_prep_with_record(e) for e in enqueue] if enqueue else ()

        def op(ctx: WriteCtx) -> Task:
            txn = ctx.txn
            raw = txn.get("tasks", key)
            if raw is None:
                raise NotFound("task", task_id)
            try:
                t = _TASK_DEC.decode(raw)         # a fresh object: changed in place below
            except msgspec.DecodeError as exc:
                raise CorruptRecord("tasks", key, str(exc)) from None
            frm = t.state
            if expect_state is not None and frm != expect_state:
                raise Conflict("task", task_id, f"task {task_id!r} is {frm}, not {expect_state}")
            if to_state not in TASK_TRANSITIONS[frm]:
                raise InvalidTransition("task", task_id, frm, to_state)
            now = ctx.now
            n = t.history_len + 1
            if changes:
                old = msgspec.structs.replace(t)
                t = replace_fields(t, changes, _TASK_PROTECTED)
            t.state = to_state
            t.version += 1
            t.history_len = n
            t.updated = now
            if cause is not None:
                t.cause = cause
            if to_state in FINAL_TASK_STATES:
                t.finished = now
            if changes:
                data = model.validate(t)
                if t.correlator and t.correlator != old.correlator:
                    owner = txn.get("task_corr", _e(t.correlator))
                    if owner is not None and owner != key:
                        raise AlreadyExists("correlator", t.correlator)
            else:
                data = _enc.encode(t)
            job_id = t.job_id
            job = ctx.job(job_id) if job_id and frm != to_state else None
            for e, _ in entries:
                if txn.get("outbox", _e(e.entry_id)) is not None:
                    raise AlreadyExists("outbox entry", e.entry_id)
            # --- writes
            ctx.put("tasks", key, data)
            if changes:
                _reindex(ctx, _task_index(old), _task_index(t))
            elif frm != to_state:   # fast path: only the state-dependent index rows move
                if job_id:
                    j = _e(job_id) + SEP
                    sq = SEP + t.seq.to_bytes(8, "big")
                    ctx.delete("task_jstate", j + _e(frm) + sq)
                    ctx.put("task_jstate", j + _e(to_state) + sq, key)
                if to_state in FINAL_TASK_STATES and frm not in FINAL_TASK_STATES:
                    if t.next_attempt is not None:
                        ctx.delete("task_due", us(t.next_attempt) + key)
                    if t.deadline is not None:
                        ctx.delete("task_dl", us(t.deadline) + key)
            h = HistoryEntry(task_id=task_id, seq=n, time=now, from_state=frm, to_state=to_state,
                             cause=cause, dm_status=dm_status, result_code=result_code)
            ctx.put("history", key + SEP + n.to_bytes(4, "big"), _enc.encode(h))
            if job is not None:
                counts = job.test_counts if t.test_cycle else job.counts
                c = counts.get(frm, 0) - 1
                if c:
                    counts[frm] = c
                else:
                    del counts[frm]
                counts[to_state] = counts.get(to_state, 0) + 1
                job.updated = now
                if to_state in FINAL_TASK_STATES and frm not in FINAL_TASK_STATES:
                    _job_progress(ctx, job)
            for e, rec in entries:
                self._outbox_put(ctx, e, rec)
            return t
        return op

    async def transition(self, task_id: str, to_state: TaskState, *, cause: str | None = None,
                         dm_status: int | None = None, result_code: int | None = None,
                         expect_state: TaskState | None = None,
                         changes: Mapping[str, Any] | None = None,
                         enqueue: Sequence[OutboxEntry] = (),
                         waypoint: Waypoint | None = None) -> Task:
        move = self._move_op(task_id, to_state, cause, dm_status, result_code, expect_state,
                             changes, enqueue)
        if waypoint is not None:
            move = self._through(task_id, waypoint, move)
        return await self._write(move, ("tasks", task_id.encode()))  # (what the writer prefetches)

    def _through(self, task_id: str, waypoint: Waypoint, move: Op[Task]) -> Op[Task]:
        """``move`` after the task's move to the ``waypoint`` (state, cause, changes), in one
        op; a refused waypoint raises before either is written."""
        first = self._waypoint_op(task_id, waypoint)

        def op(ctx: WriteCtx) -> Task:
            first(ctx)
            return move(ctx)
        return op

    def _waypoint_op(self, task_id: str, move: Waypoint) -> Op[Task]:
        """The op of a move given as (state, cause, changes): no codes, no expected state, no
        outbox entries (a waypoint; a job task's move made with its creation)."""
        state, cause, changes = move
        return self._move_op(task_id, state, cause, None, None, None, changes, ())

    def _move_op(self, task_id: str, to_state: TaskState, cause: str | None,
                 dm_status: int | None, result_code: int | None,
                 expect_state: TaskState | None, changes: Mapping[str, Any] | None,
                 enqueue: Sequence[OutboxEntry]) -> Op[Task]:
        """The op of a ``transition``."""
        if not enqueue and (not changes or _plain_changes(changes)):
            # the common case — no changes, or only the next attempt and the attempt count
            # (a notification, a session starting): one small Cython op (store/_kv.pyx),
            # same checks and writes, no re-validation of the whole task
            to_state = check_transition_args(to_state, cause, dm_status, result_code)
            return Transition(task_id, to_state, cause, dm_status, result_code, expect_state,
                              changes.get("next_attempt", KEEP) if changes else KEEP,
                              changes.get("attempts") if changes else None)
        return self.transition_op(task_id, to_state, cause=cause, dm_status=dm_status,
                                  result_code=result_code, expect_state=expect_state,
                                  changes=changes, enqueue=enqueue)

    async def tasks_by_job(self, job_id: str, *, state: TaskState | None = None,
                           cursor: str | None = None, limit: int = DEFAULT_PAGE) -> Page[Task]:
        if state is None:
            return await self._page_via_index("task_job", _e(job_id) + SEP, "tasks", Task,
                                              cursor, limit, id_in_key=False)
        prefix = _e(job_id) + SEP + _e(TaskState(state)) + SEP
        return await self._page_via_index("task_jstate", prefix, "tasks", Task, cursor, limit,
                                          id_in_key=False)

    async def tasks_by_device(self, dev_id: str, *, cursor: str | None = None,
                              limit: int = DEFAULT_PAGE) -> Page[Task]:
        return await self._page_via_index("task_dev", _e(dev_id) + SEP, "tasks", Task, cursor,
                                          limit, id_in_key=False)

    async def open_tasks_for_device(self, dev_id: str) -> list[Task]:
        prefix = _e(dev_id) + SEP

        def fn(txn: KVTxn) -> list[Task]:
            out: list[Task] = []
            for _k, tid in txn.scan("task_dev", prefix, prefix + b"\xff"):
                raw = txn.get("tasks", tid)
                if raw is not None:
                    t = dec(Task, raw, "tasks", tid)
                    if t.state not in FINAL_TASK_STATES:
                        out.append(t)
            return out
        return await self._read(fn, big=False)

    async def task_by_correlator(self, correlator: str) -> Task:
        return await self._by_index("task_corr", correlator, "tasks", Task, "task with correlator")

    async def tasks_due(self, now: float, *, limit: int = DEFAULT_PAGE) -> list[Task]:
        return await self._due("task_due", "tasks", Task, now, limit)

    async def tasks_expiring(self, now: float, *, limit: int = DEFAULT_PAGE) -> list[Task]:
        return await self._due("task_dl", "tasks", Task, now, limit)

    async def task_history(self, task_id: str, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[HistoryEntry]:
        check_limit(limit)
        prefix = _e(task_id) + SEP

        def fn(txn: KVTxn) -> Page[HistoryEntry]:
            rows, nxt = scan_page(txn, "history", prefix, cursor, limit)
            if not rows and cursor is None and txn.get("tasks", _e(task_id)) is None:
                raise NotFound("task", task_id)
            return Page([dec(HistoryEntry, v, "history", k) for k, v in rows], nxt)
        return await self._read(fn, big=limit > self.inline_read_limit)

    # --- content ------------------------------------------------------------------------------

    def _content_write(self, c: Content, mode: str,
                       changes: Mapping[str, Any] | None = None) -> Op[Content]:
        if changes is None:
            model.validate(c)
        else:
            changes = dict(changes)
            replace_fields(c, changes, _CONTENT_PROTECTED)
        key = _e(c.content_id)

        def op(ctx: WriteCtx) -> Content:
            raw = ctx.txn.get("content", key)
            if raw is not None and mode == "create":
                raise AlreadyExists("content", c.content_id)
            if raw is None and mode == "replace":
                raise NotFound("content", c.content_id)
            old = dec(Content, raw, "content", key) if raw is not None else None
            cur = c
            if changes is not None and old is not None:
                cur = replace_fields(old, changes, _CONTENT_PROTECTED)
                model.validate(cur)
            new = msgspec.structs.replace(cur, created=old.created if old else (cur.created or ctx.now))
            ctx.put("content", key, _enc.encode(new))
            return new
        return op

    async def create_content(self, content: Content) -> Content:
        return await self._write(self._content_write(content, "create"))

    async def get_content(self, content_id: str) -> Content:
        return await self._get("content", Content, content_id, "content")

    async def update_content(self, content_id: str, changes: Mapping[str, Any]) -> Content:
        probe = Content(content_id=content_id, name="", size=0, sha256="0" * 64)
        return await self._write(self._content_write(probe, "replace", changes))

    async def count_download(self, content_id: str) -> Content:
        return await self._write(self._download_op(content_id, lambda: 1))

    @staticmethod
    def _download_op(content_id: str, taken: Callable[[], int]) -> Op[Content]:
        """The write that adds ``taken()`` downloads (asked when the op runs) to the package's
        record and answers the record as written."""
        key = _e(content_id)

        def op(ctx: WriteCtx) -> Content:
            n = taken()
            raw = ctx.txn.get("content", key)
            if raw is None:
                raise NotFound("content", content_id)
            c = dec(Content, raw, "content", key)
            c.downloads += n
            data = _enc.encode(c)
            ctx.put("content", key, data)
            # every device of a campaign reads this record next (its own download): kept
            # decoded, instead of each download dropping it from the read cache
            ctx.fresh[("content", key)] = (data, c)
            return c
        return op

    async def delete_content(self, content_id: str) -> None:
        key = _e(content_id)

        def op(ctx: WriteCtx) -> None:
            if not ctx.txn.get("content", key):
                raise NotFound("content", content_id)
            ctx.delete("content", key)
        await self._write(op)

    async def list_content(self, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[Content]:
        return await self._page_of_records("content", Content, cursor, limit)

    # --- outbox -------------------------------------------------------------------------------

    @staticmethod
    def _outbox_prep(e: OutboxEntry) -> OutboxEntry:
        model.validate(e)
        if e.kind == "charging":
            _charging_record(e, 0.0)      # a payload that is no charging event: refused now
        return e

    @staticmethod
    def _outbox_prep_with_record(e: OutboxEntry) -> tuple[OutboxEntry, ChargingEvent | None]:
        """:meth:`_outbox_prep`, keeping a charging entry's log record when its payload has
        its time (the record is then the same at commit: not converted twice)."""
        model.validate(e)
        if e.kind != "charging":
            return e, None
        rec = _charging_record(e, 0.0)    # a payload that is no charging event: refused now
        return e, (rec if e.payload.get("time") else None)

    @staticmethod
    def _outbox_put(ctx: WriteCtx, e: OutboxEntry,
                    rec: ChargingEvent | None = None) -> OutboxEntry:
        """Writes a prepared entry — a charging entry's record in the charging log always,
        the entry itself unless its topic has no subscriber."""
        if not e.created:
            e = msgspec.structs.replace(e, created=ctx.now)
        key = _e(e.entry_id)
        if e.kind == "charging":
            if rec is None:
                rec = _charging_record(e, ctx.now)
            ctx.put("charging", us(rec.time) + key, _enc.encode(rec))
        if e.topic is not None and not _listened(ctx, e.topic):
            return e
        ctx.put("outbox", key, _enc.encode(e))
        ctx.put("outbox_due", us(e.due) + key, EMPTY)
        return e

    async def enqueue(self, entry: OutboxEntry) -> OutboxEntry:
        e = self._outbox_prep(entry)

        def op(ctx: WriteCtx) -> OutboxEntry:
            if ctx.txn.get("outbox", _e(e.entry_id)) is not None:
                raise AlreadyExists("outbox entry", e.entry_id)
            return self._outbox_put(ctx, e)
        return await self._write(op)

    async def claim_entries(self, now: float, limit: int, lease: float) -> list[OutboxEntry]:
        check_limit(limit)
        hi = us(now) + b"\xff"

        def any_due(txn: KVTxn) -> bool:
            for k, _ in txn.scan("outbox_due", b"", hi):
                return k[:8] <= us(now)
            return False
        if not await self._read(any_due):
            return []        # an idle pass costs no write transaction

        def op(ctx: WriteCtx) -> list[OutboxEntry]:
            keys = []
            for k, _ in ctx.txn.scan("outbox_due", b"", hi):
                if len(keys) == limit or k[:8] > us(now):
                    break
                keys.append(k)
            found = []
            for k in keys:
                rid = k[8:]
                raw = ctx.txn.get("outbox", rid)
                if raw is not None:
                    found.append((k, rid, dec(OutboxEntry, raw, "outbox", rid)))
            until = us(now + lease)
            out = []
            for k, rid, e in found:
                e.due = now + lease
                ctx.delete("outbox_due", k)
                ctx.put("outbox_due", until + rid, EMPTY)
                ctx.put("outbox", rid, _enc.encode(e))
                out.append(e)
            return out
        return await self._write(op)

    async def fan_out(self, entry_id: str, deliveries: Sequence[OutboxEntry]) -> list[OutboxEntry]:
        key = _e(entry_id)
        prepped = [self._outbox_prep(d) for d in deliveries]
        if any(d.kind == "charging" for d in prepped):
            raise ValidationError("a delivery is not a charging event", where="$.kind")

        def op(ctx: WriteCtx) -> list[OutboxEntry]:
            raw = ctx.txn.get("outbox", key)
            if raw is None:
                raise NotFound("outbox entry", entry_id)
            e = dec(OutboxEntry, raw, "outbox", key)
            fresh = [d for d in prepped if ctx.txn.get("outbox", _e(d.entry_id)) is None
                     and d.entry_id != entry_id]
            ctx.delete("outbox", key)
            ctx.delete("outbox_due", us(e.due) + key)
            return [self._outbox_put(ctx, d) for d in fresh]
        return await self._write(op)

    async def dead_letter(self, entry_id: str, *, error: str | None = None) -> DeadLetter:
        key = _e(entry_id)
        err = error[:1024] if error else None

        def op(ctx: WriteCtx) -> DeadLetter:
            raw = ctx.txn.get("outbox", key)
            if raw is None:
                raise NotFound("outbox entry", entry_id)
            e = dec(OutboxEntry, raw, "outbox", key)
            e.attempts += 1
            if err is not None:
                e.last_error = err
            d = DeadLetter(entry=e, time=ctx.now, error=err or e.last_error)
            ctx.delete("outbox", key)
            ctx.delete("outbox_due", us(e.due) + key)
            ctx.put("dead", key, _enc.encode(d))
            return d
        return await self._write(op)

    async def get_dead_letter(self, entry_id: str) -> DeadLetter:
        return await self._get("dead", DeadLetter, entry_id, "dead letter")

    async def dead_letters(self, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[DeadLetter]:
        return await self._page_of_records("dead", DeadLetter, cursor, limit)

    async def replay_dead_letter(self, entry_id: str, *, due: float) -> OutboxEntry:
        key = _e(entry_id)
        if len(key) > MAX_KEY:
            raise NotFound("dead letter", entry_id)

        def op(ctx: WriteCtx) -> OutboxEntry:
            raw = ctx.txn.get("dead", key)
            if raw is None:
                raise NotFound("dead letter", entry_id)
            if ctx.txn.get("outbox", key) is not None:
                raise AlreadyExists("outbox entry", entry_id)
            d = dec(DeadLetter, raw, "dead", key)
            e = msgspec.structs.replace(d.entry, due=due, attempts=0)
            model.validate(e)
            ctx.delete("dead", key)
            ctx.put("outbox", key, _enc.encode(e))
            ctx.put("outbox_due", us(e.due) + key, EMPTY)
            return e
        return await self._write(op)

    async def charging_events(self, *, start: float | None = None, end: float | None = None,
                              cursor: str | None = None,
                              limit: int = DEFAULT_PAGE) -> Page[ChargingEvent]:
        check_limit(limit)
        lo = us(max(start, 0.0)) if start is not None else EMPTY
        hi = us(max(end, 0.0)) if end is not None else None

        def fn(txn: KVTxn) -> Page[ChargingEvent]:
            rows, nxt = scan_page(txn, "charging", EMPTY, cursor, limit, lo=lo, hi=hi)
            return Page([dec(ChargingEvent, v, "charging", k) for k, v in rows], nxt)
        return await self._read(fn, big=limit > self.inline_read_limit)

    async def prune_charging(self, *, before: float | None = None, keep: int | None = None,
                             limit: int = DEFAULT_PAGE) -> int:
        check_limit(limit)
        if keep is not None and (not isinstance(keep, int) or keep < 0):
            raise ValidationError(f"keep must be >= 0, got {keep!r}", where="keep")
        cut = us(max(before, 0.0)) if before is not None else None

        def op(ctx: WriteCtx) -> int:
            txn = ctx.txn
            # oldest first; the scan comes before the count (a scan flushes buffered writes)
            oldest = [k for k, _ in _take(txn.scan("charging", EMPTY, None), limit)]
            excess = max(0, txn.count("charging") - keep) if keep is not None else 0
            gone = 0
            for k in oldest:
                if gone < excess or (cut is not None and k[:8] < cut):
                    ctx.delete("charging", k)
                    gone += 1
                else:
                    break
            return gone
        return await self._write(op)

    # --- subscriptions --------------------------------------------------------------------------

    async def create_subscription(self, sub: Subscription) -> Subscription:
        model.validate(sub)
        key = _e(sub.sub_id)

        def op(ctx: WriteCtx) -> Subscription:
            if ctx.txn.get("subs", key) is not None:
                raise AlreadyExists("subscription", sub.sub_id)
            s = msgspec.structs.replace(sub, created=sub.created or ctx.now)
            ctx.put("subs", key, _enc.encode(s))
            for t in set(s.topics):
                ctx.put("sub_topic", _e(t) + SEP + key, EMPTY)
            ctx.listened.clear()
            return s
        return await self._write(op)

    async def get_subscription(self, sub_id: str) -> Subscription:
        return await self._get("subs", Subscription, sub_id, "subscription")

    async def delete_subscription(self, sub_id: str) -> None:
        key = _e(sub_id)
        if len(key) > MAX_KEY:
            raise NotFound("subscription", sub_id)

        def op(ctx: WriteCtx) -> None:
            raw = ctx.txn.get("subs", key)
            if raw is None:
                raise NotFound("subscription", sub_id)
            s = dec(Subscription, raw, "subs", key)
            ctx.delete("subs", key)
            for t in set(s.topics):
                ctx.delete("sub_topic", _e(t) + SEP + key)
            ctx.listened.clear()
        await self._write(op)

    async def list_subscriptions(self, *, cursor: str | None = None,
                                 limit: int = DEFAULT_PAGE) -> Page[Subscription]:
        return await self._page_of_records("subs", Subscription, cursor, limit)

    async def due_entries(self, now: float, *, limit: int = DEFAULT_PAGE) -> list[OutboxEntry]:
        return await self._due("outbox_due", "outbox", OutboxEntry, now, limit)

    async def ack(self, entry_id: str) -> None:
        key = _e(entry_id)

        def op(ctx: WriteCtx) -> None:
            raw = ctx.txn.get("outbox", key)
            if raw is None:
                raise NotFound("outbox entry", entry_id)
            e = dec(OutboxEntry, raw, "outbox", key)
            ctx.delete("outbox", key)
            ctx.delete("outbox_due", us(e.due) + key)
        await self._write(op)

    async def retry(self, entry_id: str, *, due: float, error: str | None = None) -> OutboxEntry:
        key = _e(entry_id)

        def op(ctx: WriteCtx) -> OutboxEntry:
            raw = ctx.txn.get("outbox", key)
            if raw is None:
                raise NotFound("outbox entry", entry_id)
            e = dec(OutboxEntry, raw, "outbox", key)
            n = msgspec.structs.replace(e, due=due, attempts=e.attempts + 1,
                                        last_error=error[:1024] if error else e.last_error)
            data = model.validate(n)
            ctx.delete("outbox_due", us(e.due) + key)
            ctx.put("outbox", key, data)
            ctx.put("outbox_due", us(n.due) + key, EMPTY)
            return n
        return await self._write(op)

    # --- audit --------------------------------------------------------------------------------

    async def audit(self, entry: AuditEntry) -> AuditEntry:
        model.validate(entry)

        def op(ctx: WriteCtx) -> AuditEntry:
            seq = ctx.next_seq(b"seq:audit")
            e = msgspec.structs.replace(entry, seq=seq)
            ctx.put("audit", u64(seq), _enc.encode(e))
            return e
        return await self._write(op)

    async def audit_entries(self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE,
                            actor: str | None = None, action: str | None = None,
                            since: float | None = None, until: float | None = None,
                            scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[AuditEntry]:
        if actor is None and action is None and since is None and until is None:
            return await self._page_of_records("audit", AuditEntry, cursor, limit)
        check_limit(limit)
        if not isinstance(scan_limit, int) or scan_limit < 1:
            raise ValidationError(f"scan_limit must be >= 1, got {scan_limit!r}",
                                  where="scan_limit")
        budget = max(scan_limit, limit)
        start = decode_cursor(cursor) + SEP if cursor is not None else EMPTY
        needles = [_e(x) for x in (actor, action) if x]

        def fn(txn: KVTxn) -> Page[AuditEntry]:
            out: list[AuditEntry] = []
            scanned = 0
            last = EMPTY
            for k, v in txn.scan("audit", start, None):
                if len(out) == limit or scanned == budget:
                    return Page(out, encode_cursor(last))
                scanned += 1
                last = k
                if any(nd not in v for nd in needles):     # msgpack keeps strings as they are
                    continue
                e = dec(AuditEntry, v, "audit", k)
                if (actor is not None and e.actor != actor) or \
                        (action is not None and e.action != action) or \
                        (since is not None and e.time < since) or \
                        (until is not None and e.time >= until):
                    continue
                out.append(e)
            return Page(out, None)
        return await self._read(fn, big=budget > self.inline_read_limit)

    # --- identities ---------------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey) -> ApiKey:
        model.validate(key)
        kid = _e(key.key_id)
        h = _hash_key(key.key_hash)

        def op(ctx: WriteCtx) -> ApiKey:
            if ctx.txn.get("api_keys", kid) is not None:
                raise AlreadyExists("api key", key.key_id)
            if ctx.txn.get("api_key_hash", h) is not None:
                raise AlreadyExists("api key", "(that key)")
            k = msgspec.structs.replace(key, created=key.created or ctx.now)
            ctx.put("api_keys", kid, _enc.encode(k))
            ctx.put("api_key_hash", h, kid)
            return k
        return await self._write(op)

    async def get_api_key(self, key_id: str) -> ApiKey:
        return await self._get("api_keys", ApiKey, key_id, "api key")

    async def api_key_by_hash(self, key_hash: str) -> ApiKey:
        h = _hash_key(key_hash, lookup=True)

        def fn(txn: KVTxn) -> ApiKey:
            kid = txn.get("api_key_hash", h) if h else None
            raw = txn.get("api_keys", kid) if kid is not None else None
            if raw is None:
                raise NotFound("api key", "(that key)")
            return dec(ApiKey, raw, "api_keys", kid or b"")
        return await self._read(fn)

    async def update_api_key(self, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        return await self._update_record("api_keys", ApiKey, key_id, "api key", changes,
                                         _KEY_PROTECTED)

    async def list_api_keys(self, *, cursor: str | None = None,
                            limit: int = DEFAULT_PAGE) -> Page[ApiKey]:
        return await self._page_of_records("api_keys", ApiKey, cursor, limit)

    async def create_user(self, user: User) -> User:
        model.validate(user)
        key = _e(user.name)

        def op(ctx: WriteCtx) -> User:
            if ctx.txn.get("users", key) is not None:
                raise AlreadyExists("user", user.name)
            u = msgspec.structs.replace(user, created=user.created or ctx.now)
            ctx.put("users", key, _enc.encode(u))
            return u
        return await self._write(op)

    async def get_user(self, name: str) -> User:
        return await self._get("users", User, name, "user")

    async def update_user(self, name: str, changes: Mapping[str, Any]) -> User:
        return await self._update_record("users", User, name, "user", changes,
                                         _USER_PROTECTED)

    async def delete_user(self, name: str) -> None:
        def forget(ctx: WriteCtx, old: User) -> None:
            ctx.next_seq(IDENTITY_GEN)           # its sessions end: caches must re-read
        await self._delete("users", User, name, "user", forget)

    async def list_users(self, *, cursor: str | None = None,
                         limit: int = DEFAULT_PAGE) -> Page[User]:
        return await self._page_of_records("users", User, cursor, limit)

    async def create_session(self, session: UserSession) -> UserSession:
        model.validate(session)
        h = _hash_key(session.token_hash)

        def op(ctx: WriteCtx) -> UserSession:
            if ctx.txn.get("sessions", h) is not None:
                raise AlreadyExists("session", session.session_id)
            s = msgspec.structs.replace(session, created=session.created or ctx.now)
            ctx.put("sessions", h, _enc.encode(s))
            ctx.put("session_exp", us(s.expires) + h, EMPTY)
            return s
        return await self._write(op)

    async def get_session(self, token_hash: str) -> UserSession:
        h = _hash_key(token_hash, lookup=True)

        def fn(txn: KVTxn) -> UserSession:
            raw = txn.get("sessions", h) if h else None
            if raw is None:
                raise NotFound("session", "(that token)")
            return dec(UserSession, raw, "sessions", h)
        return await self._read(fn)

    async def delete_session(self, token_hash: str) -> None:
        h = _hash_key(token_hash, lookup=True)

        def op(ctx: WriteCtx) -> None:
            raw = ctx.txn.get("sessions", h) if h else None
            if raw is None:
                raise NotFound("session", "(that token)")
            s = dec(UserSession, raw, "sessions", h)
            ctx.delete("sessions", h)
            ctx.delete("session_exp", us(s.expires) + h)
            ctx.next_seq(IDENTITY_GEN)
        await self._write(op)

    def identity_generation(self) -> int:
        raw = self._read_now(lambda txn: txn.get("meta", IDENTITY_GEN))
        return int.from_bytes(raw, "big") if raw else 0

    async def purge_sessions(self, now: float, *, limit: int = DEFAULT_PAGE) -> int:
        check_limit(limit)
        hi = us(now) + b"\xff"

        def op(ctx: WriteCtx) -> int:
            gone = [k for k, _ in _take(ctx.txn.scan("session_exp", EMPTY, hi), limit)
                    if k[:8] <= us(now)]
            for k in gone:
                ctx.delete("session_exp", k)
                ctx.delete("sessions", k[8:])
            return len(gone)
        return await self._write(op)

    async def _update_record(self, db: str, cls: type[R], ident: str, kind: str,
                             changes: Mapping[str, Any], protected: frozenset[str]) -> R:
        changes = dict(changes)
        bad = protected.intersection(changes)
        if bad:
            f = sorted(bad)[0]
            raise ValidationError(f"{f} cannot be changed", where=f"$.{f}")
        key = _e(ident)

        def op(ctx: WriteCtx) -> R:
            raw = ctx.txn.get(db, key) if len(key) <= MAX_KEY else None
            if raw is None:
                raise NotFound(kind, ident)
            new = replace_fields(dec(cls, raw, db, key), changes, protected)
            data = model.validate(new)      # type: ignore[type-var]
            ctx.put(db, key, data)
            if db in _IDENTITY_DBS:          # a revoke or a role change: caches re-read
                ctx.next_seq(IDENTITY_GEN)
            return new
        return await self._write(op)

    # --- admin ----------------------------------------------------------------------------

    async def check(self) -> list[str]:
        return await self._read(check_txn, big=True)

    async def counts(self) -> dict[str, int]:
        def fn(txn: KVTxn) -> dict[str, int]:
            return {db: txn.count(db) for db in DBS}
        return await self._read(fn, big=True)


# --- schema ---------------------------------------------------------------------------------


def _index_job_states(txn: KVTxn) -> None:
    """Schema 1 → 2: the ``job_state`` index (jobs by state) of the jobs already stored."""
    for k, v in txn.scan("jobs", b"", None):
        j = dec(Job, v, "jobs", k)
        txn.put("job_state", _job_state_key(j.state, j.job_id), EMPTY)


def _index_dev_targets(txn: KVTxn) -> None:
    """Schema 2 → 3: the ``dev_targets`` index (a device's targets whose task is not made
    yet) of the jobs that may still make tasks."""
    for k, v in txn.scan("jobs", b"", None):
        j = dec(Job, v, "jobs", k)
        if j.state not in (JobState.SCHEDULED, JobState.RUNNING, JobState.PAUSED):
            continue
        jkey = _e(j.job_id)
        start = jkey + SEP + u64(j.total)
        for tk, did in list(txn.scan("job_targets", start, jkey + SEP + b"\xff" * 8)):
            txn.put("dev_targets", did + SEP + jkey, tk[len(jkey) + 1:])


#: Migrations of the store's own layout (indexes: they need the key layout, which model.py,
#: L0, does not know); ``model.MIGRATIONS`` holds those of the records.  Both run in order.
INDEX_MIGRATIONS: dict[int, Callable[[KVTxn], None]] = {1: _index_job_states,
                                                       2: _index_dev_targets}


def ensure_schema(txn: KVTxn, now: float,
                  migrations: Mapping[int, Callable[[KVTxn], None]] | None = None,
                  target: int | None = None) -> tuple[int, int]:
    """Creates the schema record in a new environment, or runs the migrations from the stored
    version up to ``target`` (default ``model.SCHEMA_VERSION``).  Returns (from, to).
    A newer stored version than ours is refused (StoreError)."""
    target = model.SCHEMA_VERSION if target is None else target
    migrations = {**model.MIGRATIONS, **INDEX_MIGRATIONS} if migrations is None else migrations
    raw = txn.get("meta", SCHEMA_KEY)
    if raw is None:
        txn.put("meta", SCHEMA_KEY, _enc.encode(SchemaRecord(version=target, created=now,
                                                             migrated=now)))
        return target, target
    rec = dec(SchemaRecord, raw, "meta", SCHEMA_KEY)
    if rec.version > target:
        raise StoreError(f"store schema version {rec.version} is newer than this "
                         f"dmengine's ({target})")
    frm = rec.version
    v = frm
    while v < target:
        fn = migrations.get(v)
        if fn is None:
            raise StoreError(f"no migration from schema version {v}")
        fn(txn)
        v += 1
    if frm != target:
        txn.put("meta", SCHEMA_KEY, _enc.encode(SchemaRecord(version=target, created=rec.created,
                                                             migrated=now)))
    return frm, target


# --- the checker ----------------------------------------------------------------------------


def check_txn(txn: KVTxn, *, max_problems: int = 1000) -> list[str]:
    """Walks every record and index in one read transaction; returns the problems found."""
    problems: list[str] = []

    def bad(msg: str) -> None:
        if len(problems) < max_problems:
            problems.append(msg)

    def expect(expected: set[tuple[str, bytes, bytes]], dbs: Iterable[str]) -> None:
        for db in dbs:
            seen = set()
            for k, v in txn.scan(db, b"", None):
                seen.add((db, k, v))
                if (db, k, v) not in expected:
                    bad(f"{db}: stray or wrong entry {k!r} -> {v!r}")
            for e in expected:
                if e[0] == db and e not in seen:
                    bad(f"{db}: missing entry {e[1]!r} -> {e[2]!r}")

    # schema
    raw = txn.get("meta", SCHEMA_KEY)
    if raw is None:
        bad("meta: no schema record")
    # devices
    exp: set[tuple[str, bytes, bytes]] = set()
    for k, v in txn.scan("devices", b"", None):
        try:
            d = dec(Device, v, "devices", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _e(d.dev_id) != k:
            bad(f"devices: key {k!r} holds device {d.dev_id!r}")
        exp.update(_device_index(d))
    expect(exp, ("dev_msisdn", "dev_imei", "dev_tac", "dev_cap"))
    # capabilities
    exp = set()
    for k, v in txn.scan("caps", b"", None):
        try:
            c = dec(Capability, v, "caps", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _e(c.oid) != k:
            bad(f"caps: key {k!r} holds capability {c.oid!r}")
        exp.update(("cap_tac", _e(t), k) for t in c.tacs)
    expect(exp, ("cap_tac",))
    # jobs and job_date
    jobs: dict[bytes, Job] = {}
    exp = set()
    for k, v in txn.scan("jobs", b"", None):
        try:
            j = dec(Job, v, "jobs", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        jobs[k] = j
        exp.add(("job_date", us(j.created) + k, EMPTY))
        exp.add(("job_state", _job_state_key(j.state, j.job_id), EMPTY))
    expect(exp, ("job_date", "job_state"))
    # tasks, their indexes, history and job counters
    exp = set()
    counts: dict[bytes, dict[str, dict[str, int]]] = {}
    max_seq = 0
    hist_len: dict[bytes, int] = {}
    for k, v in txn.scan("tasks", b"", None):
        try:
            t = dec(Task, v, "tasks", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _e(t.task_id) != k:
            bad(f"tasks: key {k!r} holds task {t.task_id!r}")
        max_seq = max(max_seq, t.seq)
        exp.update(_task_index(t))
        hist_len[k] = t.history_len
        if t.job_id:
            jk = _e(t.job_id)
            if jk not in jobs:
                bad(f"tasks: task {t.task_id!r} names missing job {t.job_id!r}")
            tally = counts.setdefault(jk, {"counts": {}, "test": {}, "total": {"n": 0}})
            side = tally["test"] if t.test_cycle else tally["counts"]
            side[t.state] = side.get(t.state, 0) + 1
            tally["total"]["n"] += 1
    expect(exp, ("task_job", "task_jstate", "task_dev", "task_corr", "task_due", "task_dl"))
    seq_raw = txn.get("meta", b"seq:task")
    if max_seq and (seq_raw is None or int.from_bytes(seq_raw, "big") < max_seq):
        bad(f"meta: task sequence {seq_raw!r} behind the largest task seq {max_seq}")
    for jk, j in jobs.items():
        tally = counts.get(jk, {"counts": {}, "test": {}, "total": {"n": 0}})
        if dict(j.counts) != tally["counts"]:
            bad(f"jobs: job {j.job_id!r} counts {dict(j.counts)} but its tasks say "
                f"{tally['counts']}")
        if dict(j.test_counts) != tally["test"]:
            bad(f"jobs: job {j.job_id!r} test counts {dict(j.test_counts)} but its tasks say "
                f"{tally['test']}")
        if j.total != tally["total"]["n"]:
            bad(f"jobs: job {j.job_id!r} total {j.total} but it has {tally['total']['n']} tasks")
    # history: entries 1..history_len for each task, each one starting where the previous
    # ended, the last one ending in the task's state
    seen_hist: dict[bytes, list[int]] = {}
    last_state: dict[bytes, str] = {}
    for k, v in txn.scan("history", b"", None):
        tid, sep, nb = k[:-5], k[-5:-4], k[-4:]
        if len(k) < 6 or sep != SEP:
            bad(f"history: malformed key {k!r}")
            continue
        seq = int.from_bytes(nb, "big")
        seen_hist.setdefault(tid, []).append(seq)
        try:
            h = dec(HistoryEntry, v, "history", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if h.seq != seq or _e(h.task_id) != tid:
            bad(f"history: key {k!r} holds entry {h.task_id!r}#{h.seq}")
        prev = last_state.get(tid)
        if seq > 1 and prev is not None and h.from_state != prev:
            bad(f"history: task {tid!r} entry {seq} starts at {h.from_state}, "
                f"entry {seq - 1} ended at {prev}")
        last_state[tid] = h.to_state
    for tid, hl in hist_len.items():
        got = seen_hist.pop(tid, [])
        if got != list(range(1, hl + 1)):
            bad(f"history: task {tid!r} has entries {got[:5]}… but history_len {hl}")
        elif hl:
            raw = txn.get("tasks", tid)
            task = dec(Task, raw, "tasks", tid) if raw else None
            if task is not None and last_state.get(tid) != task.state:
                bad(f"history: task {tid!r} last entry says {last_state.get(tid)}, "
                    f"task is {task.state}")
    for tid in seen_hist:
        bad(f"history: entries for missing task {tid!r}")
    # outbox
    exp = set()
    for k, v in txn.scan("outbox", b"", None):
        try:
            e = dec(OutboxEntry, v, "outbox", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        exp.add(("outbox_due", us(e.due) + k, EMPTY))
    expect(exp, ("outbox_due",))
    # subscriptions: one topic row per topic, dead letters and the charging log decode
    exp = set()
    for k, v in txn.scan("subs", b"", None):
        try:
            sub = dec(Subscription, v, "subs", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _e(sub.sub_id) != k:
            bad(f"subs: key {k!r} holds subscription {sub.sub_id!r}")
        for t in set(sub.topics):
            exp.add(("sub_topic", _e(t) + SEP + k, EMPTY))
    expect(exp, ("sub_topic",))
    for k, v in txn.scan("dead", b"", None):
        try:
            dl = dec(DeadLetter, v, "dead", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _e(dl.entry.entry_id) != k:
            bad(f"dead: key {k!r} holds entry {dl.entry.entry_id!r}")
        if txn.get("outbox", k) is not None:
            bad(f"dead: entry {k!r} is in the outbox too")
    for k, v in txn.scan("charging", b"", None):
        try:
            ce = dec(ChargingEvent, v, "charging", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if k != us(ce.time) + _e(ce.event_id):
            bad(f"charging: key {k!r} does not match event {ce.event_id!r}")
    # api keys: one hash row per key, each pointing at its key
    exp = set()
    for k, v in txn.scan("api_keys", b"", None):
        try:
            ak = dec(ApiKey, v, "api_keys", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _e(ak.key_id) != k:
            bad(f"api_keys: key {k!r} holds key {ak.key_id!r}")
        try:
            exp.add(("api_key_hash", _hash_key(ak.key_hash), k))
        except ValidationError:
            bad(f"api_keys: key {k!r} has a malformed hash")
    expect(exp, ("api_key_hash",))
    # sessions and their expiry index
    exp = set()
    for k, v in txn.scan("sessions", b"", None):
        try:
            se = dec(UserSession, v, "sessions", k)
        except CorruptRecord as exc:
            bad(str(exc))
            continue
        if _hash_key(se.token_hash, lookup=True) != k:
            bad(f"sessions: key {k!r} holds session {se.session_id!r} of another token")
        exp.add(("session_exp", us(se.expires) + k, EMPTY))
    expect(exp, ("session_exp",))
    # audit, content and users decode
    for db, cls in (("audit", AuditEntry), ("content", Content), ("users", User)):
        for k, v in txn.scan(db, b"", None):
            try:
                dec(cls, v, db, k)
            except CorruptRecord as exc:
                bad(str(exc))
    return problems


__all__ = ["KVStore", "KVTxn", "WriteCtx", "DBS", "check_txn", "ensure_schema", "scan_page",
           "u64", "us", "prefix_end", "SCAN_CHUNK"]
