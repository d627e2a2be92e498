"""The API's bodies (L5): request and response Structs, camelCase on the wire.

The engine's records (:mod:`dmengine.model`) are also the store's msgpack format, so their
field names stay snake_case; the API converts at its edge.  :func:`view` derives from a
record class a *view* Struct with the same Python field names, the same types and
constraints, and ``rename="camel"`` — ``Device.dev_id`` is ``devId`` on the wire — with the
nested records replaced by their views.  :func:`to_view` turns a record into its view for an
answer and :func:`to_model` a decoded request view back into the record.  The OpenAPI
document (:mod:`dmengine.wsi.openapi`) is generated from these Structs, so what the document
says is what the code decodes and encodes.

Answers carry every field, defaults and nulls too (``omit_defaults=False``): a client reads
one shape.  Request views refuse unknown fields, so a snake_case name (``dev_id``) is an
error naming it rather than a field silently dropped.  Listings answer
``{"items": [...], "nextCursor": str | null}`` (the ``*Page`` Structs).
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Callable, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .. import model
from ..model import (ID_PATTERN, BootstrapOp, Capability, Content, Count, Device, DiagOp,
                     DmAccount, ExecOp, HistoryEntry, Id, Job, JobState, Name, QueryOp, SetOp,
                     Task, TaskResult, TaskState, UpdateOp)

__all__ = [
    "camel", "camel_path", "view", "to_view", "to_model", "Target", "OperationIn",
    "OperationOut", "DeviceView", "DeviceRow", "DevicePatch", "AccountPatch", "CapabilityView",
    "CapabilityPatch", "ContentView", "HistoryView", "TaskDataView", "TaskSummary", "JobOut",
    "ErrorBody", "ErrorItem", "DoOperationRequest", "DoBootstrapRequest", "TaskCreated",
    "BootstrapJobCreated", "TaskCancelled", "JobCreated", "DevicePage", "TaskPage", "JobPage",
    "HistoryPage", "ContentPage", "CapabilityPage", "DiagnosticsPage", "Diagnostics",
    "ImportReport", "RowErrorView", "Health", "PageQuery", "ID_SCHEMA",
]


def camel(name: str) -> str:
    """``dev_id`` → ``devId``, ``b_optin`` → ``bOptin``; a name without ``_`` is kept."""
    if "_" not in name:
        return name
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def camel_path(where: str | None) -> str | None:
    """A field path of a record (``$.account.client_name``, ``targets[3].dev_id``) in the
    API's names (``$.account.clientName``, ``targets[3].devId``)."""
    if not where or "_" not in where:
        return where
    out = []
    for part in where.split("."):
        name, bracket, rest = part.partition("[")
        out.append(camel(name) + bracket + rest)
    return ".".join(out)


#: the id rule of :data:`dmengine.model.ID_PATTERN` as JSON Schema (the records check it on
#: write, not in their types: see model.py)
ID_SCHEMA = {"pattern": ID_PATTERN}


# --- views of the records ---------------------------------------------------------------------

_VIEWS: dict[tuple[Any, ...], type] = {}
_DEFAULT_VIEW: dict[type, type] = {}          # record class → its view
_TO_VIEW: dict[type, Callable[[Any], Any]] = {}
_TO_MODEL: dict[type, Callable[[Any], Any]] = {}


def _meta(m: Any) -> Any:
    """A Meta whose ``extra`` names a pattern (the ids) also puts it in the JSON Schema."""
    if isinstance(m, Meta) and m.extra and "pattern" in m.extra and m.pattern is None:
        kw = {k: getattr(m, k) for k in ("gt", "ge", "lt", "le", "multiple_of", "min_length",
                                         "max_length", "tz", "title", "description",
                                         "examples") if getattr(m, k) is not None}
        return Meta(**kw, extra_json_schema={**(m.extra_json_schema or {}),
                                             "pattern": m.extra["pattern"]}, extra=m.extra)
    return m


def _sub(t: Any) -> Any:
    """``t`` with every record class in it replaced by its view."""
    origin = typing.get_origin(t)
    if origin is Annotated:
        base, *metas = typing.get_args(t)
        return Annotated[tuple([_sub(base), *(_meta(m) for m in metas)])]  # type: ignore
    if origin in (Union, types.UnionType):
        return Union[tuple(_sub(a) for a in typing.get_args(t))]  # type: ignore
    if origin is list:
        return list[_sub(typing.get_args(t)[0])]  # type: ignore
    if origin is dict:
        k, v = typing.get_args(t)
        return dict[_sub(k), _sub(v)]  # type: ignore
    if isinstance(t, type) and issubclass(t, Struct):
        return view(t)
    return t


def _has_struct(t: Any) -> bool:
    if isinstance(t, type) and issubclass(t, Struct):
        return True
    return any(_has_struct(a) for a in typing.get_args(t) if not isinstance(a, Meta))


def _convert_value(v: Any, table: dict[type, Callable[[Any], Any]]) -> Any:
    if isinstance(v, Struct):
        return table[type(v)](v)
    if isinstance(v, list):
        return [_convert_value(x, table) for x in v]
    if isinstance(v, dict):
        return {k: _convert_value(x, table) for k, x in v.items()}
    return v


def _converter(src_fields: list[tuple[str, bool]], dst: type,
               table: dict[type, Callable[[Any], Any]]) -> Callable[..., Any]:
    """``convert(obj, **extra)``: a ``dst`` with the fields of ``obj`` (same Python names),
    nested records converted through ``table``.  Generated code (one keyword call, no dict):
    an NDJSON import converts every row."""
    def nested(v: Any) -> Any:
        return None if v is None else _convert_value(v, table)
    args = ", ".join(f"{n}=_nested(o.{n})" if is_nested else f"{n}=o.{n}"
                     for n, is_nested in src_fields)
    code = (f"def convert(o, **extra):\n"
            f"    if extra:\n"
            f"        return _dst({args}{', ' if args else ''}**extra)\n"
            f"    return _dst({args})\n")
    scope: dict[str, Any] = {"_dst": dst, "_nested": nested}
    exec(code, scope)                      # noqa: S102 - field names are identifiers
    return scope["convert"]  # type: ignore[no-any-return]


def view(cls: type, *, name: str | None = None, exclude: frozenset[str] | set[str] = frozenset(),
         extra: tuple[tuple[str, Any, Any], ...] = (), forbid_unknown: bool = True,
         doc: str | None = None) -> type:
    """The camelCase view of the record class ``cls`` (cached).  ``exclude`` leaves fields
    out (internal ones); ``extra`` adds ``(name, type, default)`` fields an answer derives;
    ``forbid_unknown=False`` makes a decoder that ignores unknown fields."""
    key = (cls, name, frozenset(exclude), extra, forbid_unknown)
    got = _VIEWS.get(key)
    if got is not None:
        return got
    cfg = cls.__struct_config__  # type: ignore[attr-defined]
    fields = []
    plan = []
    for f in msgspec.structs.fields(cls):
        if f.name in exclude:
            continue
        t = _sub(f.type)
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, t, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, t, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, t))
        plan.append((f.name, _has_struct(f.type)))
    for fname, t, default in extra:
        fields.append((fname, t, default))
    tag_kw: dict[str, Any] = {}
    if cfg.tag_field is not None:
        tag_kw = {"tag_field": cfg.tag_field, "tag": cfg.tag}
    # gc=False: a view holds no cycle, and the collector need not track the one made per
    # NDJSON row or per answer
    v = msgspec.defstruct(name or cls.__name__, fields, kw_only=True, rename="camel",
                          forbid_unknown_fields=forbid_unknown, module=__name__, gc=False,
                          **tag_kw)
    if doc or cls.__doc__:
        v.__doc__ = doc or cls.__doc__
    _VIEWS[key] = v
    if not exclude and not extra and name is None and forbid_unknown:
        _DEFAULT_VIEW[cls] = v
        _TO_VIEW[cls] = _converter(plan, v, _TO_VIEW)
    if not extra:
        _TO_MODEL[v] = _converter(plan, cls, _TO_MODEL)
    _DERIVED_TO_VIEW[v] = _converter(plan, v, _TO_VIEW)
    return v


_DERIVED_TO_VIEW: dict[type, Callable[..., Any]] = {}


def to_view(obj: Any, cls: type | None = None, **extra: Any) -> Any:
    """The view of the record ``obj`` (its default view, or ``cls``, a view of its class
    made with :func:`view`; ``extra`` fills the fields ``cls`` adds)."""
    if cls is None:
        return _TO_VIEW[type(obj)](obj)
    return _DERIVED_TO_VIEW[cls](obj, **extra)


def to_model(obj: Any) -> Any:
    """The record a decoded request view stands for."""
    return _TO_MODEL[type(obj)](obj)


# the records' views (answers and, where a record is the request, request bodies)
DmAccountView = view(DmAccount)
DeviceView = view(Device)
#: an NDJSON import row: a device, unknown fields ignored (a file may carry more columns)
DeviceRow = view(Device, name="DeviceRow", forbid_unknown=False)
CapabilityView = view(Capability)
TaskResultView = view(TaskResult)
HistoryView = view(HistoryEntry)
UpdateOpView = view(UpdateOp)
QueryOpView = view(QueryOp)
SetOpView = view(SetOp)
ExecOpView = view(ExecOp)
DiagOpView = view(DiagOp)
BootstrapOpView = view(BootstrapOp)

#: the operation of doOperation / createDeployments / doBulkOperation (tagged on "operation")
OperationIn = Union[UpdateOpView, QueryOpView, SetOpView, ExecOpView, DiagOpView]  # type: ignore
#: an operation in an answer (a bootstrap task carries its account, secrets blanked)
OperationOut = Union[UpdateOpView, QueryOpView, SetOpView, ExecOpView, DiagOpView,  # type: ignore
                     BootstrapOpView]

ContentView = view(Content, name="ContentView", exclude={"path"},
                   extra=(("download_url", Union[str, None], None),),
                   doc="A content record; ``downloadUrl`` is where devices fetch it.")
JobOut = view(Job, name="JobView", exclude={"op", "base_final", "base_failed"},
              extra=(("operation", Union[OperationOut, None], None),
                     ("final", int, 0), ("succeeded", int, 0), ("failed", int, 0),
                     ("progress", float, 0.0), ("rate", Union[float, None], None),
                     ("eta_seconds", Union[float, None], None)),
              doc="A job: the record and what is derived from it (final, succeeded, failed = "
                  "FAILED + EXPIRED, progress = final / targets, rate = tasks finished per "
                  "second since the start, etaSeconds).")


class _Out(Struct, kw_only=True, rename="camel"):
    pass


class _In(Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


# --- errors ----------------------------------------------------------------------------------


class ErrorItem(_Out):
    error: str
    message: str
    where: Union[str, None] = None


class ErrorBody(_Out):
    """Every error: ``error`` a code, ``message`` for people, ``where`` the field, query
    parameter or header at fault (in the request's names) or null.  A list request that
    names several bad items lists each in ``errors``."""
    error: str
    message: str
    where: Union[str, None]
    errors: Union[list[ErrorItem], UnsetType] = UNSET


# --- requests --------------------------------------------------------------------------------

OptStr = Union[Annotated[str, Meta(max_length=128)], None]


class Target(_In):
    """One device, named by exactly one of ``msisdn``, ``imei``, ``devId``."""
    msisdn: OptStr = None
    imei: OptStr = None
    dev_id: OptStr = None


class DoOperationRequest(_In):
    """doOperation: ``bOptin`` true asks the user first (UI alert), false runs in the
    background; ``acceptDevicePolicy`` 10 same TAC, 20 any IMEI if none on record, 30 any
    IMEI, 40 ask the carrier (refused when no carrier callback is configured);
    ``testCycle`` marks the task as a test (no charging event, not counted in jobs)."""
    target: Target
    operation: OperationIn
    b_optin: bool = False
    accept_device_policy: Literal[10, 20, 30, 40] = 10
    test_cycle: bool = False
    deadline: Union[Annotated[float, Meta(ge=0)], None] = None


Security = Literal["NETWORKID", "USERPIN", "USERPIN_NETWORKID", "NONE"]


class DoBootstrapRequest(_In):
    """doBootstrap: ``target`` (one device → ``{taskId}``) or ``targets`` (a list → a job,
    ``{jobId, taskIds}``)."""
    target: Union[Target, None] = None
    targets: Union[list[Target], None] = None
    security: Security = "NETWORKID"
    pin: Union[Annotated[str, Meta(max_length=64)], None] = None
    server_id: Union[Annotated[str, Meta(max_length=256)], None] = None
    name: Union[Name, None] = None
    owner: Union[Name, None] = None


class AccountPatch(_In):
    """A DM account merge-patch: the fields given replace the stored ones (null removes)."""
    server_id: Union[Annotated[str, Meta(min_length=1, max_length=256)], None, UnsetType] = UNSET
    auth_scheme: Union[model.AuthScheme, None, UnsetType] = UNSET
    client_name: Union[Name, None, UnsetType] = UNSET
    client_password: Union[model.Secret, None, UnsetType] = UNSET
    client_key: Union[model.Secret, None, UnsetType] = UNSET
    client_nonce: Union[model.Nonce, None, UnsetType] = UNSET
    server_password: Union[model.Secret, None, UnsetType] = UNSET
    server_key: Union[model.Secret, None, UnsetType] = UNSET
    server_nonce: Union[model.Nonce, None, UnsetType] = UNSET


class DevicePatch(_In):
    """updateDeviceInstance: a JSON merge-patch of the fields that may change; null removes
    a field, ``account`` is merged field by field."""
    imei: Union[model.Imei, None, UnsetType] = UNSET
    msisdn: Union[model.Msisdn, None, UnsetType] = UNSET
    capability: Union[Annotated[Id, Meta(extra_json_schema=ID_SCHEMA)], None, UnsetType] = UNSET
    tz: Union[Annotated[str, Meta(max_length=64)], None, UnsetType] = UNSET
    account: Union[AccountPatch, None, UnsetType] = UNSET


class CapabilityPatch(_In):
    """updateDeviceCapability: a JSON merge-patch; null puts a field back to its default."""
    make: Union[Name, None, UnsetType] = UNSET
    model: Union[Name, None, UnsetType] = UNSET
    firmware_versions: Union[list[Name], None, UnsetType] = UNSET
    tacs: Union[list[model.Tac], None, UnsetType] = UNSET
    mo_paths: Union[dict[Annotated[str, Meta(max_length=64)], model.Uri], None,
                    UnsetType] = UNSET
    fumo_mode: Union[model.FumoMode, None, UnsetType] = UNSET


def patch_changes(patch: Any, record_cls: type) -> dict[str, Any]:
    """The store's ``changes`` of a decoded merge-patch: the fields given (snake_case), a
    null put back to the record's default (None for optional fields)."""
    defaults = {f.name: f for f in msgspec.structs.fields(record_cls)}
    out: dict[str, Any] = {}
    for name in patch.__struct_fields__:
        v = getattr(patch, name)
        if v is UNSET:
            continue
        if v is None:
            f = defaults[name]
            if f.default_factory is not msgspec.NODEFAULT:
                v = f.default_factory()
            elif f.default is not msgspec.NODEFAULT:
                v = f.default
        elif isinstance(v, Struct):
            v = {k: getattr(v, k) for k in v.__struct_fields__ if getattr(v, k) is not UNSET}
        out[name] = v
    return out


# --- answers -----------------------------------------------------------------------------------


class Health(_Out):
    status: str


class TaskCreated(_Out):
    task_id: str


class BootstrapJobCreated(_Out):
    """The list form of doBootstrap: ``taskIds[i]`` bootstraps ``targets[i]``."""
    job_id: str
    task_ids: list[str]


class TaskCancelled(_Out):
    task_id: str
    status: TaskState


class JobCreated(_Out):
    job_id: str
    state: JobState
    targets: Count


class TaskSummary(_Out):
    """A task as listings show it (getTasks); ``status`` is the seeds' ``getStatus()``,
    ``operation`` the operation's name (UPDATE, QUERY, SET, EXEC, DIAG, BOOTSTRAP),
    ``owner`` the system that asked for it."""
    task_id: str
    dev_id: str
    job_id: Union[str, None]
    owner: str
    status: TaskState
    operation: str
    test_cycle: bool
    attempts: int
    created: float
    updated: float
    finished: Union[float, None]
    cause: Union[str, None]
    result: Union[TaskResultView, None]  # type: ignore[valid-type]


class TaskDataView(TaskSummary, kw_only=True):
    """getTaskById: the seeds' TaskData — ``status`` (``getStatus()``), the device, the
    operation (``operation`` its name, ``op`` the operation as requested, secrets blanked),
    the options, timestamps, attempts and the result (DM statuses, FUMO result code, node
    values)."""
    op: OperationOut  # type: ignore[valid-type]
    b_optin: bool
    accept_device_policy: int
    deadline: Union[float, None]
    next_attempt: Union[float, None]


class RowErrorView(_Out):
    line: int
    where: Union[str, None]
    message: str


class ImportReport(_Out):
    """importDeviceInstances: rows read, created, replaced, rejected; the first rejected
    rows (line, column or field, why) and how many more were not listed."""
    rows: int
    created: int
    replaced: int
    rejected: int
    errors: list[RowErrorView]
    errors_omitted: int


class Diagnostics(_Out):
    """The result of one DIAG task: the values read (``values``: node URI → value), the DM
    status of each read (``statuses``) and the task's state."""
    task_id: str
    dev_id: str
    status: TaskState
    nodes: list[str]
    values: dict[str, str]
    statuses: dict[str, int]
    created: float
    finished: Union[float, None]
    cause: Union[str, None]


class DevicePage(_Out):
    items: list[DeviceView]  # type: ignore[valid-type]
    next_cursor: Union[str, None]


class TaskPage(_Out):
    items: list[TaskSummary]
    next_cursor: Union[str, None]


class JobPage(_Out):
    items: list[JobOut]  # type: ignore[valid-type]
    next_cursor: Union[str, None]


class HistoryPage(_Out):
    items: list[HistoryView]  # type: ignore[valid-type]
    next_cursor: Union[str, None]


class ContentPage(_Out):
    items: list[ContentView]  # type: ignore[valid-type]
    next_cursor: Union[str, None]


class CapabilityPage(_Out):
    items: list[CapabilityView]  # type: ignore[valid-type]
    next_cursor: Union[str, None]


class DiagnosticsPage(_Out):
    items: list[Diagnostics]
    next_cursor: Union[str, None]


# --- query parameters (parsed by middleware.parse_query; documented from these) -----------------

Limit = Annotated[int, Meta(ge=1, le=10000)]


class PageQuery(_In):
    cursor: Union[Annotated[str, Meta(max_length=4096)], None] = None
    limit: Limit = 100


def task_summary(task: Task) -> TaskSummary:
    """A task record (already redacted) as :class:`TaskSummary`."""
    r = task.result
    return TaskSummary(
        task_id=task.task_id, dev_id=task.dev_id, job_id=task.job_id,
        owner=getattr(task, "owner", ""), status=task.state,
        operation=task.op.__struct_config__.tag, test_cycle=task.test_cycle,
        attempts=task.attempts, created=task.created, updated=task.updated,
        finished=task.finished, cause=task.cause,
        result=None if r is None else _TO_VIEW[TaskResult](r))


def task_data(task: Task) -> TaskDataView:
    """getTaskById's answer of a task record (already redacted).  Built in one call: it is
    the API's hottest read."""
    r = task.result
    op = task.op
    return TaskDataView(
        task_id=task.task_id, dev_id=task.dev_id, job_id=task.job_id,
        owner=getattr(task, "owner", ""), status=task.state,
        operation=op.__struct_config__.tag, test_cycle=task.test_cycle,
        attempts=task.attempts, created=task.created, updated=task.updated,
        finished=task.finished, cause=task.cause,
        result=None if r is None else _TO_VIEW[TaskResult](r),
        op=_TO_VIEW[type(op)](op), b_optin=task.b_optin,
        accept_device_policy=task.accept_device_policy, deadline=task.deadline,
        next_attempt=task.next_attempt)

