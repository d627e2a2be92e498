"""The store contract the services use (L3): one abstract async class.

Two implementations: :class:`dmengine.store.lmdb.LmdbStore` (the real one: LMDB, group commit,
crash-safe) and :class:`dmengine.store.memory.MemoryStore` (for unit tests); both share the key
layout and record logic in :mod:`dmengine.store.kv` and pass ``tests/test_store_contract.py``.

Rules every method follows:

* Records are checked with :func:`dmengine.model.validate`; a bad one raises
  :class:`~dmengine.errors.ValidationError` (``where`` = ``$.field``) and nothing is written.
* Missing records raise :class:`~dmengine.errors.NotFound`, duplicates
  :class:`~dmengine.errors.AlreadyExists`, a stale optimistic update
  :class:`~dmengine.errors.Conflict`, an illegal task move
  :class:`~dmengine.errors.InvalidTransition`; all are :class:`~dmengine.errors.StoreError`.
* A write is acknowledged (the awaitable returns) only after it is durable.
* Lists are cursor-paged: pass ``Page.next_cursor`` back as ``cursor``; None means the end.
* The store owns ``Task.seq``, ``Task.version``, ``Task.history_len``, ``Job.total``,
  ``Job.counts``/``test_counts``, ``created``/``updated`` stamps and ``AuditEntry.seq``.
* Secrets never reach the store: API keys and ``userSession`` tokens are kept as their SHA-256,
  passwords as scrypt hashes (made by :mod:`dmengine.identity`, L4).
"""
from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import msgspec

from ..errors import Conflict, InvalidTransition, NotFound, StoreError
from ..model import (ApiKey, AuditEntry, Capability, ChargingEvent, Content, DeadLetter, Device,
                     HistoryEntry, Job, JobState, OutboxEntry, Subscription, Task, TaskState, User,
                     UserSession)

T = TypeVar("T")

DEFAULT_PAGE = 100        #: default page size of every listing
MAX_PAGE = 10_000         #: largest page a caller may ask for
DEFAULT_IMPORT_CHUNK = 20_000   #: devices per write transaction in import_devices
DEFAULT_QUERY_SCAN = 20_000     #: records a query_devices page examines at most

#: A move a task makes first, in the same write as the move that names it (``transition``'s
#: ``waypoint``): (state, cause, changes).  Its own history entry and counters, as if it had
#: been written by itself just before — a FUMO Exec accepted ("waiting for the result alert")
#: and the result alert that came in the same message.
Waypoint = tuple[TaskState, str, Mapping[str, Any]]


class Page(msgspec.Struct, Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""
    items: list[T]
    next_cursor: str | None = None


class ImportReport(msgspec.Struct, kw_only=True):
    """What ``import_devices`` did: ``rejected`` holds ``(index, where, message)`` per bad record."""
    created: int = 0
    replaced: int = 0
    rejected: list[tuple[int, str | None, str]] = []


class DeviceQuery(msgspec.Struct, kw_only=True, frozen=True):
    """A device selection: every given filter must hold (None = no filter).

    ``tac`` (the IMEI's first 8 digits) and ``capability`` read their index; ``model``
    (``./DevInfo/Mod``), ``firmware`` (``./DevDetail/FwV``) and the last-contact bounds are
    checked on the records read.  ``contact_after`` keeps devices whose last contact is at or
    after it, ``contact_before`` those whose last contact is before it; a device that never
    made contact matches neither."""
    capability: str | None = None
    tac: str | None = None
    model: str | None = None
    firmware: str | None = None
    contact_after: float | None = None
    contact_before: float | None = None


class Store(abc.ABC):
    """The async contract.  Use as ``async with store:`` or call :meth:`close`."""

    async def __aenter__(self) -> "Store":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def fault(self) -> str | None:
        """What keeps the store from taking writes (closed, its writer dead), as a sentence
        for an operator; None when it is sound.  Cheap and non-blocking: ``/health`` calls it
        on every probe."""

    # --- devices -------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_device(self, dev: Device) -> Device:
        """Adds a device; AlreadyExists if the dev_id, MSISDN or IMEI is taken."""

    @abc.abstractmethod
    async def put_device(self, dev: Device) -> Device:
        """Creates or replaces a device (indexes follow); AlreadyExists if its MSISDN/IMEI
        belongs to another device."""

    @abc.abstractmethod
    async def update_device(self, dev_id: str, changes: Mapping[str, Any], *,
                            expect_version: int | None = None) -> Device:
        """Replaces the named fields of a stored device, in one write (no lost update); every
        update bumps ``Device.version``.  With ``expect_version`` the write happens only if the
        stored device is still at that version, else Conflict: a read-modify-write of the
        caller (e.g. merging a snapshot) retries instead of overwriting a concurrent update.

        ``changes["account"]`` may be a mapping instead of a DmAccount: its fields are merged
        into the stored account (a None value removes that field; an account is made when the
        device has none, so it then needs ``server_id``).  ``dev_id``, ``created`` and
        ``version`` cannot change (ValidationError naming the field)."""

    @abc.abstractmethod
    async def get_device(self, dev_id: str) -> Device: ...

    async def get_devices(self, dev_ids: Sequence[str]) -> dict[str, Device]:
        """The devices of ``dev_ids`` that exist, by DevId, read together (a scheduler pass
        reads a batch's devices at once)."""
        out = {}
        for dev_id in dev_ids:
            try:
                out[dev_id] = await self.get_device(dev_id)
            except NotFound:
                pass
        return out

    @abc.abstractmethod
    async def delete_device(self, dev_id: str) -> None: ...

    @abc.abstractmethod
    async def device_by_msisdn(self, msisdn: str) -> Device: ...

    @abc.abstractmethod
    async def device_by_imei(self, imei: str) -> Device: ...

    @abc.abstractmethod
    async def devices_by_tac(self, tac: str, *, cursor: str | None = None,
                             limit: int = DEFAULT_PAGE) -> Page[Device]: ...

    @abc.abstractmethod
    async def devices_by_capability(self, oid: str, *, cursor: str | None = None,
                                    limit: int = DEFAULT_PAGE) -> Page[Device]: ...

    @abc.abstractmethod
    async def list_devices(self, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[Device]: ...

    @abc.abstractmethod
    async def query_devices(self, query: DeviceQuery, *, cursor: str | None = None,
                            limit: int = DEFAULT_PAGE,
                            scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[Device]:
        """Devices matching ``query``, in the order of the index read (by TAC when ``tac`` is
        given, else by capability when ``capability`` is, else all devices by dev_id).

        A page holds up to ``limit`` matches and examines at most ``scan_limit`` records
        (never fewer than ``limit``), so one call costs a bounded amount of work however rare
        the matches: a page may be short, even empty, and still carry a ``next_cursor``.
        Keep calling until ``next_cursor`` is None; every matching device comes exactly once
        (devices added or removed meanwhile may or may not be seen)."""

    @abc.abstractmethod
    async def query_device_ids(self, query: DeviceQuery, *, cursor: str | None = None,
                               limit: int = DEFAULT_PAGE,
                               scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[str]:
        """``query_devices`` giving the dev_ids only, in the same order with the same paging
        (a job's selection): when the index read decides the query alone (``capability``, or
        ``tac`` without other filters) the device records are not read at all."""

    @abc.abstractmethod
    async def import_devices(self, devices: Iterable[Device], *, replace: bool = True,
                             chunk: int = DEFAULT_IMPORT_CHUNK) -> ImportReport:
        """Bulk import, ``chunk`` devices per transaction.  Bad records (validation, MSISDN/IMEI
        owned by another device, or an existing dev_id when ``replace`` is False) are skipped and
        listed in the report; the others are written."""

    # --- capabilities ----------------------------------------------------------------------
    @abc.abstractmethod
    async def create_capability(self, cap: Capability) -> Capability: ...

    @abc.abstractmethod
    async def put_capability(self, cap: Capability) -> Capability: ...

    @abc.abstractmethod
    async def update_capability(self, oid: str, changes: Mapping[str, Any]) -> Capability: ...

    @abc.abstractmethod
    async def get_capability(self, oid: str) -> Capability: ...

    @abc.abstractmethod
    async def delete_capability(self, oid: str) -> None: ...

    @abc.abstractmethod
    async def capability_by_tac(self, tac: str) -> Capability: ...

    @abc.abstractmethod
    async def list_capabilities(self, *, cursor: str | None = None,
                                limit: int = DEFAULT_PAGE) -> Page[Capability]: ...

    # --- jobs ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_job(self, job: Job) -> Job: ...

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job: ...

    @abc.abstractmethod
    async def update_job(self, job_id: str, changes: Mapping[str, Any], *,
                         expect_state: JobState | None = None) -> Job:
        """Replaces fields of a job (not its counters); Conflict if ``expect_state`` differs."""

    @abc.abstractmethod
    async def list_jobs(self, *, state: JobState | None = None, cursor: str | None = None,
                        limit: int = DEFAULT_PAGE) -> Page[Job]:
        """Jobs by job id; with ``state`` only those in it, read through a job-state index
        (the cost follows the jobs in that state, not every job ever stored: a scheduler
        pass lists the open ones); a cursor belongs to its state's listing."""

    @abc.abstractmethod
    async def jobs_by_date(self, start: float, end: float, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[Job]:
        """Jobs created in ``[start, end)`` (epoch seconds), oldest first."""

    @abc.abstractmethod
    async def add_job_targets(self, job_id: str, dev_ids: Sequence[str]) -> int:
        """Appends devices to the job's selection (in order); returns the job's target count."""

    @abc.abstractmethod
    async def job_targets(self, job_id: str, start: int, limit: int) -> list[str]:
        """The dev_ids of targets ``start`` … ``start + limit - 1`` (fewer at the end; none
        past it); NotFound if the job does not exist."""

    @abc.abstractmethod
    async def create_job_tasks(self, job_id: str, expect_total: int,
                               tasks: Sequence[Task], *,
                               moves: Mapping[str, Waypoint] | None = None) -> list[Task]:
        """Creates the next tasks of a RUNNING job in one write, if the job still has
        ``expect_total`` tasks (else Conflict: another claimer made them).  The job's counters
        move in the same write.  ``moves``: task id → the move (state, cause, changes) that
        task makes right after it is created, in the same write — its own history entry and
        counters, as if written just after (the scheduler's NOTIFIED, written before the
        package #0 goes out); a refused move refuses the whole write.  Returns the tasks as
        written (moved ones in their new state)."""

    async def has_subscribers(self, topic: str) -> bool:
        """Whether some subscription listens to ``topic`` now, so that callers skip building
        events nobody would get (the write that queues an event checks again)."""
        return True

    @abc.abstractmethod
    async def pending_job_targets(self, dev_id: str) -> list[str]:
        """Ids of the jobs that selected the device and have not made its task yet (a job
        that ended meanwhile may be among them: the caller checks the job)."""

    @abc.abstractmethod
    async def start_job_target(self, job_id: str, task: Task, boundary: int) -> Task | None:
        """Makes the task of ``task.dev_id``'s pending target of a RUNNING job now, ahead of
        the job's order (the device connected on its own): in one write, its target trades
        places with the next one to be made, so the job's order of the others is kept, and
        the task is created as that next one.  None when the job is not RUNNING, has made
        ``boundary`` tasks already (its stage is full), or has no pending target of the
        device; the target of a job that ended is forgotten then (it will never be made)."""

    @abc.abstractmethod
    async def claim_due(self, now: float, limit: int, lease: float) -> list[Task]:
        """Up to ``limit`` tasks due at ``now`` (as ``tasks_due``), each claimed: its
        ``next_attempt`` moves to ``now + lease`` in the same write, so no other claimer gets
        it until the lease ends (and it is due again then if its claimer did nothing)."""

    # --- tasks --------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_task(self, task: Task) -> Task:
        """Stores a new task (state as given, usually PENDING) with its first history entry;
        counts it in its job.  NotFound if ``job_id`` names no job."""

    @abc.abstractmethod
    async def create_tasks(self, tasks: Sequence[Task]) -> list[Task]:
        """``create_task`` for many in one transaction (all or nothing)."""

    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task: ...

    @abc.abstractmethod
    async def update_task(self, task: Task) -> Task:
        """Writes a changed task if ``task.version`` is the stored version (else Conflict).
        The state may not change here (InvalidTransition): use :meth:`transition`."""

    async def update_device_and_move(self, dev_id: str, device_changes: Mapping[str, Any],
                                     task_id: str, to_state: TaskState, *, cause: str,
                                     dm_status: int | None = None,
                                     result_code: int | None = None,
                                     expect_state: TaskState | None = None,
                                     changes: Mapping[str, Any] | None = None,
                                     enqueue: Sequence[OutboxEntry] = (),
                                     waypoint: Waypoint | None = None
                                     ) -> tuple[Device, Task | StoreError]:
        """:meth:`update_device` and a :meth:`transition` of one task, in one write where the
        store can; the move's refusal (NotFound, Conflict, InvalidTransition) is returned in
        its place, and the device update is written whatever becomes of the move.  This
        default makes two writes."""
        device = await self.update_device(dev_id, device_changes)
        try:
            return device, await self.transition(
                task_id, to_state, cause=cause, dm_status=dm_status, result_code=result_code,
                expect_state=expect_state, changes=changes, enqueue=enqueue, waypoint=waypoint)
        except (NotFound, Conflict, InvalidTransition) as exc:
            return device, exc

    @abc.abstractmethod
    async def transition(self, task_id: str, to_state: TaskState, *, cause: str | None = None,
                         dm_status: int | None = None, result_code: int | None = None,
                         expect_state: TaskState | None = None,
                         changes: Mapping[str, Any] | None = None,
                         enqueue: Sequence[OutboxEntry] = (),
                         waypoint: Waypoint | None = None) -> Task:
        """Atomically: moves the task (legal moves: ``model.TASK_TRANSITIONS``), applies
        ``changes`` (other Task fields), appends a history entry, updates the job counters and
        the indexes, and enqueues ``enqueue`` outbox entries.  ``waypoint``: a move made first
        in the same write (see :data:`Waypoint`); refused, neither is written."""

    @abc.abstractmethod
    async def tasks_by_job(self, job_id: str, *, state: TaskState | None = None,
                           cursor: str | None = None, limit: int = DEFAULT_PAGE) -> Page[Task]: ...

    @abc.abstractmethod
    async def tasks_by_device(self, dev_id: str, *, cursor: str | None = None,
                              limit: int = DEFAULT_PAGE) -> Page[Task]:
        """The device's tasks, oldest first."""

    @abc.abstractmethod
    async def open_tasks_for_device(self, dev_id: str) -> list[Task]:
        """The device's tasks that are not final, oldest first, in one read (what a package 1
        asks: SQL ``WHERE dev_id = ? AND state NOT IN (…)``)."""

    @abc.abstractmethod
    async def task_by_correlator(self, correlator: str) -> Task: ...

    @abc.abstractmethod
    async def tasks_due(self, now: float, *, limit: int = DEFAULT_PAGE) -> list[Task]:
        """Unfinished tasks whose ``next_attempt`` is ≤ now, earliest first."""

    @abc.abstractmethod
    async def tasks_expiring(self, now: float, *, limit: int = DEFAULT_PAGE) -> list[Task]:
        """Unfinished tasks whose ``deadline`` is ≤ now, earliest first."""

    @abc.abstractmethod
    async def task_history(self, task_id: str, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[HistoryEntry]: ...

    # --- content ------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_content(self, content: Content) -> Content: ...

    @abc.abstractmethod
    async def get_content(self, content_id: str) -> Content: ...

    @abc.abstractmethod
    async def update_content(self, content_id: str, changes: Mapping[str, Any]) -> Content: ...

    @abc.abstractmethod
    async def count_download(self, content_id: str) -> Content:
        """``downloads += 1``."""

    @abc.abstractmethod
    async def delete_content(self, content_id: str) -> None: ...

    @abc.abstractmethod
    async def list_content(self, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[Content]: ...

    # --- outbox (webhook and charging deliveries) --------------------------------------
    @abc.abstractmethod
    async def enqueue(self, entry: OutboxEntry) -> OutboxEntry: ...

    @abc.abstractmethod
    async def due_entries(self, now: float, *, limit: int = DEFAULT_PAGE) -> list[OutboxEntry]:
        """Entries due at or before ``now``, earliest first."""

    @abc.abstractmethod
    async def ack(self, entry_id: str) -> None:
        """Delivered: removes the entry (NotFound if it is not there)."""

    @abc.abstractmethod
    async def retry(self, entry_id: str, *, due: float, error: str | None = None) -> OutboxEntry:
        """Not delivered: ``attempts += 1``, new due time."""

    # An entry of kind ``charging`` is an IF-4 charging event: the write that queues it also
    # appends it to the charging log (``charging_events``), which keeps it after delivery.
    # An entry with a ``topic`` is queued only while a subscription of that topic exists
    # (checked in the same write; the charging log is written either way); otherwise
    # ``enqueue`` returns it unqueued.  A charging entry is logged once: enqueueing its id
    # again is AlreadyExists only while it is still queued.
    # ``update_job`` queues a ``job`` event when it changes a job's state, and a move that
    # makes a job's final-task count cross a tenth of its targets queues a progress event
    # (both only while a ``job`` subscription exists).

    @abc.abstractmethod
    async def claim_entries(self, now: float, limit: int, lease: float) -> list[OutboxEntry]:
        """Up to ``limit`` entries due at ``now`` (earliest first), each claimed: its ``due``
        moves to ``now + lease`` in the same write, so no other claimer gets it until then
        (a claimer that dies leaves it due again when the lease runs out)."""

    @abc.abstractmethod
    async def fan_out(self, entry_id: str, deliveries: Sequence[OutboxEntry]) -> list[OutboxEntry]:
        """In one write: removes the entry and queues ``deliveries`` (one per subscriber; none
        drops the event).  NotFound if the entry is gone (another claimer fanned it out)."""

    @abc.abstractmethod
    async def dead_letter(self, entry_id: str, *, error: str | None = None) -> DeadLetter:
        """Gives up on an entry after one more failed attempt (``attempts += 1``): it leaves
        the outbox for the dead-letter list in one write."""

    @abc.abstractmethod
    async def get_dead_letter(self, entry_id: str) -> DeadLetter: ...

    @abc.abstractmethod
    async def dead_letters(self, *, cursor: str | None = None,
                           limit: int = DEFAULT_PAGE) -> Page[DeadLetter]:
        """The dead letters by entry id (roughly the events' time order)."""

    @abc.abstractmethod
    async def replay_dead_letter(self, entry_id: str, *, due: float) -> OutboxEntry:
        """Back into the outbox, due at ``due`` with ``attempts`` 0 (same id, same body)."""

    @abc.abstractmethod
    async def charging_events(self, *, start: float | None = None, end: float | None = None,
                              cursor: str | None = None,
                              limit: int = DEFAULT_PAGE) -> Page[ChargingEvent]:
        """The charging log, oldest first, ``time`` in ``[start, end)`` when given."""

    @abc.abstractmethod
    async def prune_charging(self, *, before: float | None = None, keep: int | None = None,
                             limit: int = DEFAULT_PAGE) -> int:
        """Retention of the charging log: deletes its oldest events, those whose ``time`` is
        before ``before`` and as many more as there are beyond the newest ``keep``, at most
        ``limit`` in one write (call again while it returns ``limit``).  Queued deliveries of
        the events are not touched.  Returns how many went."""

    # --- subscriptions (webhooks) -------------------------------------------------------

    @abc.abstractmethod
    async def create_subscription(self, sub: Subscription) -> Subscription:
        """Adds a subscription; AlreadyExists if its ``sub_id`` is taken."""

    @abc.abstractmethod
    async def get_subscription(self, sub_id: str) -> Subscription: ...

    @abc.abstractmethod
    async def delete_subscription(self, sub_id: str) -> None:
        """Removes it (NotFound if missing); its queued deliveries are dropped when due."""

    @abc.abstractmethod
    async def list_subscriptions(self, *, cursor: str | None = None,
                                 limit: int = DEFAULT_PAGE) -> Page[Subscription]:
        """Every subscription, by ``sub_id``."""

    # --- audit ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def audit(self, entry: AuditEntry) -> AuditEntry: ...

    @abc.abstractmethod
    async def audit_entries(self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE,
                            actor: str | None = None, action: str | None = None,
                            since: float | None = None, until: float | None = None,
                            scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[AuditEntry]:
        """Audit entries in the order written (``seq``), keeping those whose ``actor`` and
        ``action`` are the ones given and whose ``time`` is in ``[since, until)``.  With a
        filter a page examines at most ``scan_limit`` entries (never fewer than ``limit``): it
        may be short, even empty, and still carry a ``next_cursor`` (as ``query_devices``)."""

    # --- identities: API keys, users, userSession tokens (dmengine/identity.py) -------------
    # Keys and tokens are found by their SHA-256 (hex, ``ApiKey.key_hash`` /
    # ``UserSession.token_hash``); the store never sees a key, a token or a password.

    @abc.abstractmethod
    async def create_api_key(self, key: ApiKey) -> ApiKey:
        """Adds a key; AlreadyExists if its ``key_id`` or its ``key_hash`` is taken."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKey: ...

    @abc.abstractmethod
    async def api_key_by_hash(self, key_hash: str) -> ApiKey:
        """The key whose SHA-256 is ``key_hash`` (revoked ones too); NotFound if none."""

    @abc.abstractmethod
    async def update_api_key(self, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        """Replaces fields of a key (``revoked``, ``rate``, …); ``key_id``, ``key_hash`` and
        ``created`` cannot change (ValidationError naming the field)."""

    @abc.abstractmethod
    async def list_api_keys(self, *, cursor: str | None = None,
                            limit: int = DEFAULT_PAGE) -> Page[ApiKey]:
        """Every key (revoked ones too), by ``key_id``."""

    @abc.abstractmethod
    async def create_user(self, user: User) -> User:
        """Adds a user; AlreadyExists if the name is taken."""

    @abc.abstractmethod
    async def get_user(self, name: str) -> User: ...

    @abc.abstractmethod
    async def update_user(self, name: str, changes: Mapping[str, Any]) -> User:
        """Replaces fields of a user; ``name`` and ``created`` cannot change."""

    @abc.abstractmethod
    async def delete_user(self, name: str) -> None: ...

    @abc.abstractmethod
    async def list_users(self, *, cursor: str | None = None,
                         limit: int = DEFAULT_PAGE) -> Page[User]: ...

    @abc.abstractmethod
    async def create_session(self, session: UserSession) -> UserSession:
        """Adds a session; AlreadyExists if its ``token_hash`` is taken."""

    @abc.abstractmethod
    async def get_session(self, token_hash: str) -> UserSession:
        """The session (expired ones too, until purged); NotFound if none."""

    @abc.abstractmethod
    async def delete_session(self, token_hash: str) -> None:
        """Ends a session (logout); NotFound if there is none."""

    @abc.abstractmethod
    def identity_generation(self) -> int:
        """A number that changes with every write that changes or ends an API key, a user or
        a userSession (``update_api_key``, ``update_user``, ``delete_user``,
        ``delete_session``; creating one does not change it, nor does purging expired
        sessions), whichever process made it.  A cache of identities is valid while it stays
        the same.  Cheap and non-blocking, without an await: every API call asks it (on SQL:
        a counter kept current by LISTEN/NOTIFY)."""

    @abc.abstractmethod
    async def purge_sessions(self, now: float, *, limit: int = DEFAULT_PAGE) -> int:
        """Deletes up to ``limit`` sessions that expired at or before ``now``, earliest first;
        returns how many."""

    # --- admin ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def check(self) -> list[str]:
        """Walks every index against its records; returns the problems found (empty = sound)."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Entries per named database."""


async def all_pages(fetch: Callable[[str | None], Awaitable[Page[T]]]) -> list[T]:
    """Every item of a cursor-paged listing, page after page::

        history = await all_pages(lambda c: store.task_history(task_id, cursor=c))
    """
    out: list[T] = []
    cursor: str | None = None
    while True:
        page = await fetch(cursor)
        out.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return out


__all__ = ["Store", "Page", "ImportReport", "DeviceQuery", "all_pages", "DEFAULT_PAGE",
           "MAX_PAGE", "DEFAULT_IMPORT_CHUNK", "DEFAULT_QUERY_SCAN"]
