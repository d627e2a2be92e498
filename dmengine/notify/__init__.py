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
]
