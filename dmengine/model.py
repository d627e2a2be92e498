"""The engine's records (L0): msgspec Structs stored as msgpack in the store and sent as JSON by the API.

Constraints ride on ``Annotated[..., Meta(...)]`` so that a bad record fails with a path
(``Expected `str` matching regex ... - at `$.msisdn```).  A Struct built in Python is *not*
checked by msgspec; :func:`validate` checks it (encode + typed decode) and raises
:class:`dmengine.errors.ValidationError` with ``where`` set to the msgspec path.  The store
calls it on every write.

Secrets (the DM account's passwords, keys and nonces) are marked
``Meta(extra={"secret": True})``; :func:`redact` (a device) and :func:`redact_task` (a task: a
bootstrap carries the account it provisions) return a copy with them blanked, for every API read.

Times are UTC seconds since the epoch (float).  Schema changes bump :data:`SCHEMA_VERSION` and
add a function to :data:`MIGRATIONS` (see ``store/kv.py``: opening an older environment runs them).
"""
from __future__ import annotations

import enum
import os
import re
import threading
import time
from typing import Annotated, Any, Callable, Literal, TypeVar, Union

import msgspec
from msgspec import Meta, Struct, field

from .errors import ValidationError

SCHEMA_VERSION = 3   # 2: the store's job_state index; 3: dev_targets (store/kv.py INDEX_MIGRATIONS)

# --- field types ------------------------------------------------------------------------

#: Record ids are used inside store keys.  Their character rule (:data:`ID_PATTERN`) is
#: checked by :func:`validate` on every write rather than by a ``Meta(pattern=...)``: a regex
#: in the type would run again on every decode of a stored record (it doubled the cost of
#: reading a Task), and what is stored has been checked already.
ID_PATTERN = r"^[A-Za-z0-9:._+@/=-]+$"
Id = Annotated[str, Meta(min_length=1, max_length=128, extra={"pattern": ID_PATTERN})]
OptId = Union[Id, None]
DevId = Id
Imei = Annotated[str, Meta(pattern=r"^[0-9]{14,16}$")]
Msisdn = Annotated[str, Meta(pattern=r"^\+?[0-9]{5,15}$")]
Tac = Annotated[str, Meta(pattern=r"^[0-9]{8}$")]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Meta(max_length=1024)]
Name = Annotated[str, Meta(max_length=256)]
Uri = Annotated[str, Meta(min_length=1, max_length=1024)]
Time = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
Secret = Annotated[str, Meta(max_length=512, extra={"secret": True})]
#: An authentication nonce: not a key, but with a captured digest it lets a replay pass, so
#: API reads blank it like one.
Nonce = Annotated[str, Meta(max_length=256, extra={"secret": True})]
NodeValue = Annotated[str, Meta(max_length=65536)]


def now() -> float:
    return time.time()


def new_id(prefix: str = "") -> str:
    """A fresh, roughly time-ordered record id (48-bit ms time + 64 random bits, hex)."""
    return f"{prefix}{int(time.time() * 1000):012x}{_random8().hex()}"


# The ids' random bits come from os.urandom 4 KiB at a time: a campaign device gets several
# ids (its task, outbox entries, history), and a getrandom system call for each 8 bytes was
# most of new_id.  Every id still has 8 fresh bytes, never handed out twice: the lock, because
# the store's writer thread makes ids too; a forked child starts with an empty pool.
_ID_POOL_BYTES = 4096
_id_pool = b""
_id_pos = 0
_id_lock = threading.Lock()


def _random8() -> bytes:
    global _id_pool, _id_pos
    with _id_lock:
        pos = _id_pos
        if pos + 8 > len(_id_pool):
            _id_pool, pos = os.urandom(_ID_POOL_BYTES), 0
        _id_pos = pos + 8
        return _id_pool[pos:pos + 8]


def _reset_id_pool() -> None:
    global _id_pool, _id_pos, _id_lock
    _id_pool, _id_pos, _id_lock = b"", 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_id_pool)


# --- enums ------------------------------------------------------------------------------


class TaskState(enum.StrEnum):
    PENDING = "PENDING"
    NOTIFIED = "NOTIFIED"
    IN_PROGRESS = "IN_PROGRESS"
    WAITING_USER = "WAITING_USER"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


FINAL_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED,
                               TaskState.EXPIRED})

_T = TaskState
_ACTIVE = frozenset({_T.PENDING, _T.NOTIFIED, _T.IN_PROGRESS, _T.WAITING_USER})
_STOPS = frozenset({_T.FAILED, _T.CANCELLED, _T.EXPIRED})
#: Every legal task move (DESIGN.md §4).  Anything else is refused by the store's transition
#: helper with ``InvalidTransition``.  An unfinished task may move to any unfinished state (the
#: same state included: a retry, another notification, a device that connects on its own or
#: drops the session while the user is asked) and may fail, be cancelled or expire; it can
#: only succeed from IN_PROGRESS or WAITING_USER; a finished task never moves again.
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    _T.PENDING: _ACTIVE | _STOPS,
    _T.NOTIFIED: _ACTIVE | _STOPS,
    _T.IN_PROGRESS: _ACTIVE | _STOPS | {_T.SUCCEEDED},
    _T.WAITING_USER: _ACTIVE | _STOPS | {_T.SUCCEEDED},
    _T.SUCCEEDED: frozenset(),
    _T.FAILED: frozenset(),
    _T.CANCELLED: frozenset(),
    _T.EXPIRED: frozenset(),
}
del _T, _ACTIVE, _STOPS


class JobState(enum.StrEnum):
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class AuthScheme(enum.StrEnum):
    NONE = "NONE"
    BASIC = "BASIC"            # syncml:auth-basic: needs the password
    DIGEST = "DIGEST"          # syncml:auth-md5: needs K = B64(MD5(name:password)) only
    HMAC = "HMAC"              # syncml:auth-MAC: needs K only
    TRANSPORT = "TRANSPORT"    # TLS client auth / HTTP level


class FumoMode(enum.StrEnum):
    DOWNLOAD_AND_UPDATE = "DOWNLOAD_AND_UPDATE"    # one Exec on ./DownloadAndUpdate
    DOWNLOAD_THEN_UPDATE = "DOWNLOAD_THEN_UPDATE"  # Exec Download, then Exec Update


# --- devices and capabilities ----------------------------------------------------------


class DmAccount(Struct, kw_only=True, omit_defaults=True):
    """The DM account both sides share (DMAcc).  Client = the device authenticating to us,
    server = us authenticating to the device (also the package-0 digest).  For DIGEST/HMAC the
    keys ``K = B64(MD5(name ":" password))`` are enough; BASIC needs the password itself."""

    server_id: Annotated[str, Meta(min_length=1, max_length=256)]
    auth_scheme: AuthScheme = AuthScheme.DIGEST
    client_name: Name = ""
    client_password: Union[Secret, None] = None
    client_key: Union[Secret, None] = None
    client_nonce: Union[Nonce, None] = None        # base64, we issued it
    server_password: Union[Secret, None] = None
    server_key: Union[Secret, None] = None
    server_nonce: Union[Nonce, None] = None        # base64, device issued it
    # until when a package 1 may authenticate with the re-synchronisation nonce: set when a
    # package #0 went out signed with it, cleared when the device next authenticates
    resync_until: Union[float, None] = None


class Device(Struct, kw_only=True, omit_defaults=True):
    dev_id: DevId                                  # e.g. "IMEI:356938035643809"
    imei: Union[Imei, None] = None
    msisdn: Union[Msisdn, None] = None
    capability: OptId = None                       # Capability.oid
    account: Union[DmAccount, None] = None
    #: a bootstrapped account not yet used: it becomes ``account`` when the device first
    #: authenticates with it (a bootstrap that never arrives leaves the device its old one)
    pending_account: Union[DmAccount, None] = None
    last_contact: Union[Time, None] = None
    devinfo: dict[Uri, NodeValue] = {}
    devdetail: dict[Uri, NodeValue] = {}
    tz: Union[Annotated[str, Meta(max_length=64)], None] = None
    created: Time = 0.0
    updated: Time = 0.0
    version: Count = 0                             # bumped by every update (optimistic writes)

    @property
    def tac(self) -> str | None:
        return self.imei[:8] if self.imei else None


class Capability(Struct, kw_only=True, omit_defaults=True):
    oid: Id
    make: Name = ""
    model: Name = ""
    firmware_versions: list[Name] = []
    tacs: list[Tac] = []
    mo_paths: dict[Annotated[str, Meta(max_length=64)], Uri] = {}   # e.g. {"fumo": "./FUMO/1"}
    fumo_mode: FumoMode = FumoMode.DOWNLOAD_AND_UPDATE
    created: Time = 0.0
    updated: Time = 0.0


# --- operations (tagged union on "operation") -------------------------------------------


class UpdateOp(Struct, tag_field="operation", tag="UPDATE", kw_only=True, omit_defaults=True):
    content_id: OptId = None                       # None: picked by capability + firmware
    fumo_path: Union[Uri, None] = None             # None: from the capability


class QueryOp(Struct, tag_field="operation", tag="QUERY", kw_only=True, omit_defaults=True):
    nodes: Annotated[list[Uri], Meta(min_length=1, max_length=1000)]


class NodeChange(Struct, kw_only=True, omit_defaults=True):
    uri: Uri
    action: Literal["Add", "Replace", "Delete"] = "Replace"
    value: Union[NodeValue, None] = None
    format: Annotated[str, Meta(max_length=16)] = "chr"
    type: Union[Annotated[str, Meta(max_length=128)], None] = None


class SetOp(Struct, tag_field="operation", tag="SET", kw_only=True, omit_defaults=True):
    changes: Annotated[list[NodeChange], Meta(min_length=1, max_length=1000)]


class ExecOp(Struct, tag_field="operation", tag="EXEC", kw_only=True, omit_defaults=True):
    uri: Uri
    data: Union[NodeValue, None] = None


class DiagOp(Struct, tag_field="operation", tag="DIAG", kw_only=True, omit_defaults=True):
    nodes: Annotated[list[Uri], Meta(max_length=1000)] = []


class BootstrapOp(Struct, tag_field="operation", tag="BOOTSTRAP", kw_only=True,
                  omit_defaults=True):
    account: DmAccount
    security: Literal["NETWORKID", "USERPIN", "USERPIN_NETWORKID", "NONE"] = "NETWORKID"


Operation = Union[UpdateOp, QueryOp, SetOp, ExecOp, DiagOp, BootstrapOp]


# --- tasks, history, jobs -------------------------------------------------------------


class TaskResult(Struct, kw_only=True, omit_defaults=True):
    statuses: dict[Annotated[str, Meta(max_length=1024)], int] = {}   # "Exec ./FUMO/1/..." → 200
    fumo_result: Union[int, None] = None           # Generic Alert 1226 result code
    nodes: dict[Uri, NodeValue] = {}               # Get results / diagnostics values
    message: Union[Text, None] = None


class Task(Struct, kw_only=True, omit_defaults=True, gc=False):
    task_id: Id
    dev_id: DevId
    op: Operation
    job_id: OptId = None
    seq: Count = 0                                 # set by the store on create (key order)
    version: Count = 0                             # optimistic check, bumped on every write
    history_len: Count = 0                         # history entries so far (set by the store)
    b_optin: bool = False
    accept_device_policy: Literal[10, 20, 30, 40] = 10
    test_cycle: bool = False
    state: TaskState = TaskState.PENDING
    attempts: Count = 0
    #: wake-ups sent while waiting for the result alert of an accepted Exec (bounded by
    #: BrokerConfig.alert_followups; the package is not sent again)
    followups: Count = 0
    next_attempt: Union[Time, None] = None
    deadline: Union[Time, None] = None
    correlator: Union[Annotated[str, Meta(max_length=256)], None] = None
    result: Union[TaskResult, None] = None
    cause: Union[Text, None] = None
    created: Time = 0.0
    updated: Time = 0.0
    finished: Union[Time, None] = None
    #: who asked: the external system (``Identity.owner``, dmengine/identity.py) whose call
    #: made it, or its job's owner; "" for tasks made before identities (only admins see them)
    owner: Name = ""


class HistoryEntry(Struct, kw_only=True, omit_defaults=True, gc=False):
    task_id: Id
    seq: Count                                     # 1, 2, 3 … per task
    time: Time
    to_state: TaskState
    from_state: Union[TaskState, None] = None      # None for the creation entry
    cause: Union[Text, None] = None
    dm_status: Union[int, None] = None
    result_code: Union[int, None] = None


class TimeWindow(Struct, kw_only=True, omit_defaults=True):
    """Daily window in the device's (or UTC) time: seconds since midnight, end exclusive."""
    start: Annotated[int, Meta(ge=0, le=86400)]
    end: Annotated[int, Meta(ge=0, le=86400)]
    days: list[Annotated[int, Meta(ge=0, le=6)]] = field(default_factory=lambda: list(range(7)))  # 0 = Monday


class StopRule(Struct, kw_only=True, omit_defaults=True):
    """Stop the job when ``failed / finished >= max_failure_ratio`` after ``min_finished`` tasks."""
    max_failure_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0
    min_finished: Count = 0


class Stage(Struct, kw_only=True, omit_defaults=True):
    """One group of a staged rollout: the job runs up to ``percent`` of its targets (counted
    from the start, so stages nest), then moves on once the tasks run so far are all final and
    their success ratio is at least ``success_threshold`` — or waits for restartJob when
    ``approval`` is set (or the threshold was missed: the job pauses with the cause)."""
    percent: Annotated[float, Meta(gt=0, le=100)]
    success_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.0
    approval: bool = False


class Selection(Struct, kw_only=True, omit_defaults=True):
    """The devices of a job: the ones named, else those matching the query's filters."""
    dev_ids: list[DevId] = []
    capability: OptId = None
    tac: Union[Annotated[str, Meta(pattern=r"^[0-9]{8}$")], None] = None
    model: Union[Name, None] = None
    firmware: Union[Name, None] = None


class Job(Struct, kw_only=True, omit_defaults=True):
    job_id: Id
    state: JobState = JobState.SCHEDULED
    name: Name = ""
    owner: Name = ""
    op: Union[Operation, None] = None
    b_optin: bool = False
    accept_device_policy: Literal[10, 20, 30, 40] = 10
    test_cycle: bool = False
    total: Count = 0                               # tasks created for this job
    counts: dict[TaskState, Count] = {}            # tasks per state (test-cycle tasks excluded)
    test_counts: dict[TaskState, Count] = {}       # test-cycle tasks per state
    rate_limit: Union[Annotated[float, Meta(gt=0)], None] = None      # tasks started per second
    concurrency: Union[Annotated[int, Meta(ge=1)], None] = None
    windows: list[TimeWindow] = []
    stop_rule: Union[StopRule, None] = None
    start_at: Union[Time, None] = None
    end_at: Union[Time, None] = None
    cause: Union[Text, None] = None
    created: Time = 0.0
    updated: Time = 0.0
    finished: Union[Time, None] = None
    # --- campaigns (DMSCHED) ---
    selection: Union[Selection, None] = None
    targets: Count = 0                             # devices selected (job_targets rows)
    stages: list[Stage] = []                       # staged rollout; none: all at once
    stage: Count = 0                               # the stage running now
    priority: int = 0                              # higher goes first for shared budgets
    tz: Union[Annotated[str, Meta(max_length=64)], None] = None   # windows' zone (else UTC)
    deadline: Union[Time, None] = None             # of each task (default: end_at or the TTL)
    started: Union[Time, None] = None              # first RUNNING
    # the stop rule counts failures since the last (re)start: what was final and failed then
    base_final: Count = 0
    base_failed: Count = 0


# --- content, outbox, audit, schema ------------------------------------------------


class Content(Struct, kw_only=True, omit_defaults=True):
    content_id: Id
    name: Name
    size: Count
    sha256: Sha256
    capability: OptId = None
    from_version: Union[Name, None] = None
    to_version: Union[Name, None] = None
    path: Union[Annotated[str, Meta(max_length=4096)], None] = None
    content_type: Annotated[str, Meta(max_length=128)] = "application/octet-stream"
    downloads: Count = 0
    created: Time = 0.0


class OutboxEntry(Struct, kw_only=True, omit_defaults=True):
    entry_id: Id
    kind: Literal["webhook", "charging"]
    due: Time
    payload: dict[str, Any] = {}
    target: Union[Annotated[str, Meta(max_length=2048)], None] = None   # URL or recipient
    attempts: Count = 0
    last_error: Union[Text, None] = None
    created: Time = 0.0
    #: an event of this topic (dmengine/webhooks.py): the store writes the entry only while
    #: some subscription listens to the topic, so nobody pays for events no one receives
    topic: Union[Literal["task", "job", "charging"], None] = None


class AuditEntry(Struct, kw_only=True, omit_defaults=True):
    time: Time
    actor: Name
    action: Name
    target: Union[Annotated[str, Meta(max_length=1024)], None] = None
    detail: dict[str, Any] = {}
    seq: Count = 0                                 # set by the store


# --- identities: API keys, users, sessions (dmengine/identity.py) --------------------------

#: Roles, weakest first: each may do what the ones before it may
#: (viewer: reads; operator: operations, jobs, devices, content; admin: everything).
Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
#: A SHA-256 as hex: what the store keeps of an API key or a session token (never the
#: secret).  A length rule, not a regex: records are decoded on every API call.
SecretHash = Annotated[str, Meta(min_length=64, max_length=64, extra={"secret": True})]
OptRate = Union[Annotated[float, Meta(ge=0)], None]        # requests/s; 0: no limit
OptBurst = Union[Annotated[int, Meta(ge=1, le=1_000_000)], None]


class ApiKey(Struct, kw_only=True, omit_defaults=True):
    """An external system's API key.  ``name`` is the system: the owner of the jobs and tasks
    its calls make.  The key itself is never stored, only its SHA-256 (``key_hash``)."""
    key_id: Id
    name: Name
    role: Role
    key_hash: SecretHash
    rate: OptRate = None                           # None: the configured default
    burst: OptBurst = None
    created: Time = 0.0
    created_by: Name = ""
    revoked: Union[Time, None] = None
    revoked_by: Union[Name, None] = None


class User(Struct, kw_only=True, omit_defaults=True):
    """A person or system that logs in with a name and password (scrypt hash, PHC-like
    ``scrypt$n$r$p$salt$hash``).  ``system``: whose jobs and tasks (default: the name)."""
    name: Id
    role: Role
    password_hash: Annotated[str, Meta(max_length=512, extra={"secret": True})]
    system: Name = ""
    rate: OptRate = None
    burst: OptBurst = None
    created: Time = 0.0
    created_by: Name = ""


class UserSession(Struct, kw_only=True, omit_defaults=True):
    """A ``userSession`` token's record, stored under the token's SHA-256 (``token_hash``).
    ``subject`` is the key_id (``kind`` "key") or the user name (``kind`` "user"); the role is
    read from that record on every use, so a revoked key or a deleted user ends its sessions."""
    token_hash: SecretHash
    session_id: Id
    kind: Literal["key", "user"]
    subject: Id
    expires: Time
    created: Time = 0.0


# --- push: subscriptions, dead letters, charging events (dmengine/webhooks.py) -------------

EventTopic = Literal["task", "job", "charging"]
EVENT_TOPICS: tuple[str, ...] = ("task", "job", "charging")


class Subscription(Struct, kw_only=True, omit_defaults=True):
    """A webhook: events of ``topics`` POSTed to ``url``, signed with ``secret`` (HMAC-SHA256;
    shown once, when the subscription is made).  ``job_id``: only that job's task and job
    events (charging events are not filtered).  ``owner``: the external system that made it;
    it gets the events of that owner's tasks and jobs only, unless ``all_owners`` (made by
    an identity that sees everything: an admin)."""
    sub_id: Id
    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    topics: Annotated[list[EventTopic], Meta(min_length=1, max_length=3)]
    secret: Secret
    owner: Name = ""
    all_owners: bool = False
    job_id: OptId = None
    description: Union[Text, None] = None
    created: Time = 0.0


class DeadLetter(Struct, kw_only=True, omit_defaults=True):
    """A delivery that failed ``entry.attempts`` times: kept until replayed."""
    entry: OutboxEntry
    time: Time
    error: Union[Text, None] = None


class ChargingEvent(Struct, kw_only=True, omit_defaults=True):
    """IF-4: one completed (not test-cycle) operation.  ``event_id`` is its outbox entry's id,
    ``time`` when the task finished."""
    event_id: Id
    time: Time
    task_id: OptId = None
    job_id: OptId = None
    owner: Name = ""
    dev_id: Union[DevId, None] = None
    imei: Union[Annotated[str, Meta(max_length=64)], None] = None
    msisdn: Union[Annotated[str, Meta(max_length=64)], None] = None
    devinfo: dict[Uri, NodeValue] = {}
    operation: Union[Name, None] = None
    content_id: OptId = None
    content_version: Union[Name, None] = None
    result: Union[Name, None] = None               # the task's final state (SUCCEEDED)
    result_code: Union[int, None] = None           # FUMO / Exec result code, when there is one
    cause: Union[Text, None] = None


class SchemaRecord(Struct, kw_only=True):
    version: int
    created: Time = 0.0
    migrated: Time = 0.0


# --- helpers ------------------------------------------------------------------------------

R = TypeVar("R", bound=Struct)

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def decoder(cls: type[R]) -> msgspec.msgpack.Decoder[R]:
    d = _DECODERS.get(cls)
    if d is None:
        d = _DECODERS[cls] = msgspec.msgpack.Decoder(cls)
    return d


def where_of(exc: msgspec.ValidationError) -> str | None:
    """The ``$.path`` msgspec put at the end of its message, or None."""
    msg = str(exc)
    i = msg.rfind(" - at `")
    return msg[i + 7:-1] if i >= 0 and msg.endswith("`") else "$"


_ID_RE = re.compile(ID_PATTERN)
_ID_FIELDS: dict[type, tuple[str, ...]] = {}


def _id_fields(cls: type) -> tuple[str, ...]:
    """Top-level fields of ``cls`` typed ``Id`` / ``OptId`` (found by the Meta extra)."""
    got = _ID_FIELDS.get(cls)
    if got is None:
        out = []
        for f in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
            t = f.type
            for sub in (t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)):
                if (getattr(sub, "extra", None) or {}).get("pattern") == ID_PATTERN:
                    out.append(f.name)
        got = _ID_FIELDS[cls] = tuple(out)
    return got


def validate(obj: R) -> bytes:
    """Checks ``obj`` against its annotations and the id rule; returns its msgpack bytes.

    Raises :class:`ValidationError` with ``where`` = the msgspec path (``$.msisdn``).
    """
    try:
        data = _ENCODER.encode(obj)
    except (TypeError, ValueError, OverflowError) as exc:   # a value of the wrong Python type
        raise ValidationError(f"{type(obj).__name__}: {exc}", where="$") from None
    try:
        decoder(type(obj)).decode(data)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"{type(obj).__name__}: {exc}", where=where_of(exc)) from None
    check_ids(obj)
    return data


def check_ids(obj: Struct) -> None:
    """The id rule (:data:`ID_PATTERN`) on ``obj``'s id fields: all :func:`validate` adds to
    what ``msgspec.convert`` checked when it made ``obj``."""
    for name in _id_fields(type(obj)):
        v = getattr(obj, name)
        if v is not None and _ID_RE.match(v) is None:
            raise ValidationError(f"{type(obj).__name__}: Expected `str` matching regex "
                                  f"{ID_PATTERN!r} - at `$.{name}`", where=f"$.{name}")


def _secret_fields(cls: type) -> frozenset[str]:
    info = msgspec.inspect.type_info(cls)
    out = set()
    for f in info.fields:  # type: ignore[attr-defined]
        t = f.type
        types = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
        for sub in types:
            extra = getattr(sub, "extra", None)
            if extra and extra.get("secret"):
                out.add(f.name)
    return frozenset(out)


_ACCOUNT_SECRETS = _secret_fields(DmAccount)


def redact_account(acc: DmAccount | None) -> DmAccount | None:
    if acc is None:
        return None
    return msgspec.structs.replace(acc, **{k: ("***" if getattr(acc, k) else None)
                                           for k in _ACCOUNT_SECRETS})


def redact(dev: Device) -> Device:
    """The device as API reads show it: secrets replaced by ``"***"`` (or None when unset)."""
    if dev.account is None and dev.pending_account is None:
        return dev
    return msgspec.structs.replace(dev, account=redact_account(dev.account),
                                   pending_account=redact_account(dev.pending_account))


def redact_task(task: Task) -> Task:
    """The task as API reads show it: a bootstrap's account (the generated passwords and
    nonces it provisions) redacted like a device's; other operations carry no secret."""
    op = task.op
    if isinstance(op, BootstrapOp):
        return msgspec.structs.replace(
            task, op=msgspec.structs.replace(op, account=redact_account(op.account)))
    return task


def secret_fields() -> frozenset[str]:
    """Names of the DmAccount fields marked secret."""
    return _ACCOUNT_SECRETS


#: Schema migrations: ``MIGRATIONS[v]`` upgrades an environment from version ``v`` to ``v + 1``.
#: Each gets the store's raw key-value write transaction (see store/kv.py ``KVTxn``).
MIGRATIONS: dict[int, Callable[[Any], None]] = {}

__all__ = [
    "SCHEMA_VERSION", "TaskState", "JobState", "AuthScheme", "FumoMode", "TASK_TRANSITIONS",
    "FINAL_TASK_STATES", "DmAccount", "Device", "Capability", "UpdateOp", "QueryOp", "NodeChange",
    "SetOp", "ExecOp", "DiagOp", "BootstrapOp", "Operation", "TaskResult", "Task", "HistoryEntry",
    "TimeWindow", "StopRule", "Stage", "Selection", "Job", "Content", "OutboxEntry", "AuditEntry", "SchemaRecord",
    "Role", "ROLES", "ApiKey", "User", "UserSession",
    "EventTopic", "EVENT_TOPICS", "Subscription", "DeadLetter", "ChargingEvent",
    "validate", "redact", "redact_account", "redact_task", "secret_fields", "new_id", "now",
    "MIGRATIONS", "decoder", "where_of", "field",
]
