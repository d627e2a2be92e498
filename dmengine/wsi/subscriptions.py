"""Push routes of the API (L5): webhook subscriptions, dead letters, charging events.

``createSubscription`` (POST /v1/subscriptions), ``getSubscriptions`` (GET
/v1/subscriptions), ``deleteSubscription`` (DELETE /v1/subscriptions/{subscriptionId}),
``getDeadLetters`` (GET /v1/dead-letters), ``replayDeadLetter`` (POST
/v1/dead-letters/{deliveryId}/replay) and ``getChargingEvents`` (GET /v1/charging).  The work
is done by :class:`dmengine.webhooks.Webhooks` (``engine.webhooks``); these handlers
translate HTTP and JSON (camelCase, the app's one error shape).

A subscription's ``secret`` (the HMAC-SHA256 key of its signatures) is in the answer of
``createSubscription`` and nowhere else.  A ``url`` the engine's URL guard refuses
(loopback, link-local, private, a name resolving to one; see dmengine/urlguard.py) is a 400
with ``where: "url"``.

Whose: a subscription's ``owner`` is the caller's system (as a job's,
:func:`dmengine.wsi.security.owner_for_new`; ``"api"`` without identities).  It receives
the events of its own system's tasks and jobs only — one made by an admin
(``allOwners``) everyone's — and a non-admin lists, deletes and replays only its own
subscriptions and dead letters and reads only its own charging events.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec
from aiohttp import web
from msgspec import Meta

from ..devices import parse_time
from ..errors import ApiError, ValidationError
from ..model import ID_PATTERN, ChargingEvent, DeadLetter, Subscription
from ..store.base import DEFAULT_PAGE, MAX_PAGE
from ..webhooks import Webhooks, charging_json, dead_letter_json, subscription_json
from .common import ENGINE
from .middleware import decode_body, json_response
from .openapi import operation
from .schemas import PageQuery
from .security import caller, owner_for_new, owner_scope

routes = web.RouteTableDef()

#: who made a subscription while the API has one key (per-key identities: wsi/security.py)
DEFAULT_OWNER = "api"

Topic = Literal["task", "job", "charging"]
_ID = re.compile(ID_PATTERN)


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    pass


class SubscriptionRequest(_Body):
    """``url``: where events are POSTed (http/https, a public address unless the engine
    allows private ones); ``events``: topics; ``jobId``: only that job's task and job events."""
    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    events: Annotated[list[Topic], Meta(min_length=1, max_length=3)]
    job_id: Union[Annotated[str, Meta(min_length=1, max_length=128)], None] = None
    description: Union[Annotated[str, Meta(max_length=1024)], None] = None


class _Out(msgspec.Struct, kw_only=True, rename="camel"):
    pass


class SubscriptionView(_Out):
    subscription_id: str
    url: str
    events: list[str]
    job_id: Union[str, None]
    description: Union[str, None]
    owner: str
    all_owners: bool
    created: float


class SubscriptionCreated(SubscriptionView):
    """The one answer that carries the secret."""
    secret: str


class SubscriptionPage(_Out):
    items: list[SubscriptionView]
    next_cursor: Union[str, None]


class DeadLetterView(_Out):
    delivery_id: str
    event_id: Union[str, None]
    type: Union[str, None]
    subscription_id: Union[str, None]
    attempts: int
    last_error: Union[str, None]
    failed: float
    created: float
    body: dict[str, Any]


class DeadLetterPage(_Out):
    items: list[DeadLetterView]
    next_cursor: Union[str, None]


class Replayed(_Out):
    delivery_id: str
    due: float


class ChargingDevice(_Out):
    dev_id: Union[str, None]
    imei: Union[str, None]
    msisdn: Union[str, None]
    dev_info: dict[str, str]


class ChargingPackage(_Out):
    content_id: str
    version: Union[str, None]


class ChargingResult(_Out):
    status: Union[str, None]
    code: Union[int, None]
    cause: Union[str, None]


class ChargingEventView(_Out):
    """IF-4: time, device (DevId, IMEI, MSISDN, DevInfo), operation, package, result."""
    event_id: str
    time: float
    task_id: Union[str, None]
    job_id: Union[str, None]
    owner: str
    device: ChargingDevice
    operation: Union[str, None]
    package: Union[ChargingPackage, None]
    result: ChargingResult


class ChargingPage(_Out):
    items: list[ChargingEventView]
    next_cursor: Union[str, None]


class DeadLettersQuery(PageQuery, kw_only=True):
    """``subscriptionId``: only that subscription's dead letters."""
    subscription_id: Union[Annotated[str, Meta(max_length=128)], None] = None


class ChargingQuery(PageQuery, kw_only=True, rename={"start": "from", "end": "to"}):
    """Events whose time is in ``[from, to)``: epoch seconds or ISO 8601 (default: all)."""
    start: Union[Annotated[str, Meta(max_length=64)], None] = None
    end: Union[Annotated[str, Meta(max_length=64)], None] = None


TAG = "push"


# --- helpers ------------------------------------------------------------------------------------


def _hooks(request: web.Request) -> Webhooks:
    hooks = getattr(request.app[ENGINE], "webhooks", None)
    if hooks is None:
        raise ApiError("push (webhooks) is not running", code="unavailable", http_status=503)
    return hooks


def _query(request: web.Request, known: set[str]) -> dict[str, str]:
    for name in request.query:
        if name not in known:
            raise ValidationError(f"unknown query parameter {name!r} (known: "
                                  f"{', '.join(sorted(known))})", where=name)
    return {k: request.query[k] for k in request.query}


def _limit(q: dict[str, str]) -> int:
    try:
        limit = int(q.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit is a number 1..{MAX_PAGE}", where="limit")
    return limit


def _time(q: dict[str, str], name: str) -> float | None:
    v = q.get(name)
    if not v:
        return None
    try:
        t = parse_time(v)
    except ValueError:
        t = -1.0
    if not 0 <= t <= 253402300799.0:
        raise ValidationError(f"{name} is epoch seconds or an ISO-8601 time, not {v!r}",
                              where=name)
    return t


def _sub_view(sub: Subscription) -> dict[str, Any]:
    return subscription_json(sub)


def _dead_view(d: DeadLetter) -> dict[str, Any]:
    return dead_letter_json(d)


def _charging_view(ev: ChargingEvent) -> dict[str, Any]:
    return charging_json(ev)


# --- routes -------------------------------------------------------------------------------------


@routes.post("/v1/subscriptions", name="createSubscription")
@operation("Subscribe a URL to task, job or charging events", body=SubscriptionRequest,
           answers={201: SubscriptionCreated}, errors=(400, 409), tag=TAG)
async def create_subscription(request: web.Request) -> web.Response:
    """``{url, events, jobId?, description?}`` → 201 with the subscription and its
    ``secret`` (shown this once: keep it to check the signatures)."""
    body: SubscriptionRequest = await decode_body(request, SubscriptionRequest)
    if body.job_id is not None and _ID.match(body.job_id) is None:
        raise ValidationError(f"not a job id: {body.job_id!r}", where="jobId")
    ident = caller(request)
    sub = await _hooks(request).create_subscription(
        body.url, list(body.events), owner=owner_for_new(request, None, DEFAULT_OWNER),
        all_owners=ident is None or ident.sees_all, job_id=body.job_id,
        description=body.description)
    return json_response(subscription_json(sub, with_secret=True), 201)


@routes.get("/v1/subscriptions", name="getSubscriptions")
@operation("The subscriptions (without their secrets)", query=PageQuery,
           answers={200: SubscriptionPage}, errors=(400,), tag=TAG)
async def get_subscriptions(request: web.Request) -> web.Response:
    """``?cursor=&limit=`` → ``{items, nextCursor}`` (no secrets)."""
    q = _query(request, {"cursor", "limit"})
    page = await _hooks(request).list_subscriptions(cursor=q.get("cursor") or None,
                                                    limit=_limit(q), scope=owner_scope(request))
    return json_response({"items": [_sub_view(s) for s in page.items],
                          "nextCursor": page.next_cursor})


@routes.delete("/v1/subscriptions/{subscriptionId}", name="deleteSubscription")
@operation("Delete a subscription", answers={204: None}, errors=(404,), tag=TAG)
async def delete_subscription(request: web.Request) -> web.Response:
    """204; deliveries still queued for it are dropped, its dead letters stay listed."""
    await _hooks(request).delete_subscription(request.match_info["subscriptionId"],
                                              scope=owner_scope(request))
    return web.Response(status=204)


@routes.get("/v1/dead-letters", name="getDeadLetters")
@operation("Deliveries given up after their last attempt", query=DeadLettersQuery,
           answers={200: DeadLetterPage}, errors=(400,), tag=TAG)
async def get_dead_letters(request: web.Request) -> web.Response:
    """Deliveries given up after the last attempt: ``?subscriptionId=&cursor=&limit=`` →
    ``{items, nextCursor}`` (with a subscriptionId a page may be short)."""
    q = _query(request, {"subscriptionId", "cursor", "limit"})
    page = await _hooks(request).dead_letters(cursor=q.get("cursor") or None, limit=_limit(q),
                                              sub_id=q.get("subscriptionId") or None,
                                              scope=owner_scope(request))
    return json_response({"items": [_dead_view(d) for d in page.items],
                          "nextCursor": page.next_cursor})


@routes.post("/v1/dead-letters/{deliveryId}/replay", name="replayDeadLetter")
@operation("Deliver a dead letter again", answers={202: Replayed}, errors=(404, 409), tag=TAG)
async def replay_dead_letter(request: web.Request) -> web.Response:
    """The delivery goes back to the outbox, due now, with its attempts counted afresh
    (same event id, same body) → 202 ``{deliveryId, due}``."""
    entry = await _hooks(request).replay(request.match_info["deliveryId"],
                                         scope=owner_scope(request))
    return json_response({"deliveryId": entry.entry_id, "due": entry.due}, 202)


@routes.get("/v1/charging", name="getChargingEvents")
@operation("Charging events (IF-4)", query=ChargingQuery, answers={200: ChargingPage},
           errors=(400,), tag=TAG)
async def get_charging_events(request: web.Request) -> web.Response:
    """IF-4 charging events, oldest first: ``?from=&to=&cursor=&limit=`` (times: epoch
    seconds or ISO 8601, ``[from, to)``) → ``{items, nextCursor}``."""
    q = _query(request, {"from", "to", "cursor", "limit"})
    start, end = _time(q, "from"), _time(q, "to")
    if start is not None and end is not None and end <= start:
        raise ValidationError("to must be after from", where="to")
    page = await _hooks(request).charging_events(start=start, end=end,
                                                 cursor=q.get("cursor") or None,
                                                 limit=_limit(q), scope=owner_scope(request))
    return json_response({"items": [_charging_view(e) for e in page.items],
                          "nextCursor": page.next_cursor})


__all__ = ["routes", "SubscriptionRequest", "SubscriptionView", "SubscriptionCreated",
           "SubscriptionPage", "DeadLetterView", "DeadLetterPage", "Replayed",
           "ChargingEventView", "ChargingPage", "DEFAULT_OWNER"]
