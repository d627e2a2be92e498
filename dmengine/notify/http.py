"""Package #0 handed to another SMS centre by an HTTP callback.

``POST <url>`` with JSON::

    {"msisdn": "4915112345678", "pkg0": "<base64>",
     "content_type": "application/vnd.syncml.notification",
     "wap_application_id": "x-wap-application:syncml.dm"}

2xx is accepted (a JSON answer's ``id``/``message_id`` is kept; ``{"queued": true}`` or
HTTP 202 with ``"status": "queued"`` is reported as queued).  5xx, 408, 429, connection
errors and timeouts are retryable; other 4xx are not.

With a ``guard`` (:class:`dmengine.urlguard.UrlGuard`; the engine sets one and checks the URL
when it starts) every connection's addresses pass the guard.  Redirects are never followed:
a gateway URL cannot be made to reach the server's own network unless configured.  The
POSTs go through :class:`dmengine.notify.httpclient.HttpPool` (kept-alive connections).
"""
from __future__ import annotations

import base64

import msgspec

from dmengine.errors import GatewayError
from dmengine.urlguard import UrlGuard, UrlRefused

from .base import Delivery, DeliveryState, Gateway
from .httpclient import HttpPool
from .wsp import APP_ID_SYNCML_DM_TEXT, CT_SYNCML_NOTIFICATION_TEXT

__all__ = ["HttpCallbackGateway", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 10.0
MAX_REPLY = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 64   #: connections to the SMS centre at most (kept alive)

# msgspec's JSON, not the json module's: a campaign posts hundreds of these a second
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


class HttpCallbackGateway(Gateway):
    name = "http"

    def __init__(self, url: str, *, headers: dict[str, str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, guard: UrlGuard | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.url = url
        self.guard = guard
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._pool = HttpPool(url, headers={"Content-Type": "application/json", **self.headers},
                              timeout=timeout, guard=guard, max_connections=max_connections,
                              max_reply=MAX_REPLY)

    @staticmethod
    def body(msisdn: str, pkg0: bytes) -> dict[str, str]:
        return {"msisdn": msisdn, "pkg0": base64.b64encode(pkg0).decode("ascii"),
                "content_type": CT_SYNCML_NOTIFICATION_TEXT,
                "wap_application_id": APP_ID_SYNCML_DM_TEXT}

    async def _send_once(self, msisdn: str, pkg0: bytes) -> Delivery:
        payload = _json_encode(self.body(msisdn, pkg0))
        try:
            if self.guard is not None:
                self.guard.check_literal(self.url)
            status, raw = await self._pool.post(payload)
        except UrlRefused as exc:
            raise GatewayError(f"http gateway {self.url}: refused: {exc}",
                               retryable=False) from exc
        except (TimeoutError, OSError) as exc:
            raise GatewayError(f"http gateway {self.url}: {type(exc).__name__}: {exc}",
                               retryable=True) from exc
        text = raw.decode("utf-8", "replace").strip()
        if 200 <= status < 300:
            state = DeliveryState.ACCEPTED
            message_id = None
            try:
                answer = _json_decode(text) if text else None
            except msgspec.DecodeError:
                answer = None
            if isinstance(answer, dict):
                mid = answer.get("message_id", answer.get("id"))
                message_id = str(mid) if mid is not None else None
                if answer.get("queued") is True or answer.get("status") == "queued":
                    state = DeliveryState.QUEUED
            return Delivery(gateway=self.name, msisdn=msisdn, state=state, attempts=1,
                            detail=text[:200], message_id=message_id,
                            wire={"json": payload})
        retryable = status >= 500 or status in (408, 429)
        raise GatewayError(f"http gateway refused: HTTP {status} {text[:200]!r}",
                           retryable=retryable)

    async def close(self) -> None:
        await self._pool.close()
