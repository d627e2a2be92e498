"""Package #0 through Kannel's smsbox ``sendsms`` interface as a WAP push SMS.

One SMS carries UDH ``06 05 04 0B 84 23 F0`` and the body ``<tid> 06 03 C4 AF 87 <pkg0>``
(see ``wsp.py``), sent with ``coding=1`` (8-bit).  The checks REAL-PARTS.md asks for:

* only ``0: Accepted for delivery`` is an accepted delivery; ``3: Queued for later delivery``
  (HTTP 202 too, but the SMSC is not connected) is reported as ``DeliveryState.QUEUED``;
* UDH + body must fit 140 bytes, i.e. WSP headers + package #0 <= 133 bytes, otherwise
  Kannel with ``max-messages = 1`` truncates silently: refused here with
  ``GatewayError(retryable=False)`` (concatenated SMS is not implemented);
* the binary is percent-encoded exactly once (GET) or sent raw (POST).

HTTP 5xx, connection failures and timeouts are retryable; 4xx (bad credentials, missing
fields, denied numbers) are not.
"""
from __future__ import annotations

import itertools
from urllib.parse import quote, quote_from_bytes

import aiohttp
from yarl import URL

from dmengine.errors import GatewayError

from .base import Delivery, DeliveryState, Gateway
from .wsp import MAX_PUSH_BODY, WDP_UDH, build_push

__all__ = ["KannelGateway", "DEFAULT_TIMEOUT", "DEFAULT_SENDSMS_PATH"]

DEFAULT_TIMEOUT = 10.0
DEFAULT_SENDSMS_PATH = "/cgi-bin/sendsms"
ACCEPTED_PREFIX = "0:"
QUEUED_PREFIX = "3:"


def _pct(data: bytes) -> str:
    return quote_from_bytes(data, safe="")


class KannelGateway(Gateway):
    """``KannelGateway("http://127.0.0.1:13013", "user", "pw", sender="12345")``.

    ``method`` is ``"GET"`` (query string, as Kannel documents) or ``"POST"`` (raw body with
    ``X-Kannel-*`` headers).  ``smsc_id`` routes to one SMSC; ``dlr_url``/``dlr_mask`` ask
    Kannel for delivery reports.  A shared ``aiohttp.ClientSession`` may be passed in;
    otherwise the gateway opens its own and closes it in ``close()``.
    """

    name = "kannel"

    def __init__(self, base_url: str, username: str, password: str, *, sender: str | None = None,
                 smsc_id: str | None = None, method: str = "GET",
                 path: str = DEFAULT_SENDSMS_PATH, timeout: float = DEFAULT_TIMEOUT,
                 dlr_url: str | None = None, dlr_mask: int | None = None,
                 max_body: int = MAX_PUSH_BODY, session: aiohttp.ClientSession | None = None,
                 first_tid: int = 1, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if method not in ("GET", "POST"):
            raise ValueError(f"method must be GET or POST, not {method!r}")
        self.url = base_url.rstrip("/") + path
        self.username = username
        self.password = password
        self.sender = sender
        self.smsc_id = smsc_id
        self.method = method
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.dlr_url = dlr_url
        self.dlr_mask = dlr_mask
        self.max_body = max_body
        self._session = session
        self._own_session = session is None
        self._tids = itertools.cycle(range(256))
        for _ in range(first_tid % 256):
            next(self._tids)
        self.queued = 0

    def check_payload(self, pkg0: bytes) -> None:
        super().check_payload(pkg0)
        body_len = len(build_push(pkg0))
        if body_len > self.max_body:
            raise GatewayError(
                f"WSP headers + package #0 are {body_len} bytes; one SMS carries {self.max_body} "
                f"after the UDH (package #0 of {len(pkg0)} bytes is too long; concatenated SMS "
                f"is not supported)", retryable=False)

    def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._own_session = True
        return self._session

    def _request(self, msisdn: str, body: bytes) -> tuple[str, URL, dict[str, str], bytes | None]:
        if self.method == "GET":
            q = [("username", quote(self.username, safe="")),
                 ("password", quote(self.password, safe="")),
                 ("to", quote(msisdn, safe=""))]
            if self.sender:
                q.append(("from", quote(self.sender, safe="")))
            if self.smsc_id:
                q.append(("smsc", quote(self.smsc_id, safe="")))
            if self.dlr_url:
                q.append(("dlr-url", quote(self.dlr_url, safe="")))
            if self.dlr_mask is not None:
                q.append(("dlr-mask", str(int(self.dlr_mask))))
            q += [("coding", "1"), ("udh", _pct(WDP_UDH)), ("text", _pct(body))]
            query = "&".join(f"{k}={v}" for k, v in q)
            return "GET", URL(f"{self.url}?{query}", encoded=True), {}, None
        headers = {"Content-Type": "application/octet-stream", "X-Kannel-Username": self.username,
                   "X-Kannel-Password": self.password, "X-Kannel-To": msisdn,
                   "X-Kannel-Coding": "1", "X-Kannel-UDH": _pct(WDP_UDH)}
        if self.sender:
            headers["X-Kannel-From"] = self.sender
        if self.smsc_id:
            headers["X-Kannel-SMSC"] = self.smsc_id
        if self.dlr_url:
            headers["X-Kannel-DLR-Url"] = self.dlr_url
        if self.dlr_mask is not None:
            headers["X-Kannel-DLR-Mask"] = str(int(self.dlr_mask))
        return "POST", URL(self.url), headers, body

    async def _send_once(self, msisdn: str, pkg0: bytes) -> Delivery:
        body = build_push(pkg0, tid=next(self._tids))
        method, url, headers, data = self._request(msisdn, body)
        try:
            async with self._session_get().request(method, url, headers=headers, data=data,
                                                   timeout=self.timeout) as resp:
                text = (await resp.text(errors="replace")).strip()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise GatewayError(f"kannel sendsms {self.url}: {type(exc).__name__}: {exc}",
                               retryable=True) from exc
        if 200 <= status < 300:
            if text.startswith(ACCEPTED_PREFIX):
                state = DeliveryState.ACCEPTED
            elif text.startswith(QUEUED_PREFIX):
                state = DeliveryState.QUEUED
                self.queued += 1
            else:
                raise GatewayError(f"kannel answered HTTP {status} {text!r}, not '0: Accepted'",
                                   retryable=False)
            return Delivery(gateway=self.name, msisdn=msisdn, state=state, attempts=1, detail=text,
                            wire={"udh": WDP_UDH, "body": body})
        retryable = status >= 500 or status in (408, 429)
        raise GatewayError(f"kannel refused: HTTP {status} {text!r}", retryable=retryable)

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
