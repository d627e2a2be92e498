"""A gateway without an SMSC: hands package #0 to an in-process async callback.

Used by the campaign benchmark and the device simulator.  ``callback(msisdn, pkg0)`` is
awaited; a ``GatewayError`` it raises keeps its ``retryable`` flag (so retries can be
tested), any other exception becomes ``GatewayError(retryable=False)``.  A callback that
returns ``False`` means "no such device here" (not retryable).  No rate limit by default.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from dmengine.errors import GatewayError

from .base import Delivery, DeliveryState, Gateway

__all__ = ["LoopbackGateway", "Receiver"]

Receiver = Callable[[str, bytes], Awaitable[object]]
#: ``bootstrap_callback(msisdn, body, content_type)`` receives DM-profile bootstrap messages.
BootstrapReceiver = Callable[[str, bytes, str], Awaitable[object]]


class LoopbackGateway(Gateway):
    name = "loopback"

    def __init__(self, callback: Receiver, *, rate: float | None = None,
                 bootstrap_callback: BootstrapReceiver | None = None, **kw: object) -> None:
        super().__init__(rate=rate, **kw)  # type: ignore[arg-type]
        self.callback = callback
        self.bootstrap_callback = bootstrap_callback

    async def send_bootstrap(self, msisdn: str, body: bytes, content_type: str) -> Delivery:
        if self.bootstrap_callback is None:
            return await super().send_bootstrap(msisdn, body, content_type)
        if await self.bootstrap_callback(msisdn, body, content_type) is False:
            raise GatewayError(f"loopback receiver has no device {msisdn}", retryable=False)
        return Delivery(gateway=self.name, msisdn=msisdn, state=DeliveryState.ACCEPTED,
                        attempts=1, wire={"bootstrap": body, "content_type": content_type.encode()})

    async def _send_once(self, msisdn: str, pkg0: bytes) -> Delivery:
        try:
            result = await self.callback(msisdn, pkg0)
        except GatewayError:
            raise
        except Exception as exc:  # the receiver's bug must not look like a transient failure
            raise GatewayError(f"loopback receiver failed: {type(exc).__name__}: {exc}",
                               retryable=False) from exc
        if result is False:
            raise GatewayError(f"loopback receiver has no device {msisdn}", retryable=False)
        return Delivery(gateway=self.name, msisdn=msisdn, state=DeliveryState.ACCEPTED,
                        attempts=1, wire={"pkg0": pkg0})
