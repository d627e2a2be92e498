"""The simulator as the campaign benchmark uses it: a lazy fleet (devices made from their
index when notified, dropped after their sessions) and the HTTP package-0 listener the
server's ``--gateway http:URL`` posts to."""
from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import uvloop

from dmengine.notify.http import HttpCallbackGateway
from dmengine.notify.pkg0 import build_pkg0
from dmengine.simulator.device import DeviceProfile, VirtualDevice
from dmengine.simulator.fleet import FaultShares, Fleet, registration_csv
from dmengine.simulator.pkg0http import Pkg0Listener


def test_lazy_fleet_makes_devices_from_their_index():
    fleet = Fleet(DeviceProfile(), 1000, first_index=5000, lazy=True,
                  faults=FaultShares(fail_update=0.1, drop=0.05))
    assert fleet.live == 0 and len(fleet.devices) == 1000
    d = fleet.devices[3]
    eager = VirtualDevice(5003, DeviceProfile())
    assert (d.dev_id, d.msisdn, d.username, d.client_secret, d.server_nonce) == \
        (eager.dev_id, eager.msisdn, eager.username, eager.client_secret, eager.server_nonce)
    assert fleet.live == 0                           # looked at, not kept
    # faults derive from (seed, index): the same device gets the same plan every time
    plans = [fleet.devices[i].faults for i in range(1000)]
    assert plans == [fleet.devices[i].faults for i in range(1000)]
    failing = sum(p.fail_update is not None for p in plans)
    assert 60 <= failing <= 140, failing
    assert fleet.find_msisdn(eager.msisdn) is fleet.find_msisdn(eager.msisdn)
    assert fleet.find_msisdn("+447900000001") is None        # not one of this fleet's
    assert fleet.find_msisdn("+4479000050031") is None       # not the canonical form
    # the CSV of a lazy fleet is every device's, in index order, without keeping them
    csv = b"".join(registration_csv(fleet.devices)).decode().splitlines()
    assert len(csv) == 1001 and csv[4].startswith(eager.dev_id + ",")
    assert fleet.live == 1                           # only the one find_msisdn pinned


def test_lazy_fleet_keeps_what_a_session_changed():
    fleet = Fleet(DeviceProfile(), 10, lazy=True)
    dev = fleet.device(4)
    fleet._hold(dev)
    dev.client_nonce = b"N" * 16                     # the server issued a new nonce
    dev.fwv = "2.4.0"                                # and the update went through
    fleet._release(dev)
    assert fleet.live == 0
    again = fleet.device(4)
    assert again is not dev
    assert again.client_nonce == b"N" * 16 and again.fwv != DeviceProfile().fwv
    odd = fleet.device(5)
    fleet._hold(odd)
    odd.client_nonce = b"short"
    fleet._release(odd)
    assert fleet.device(5).client_nonce == b"short"
    # a device with a result still to report stays
    keep = fleet.device(6)
    fleet._hold(keep)
    keep.pending_alerts.append(object())             # type: ignore[arg-type]
    fleet._release(keep)
    assert fleet.device(6) is keep


def test_listener_hands_posted_package0_to_the_fleet():
    async def main() -> None:
        prof = DeviceProfile(server_url="http://127.0.0.1:9/dm")   # nobody listens: sessions fail
        fleet = Fleet(prof, 50, lazy=True)
        fleet.client.timeout = 2.0
        listener = Pkg0Listener(fleet)
        url = await listener.start()
        gw = HttpCallbackGateway(url, rate=None)
        try:
            dev = fleet.devices[7]
            pkg0 = build_pkg0(prof.server_id, dev.server_secret, dev.server_nonce, 0x1234)
            delivery = await gw.send(dev.msisdn, pkg0)
            assert delivery.accepted and delivery.message_id == "1"
            async with aiohttp.ClientSession() as s:
                async with s.post(url, json={"msisdn": "+4479" + "9" * 8,
                                             "pkg0": base64.b64encode(pkg0).decode()}) as r:
                    assert r.status == 404
                async with s.post(url, data=b"{nope") as r:
                    assert r.status == 400
                await fleet.wait_idle(timeout=10)
                async with s.get(url.rsplit("/", 1)[0] + "/stats") as r:
                    stats = json.loads(await r.text())
            assert stats["notifications"] == 1 and stats["pkg0_posts"] == 1
            assert stats["pkg0_unknown"] == 1 and stats["pkg0_bad"] == 1
            assert stats["sessions"] == 1 and stats["outcomes"] == {"http_error": 1}
            assert stats["devices_live"] == 0                  # dropped after its session
        finally:
            await gw.close()
            await listener.close()
            fleet.close()

    uvloop.run(asyncio.wait_for(main(), 30))


def test_a_result_that_could_not_be_delivered_is_reported_again():
    """A session that failed while the device held a Generic Alert is started again with
    backoff (a phone reports its FUMO result until it is delivered), at most
    ``report_retries`` times."""
    from dmengine.message import Command

    async def main() -> None:
        fleet = Fleet(DeviceProfile(server_url="http://127.0.0.1:9/dm"), 4, lazy=True,
                      report_retries=2, report_delay=0.01)
        fleet.client.timeout = 2.0
        try:
            dev = fleet.device(2)
            dev.pending_alerts.append(Command(name="Alert", data="1226"))
            await fleet.run_session(dev, _want=False)
            await fleet.wait_idle(timeout=10)
            assert fleet.stats.report_retries == 2 and fleet.stats.sessions == 3
            assert fleet.stats.outcomes == {"http_error": 3}
            assert fleet.live == 1                   # still holding its result
        finally:
            fleet.close()

    uvloop.run(asyncio.wait_for(main(), 30))
