"""Who may do what, on the API port (L5): the authentication and authorization check,
the route → role table, and the session, key, user and audit routes.

Every call but the public ones (:data:`PUBLIC_NAMES`, :data:`PUBLIC_PATHS`: health, metrics,
the OpenAPI document and docs, ``login``) is checked by :func:`guard` (called by the wrapper
of every route's handler, :func:`dmengine.wsi.app.api_wrapper`), in this order:

1. **who** — an API key (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``) or a
   ``userSession`` token from ``login`` (``Authorization: Bearer dms_…``, or ``X-API-Key``);
   none, unknown, revoked, expired or logged out: 401 with ``WWW-Authenticate``.  This comes
   before anything else, so a stranger learns nothing of routes or records (an unknown path
   is a 401 too);
2. **how often** — the identity's token bucket: over it, 429 with ``Retry-After``;
3. **what** — the route's operationId in :data:`ROLE_OF` names the weakest role allowed
   (viewer < operator < admin); a route missing from the table needs admin (fail closed).
   Too weak: 403 naming the role needed;
4. **whose** — a route about one task or job (``{taskId}``, ``{jobId}`` in the path, or
   ``taskId``/``jobId`` in the query) answers 404, the same as for an id that does not exist,
   unless the task or job is the caller's system's (admins see all), so ids of other systems
   do not leak.  Listings are scoped by their handlers (:func:`owner_scope`);
5. the handler runs with :data:`dmengine.identity.CALLER` set: what it creates is stamped with
   the caller's system (``owner``);
6. **audit** — every call that changes something (any method but GET/HEAD/OPTIONS, login and
   logout included) is written to the audit log with who, what, when and the outcome, also
   when it was refused (403, 404 of ownership, 4xx) or failed.  Never a key, token or
   password: the target is the path, and only id fields (``taskId``, ``jobId``, ``keyId``…)
   of an answer are kept.  Calls refused at 1 or 2 are not written (they did nothing, and a
   flood of them must not fill the log).

Routes (operationIds): ``login``, ``logout``, ``createApiKey``, ``listApiKeys``,
``revokeApiKey``, ``createUser``, ``listUsers``, ``deleteUser``, ``getAuditLog``.  A key or a
generated password is in the answer that creates it, once; never in any other answer.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Awaitable, Callable, Literal, Union

import msgspec
from aiohttp import web
from msgspec import Meta

from ..devices import parse_time
from ..errors import (AlreadyExists, ApiError, DmError, NotFound, ServiceError, StoreError,
                      ValidationError)
from ..identity import (CALLER, MAX_CREDENTIAL, MAX_PASSWORD, Forbidden, Identities, Identity,
                        RateLimited, Unauthorized, audit_json, retry_after_header)
from ..model import ID_PATTERN, ROLES, ApiKey, User
from ..store.base import DEFAULT_PAGE, MAX_PAGE
from .middleware import decode_body, json_response, parse_query
from .openapi import operation

log = logging.getLogger("dmengine.wsi.security")

IDENTITIES: web.AppKey[Identities] = web.AppKey("identities", Identities)
#: where the middleware leaves the caller's :class:`~dmengine.identity.Identity`
IDENTITY_KEY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)

#: routes anyone may call (route names and paths: the docs' assets live under /docs/)
PUBLIC_NAMES = frozenset({"health", "ready", "metrics", "docs", "openapi", "getOpenApi", "login"})
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/openapi.json"})
PUBLIC_PREFIXES = ("/docs/",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

V, O, A = "viewer", "operator", "admin"
ADMIN = A           #: the strongest role: every route, every owner's jobs and tasks
#: operationId → the weakest role that may call it.  Reads are the viewer's; operations, jobs,
#: devices, capabilities, content and subscriptions the operator's; keys, users and the audit
#: log the admin's.  A route not listed needs admin (tests/test_api_auth.py checks that every
#: route of the app is listed or public).
ROLE_OF: dict[str, str] = {
    # session
    "logout": V,
    # IDeploymentBrokerServices
    "doOperation": O, "doBootstrap": O, "doBulkOperation": O, "cancelTask": O,
    "getTaskById": V, "getTaskHistory": V, "getDiagnostics": V,
    # IBulkOperationsManagerServices
    "createDeployments": O, "cancelJob": O, "pauseJob": O, "restartJob": O,
    "getJob": V, "getJobs": V, "getJobsByDate": V, "getTasks": V,
    # IDeviceManagerServices
    "createDeviceInstance": O, "updateDeviceInstance": O, "deleteDeviceInstance": O,
    "importDeviceInstances": O, "getDeviceInstanceByDeviceID": V, "getDeviceInstances": V,
    "createDeviceCapability": O, "updateDeviceCapability": O, "deleteDeviceCapability": O,
    "getDeviceCapabilityByOid": V, "getDeviceCapabilities": V,
    # content
    "uploadContent": O, "deleteContent": O, "getContent": V, "listContent": V,
    "getContents": V, "downloadContent": V,
    # push: subscriptions, dead letters, charging events
    "createSubscription": O, "deleteSubscription": O, "getSubscriptions": V,
    "getSubscription": V, "replayDeadLetter": O, "getDeadLetters": V,
    "getChargingEvents": V,
    # who may do what
    "createApiKey": A, "listApiKeys": A, "revokeApiKey": A, "createUser": A, "listUsers": A,
    "deleteUser": A, "getAuditLog": A,
}
#: answer fields kept in the audit entry of a call (ids of what it made; never a secret)
AUDIT_ID_FIELDS = ("taskId", "taskIds", "jobId", "keyId", "contentId", "subscriptionId",
                   "devId", "oid", "sessionId", "name")

_json = msgspec.json.Encoder()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def required_role(name: str | None) -> str:
    return ROLE_OF.get(name or "", A)


def is_public(name: str | None, path: str) -> bool:
    return name in PUBLIC_NAMES or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _answer(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json.encode(obj), status=status, headers=headers,
                        content_type="application/json")


def _error(status: int, code: str, message: str, where: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    return _answer({"error": code, "message": message, "where": where}, status, headers)


def caller(request: web.Request) -> Identity | None:
    """The identity the middleware found for this call (None on public routes): the
    :data:`~dmengine.identity.CALLER` it set while the handler runs (a context variable is
    a C-level read; a request key lookup cost two Python-level calls on every call)."""
    return CALLER.get()


def owner_scope(request: web.Request) -> str | None:
    """Whose jobs and tasks a listing may show: None (all) for an admin, else the caller's
    system."""
    ident = caller(request)
    if ident is None or ident.sees_all:
        return None
    return ident.owner


def owner_for_new(request: web.Request, asked: str | None, default: str = "api") -> str:
    """The owner of a job the caller creates: its own system; an admin may name another
    (``owner`` in the body), anyone else only its own (403 naming ``owner``)."""
    ident = caller(request)
    if ident is None:
        return asked if asked is not None else default
    if asked is None or asked == ident.owner:
        return ident.owner
    if ident.sees_all:
        return asked
    raise Forbidden(f"only an admin may create a job for another owner than {ident.owner!r}",
                    where="owner")


def _credential(request: web.Request) -> str:
    given = request.headers.get("X-API-Key") or ""
    if not given:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
    return given


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status >= 500:
        return "failed"
    return "refused"


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, web.HTTPException):
        return exc.status
    if isinstance(exc, (ApiError, ServiceError)):
        return exc.http_status
    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, AlreadyExists):
        return 409
    if isinstance(exc, StoreError):
        return 503
    if isinstance(exc, DmError):
        return 400
    return 500


def _ids_of(resp: web.StreamResponse) -> dict[str, Any] | None:
    """The id fields of a small JSON answer (what a call made), for its audit entry."""
    if not isinstance(resp, web.Response) or resp.content_type != "application/json":
        return None
    body = resp.body
    if not isinstance(body, (bytes, bytearray)) or len(body) > 64 * 1024:
        return None
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    out: dict[str, Any] = {}
    for k in AUDIT_ID_FIELDS:
        v = obj.get(k)
        if isinstance(v, str):
            out[k] = v[:256]
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = [x[:256] for x in v[:100]]
    return out or None


def _action(request: web.Request) -> str:
    """What the audit calls a call: its route's name, else (the catch-all of paths no route
    has) its method and the path asked for."""
    return request.match_info.route.name or f"{request.method} {request.path}"


async def _audit(ids: Identities, request: web.Request, ident: Identity | None, status: int,
                 *, resp: web.StreamResponse | None = None, action: str | None = None,
                 **detail: Any) -> None:
    ids_made = _ids_of(resp) if resp is not None and status < 400 else None
    await ids.audit(ident.actor if ident is not None else "anonymous",
                    action or _action(request), target=request.path, outcome=_outcome(status),
                    status=status, method=request.method, address=request.remote,
                    role=ident.role if ident is not None else None,
                    owner=ident.owner if ident is not None else None,
                    session=ident.session_id if ident is not None else None,
                    made=ids_made, **detail)


async def _not_theirs(request: web.Request, ids: Identities, ident: Identity
                      ) -> web.Response | None:
    """404 (as for an id that does not exist) when the task or job the route is about is
    another system's; None when it is the caller's."""
    mi = request.match_info
    task_id = mi.get("taskId", mi.get("task_id")) or request.query.get("taskId")
    if task_id is not None:
        owner = await ids.task_owner(task_id)
        if owner is None or not ident.may_see(owner):
            return _error(404, "not_found", f"no task {task_id!r}", "taskId")
    job_id = mi.get("jobId", mi.get("job_id")) or request.query.get("jobId")
    if job_id is not None:
        owner = await ids.job_owner(job_id)
        if owner is None or not ident.may_see(owner):
            return _error(404, "not_found", f"no job {job_id!r}", "jobId")
    return None


async def guard(request: web.Request, handler: Handler, ids: Identities, name: str | None,
                need: str | None) -> tuple[web.StreamResponse, Identity | None]:
    """Who, how often, what, whose — then the handler — then the audit (module docstring),
    for a call that is not public: ``need`` is the route's role (:func:`required_role`),
    None for a path no route has (the app's catch-all route, whose answer is a 404 or 405:
    no role to check).  The wrapper of every route (:func:`dmengine.wsi.app.api_wrapper`)
    calls it with what it worked out once per route.  Answers the response and the identity the
    handler ran with (None when the call was refused before it: the metrics' ``anonymous``);
    what the handler raises goes on up, with :data:`IDENTITY_KEY` set (the role label of
    the error's answer)."""
    credential = _credential(request)
    ident = ids.known(credential)           # (a key seen before: no coroutine, no store read)
    if ident is None:
        try:
            ident = await ids.authenticate(credential)
        except Unauthorized as exc:
            return _error(401, exc.code, str(exc), exc.where,
                          {"WWW-Authenticate": 'Bearer realm="dmengine"'}), None
    wait = ids.check_rate(ident)
    if wait:
        return _error(429, RateLimited.code, f"{ident.actor} is over its rate: try again in "
                                             f"{wait:.2f} s", None,
                      {"Retry-After": retry_after_header(wait)}), None
    changes = request.method not in SAFE_METHODS
    # a route (not a 404 / 405 of the router), and a caller who is not an admin (the
    # strongest role, who sees every owner's: nothing to check, the common case of a
    # system's own key skips two Python-level calls)
    if need is not None and ident.role != ADMIN:
        if not ident.has(need):
            what = name or _action(request)
            denied = _error(403, Forbidden.code, f"{what} needs the role {need} or stronger; "
                                                 f"this caller is {ident.role}", "role")
            if changes:
                await _audit(ids, request, ident, 403, needs=need)
            return denied, None
        if not ident.sees_all:
            refusal = await _not_theirs(request, ids, ident)
            if refusal is not None:
                if changes:
                    await _audit(ids, request, ident, 404, why="not the caller's")
                return refusal, None
    token = CALLER.set(ident)
    try:
        resp = await handler(request)
    except asyncio.CancelledError:
        raise                          # the server is stopping
    except BaseException as exc:
        request[IDENTITY_KEY] = ident
        if changes:
            await _audit(ids, request, ident, _status_of(exc))
        raise
    finally:
        CALLER.reset(token)
    if changes:
        await _audit(ids, request, ident, resp.status, resp=resp)
    return resp, ident


# --- schemas ------------------------------------------------------------------------------

RoleName = Literal["viewer", "operator", "admin"]
Rate = Union[Annotated[float, Meta(ge=0)], None]
Burst = Union[Annotated[int, Meta(ge=1, le=1_000_000)], None]
Limit = Annotated[int, Meta(ge=1, le=MAX_PAGE)]
Cursor = Union[Annotated[str, Meta(max_length=4096)], None]


class _In(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


class _Out(msgspec.Struct, kw_only=True, rename="camel"):
    pass


class LoginRequest(_In):
    """``{"apiKey"}``, or ``{"userName", "password"}``."""
    api_key: Union[Annotated[str, Meta(max_length=MAX_CREDENTIAL)], None] = None
    user_name: Union[Annotated[str, Meta(max_length=256)], None] = None
    password: Union[Annotated[str, Meta(max_length=MAX_PASSWORD)], None] = None


class LoginAnswer(_Out):
    """``userSession``: the token (``Authorization: Bearer TOKEN``) until ``expires`` (epoch
    seconds) or logout; ``role`` and ``owner`` (the system whose jobs and tasks it sees)."""
    user_session: str
    session_id: str
    expires: float
    role: RoleName
    owner: str


class CreateApiKeyRequest(_In):
    """``name``: the external system (owner of the jobs and tasks its calls make);
    ``rate``/``burst``: its limit (requests/s; 0 = none; default: the server's)."""
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    role: RoleName
    rate: Rate = None
    burst: Burst = None


class ApiKeyInfo(_Out):
    """A key as listed: never the key, never its hash."""
    key_id: str
    name: str
    role: RoleName
    rate: Union[float, None]
    burst: Union[int, None]
    created: float
    created_by: str
    revoked: Union[float, None]
    revoked_by: Union[str, None]


class NewApiKey(ApiKeyInfo, kw_only=True):
    """``apiKey``: the key, in this answer only (the store keeps its SHA-256)."""
    api_key: str


class ApiKeyPage(_Out):
    items: list[ApiKeyInfo]
    next_cursor: Union[str, None]


class CreateUserRequest(_In):
    """``password`` omitted: one is generated and answered once.  ``system``: whose jobs and
    tasks the user sees (default: the name)."""
    name: Annotated[str, Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
    role: RoleName
    password: Union[Annotated[str, Meta(max_length=MAX_PASSWORD)], None] = None
    system: Annotated[str, Meta(max_length=256)] = ""
    rate: Rate = None
    burst: Burst = None


class UserInfo(_Out):
    """A user as listed: never the password or its hash."""
    name: str
    role: RoleName
    system: str
    rate: Union[float, None]
    burst: Union[int, None]
    created: float
    created_by: str


class NewUser(UserInfo, kw_only=True, omit_defaults=True):
    """``password``: only when it was generated, in this answer only."""
    password: Union[str, None] = None


class UserPage(_Out):
    items: list[UserInfo]
    next_cursor: Union[str, None]


class AuditItem(_Out):
    """Who (``actor``: ``key:ID``, ``user:NAME``, ``cli:LOGIN`` or ``anonymous``), what
    (``action``: the operationId; ``target``: the path), when (``time``), how it ended
    (``outcome``: ok, denied, refused, failed; ``status``: the HTTP status), and ``detail``:
    role, owner, session, method, address, ids of what was made."""
    seq: int
    time: float
    actor: str
    action: str
    target: Union[str, None]
    outcome: Union[str, None]
    status: Union[int, None]
    detail: dict[str, Any]


class AuditPage(_Out):
    items: list[AuditItem]
    next_cursor: Union[str, None]


class KeysQuery(_In):
    cursor: Cursor = None
    limit: Limit = DEFAULT_PAGE


class AuditQuery(_In):
    """``actor``/``action``: exactly these; ``from``/``to``: epoch seconds or ISO 8601."""
    actor: Union[Annotated[str, Meta(max_length=256)], None] = None
    action: Union[Annotated[str, Meta(max_length=256)], None] = None
    from_: Union[Annotated[str, Meta(max_length=64)], None] = msgspec.field(default=None,
                                                                             name="from")
    to: Union[Annotated[str, Meta(max_length=64)], None] = None
    cursor: Cursor = None
    limit: Limit = DEFAULT_PAGE


def _key_info(k: ApiKey, cls: type = ApiKeyInfo, **extra: Any) -> Any:
    return cls(key_id=k.key_id, name=k.name, role=k.role, rate=k.rate, burst=k.burst,
               created=k.created, created_by=k.created_by, revoked=k.revoked,
               revoked_by=k.revoked_by, **extra)


def _user_info(u: User, cls: type = UserInfo, **extra: Any) -> Any:
    return cls(name=u.name, role=u.role, system=u.system or u.name, rate=u.rate,
               burst=u.burst, created=u.created, created_by=u.created_by, **extra)


def _time(value: str | None, name: str) -> float | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise ApiError(f"{name} is epoch seconds or an ISO-8601 time, not {value!r}",
                       code="invalid", where=name) from None


def _ids(request: web.Request) -> Identities:
    return request.app[IDENTITIES]


def _me(request: web.Request) -> Identity:
    ident = caller(request)
    assert ident is not None
    return ident


# --- routes -------------------------------------------------------------------------------

routes = web.RouteTableDef()
TAG = "session"


@routes.post("/v1/login", name="login")
@operation("Log in: an API key, or a user name and password → userSession",
           body=LoginRequest, answers={200: LoginAnswer}, errors=(400, 401, 429), public=True,
           tag=TAG)
async def login(request: web.Request) -> web.Response:
    """An API key, or a user name and password → ``{userSession, sessionId, expires, role,
    owner}``.  Send the token as ``Authorization: Bearer TOKEN`` until it expires or
    ``logout``.  Wrong credentials: 401 (the same for an unknown user, after the same work);
    too many attempts from one address: 429 with Retry-After."""
    ids = _ids(request)
    wait = ids.check_login_rate(request.remote or "?")
    if wait:
        return _error(429, RateLimited.code, "too many login attempts from this address", None,
                      {"Retry-After": retry_after_header(wait)})
    req: LoginRequest = await decode_body(request, LoginRequest)
    with_key = req.api_key is not None
    if with_key == (req.user_name is not None or req.password is not None):
        raise ApiError("log in with apiKey, or with userName and password", code="invalid",
                       where="$.apiKey")
    if not with_key and (req.user_name is None or req.password is None):
        raise ApiError("userName and password go together", code="invalid",
                       where="$.password" if req.password is None else "$.userName")
    how = "apiKey" if with_key else "password"
    try:
        if with_key:
            token, sess, ident = await ids.login_key(req.api_key or "")
        else:
            token, sess, ident = await ids.login_password(req.user_name or "",
                                                          req.password or "")
    except Unauthorized as exc:
        detail: dict[str, Any] = {"with": how}
        if getattr(exc, "user_exists", False):
            detail["user"] = req.user_name    # a name on record, not someone's password
        await _audit(ids, request, None, 401, action="login", **detail)
        return _error(401, exc.code, str(exc), "$.apiKey" if with_key else "$.password",
                      {"WWW-Authenticate": 'Bearer realm="dmengine"'})
    done: dict[str, Any] = {"with": how}
    await _audit(ids, request, ident, 200, action="login", **done)
    return json_response(LoginAnswer(user_session=token, session_id=sess.session_id,
                                     expires=sess.expires, role=ident.role,  # type: ignore[arg-type]
                                     owner=ident.owner))


@routes.post("/v1/logout", name="logout")
@operation("Log out: end this userSession", answers={204: None}, errors=(400, 401), tag=TAG)
async def logout(request: web.Request) -> web.Response:
    """Ends the userSession the call came with: its token is refused from now on."""
    await _ids(request).logout(_me(request))
    return web.Response(status=204)


@routes.post("/v1/keys", name="createApiKey")
@operation("Create an API key for an external system (admin)", body=CreateApiKeyRequest,
           answers={201: NewApiKey}, errors=(400,), tag=TAG)
async def create_api_key(request: web.Request) -> web.Response:
    """The key's record and ``apiKey``, the key itself, shown in this answer only (the
    store keeps its SHA-256)."""
    req: CreateApiKeyRequest = await decode_body(request, CreateApiKeyRequest)
    key, secret = await _ids(request).create_key(req.name, req.role, rate=req.rate,
                                                  burst=req.burst,
                                                  created_by=_me(request).actor)
    return json_response(_key_info(key, NewApiKey, api_key=secret), 201)


@routes.get("/v1/keys", name="listApiKeys")
@operation("List the API keys (admin)", query=KeysQuery, answers={200: ApiKeyPage},
           errors=(400,), tag=TAG)
async def list_api_keys(request: web.Request) -> web.Response:
    """Every key, revoked ones too, by key id — never a key or its hash."""
    q: KeysQuery = parse_query(request, KeysQuery)
    page = await _ids(request).list_keys(cursor=q.cursor, limit=q.limit)
    return json_response(ApiKeyPage(items=[_key_info(k) for k in page.items],
                                    next_cursor=page.next_cursor))


@routes.delete("/v1/keys/{keyId}", name="revokeApiKey")
@operation("Revoke an API key (admin)", answers={200: ApiKeyInfo}, errors=(404,), tag=TAG)
async def revoke_api_key(request: web.Request) -> web.Response:
    """The key and every userSession made with it are refused from now on; the record stays
    (marked revoked) for the audit."""
    key = await _ids(request).revoke_key(request.match_info["keyId"], by=_me(request).actor)
    return json_response(_key_info(key))


@routes.post("/v1/users", name="createUser")
@operation("Create a user who logs in with a password (admin)", body=CreateUserRequest,
           answers={201: NewUser}, errors=(400, 409), tag=TAG)
async def create_user(request: web.Request) -> web.Response:
    """The password is stored as a scrypt hash; one generated (``password`` omitted) is in
    this answer only."""
    req: CreateUserRequest = await decode_body(request, CreateUserRequest)
    user, generated = await _ids(request).create_user(
        req.name, req.role, password=req.password, system=req.system, rate=req.rate,
        burst=req.burst, created_by=_me(request).actor)
    return json_response(_user_info(user, NewUser, password=generated), 201)


@routes.get("/v1/users", name="listUsers")
@operation("List the users (admin)", query=KeysQuery, answers={200: UserPage}, errors=(400,),
           tag=TAG)
async def list_users(request: web.Request) -> web.Response:
    q: KeysQuery = parse_query(request, KeysQuery)
    page = await _ids(request).list_users(cursor=q.cursor, limit=q.limit)
    return json_response(UserPage(items=[_user_info(u) for u in page.items],
                                  next_cursor=page.next_cursor))


@routes.delete("/v1/users/{name}", name="deleteUser")
@operation("Remove a user (admin)", answers={204: None}, errors=(404,), tag=TAG)
async def delete_user(request: web.Request) -> web.Response:
    """The user's userSessions are refused from now on."""
    await _ids(request).delete_user(request.match_info["name"])
    return web.Response(status=204)


@routes.get("/v1/audit", name="getAuditLog")
@operation("The audit log: who changed what, when, with what outcome (admin)",
           query=AuditQuery, answers={200: AuditPage}, errors=(400,), tag=TAG)
async def get_audit_log(request: web.Request) -> web.Response:
    """Oldest first.  With filters a page examines a bounded number of entries: it may be
    short, even empty, and still have a ``nextCursor``; page on until it is null."""
    q: AuditQuery = parse_query(request, AuditQuery)
    page = await _ids(request).audit_log(cursor=q.cursor, limit=q.limit, actor=q.actor,
                                         action=q.action, since=_time(q.from_, "from"),
                                         until=_time(q.to, "to"))
    return json_response(AuditPage(items=[msgspec.convert(audit_json(e), AuditItem)
                                          for e in page.items],
                                   next_cursor=page.next_cursor))


def install(app: web.Application, identities: Identities) -> None:
    """Puts the identities service in ``app`` (:func:`dmengine.wsi.app.make_app` adds this
    module's ``routes`` with the others, each wrapped in what calls :func:`guard`)."""
    app[IDENTITIES] = identities


__all__ = ["guard", "install", "routes", "ROLE_OF", "PUBLIC_NAMES",
           "PUBLIC_PATHS", "IDENTITIES", "caller", "owner_scope", "owner_for_new",
           "required_role", "ROLES"]
