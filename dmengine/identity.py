"""Who may do what (L4): identities, API keys, users, ``userSession`` tokens, roles, the
per-identity rate limiter and the audit log's writes.  No HTTP here: the API side (headers,
the route → role table, the routes) is :mod:`dmengine.wsi.security`.

* An **API key** belongs to one external system (``ApiKey.name``: the owner of the jobs and
  tasks its calls make) and has one role.  It is 256 random bits, shown once when it is made
  and stored only as its SHA-256: a key this long cannot be guessed from its hash, and a fast
  hash lets every call be checked with one store read (scrypt on every call would cost tens
  of milliseconds of CPU each).  The key ``dmengine serve`` has always printed (``DATA/api-key``)
  is the first admin key (:meth:`Identities.ensure_serve_key`).
* A **user** logs in with a name and a password; the password is kept as a scrypt hash
  (``hashlib.scrypt``, n=2^14, r=8, p=1 by default).  A login for a name that does not exist
  checks the password against a dummy hash all the same, so a wrong password costs the same
  time whether the user exists or not; at most ``max_hashing`` hashes run at once, off the
  event loop.
* ``login`` (with a key or a name and password) gives a **userSession** token (``dms_…``)
  that expires after ``session_ttl`` and ends with ``logout``; only its SHA-256 is stored.
  A session's role is its key's or user's: revoking the key or deleting the user ends its
  sessions at once.
* **The identity cache**: a call's key or token is looked up by its SHA-256 in an in-memory
  cache before the store.  An entry is used only while the store's identity generation
  (``Store.identity_generation``, one small read) is the one it was read at: every revoke,
  role change, user removal and logout — through the API or ``dmengine keys`` in another
  process — changes it, so the very next call reads the store again and is refused; a
  session's entry also ends at the session's expiry.  Unknown or refused credentials are
  never cached (a flood of them costs store reads, not memory).  Calls of one key in one turn
  of the event loop share that check (:meth:`Identities.known`): each of them was received
  before it was made, so a change committed before a call came still counts for it.
* **Roles** ``viewer`` < ``operator`` < ``admin``: each may do what the weaker ones may.  An
  identity sees and controls the jobs and tasks of its own system (:attr:`Identity.owner`);
  an admin sees all of them.
* **Rate limits**: a token bucket per identity (a key's or user's sessions share it), in this
  process's memory; ``rate`` requests per second with ``burst`` stored, from the key or user
  record or else :class:`IdentityConfig`.  Login attempts are limited per client address.
* **Audit**: :meth:`Identities.audit` writes who did what, when and with what outcome — never
  a key, a token or a password.

While an API call runs, :data:`CALLER` holds its identity, so the services stamp what they
create with its owner (:func:`current_owner`) without every handler passing it along.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import dataclasses
import hashlib
import hmac
import importlib
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from .bounded import BoundedDict
from .errors import InvalidRequest, NotFound, ServiceError, StoreError, UnknownResource
from .model import ROLES, ApiKey, AuditEntry, User, UserSession, new_id
from .store.base import DEFAULT_PAGE, DEFAULT_QUERY_SCAN, Page, Store

log = logging.getLogger("dmengine.identity")

KEY_PREFIX = "dmk_"                  #: API keys made here start with it
SESSION_PREFIX = "dms_"              #: userSession tokens start with it
SERVE_KEY_CREATOR = "serve"          #: ``created_by`` of the key ``dmengine serve`` prints
MAX_PASSWORD = 1024                  #: longest password taken (scrypt reads all of it)
MAX_CREDENTIAL = 512                 #: longest key or token looked at


@dataclass
class IdentityConfig:
    """Sessions, rate limits and password hashing (``dmengine serve --session-ttl``,
    ``--api-rate``, ``--api-burst``)."""

    session_ttl: float = 3600.0          #: seconds a userSession lives
    default_rate: float = 50.0           #: requests/s of an identity without its own (0: none)
    default_burst: int = 100
    login_rate: float = 5.0              #: login attempts/s per client address (0: none)
    login_burst: int = 20
    scrypt_n: int = 1 << 14
    scrypt_r: int = 8
    scrypt_p: int = 1
    max_hashing: int = 2                 #: scrypt computations at once (each takes 16 MiB)
    min_password: int = 12
    max_buckets: int = 100_000           #: rate-limit buckets kept (least recently used go)
    #: identities of keys and tokens seen lately, kept in memory so that a call is checked
    #: without reading its key (0: no cache).  An entry is used only while the store's
    #: identity generation is the one it was read at (any revoke, role change, user removal
    #: or logout, by any process, changes it), and a session's only until it expires.
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        from .errors import ConfigError
        if self.session_ttl <= 0:
            raise ConfigError("session_ttl must be > 0", key="session_ttl")
        if self.default_rate < 0 or self.default_burst < 1:
            raise ConfigError("the API rate must be >= 0 and the burst >= 1", key="api_rate")


class Unauthorized(ServiceError):
    """No identity: no credential, or one that is unknown, revoked or expired."""
    code = "unauthorized"
    http_status = 401


class Forbidden(ServiceError):
    """An identity whose role does not allow the call."""
    code = "forbidden"
    http_status = 403


class RateLimited(ServiceError):
    """Over the identity's rate: try again in ``retry_after`` seconds."""
    code = "rate_limited"
    http_status = 429

    def __init__(self, msg: str, *, retry_after: float, where: str | None = None) -> None:
        super().__init__(msg, where=where)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """Who calls: a key or a user (directly or through a userSession)."""

    kind: str                            #: "key" or "user"
    subject: str                         #: the key_id or the user name
    owner: str                           #: the external system whose jobs and tasks these are
    role: str
    rate: float | None = None
    burst: int | None = None
    session_id: str | None = None        #: set when the call came with a userSession token
    session_hash: str | None = dataclasses.field(default=None, repr=False)

    @property
    def actor(self) -> str:
        """How the audit log names it: ``key:k…`` or ``user:NAME``."""
        return f"{self.kind}:{self.subject}"

    def has(self, role: str) -> bool:
        """Whether this identity's role is ``role`` or a stronger one."""
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def sees_all(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str | None) -> bool:
        """Whether a job or task of ``owner`` is this identity's to see and control."""
        return self.sees_all or (bool(owner) and owner == self.owner)


#: The identity of the API call being served (set by the API's middleware).
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("dmengine_caller",
                                                                       default=None)


def current_owner() -> str | None:
    """The owner to stamp on what the current API call creates; None outside a call."""
    ident = CALLER.get()
    return ident.owner if ident is not None else None


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (``_sha256``; ``_sha2`` from 3.12), else hashlib's.  hashlib's
    is OpenSSL's, whose per-call set-up (an EVP fetch) is most of hashing a 47-byte key:
    the built-in one takes 40 % less CPU for it, on every API call.  Same digest."""
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()


def sha256_hex(secret: str) -> str:
    """The stored form of a key or token.  Bytes that are not UTF-8 (aiohttp keeps them as
    surrogates) are hashed as sent, so such a key is simply unknown, never an error."""
    digest = _sha256(secret.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()  # type: ignore[no-any-return]


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_password() -> str:
    return secrets.token_urlsafe(18)


# --- passwords ------------------------------------------------------------------------------

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii").rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str, *, n: int = 1 << 14, r: int = 8, p: int = 1) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64 without padding): 16 random salt bytes, 32 bytes
    of hash.  Blocking (tens of milliseconds): call it off the event loop."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p,
                        maxmem=256 * n * r * p + (1 << 20), dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare).  Blocking."""
    try:
        scheme, n_, r_, p_, salt_, dk_ = stored.split("$")
        n, r, p = int(n_), int(r_), int(p_)
        salt, want = _unb64(salt_), _unb64(dk_)
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    got = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p,
                         maxmem=256 * n * r * p + (1 << 20), dklen=len(want))
    return hmac.compare_digest(got, want)


# --- rate limits ----------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by name; :meth:`take` never waits.  The least recently used buckets are
    dropped past ``max_buckets`` (a dropped bucket starts full again)."""

    def __init__(self, max_buckets: int = 100_000, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_buckets = max_buckets
        self.clock = clock
        self._b: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def take(self, name: str, rate: float, burst: int) -> float:
        """Takes a token from ``name``'s bucket: 0.0 if there was one, else the seconds until
        there will be (nothing taken).  ``rate`` 0 means no limit."""
        if rate <= 0:
            return 0.0
        now = self.clock()
        b = self._b.get(name)
        if b is None:
            b = self._b[name] = [float(burst), now]
            if len(self._b) > self.max_buckets:
                self._b.popitem(last=False)
        else:
            self._b.move_to_end(name)
            b[0] = min(float(burst), b[0] + (now - b[1]) * rate)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return 0.0
        return (1.0 - b[0]) / rate


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds: never 0 (a client would come straight back)."""
    return str(max(1, math.ceil(seconds)))


# --- the service ----------------------------------------------------------------------------

UNAUTHORIZED = "missing, unknown or revoked API key or userSession"


class Identities:
    """Keys, users, sessions, roles, rate limits and audit writes over the store."""

    def __init__(self, store: Store, config: IdentityConfig | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config or IdentityConfig()
        self.clock = clock
        self.limiter = RateLimiter(self.config.max_buckets)
        self.login_limiter = RateLimiter(self.config.max_buckets)
        self._hashing: asyncio.Semaphore | None = None
        self._dummy: str | None = None
        #: SHA-256 of a key or token → (its identity, the session's expiry or None, the
        #: store's identity generation when read).  Hashes, never the secrets themselves.
        self._cache: BoundedDict[str, tuple[Identity, float | None, int]] = BoundedDict(
            max(1, self.config.cache_size))
        self.cache_hits = 0
        self.cache_misses = 0
        #: credential → identity found by :meth:`known` in this turn of the event loop, and
        #: only until its end (a callback queued behind every request that was ready when
        #: the first of them was checked).  Every request answered from it was received
        #: before the store was read for it, so a change committed before a request came
        #: still counts for that request; many calls of one system's key in one turn cost
        #: one hash and one store read.  Holds the secrets themselves, for that turn only.
        self._turn: dict[str, Identity] = {}

    # --- who is calling ------------------------------------------------------------------

    async def authenticate(self, credential: str | None) -> Identity:
        """The identity of an API key or a userSession token; Unauthorized if there is none
        (no credential, unknown, revoked, expired or logged out)."""
        if not credential or len(credential) > MAX_CREDENTIAL:
            raise Unauthorized(UNAUTHORIZED, where="X-API-Key")
        h = sha256_hex(credential)
        if self.config.cache_size <= 0:
            return (await self._lookup(credential, h))[0]
        # the generation is read before the records: a change committed after this read
        # makes the entry stale at once, even one made from what was read here
        gen = self.store.identity_generation()
        ident = self._hit(h, gen)
        if ident is not None:
            return ident
        self.cache_misses += 1
        ident, expires = await self._lookup(credential, h)
        # when full the oldest entry goes: a crowd of keys costs store reads, never memory
        self._cache[h] = (ident, expires, gen)
        return ident

    def known(self, credential: str | None) -> Identity | None:
        """The identity of a key or token from the cache, if it is there and still valid
        (the store's identity generation unchanged, the session not expired); else None —
        then :meth:`authenticate` decides.  Synchronous: the common call (a system's key,
        seen before) costs no coroutine."""
        if not credential:
            return None
        ident = self._turn.get(credential)
        if ident is not None:
            return ident
        if len(credential) > MAX_CREDENTIAL or self.config.cache_size <= 0:
            return None
        ident = self._hit(sha256_hex(credential), self.store.identity_generation())
        if ident is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return ident
            if not self._turn:
                loop.call_soon(self._turn.clear)
            self._turn[credential] = ident
        return ident

    def _hit(self, h: str, gen: int) -> Identity | None:
        """The cached identity of the key or token whose hash is ``h``, if its entry was
        read at generation ``gen`` and has not expired; a stale entry is dropped."""
        hit = self._cache.get(h)
        if hit is None:
            return None
        ident, expires, at = hit
        if at == gen and (expires is None or expires > self.clock()):
            self.cache_hits += 1
            return ident
        del self._cache[h]
        return None

    async def _lookup(self, credential: str, h: str) -> tuple[Identity, float | None]:
        """The identity of a key or token read from the store (no cache), and when it ends
        by itself (a session's expiry; None for a key)."""
        if credential.startswith(SESSION_PREFIX):
            try:
                sess = await self.store.get_session(h)
            except NotFound:
                sess = None
            if sess is None or sess.expires <= self.clock():
                raise Unauthorized("userSession expired, ended or unknown: log in again",
                                   where="X-API-Key")
            ident = await self._subject(sess.kind, sess.subject)
            return (dataclasses.replace(ident, session_id=sess.session_id, session_hash=h),
                    sess.expires)
        try:
            key = await self.store.api_key_by_hash(h)
        except NotFound:
            raise Unauthorized(UNAUTHORIZED, where="X-API-Key") from None
        if key.revoked is not None:
            raise Unauthorized(UNAUTHORIZED, where="X-API-Key")
        return _of_key(key), None

    async def _subject(self, kind: str, subject: str) -> Identity:
        try:
            if kind == "key":
                key = await self.store.get_api_key(subject)
                if key.revoked is None:
                    return _of_key(key)
            else:
                return _of_user(await self.store.get_user(subject))
        except NotFound:
            pass
        raise Unauthorized("userSession ended: its key was revoked or its user removed",
                           where="X-API-Key")

    def check_rate(self, ident: Identity) -> float:
        """0.0 if the identity may make this call now, else the seconds to wait."""
        cfg = self.config
        rate = ident.rate if ident.rate is not None else cfg.default_rate
        if rate <= 0:
            return 0.0                   # no limit (the serve key): no bucket to name
        burst = ident.burst if ident.burst is not None else cfg.default_burst
        return self.limiter.take(ident.actor, rate, burst)

    def check_login_rate(self, address: str) -> float:
        return self.login_limiter.take(f"login:{address}", self.config.login_rate,
                                       self.config.login_burst)

    # --- login / logout ------------------------------------------------------------------

    async def login_key(self, key: str) -> tuple[str, UserSession, Identity]:
        """A userSession for an API key (not for another session's token)."""
        if not key or key.startswith(SESSION_PREFIX):
            raise Unauthorized(UNAUTHORIZED, where="apiKey")
        try:
            ident = await self.authenticate(key)
        except Unauthorized:
            raise Unauthorized(UNAUTHORIZED, where="apiKey") from None
        return await self._new_session(ident)

    async def login_password(self, name: str, password: str) -> tuple[str, UserSession, Identity]:
        """A userSession for a user name and password.  Unknown name or wrong password: the
        same answer after the same work (a scrypt check against a dummy hash)."""
        user: User | None = None
        if 0 < len(name) <= 128:
            try:
                user = await self.store.get_user(name)
            except NotFound:
                user = None
        stored = user.password_hash if user is not None else await self._dummy_hash()
        ok = await self._run_hash(verify_password, password[:MAX_PASSWORD], stored)
        if user is None or not ok or len(password) > MAX_PASSWORD:
            exc = Unauthorized("wrong user name or password", where="password")
            exc.user_exists = user is not None      # type: ignore[attr-defined]  # for the audit
            raise exc
        return await self._new_session(_of_user(user))

    async def _new_session(self, ident: Identity) -> tuple[str, UserSession, Identity]:
        now = self.clock()
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        sess = await self.store.create_session(UserSession(
            token_hash=sha256_hex(token), session_id=new_id("s"), kind=ident.kind,  # type: ignore[arg-type]
            subject=ident.subject, expires=now + self.config.session_ttl, created=now))
        try:                                 # expired sessions do not pile up
            await self.store.purge_sessions(now, limit=100)
        except StoreError as exc:
            log.warning("expired sessions not purged: %s", exc)
        return token, sess, dataclasses.replace(ident, session_id=sess.session_id,
                                                session_hash=sess.token_hash)

    async def logout(self, ident: Identity) -> None:
        """Ends the session the call came with (its token is refused from now on)."""
        if ident.session_hash is None:
            raise InvalidRequest("logout ends a userSession; an API key is revoked by an "
                                 "admin (revokeApiKey, dmengine keys revoke)",
                                 where="X-API-Key")
        try:
            await self.store.delete_session(ident.session_hash)
        except NotFound:
            raise Unauthorized("userSession already ended", where="X-API-Key") from None

    # --- keys ----------------------------------------------------------------------------

    async def create_key(self, name: str, role: str, *, rate: float | None = None,
                         burst: int | None = None, created_by: str = "") -> tuple[ApiKey, str]:
        """A new key for the system ``name``: (its record, the key).  The key is not kept:
        show it once."""
        _check_role(role)
        if not name or len(name) > 256:
            raise InvalidRequest("a key needs the name of its system (1-256 characters)",
                                 where="name")
        secret = new_api_key()
        key = await self.store.create_api_key(ApiKey(
            key_id=new_id("k"), name=name, role=role, key_hash=sha256_hex(secret),  # type: ignore[arg-type]
            rate=rate, burst=burst, created=self.clock(), created_by=created_by[:256]))
        return key, secret

    async def ensure_serve_key(self, secret: str, *, name: str = "api") -> ApiKey:
        """The key ``dmengine serve`` prints (``DATA/api-key`` or ``--api-key``) as an admin
        key without a rate limit.  A serve key that is no longer the configured one is
        revoked (as when only the configured key worked); one an admin revoked stays revoked."""
        h = sha256_hex(secret)
        now = self.clock()
        mine: ApiKey | None = None
        cursor: str | None = None
        while True:
            page = await self.store.list_api_keys(cursor=cursor, limit=1000)
            for k in page.items:
                if k.key_hash == h:
                    mine = k
                elif k.created_by == SERVE_KEY_CREATOR and k.revoked is None:
                    await self.store.update_api_key(k.key_id, {
                        "revoked": now, "revoked_by": "serve: another key configured"})
            cursor = page.next_cursor
            if cursor is None:
                break
        if mine is not None:
            if mine.revoked is not None:
                log.warning("the API key of DATA/api-key (key_id %s) is revoked", mine.key_id)
            return mine
        return await self.store.create_api_key(ApiKey(
            key_id=new_id("k"), name=name, role="admin", key_hash=h, rate=0.0, created=now,
            created_by=SERVE_KEY_CREATOR))

    async def list_keys(self, *, cursor: str | None = None,
                        limit: int = DEFAULT_PAGE) -> Page[ApiKey]:
        return await self.store.list_api_keys(cursor=cursor, limit=limit)

    async def get_key(self, key_id: str) -> ApiKey:
        try:
            return await self.store.get_api_key(key_id)
        except NotFound:
            raise UnknownResource(f"no API key {key_id!r}", where="keyId") from None

    async def revoke_key(self, key_id: str, *, by: str = "") -> ApiKey:
        """Revokes a key (kept, marked revoked): it and its sessions are refused from now on.
        Revoking a revoked key changes nothing."""
        key = await self.get_key(key_id)
        if key.revoked is not None:
            return key
        return await self.store.update_api_key(key_id, {"revoked": self.clock(),
                                                        "revoked_by": by[:256] or None})

    # --- users ---------------------------------------------------------------------------

    async def create_user(self, name: str, role: str, *, password: str | None = None,
                          system: str = "", rate: float | None = None,
                          burst: int | None = None, created_by: str = ""
                          ) -> tuple[User, str | None]:
        """A new user: (its record, the password if one was generated, else None)."""
        _check_role(role)
        generated = None
        if password is None:
            password = generated = new_password()
        elif not self.config.min_password <= len(password) <= MAX_PASSWORD:
            raise InvalidRequest(f"a password has {self.config.min_password} to "
                                 f"{MAX_PASSWORD} characters", where="password")
        try:
            await self.store.get_user(name)
            raise ServiceError(f"user {name!r} exists", where="name")
        except NotFound:
            pass
        cfg = self.config
        phash = await self._run_hash(hash_password, password, n=cfg.scrypt_n, r=cfg.scrypt_r,
                                     p=cfg.scrypt_p)
        user = await self.store.create_user(User(
            name=name, role=role, password_hash=phash, system=system, rate=rate,  # type: ignore[arg-type]
            burst=burst, created=self.clock(), created_by=created_by[:256]))
        return user, generated

    async def list_users(self, *, cursor: str | None = None,
                         limit: int = DEFAULT_PAGE) -> Page[User]:
        return await self.store.list_users(cursor=cursor, limit=limit)

    async def delete_user(self, name: str) -> None:
        """Removes a user; its sessions are refused from now on."""
        if not 0 < len(name) <= 128:
            raise UnknownResource(f"no user {name!r}", where="name")
        try:
            await self.store.delete_user(name)
        except NotFound:
            raise UnknownResource(f"no user {name!r}", where="name") from None

    # --- audit ---------------------------------------------------------------------------

    async def audit(self, actor: str, action: str, *, target: str | None = None,
                    outcome: str, status: int | None = None, **detail: Any) -> AuditEntry | None:
        """Writes one audit entry: who (``actor``), what (``action``, ``target``), when (now),
        and how it ended (``outcome``: ok, denied, refused or failed; ``status``).  Callers
        pass no secret; a store that cannot write is logged, not raised (the call it records
        has happened)."""
        d: dict[str, Any] = {"outcome": outcome}
        if status is not None:
            d["status"] = status
        d.update({k: v for k, v in detail.items() if v is not None})
        entry = AuditEntry(time=self.clock(), actor=actor[:256], action=action[:256],
                           target=target[:1024] if target else None, detail=d)
        try:
            return await self.store.audit(entry)
        except StoreError as exc:
            log.error("audit entry for %s by %s not written: %s", action[:64], actor[:64], exc)
            return None

    async def audit_log(self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE,
                        actor: str | None = None, action: str | None = None,
                        since: float | None = None, until: float | None = None,
                        scan_limit: int = DEFAULT_QUERY_SCAN) -> Page[AuditEntry]:
        return await self.store.audit_entries(cursor=cursor, limit=limit, actor=actor,
                                              action=action, since=since, until=until,
                                              scan_limit=scan_limit)

    # --- jobs and tasks: whose are they --------------------------------------------------

    async def task_owner(self, task_id: str) -> str | None:
        """Whose the task is (its own owner, else its job's); None if there is no such task."""
        try:
            task = await self.store.get_task(task_id)
        except (NotFound, StoreError):
            return None
        if task.owner:
            return task.owner
        if task.job_id:
            return await self.job_owner(task.job_id)
        return ""

    async def job_owner(self, job_id: str) -> str | None:
        try:
            return (await self.store.get_job(job_id)).owner
        except (NotFound, StoreError):
            return None

    # --- hashing off the event loop -----------------------------------------------------

    async def _run_hash(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if self._hashing is None:
            self._hashing = asyncio.Semaphore(self.config.max_hashing)
        async with self._hashing:
            return await asyncio.to_thread(fn, *args, **kw)

    async def _dummy_hash(self) -> str:
        """A hash of a random password with the configured cost: what an unknown name's
        password is checked against."""
        if self._dummy is None:
            cfg = self.config
            self._dummy = await self._run_hash(hash_password, secrets.token_urlsafe(16),
                                               n=cfg.scrypt_n, r=cfg.scrypt_r, p=cfg.scrypt_p)
        return self._dummy


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(f"role is one of {', '.join(ROLES)}, not {role!r}", where="role")


def _of_key(key: ApiKey) -> Identity:
    return Identity(kind="key", subject=key.key_id, owner=key.name, role=key.role,
                    rate=key.rate, burst=key.burst)


def _of_user(user: User) -> Identity:
    return Identity(kind="user", subject=user.name, owner=user.system or user.name,
                    role=user.role, rate=user.rate, burst=user.burst)


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key as answers and listings show it: never its hash."""
    return {"keyId": key.key_id, "name": key.name, "role": key.role, "rate": key.rate,
            "burst": key.burst, "created": key.created, "createdBy": key.created_by,
            "revoked": key.revoked, "revokedBy": key.revoked_by}


def user_json(user: User) -> dict[str, Any]:
    """A user as answers and listings show it: never its password hash."""
    return {"name": user.name, "role": user.role, "system": user.system or user.name,
            "rate": user.rate, "burst": user.burst, "created": user.created,
            "createdBy": user.created_by}


def audit_json(e: AuditEntry) -> dict[str, Any]:
    """An audit entry as getAuditLog lists it: ``outcome`` and ``status`` on top, the rest
    of what was recorded (role, owner, session, address, ids made) under ``detail``."""
    d = dict(msgspec.to_builtins(e.detail))
    return {"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action,
            "target": e.target, "outcome": d.pop("outcome", None),
            "status": d.pop("status", None), "detail": d}


__all__ = ["Identities", "IdentityConfig", "Identity", "Unauthorized", "Forbidden",
           "RateLimited", "RateLimiter", "CALLER", "current_owner", "sha256_hex",
           "hash_password", "verify_password", "new_api_key", "retry_after_header",
           "key_json", "user_json", "audit_json", "KEY_PREFIX", "SESSION_PREFIX"]
