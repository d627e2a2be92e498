"""Device identity rules (L4): acceptDevicePolicy and DevId parsing.

When the device that answers a notification is not the one on record (another IMEI behind the
same MSISDN), ``acceptDevicePolicy`` of the task decides (DESIGN.md §3, seeds §6.1):

* 10 — accept any IMEI with the same TAC (first 8 digits) as the one on record;
* 20 — accept any IMEI if the record has none;
* 30 — accept any IMEI;
* 40 — ask the carrier: an async callback (a webhook) answers accept or reject.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp

from .model import Device

POLICY_SAME_TAC = 10
POLICY_ANY_IF_NONE = 20
POLICY_ANY = 30
POLICY_CARRIER_CALLBACK = 40
POLICIES = (POLICY_SAME_TAC, POLICY_ANY_IF_NONE, POLICY_ANY, POLICY_CARRIER_CALLBACK)

#: How long the carrier callback may take before the answer counts as "reject".
DEFAULT_CALLBACK_TIMEOUT = 5.0


def imei_of(dev_id: str | None) -> str | None:
    """The IMEI digits of a DevId URN (``IMEI:356938035643809``), else None."""
    if not dev_id:
        return None
    scheme, _, rest = dev_id.partition(":")
    if scheme.upper() == "IMEI" and rest.isdigit():
        return rest
    return None


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    accept: bool
    cause: str
    same_device: bool = False


#: ``callback(device, reported_dev_id, task_id) -> bool`` for policy 40.
CarrierCallback = Callable[[Device, str, str], Awaitable[bool]]


async def check_device_policy(policy: int, record: Device, reported_dev_id: str, *,
                              task_id: str = "",
                              callback: CarrierCallback | None = None) -> PolicyDecision:
    """Decides whether the device that reported ``reported_dev_id`` may stand for ``record``."""
    if reported_dev_id == record.dev_id:
        return PolicyDecision(True, "same device", same_device=True)
    reported_imei = imei_of(reported_dev_id)
    if reported_imei is not None and record.imei is not None and reported_imei == record.imei:
        return PolicyDecision(True, "same IMEI", same_device=True)
    if policy == POLICY_SAME_TAC:
        if record.imei and reported_imei and reported_imei[:8] == record.imei[:8]:
            return PolicyDecision(True, f"policy 10: {reported_dev_id} has the TAC on record")
        return PolicyDecision(False, f"refused by acceptDevicePolicy 10: {reported_dev_id} does not "
                                     f"have the TAC of the IMEI on record")
    if policy == POLICY_ANY_IF_NONE:
        if not record.imei:
            return PolicyDecision(True, "policy 20: no IMEI on record")
        return PolicyDecision(False, f"refused by acceptDevicePolicy 20: the record has IMEI "
                                     f"{record.imei}, device reported {reported_dev_id}")
    if policy == POLICY_ANY:
        return PolicyDecision(True, "policy 30: any IMEI accepted")
    if policy == POLICY_CARRIER_CALLBACK:
        if callback is None:
            return PolicyDecision(False, "refused by acceptDevicePolicy 40: no carrier callback "
                                         "configured")
        try:
            ok = await callback(record, reported_dev_id, task_id)
        except Exception as exc:  # a broken callback is a refusal, never a crash
            return PolicyDecision(False, f"refused by acceptDevicePolicy 40: carrier callback "
                                         f"failed ({type(exc).__name__})")
        if ok:
            return PolicyDecision(True, "policy 40: the carrier accepted")
        return PolicyDecision(False, "refused by acceptDevicePolicy 40: the carrier rejected "
                                     f"{reported_dev_id}")
    return PolicyDecision(False, f"unknown acceptDevicePolicy {policy}")


def http_carrier_callback(url: str, *, timeout: float = DEFAULT_CALLBACK_TIMEOUT,
                          session: aiohttp.ClientSession | None = None) -> CarrierCallback:
    """Policy 40 over HTTP: POSTs ``{task_id, dev_id, msisdn, imei_on_record, reported_dev_id}``
    as JSON; the carrier answers ``{"decision": "accept"}`` or ``{"decision": "reject"}``.
    Anything else (error status, timeout, other JSON) counts as reject."""

    async def callback(record: Device, reported_dev_id: str, task_id: str) -> bool:
        body = {"task_id": task_id, "dev_id": record.dev_id, "msisdn": record.msisdn,
                "imei_on_record": record.imei, "reported_dev_id": reported_dev_id}
        own = session is None
        s = session or aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout):
                async with s.post(url, json=body) as resp:
                    if resp.status != 200:
                        return False
                    answer = await resp.json(content_type=None)
            return isinstance(answer, dict) and answer.get("decision") == "accept"
        finally:
            if own:
                await s.close()

    return callback
