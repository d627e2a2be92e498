"""Package #0 (server-alerted notification): build/parse, WAP push framing, gateways (L3).

``pkg0`` and ``wsp`` are pure bytes code; ``base`` is the gateway contract (rate limit,
retries); ``kannel``, ``http`` and ``loopback`` are the gateways.  The gateway modules import
aiohttp, so they are not imported here: ``from dmengine.notify.kannel import KannelGateway``.
"""
from __future__ import annotations

from .base import Delivery, DeliveryState, Gateway, RetryPolicy, TokenBucket
from .pkg0 import Pkg0, Pkg0DigestError, build_pkg0, compute_digest, parse_pkg0, session_id_text
from .wsp import WDP_UDH, build_push, decode_sms_notification, parse_push, parse_udh

__all__ = [
    "Delivery", "DeliveryState", "Gateway", "RetryPolicy", "TokenBucket",
    "Pkg0", "Pkg0DigestError", "build_pkg0", "compute_digest", "parse_pkg0", "session_id_text",
    "WDP_UDH", "build_push", "decode_sms_notification", "parse_push", "parse_udh",
    "gateway_from_config",
]


def gateway_from_config(cfg: dict[str, object]) -> Gateway:
    """A gateway from a configuration mapping, e.g.::

        {"type": "kannel", "url": "http://127.0.0.1:13013", "username": "u", "password": "p",
         "sender": "12345", "rate": 50, "burst": 50, "attempts": 4}
        {"type": "http", "url": "https://smsc.example/push", "headers": {"Authorization": "…"}}

    Unknown types or missing keys raise ``ConfigError`` naming the key.
    """
    from dmengine.errors import ConfigError

    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    common: dict[str, object] = {}
    for key in ("rate", "burst"):
        if key in cfg:
            common[key] = cfg.pop(key)
    retry = {k: cfg.pop(k) for k in ("attempts", "base_delay", "max_delay", "factor", "jitter")
             if k in cfg}
    if retry:
        try:
            common["retry"] = RetryPolicy(**retry)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(f"notification gateway retry settings: {exc}",
                              key="attempts") from None

    def need(key: str) -> str:
        value = cfg.pop(key, None)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"notification gateway {kind!r} needs {key!r}", key=key)
        return value

    try:
        if kind == "kannel":
            from .kannel import KannelGateway
            url, user, pw = need("url"), need("username"), need("password")
            return KannelGateway(url, user, pw, **cfg, **common)  # type: ignore[arg-type]
        if kind == "http":
            from .http import HttpCallbackGateway
            return HttpCallbackGateway(need("url"), **cfg, **common)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"notification gateway {kind!r}: {exc}",
                          key=next(iter(cfg), None)) from None
    raise ConfigError(f"unknown notification gateway type {kind!r} (kannel or http)", key="type")
