"""Push (L4): subscriptions, signed webhook deliveries from the outbox, dead letters, and the
IF-4 charging events — the "push" half of DMWSI's "pull or push" (DESIGN.md §3, §5).

Events
    ``task.finished`` (a task reached a final state; written by :class:`dmengine.tasks.Tasks`
    in the same store write as the move), ``job.state`` (a job changed state) and
    ``job.progress`` (a job's final tasks crossed another tenth of its targets; both written
    by the store in the write that made them), ``charging`` (a non-test task succeeded: IF-4's
    time, device, operation, package and result; also kept in the store's charging log,
    ``GET /v1/charging``).  Task and job events are written only while someone subscribes to
    their topic, so an engine without subscribers pays nothing for them.

Subscriptions
    ``createSubscription`` names a URL (the caller's or another recipient's), the topics
    (``task``, ``job``, ``charging``) and optionally one job.  The URL must pass the engine's
    :class:`~dmengine.urlguard.UrlGuard` (no loopback, link-local or private target unless
    configured) when the subscription is made *and* on every connection (DNS rebinding).
    A subscription gets a secret, shown once in the creation's answer.

Delivery (at least once)
    The :class:`Webhooks` dispatcher loop claims due outbox entries with a lease
    (``store.claim_entries``: another dispatcher, or this one after a crash, takes them only
    when the lease has run out).  An event entry is *fanned out* — replaced, in one write, by
    one delivery entry per matching subscription (id ``EVENT.SUB``) — and each delivery is
    POSTed on its own: 2xx acknowledges it, anything else (status, timeout, refused address,
    a redirect, which is never followed) schedules a retry with exponential backoff and
    jitter; after ``max_attempts`` the delivery goes to the dead-letter list, from where it can
    be listed and replayed.  The body of a delivery is fixed when it is made, so every attempt
    sends the same bytes with the same event id; a receiver deduplicates on
    ``X-DMEngine-Event-Id``.

Signature
    ``X-DMEngine-Signature: t=TIMESTAMP,v1=HEX`` with ``HEX = HMAC-SHA256(secret,
    "TIMESTAMP." + body)`` (TIMESTAMP: Unix seconds of the attempt).  A receiver recomputes it
    over the raw body, compares in constant time and refuses timestamps older than a few
    minutes (:func:`verify` does all three).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import msgspec

from . import logs
from .errors import InvalidRequest, NotFound, ServiceError, UnknownResource
from .model import (EVENT_TOPICS, ChargingEvent, DeadLetter, OutboxEntry, Subscription, new_id)
from .store.base import DEFAULT_PAGE, Page, Store
from .supervised import Supervision
from .urlguard import UrlGuard, UrlRefused

log = logging.getLogger("dmengine.webhooks")
_rng = random.Random()          # backoff jitter: spreading load, nothing secret
_json = msgspec.json.Encoder()

SIGNATURE_HEADER = "X-DMEngine-Signature"
EVENT_ID_HEADER = "X-DMEngine-Event-Id"
EVENT_TYPE_HEADER = "X-DMEngine-Event-Type"
DELIVERY_HEADER = "X-DMEngine-Delivery"
ATTEMPT_HEADER = "X-DMEngine-Attempt"
USER_AGENT = "dmengine-webhooks/1"
#: failed dispatcher passes in a row after which health() reports the dispatcher
#: answer bytes read (and dropped) from a receiver
MAX_REPLY = 16 * 1024
#: how long a subscription list read by the dispatcher is used before it is read again
SUBS_TTL = 1.0


@dataclass
class WebhookConfig:
    """The dispatcher's settings (``EngineConfig.webhooks``)."""

    max_attempts: int = 8              #: attempts of a delivery before it is a dead letter
    backoff_base: float = 10.0         #: wait after the first failure, doubled after each
    backoff_max: float = 3600.0        #: longest wait between attempts
    jitter: float = 0.2                #: waits are spread by ± this share
    timeout: float = 10.0              #: one attempt, connect to last byte
    concurrency: int = 64              #: deliveries under way at once (HTTP requests)
    #: deliveries claimed and waiting for a slot at most, per slot: bigger claims (fewer
    #: store writes) while every slot stays busy
    queue_factor: int = 4
    batch: int = 200                   #: outbox entries claimed per pass at most
    lease: float = 60.0                #: a claimed entry is hidden this long (≥ 3 × timeout)
    poll_interval: float = 0.2         #: pause of the loop when nothing was due
    max_subscriptions: int = 1000
    #: retention of the charging log (``GET /v1/charging``): events older than this many
    #: seconds are deleted (None: kept by age) …
    charging_max_age: float | None = 90 * 86400.0
    #: … and the oldest beyond this many (None: no count limit); checked by the dispatcher
    #: every ``retention_interval`` seconds
    charging_max_events: int | None = None
    retention_interval: float = 60.0

    def __post_init__(self) -> None:
        from .errors import ConfigError
        for name in ("max_attempts", "concurrency", "batch", "max_subscriptions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"webhooks.{name} must be >= 1", key=f"webhooks.{name}")
        for name in ("backoff_base", "backoff_max", "timeout", "lease", "poll_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"webhooks.{name} must be > 0", key=f"webhooks.{name}")
        if not 0 <= self.jitter < 1:
            raise ConfigError("webhooks.jitter must be in [0, 1)", key="webhooks.jitter")
        if self.charging_max_age is not None and not self.charging_max_age > 0:
            raise ConfigError("webhooks.charging_max_age must be > 0 (None: no age limit)",
                              key="webhooks.charging_max_age")
        if self.charging_max_events is not None and self.charging_max_events < 1:
            raise ConfigError("webhooks.charging_max_events must be >= 1 (None: no limit)",
                              key="webhooks.charging_max_events")
        if not self.retention_interval > 0:
            raise ConfigError("webhooks.retention_interval must be > 0",
                              key="webhooks.retention_interval")


# --- signatures --------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-DMEngine-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str | None, body: bytes, *, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: the header's ``v1`` is the HMAC of ``t.body`` and ``t`` is at
    most ``tolerance`` seconds from ``now`` (a replayed old delivery is refused)."""
    if not header:
        return False
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        k, _, v = item.strip().partition("=")
        parts.setdefault(k, []).append(v)
    try:
        ts = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    want = sign(secret, ts, body).rsplit("v1=", 1)[1]
    return any(hmac.compare_digest(want, v) for v in parts.get("v1", []))


# --- JSON of events ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def charging_json(ev: ChargingEvent) -> dict[str, Any]:
    """A charging event as the API and the webhooks show it (IF-4's groups)."""
    return {
        "eventId": ev.event_id, "time": ev.time, "taskId": ev.task_id, "jobId": ev.job_id,
        "owner": ev.owner,
        "device": {"devId": ev.dev_id, "imei": ev.imei, "msisdn": ev.msisdn,
                   "devInfo": dict(ev.devinfo)},
        "operation": ev.operation,
        "package": ({"contentId": ev.content_id, "version": ev.content_version}
                    if ev.content_id else None),
        "result": {"status": ev.result, "code": ev.result_code, "cause": ev.cause},
    }


def _camel_keys(d: dict[str, Any]) -> dict[str, Any]:
    return {camel(k): v for k, v in d.items()}


def event_data(entry: OutboxEntry) -> tuple[str, str, dict[str, Any]]:
    """(topic, type, data) of an event entry; data in the API's camelCase (record fields are
    renamed, data keys — node URIs, task states — are kept)."""
    if entry.kind == "charging":
        d = dict(entry.payload)
        d["event_id"] = entry.entry_id
        d.setdefault("time", entry.created)
        try:
            ev = msgspec.convert(d, ChargingEvent)
        except msgspec.ValidationError:
            ev = ChargingEvent(event_id=entry.entry_id, time=entry.created)
        data = charging_json(ev)
        data.pop("eventId")
        return "charging", "charging", data
    p = dict(entry.payload)
    kind = str(p.pop("type", f"{entry.topic}.event"))
    p.pop("time", None)
    data = _camel_keys(p)
    if isinstance(data.get("result"), dict):
        data["result"] = _camel_keys(data["result"])
    return entry.topic or "task", kind, data


def subscription_json(sub: Subscription, *, with_secret: bool = False) -> dict[str, Any]:
    out = {"subscriptionId": sub.sub_id, "url": sub.url, "events": list(sub.topics),
           "jobId": sub.job_id, "description": sub.description, "owner": sub.owner,
           "allOwners": sub.all_owners, "created": sub.created}
    if with_secret:
        out["secret"] = sub.secret
    return out


def dead_letter_json(d: DeadLetter) -> dict[str, Any]:
    e = d.entry
    body = e.payload
    return {"deliveryId": e.entry_id, "eventId": body.get("eventId"),
            "type": body.get("type"), "subscriptionId": e.target, "attempts": e.attempts,
            "lastError": d.error or e.last_error, "failed": d.time, "created": e.created,
            "body": body}


# --- the service and its dispatcher ------------------------------------------------------------


class Webhooks:
    """Subscriptions, dead letters and charging events for the API, and the delivery loop."""

    def __init__(self, store: Store, guard: UrlGuard | None = None,
                 config: WebhookConfig | None = None, *, registry: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.guard = guard or UrlGuard()
        self.config = config or WebhookConfig()
        self.clock = clock
        self.loop = Supervision("webhook dispatcher", clock, log)
        self.counts = {"delivered": 0, "retried": 0, "dead": 0, "dropped": 0, "fanned": 0}
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._sem: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self._subs: dict[str, Subscription] | None = None
        self._subs_read = 0.0
        self._next_prune = 0.0               # when the charging log's retention runs next
        self.pruned = 0                      # charging events deleted by the retention
        if registry is not None:
            # read from self.counts at scrape time (plain integers, no lock per delivery)
            from .metrics import WebhookMetrics
            WebhookMetrics(registry, self.counts)

    # --- subscriptions (createSubscription, deleteSubscription, getSubscriptions) ---------------

    async def create_subscription(self, url: str, topics: list[str], *, owner: str,
                                  all_owners: bool = False, job_id: str | None = None,
                                  description: str | None = None) -> Subscription:
        """A new subscription (its secret is in the returned record: show it once).
        ``owner`` gets its own tasks' and jobs' events; ``all_owners`` everyone's."""
        if not topics:
            raise InvalidRequest("name at least one event topic (task, job, charging)",
                                 where="events")
        for i, t in enumerate(topics):
            if t not in EVENT_TOPICS:
                raise InvalidRequest(f"unknown event topic {t!r} (task, job, charging)",
                                     where=f"events[{i}]")
        try:
            await self.guard.check(url)
        except UrlRefused as exc:
            raise InvalidRequest(f"url refused: {exc}", where="url") from None
        page = await self.store.list_subscriptions(limit=self.config.max_subscriptions)
        if len(page.items) >= self.config.max_subscriptions:
            raise ServiceError(f"at most {self.config.max_subscriptions} subscriptions",
                               where="url")
        sub = Subscription(sub_id=new_id("s"), url=url,
                           topics=list(dict.fromkeys(topics)),  # type: ignore[arg-type]
                           secret="whsec_" + secrets.token_urlsafe(32), owner=owner,
                           all_owners=all_owners, job_id=job_id, description=description,
                           created=self.clock())
        sub = await self.store.create_subscription(sub)
        self._subs = None
        return sub

    async def get_subscription(self, sub_id: str, *, scope: str | None = None) -> Subscription:
        """``scope``: the caller's system (None: an admin); another's subscription is not
        found (404), as another system's task is."""
        try:
            sub = await self.store.get_subscription(sub_id)
        except NotFound:
            sub = None
        if sub is None or (scope is not None and sub.owner != scope):
            raise UnknownResource(f"no subscription {sub_id!r}", where="subscriptionId")
        return sub

    async def delete_subscription(self, sub_id: str, *, scope: str | None = None) -> None:
        await self.get_subscription(sub_id, scope=scope)
        try:
            await self.store.delete_subscription(sub_id)
        except NotFound:
            raise UnknownResource(f"no subscription {sub_id!r}", where="subscriptionId") from None
        self._subs = None

    async def list_subscriptions(self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE,
                                 scope: str | None = None) -> Page[Subscription]:
        """By id; with ``scope`` only that system's (a page may then be short)."""
        page = await self.store.list_subscriptions(cursor=cursor, limit=limit)
        if scope is not None:
            page = Page([s for s in page.items if s.owner == scope], page.next_cursor)
        return page

    # --- dead letters (getDeadLetters, replayDeadLetter) ------------------------------------------

    async def dead_letters(self, *, cursor: str | None = None, limit: int = DEFAULT_PAGE,
                           sub_id: str | None = None,
                           scope: str | None = None) -> Page[DeadLetter]:
        """The dead letters by delivery id; with ``sub_id`` only that subscription's, with
        ``scope`` only those of that system's subscriptions (a page may then be short and
        still have a next cursor)."""
        page = await self.store.dead_letters(cursor=cursor, limit=limit)
        items = page.items
        if sub_id is not None:
            items = [d for d in items if d.entry.target == sub_id]
        if scope is not None:
            subs = await self._subscriptions()
            items = [d for d in items if d.entry.target in subs and
                     subs[d.entry.target].owner == scope]
        return Page(items, page.next_cursor)

    async def replay(self, delivery_id: str, *, scope: str | None = None) -> OutboxEntry:
        """A dead letter back into the outbox, due now, attempts counted afresh."""
        try:
            dead = await self.store.get_dead_letter(delivery_id)
        except NotFound:
            raise UnknownResource(f"no dead letter {delivery_id!r}", where="deliveryId") from None
        target = dead.entry.target
        sub = None
        if target is not None:
            try:
                sub = await self.store.get_subscription(target)
            except NotFound:
                if scope is not None:
                    raise UnknownResource(f"no dead letter {delivery_id!r}",
                                          where="deliveryId") from None
                raise ServiceError(f"subscription {target} was deleted: nothing to "
                                   f"deliver to", where="deliveryId") from None
        if scope is not None and (sub is None or sub.owner != scope):
            raise UnknownResource(f"no dead letter {delivery_id!r}", where="deliveryId")
        try:
            entry = await self.store.replay_dead_letter(delivery_id, due=self.clock())
        except NotFound:
            raise UnknownResource(f"no dead letter {delivery_id!r}", where="deliveryId") from None
        self.wake()
        return entry

    # --- charging (getChargingEvents) ----------------------------------------------------------

    async def charging_events(self, *, start: float | None = None, end: float | None = None,
                              cursor: str | None = None, limit: int = DEFAULT_PAGE,
                              scope: str | None = None) -> Page[ChargingEvent]:
        """The charging log; with ``scope`` only that system's events (pages may be short)."""
        page = await self.store.charging_events(start=start, end=end, cursor=cursor,
                                                limit=limit)
        if scope is not None:
            page = Page([e for e in page.items if e.owner == scope], page.next_cursor)
        return page

    async def prune_charging(self) -> int:
        """The charging log's retention (``charging_max_age``, ``charging_max_events``): its
        oldest events are deleted, a bounded batch per store write.  Returns how many."""
        cfg = self.config
        if cfg.charging_max_age is None and cfg.charging_max_events is None:
            return 0
        before = self.clock() - cfg.charging_max_age if cfg.charging_max_age is not None \
            else None
        batch = 1000
        gone = 0
        while True:
            n = await self.store.prune_charging(before=before, keep=cfg.charging_max_events,
                                                limit=batch)
            gone += n
            if n < batch:
                break
        if gone:
            self.pruned += gone
            log.info("charging log: %d events past their retention deleted", gone)
        return gone

    # --- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.loop.task is None:
            self._wake = asyncio.Event()
            self._sem = asyncio.Semaphore(self.config.concurrency)
            self._session = self.guard.session(
                connector=self.guard.connector(limit=self.config.concurrency,
                                               ttl_dns_cache=10),
                headers={"User-Agent": USER_AGENT})
            self.loop.start(self.run)

    async def stop(self) -> None:
        await self.loop.stop()
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()               # their leases run out: delivered again later
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        """Look at the outbox now rather than after the poll interval."""
        if self._wake is not None:
            self._wake.set()

    def health(self) -> list[str]:
        """What is wrong with the dispatcher, for ``/health`` (empty when nothing is)."""
        return self.loop.health()

    async def run(self) -> None:
        """The loop (until cancelled), supervised: a failed pass is logged, counted and tried
        again after the poll interval."""
        assert self._wake is not None
        while True:
            claimed = await self.loop.run_pass(self.pass_once)
            if claimed:
                await asyncio.sleep(0)           # more may be due: go on
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
            except TimeoutError:
                pass

    def _cap(self) -> int:
        """Deliveries claimed and not finished at most (sending or waiting for a slot)."""
        return self.config.concurrency * max(1, self.config.queue_factor)

    def _lease(self) -> float:
        return max(self.config.lease, 3 * self.config.timeout)

    async def _subscriptions(self) -> dict[str, Subscription]:
        now = time.monotonic()
        if self._subs is None or now - self._subs_read > SUBS_TTL:
            subs: dict[str, Subscription] = {}
            cursor = None
            while True:
                page = await self.store.list_subscriptions(cursor=cursor, limit=1000)
                subs.update((s.sub_id, s) for s in page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
            self._subs, self._subs_read = subs, now
        return self._subs

    async def pass_once(self) -> int:
        """Claims what is due (as many as there are free delivery slots), fans events out and
        starts their deliveries; returns the entries claimed.  Every ``retention_interval``
        it first prunes the charging log (:meth:`prune_charging`)."""
        now = self.clock()
        if now >= self._next_prune:
            self._next_prune = now + self.config.retention_interval
            await self.prune_charging()
        free = self._cap() - len(self._inflight)
        if free <= 0:
            return 0
        lease = self._lease()
        entries = await self.store.claim_entries(now, min(self.config.batch, free), lease)
        if not entries:
            return 0
        subs = await self._subscriptions()
        deliveries: list[OutboxEntry] = []
        events = []
        for e in entries:
            if e.entry_id in self._inflight:
                continue                       # still being sent by this process
            if e.target is not None:
                deliveries.append(e)
            else:
                events.append(e)
        if events:
            made = await asyncio.gather(*(self._fan_out(e, subs, now + lease) for e in events))
            for batch in made:
                deliveries.extend(batch)
        for d in deliveries:
            self._inflight[d.entry_id] = asyncio.get_running_loop().create_task(
                self._deliver(d, subs.get(d.target or "")))
        return len(entries)

    async def _fan_out(self, e: OutboxEntry, subs: dict[str, Subscription],
                       claimed_until: float) -> list[OutboxEntry]:
        topic, kind, data = event_data(e)
        job_id = e.payload.get("job_id") if topic != "charging" else None
        owner = e.payload.get("owner") or ""
        out = []
        for sub in subs.values():
            if topic not in sub.topics:
                continue
            if not sub.all_owners and sub.owner != owner:
                continue                       # another system's task, job or charge
            if sub.job_id is not None and topic != "charging" and sub.job_id != job_id:
                continue
            body = {"eventId": e.entry_id, "type": kind,
                    "time": float(e.payload.get("time") or e.created),
                    "subscriptionId": sub.sub_id, "data": data}
            out.append(OutboxEntry(entry_id=f"{e.entry_id}.{sub.sub_id}", kind="webhook",
                                   due=claimed_until, target=sub.sub_id, payload=body,
                                   created=e.created))
        try:
            made = await self.store.fan_out(e.entry_id, out)
        except NotFound:
            return []                           # another dispatcher did it
        self.counts["fanned"] += 1
        return made

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1

    async def _deliver(self, entry: OutboxEntry, sub: Subscription | None) -> None:
        try:
            if sub is None:
                try:
                    sub = await self.store.get_subscription(entry.target or "")
                except NotFound:
                    sub = None
            if sub is None:
                # the subscription was deleted: its deliveries are dropped
                await self.store.ack(entry.entry_id)
                self._count("dropped")
                return
            assert self._sem is not None
            async with self._sem:
                error = await self._send(entry, sub)
            if error is None:
                await self.store.ack(entry.entry_id)
                self._count("delivered")
                log.debug("webhook %s delivered", entry.entry_id, extra=_entry_ids(entry))
            elif entry.attempts + 1 >= self.config.max_attempts:
                await self.store.dead_letter(entry.entry_id, error=error)
                self._count("dead")
                log.warning("webhook %s to %s given up after %d attempts: %s", entry.entry_id,
                            sub.url, entry.attempts + 1, error, extra=_entry_ids(entry))
            else:
                await self.store.retry(entry.entry_id, due=self.clock() +
                                       self.backoff(entry.attempts), error=error)
                self._count("retried")
        except NotFound:
            pass                                  # replayed/handled elsewhere meanwhile
        except asyncio.CancelledError:
            raise
        except Exception:
            # the store could not record the outcome: the lease runs out, it is sent again
            log.exception("webhook %s: outcome not recorded", entry.entry_id)
        finally:
            self._inflight.pop(entry.entry_id, None)
            if self._wake is not None and len(self._inflight) <= self._cap() // 2:
                self._wake.set()               # room for a bigger claim: look now

    def backoff(self, attempts: int) -> float:
        """The wait after failed attempt ``attempts + 1``: exponential, capped, jittered."""
        c = self.config
        base = min(c.backoff_max, c.backoff_base * (2 ** min(attempts, 30)))
        return base * (1.0 + _rng.uniform(-c.jitter, c.jitter)) if c.jitter else base

    async def _send(self, entry: OutboxEntry, sub: Subscription) -> str | None:
        """One attempt; None when the receiver took it (2xx), else what went wrong."""
        body = _json.encode(entry.payload)
        ts = int(self.clock())
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(sub.secret, ts, body),
                   EVENT_ID_HEADER: str(entry.payload.get("eventId", entry.entry_id)),
                   EVENT_TYPE_HEADER: str(entry.payload.get("type", "")),
                   DELIVERY_HEADER: entry.entry_id,
                   ATTEMPT_HEADER: str(entry.attempts + 1)}
        assert self._session is not None
        try:
            self.guard.check_literal(sub.url)        # names: checked by the resolver
            async with self._session.post(
                    sub.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout)) as resp:
                await resp.content.read(MAX_REPLY)
                status = resp.status
        except UrlRefused as exc:
            return f"refused: {exc}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:1000]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"


__all__ = ["Webhooks", "WebhookConfig", "sign", "verify", "charging_json", "subscription_json",
           "dead_letter_json", "event_data", "SIGNATURE_HEADER", "EVENT_ID_HEADER",
           "EVENT_TYPE_HEADER", "DELIVERY_HEADER", "ATTEMPT_HEADER"]


def _entry_ids(entry: Any) -> dict[str, str]:
    """The task, job and device an outbox entry is about, for its log lines
    (dmengine/logs.py): a delivery carries the event as sent (``data`` in camelCase), an
    event before its fan-out the engine's own fields."""
    payload = entry.payload if isinstance(entry.payload, dict) else {}
    data = payload.get("data")
    if isinstance(data, dict):
        return logs.ids(task=data.get("taskId"), job=data.get("jobId"), device=data.get("devId"))
    return logs.ids(task=payload.get("task_id"), job=payload.get("job_id"),
                    device=payload.get("dev_id"))
