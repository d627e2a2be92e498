"""Push (issue 15): webhook subscriptions, signed at-least-once deliveries from the outbox,
retries, dead letters and their replay, the URL guard (SSRF), charging events (IF-4) — over
real HTTP, against a real engine and real aiohttp receivers."""
from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import time
from typing import Any, Callable

import aiohttp
import pytest
import uvloop
from aiohttp import web

from dmengine.broker import BrokerConfig
from dmengine.cli import build_parser, main as cli_main
from dmengine.devices import http_carrier_callback
from dmengine.engine import Engine, EngineConfig
from dmengine.errors import ConfigError, GatewayError
from dmengine.model import Device, QueryOp, TaskState, UpdateOp
from dmengine.notify.http import HttpCallbackGateway
from dmengine.urlguard import UrlGuard, UrlRefused, address_problem
from dmengine.webhooks import (ATTEMPT_HEADER, EVENT_ID_HEADER, SIGNATURE_HEADER, WebhookConfig,
                               sign, verify)

from conftest import api_client, bounded, local_http
from test_broker_e2e import World, run_world, upload_firmware

S = TaskState
PUBLIC = "93.184.216.34"          # an address of the public internet (never connected to here)


# --- a real receiver ----------------------------------------------------------------------------


class Receiver:
    """An aiohttp server on loopback that records every request; ``behave(event_id, n)``
    (``n``: the how-many-th request for that event) says what to answer: an int status, or
    ``"sleep"`` to stall past the sender's timeout."""

    def __init__(self, behave: Callable[[str, int], Any] = lambda e, n: 200) -> None:
        self.behave = behave
        self.requests: list[dict[str, Any]] = []
        self.per_event: collections.Counter[str] = collections.Counter()
        self.secret: str | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        eid = request.headers.get(EVENT_ID_HEADER, "")
        self.per_event[eid] += 1
        n = self.per_event[eid]
        what = self.behave(eid, n)
        self.requests.append({
            "event_id": eid, "n": n, "body": body, "json": json.loads(body),
            "attempt": int(request.headers.get(ATTEMPT_HEADER, "0")),
            "signature": request.headers.get(SIGNATURE_HEADER),
            "valid": self.secret is not None and verify(self.secret,
                                                        request.headers.get(SIGNATURE_HEADER),
                                                        body),
            "answer": what})
        if what == "sleep":
            await asyncio.sleep(2.0)
            return web.Response(status=200)
        return web.Response(status=int(what), text="ok")

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def delivered(self) -> dict[str, dict[str, Any]]:
        """event id → the request that was answered 2xx."""
        return {r["event_id"]: r for r in self.requests
                if isinstance(r["answer"], int) and 200 <= r["answer"] < 300}


async def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --- an engine and its API ----------------------------------------------------------------------


FAST_HOOKS = dict(backoff_base=0.05, jitter=0.2, timeout=0.5, poll_interval=0.02)


class Api:
    def __init__(self, engine: Engine, http: aiohttp.ClientSession) -> None:
        self.url = engine.api_url
        self.headers = {"X-API-Key": engine.api_key}
        self.http = http

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=json, params=params,
                                     headers=self.headers) as r:
            text = await r.text()
            return r.status, (json_loads(text) if text else None)


def json_loads(text: str) -> Any:
    return json.loads(text)


def with_engine(tmp_path: pathlib.Path, scenario: Callable[..., Any], *,
                allow_private: bool = True, **hooks: Any) -> None:
    async def main() -> None:
        cfg = EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                           allow_private_callbacks=allow_private,
                           broker=BrokerConfig(tick_interval=0.05, retry_delays=(30.0,)),
                           webhooks=WebhookConfig(**{**FAST_HOOKS, **hooks}))
        engine = Engine(cfg)
        await engine.start()
        try:
            async with api_client() as http:
                await bounded(scenario(engine, Api(engine, http)))
        finally:
            await engine.stop()
    uvloop.run(main())


async def subscribe(api: Api, url: str, events: list[str], **kw: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "v1/subscriptions",
                                  json={"url": url, "events": events, **kw})
    assert status == 201, body
    return body


async def finished_tasks(engine: Engine, api: Api, n: int) -> list[str]:
    """``n`` real tasks that end CANCELLED through the API (a task.finished event each)."""
    ids = []
    for i in range(n):
        dev = await engine.store.create_device(Device(
            dev_id=f"IMEI:3569380356{i:05d}", imei=f"3569380356{i:05d}",
            msisdn=f"+49170{i:07d}"))
        status, body = await api.call("POST", "v1/operations", json={
            "target": {"devId": dev.dev_id}, "operation": {"operation": "QUERY",
                                                             "nodes": ["./DevInfo/Mod"]}})
        assert status == 201, body
        ids.append(body["taskId"])
        status, body = await api.call("POST", f"v1/tasks/{ids[-1]}/cancel")
        assert status == 200, body
    return ids


# --- signatures and the guard (no engine) -------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_and_body():
    import hashlib
    import hmac
    body = b'{"eventId":"ev1"}'
    header = sign("whsec_k", 1700000000, body)
    want = hmac.new(b"whsec_k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={want}"
    assert verify("whsec_k", header, body, now=1700000100)
    assert not verify("whsec_other", header, body, now=1700000100)
    assert not verify("whsec_k", header, body + b" ", now=1700000100)
    assert not verify("whsec_k", header, body, now=1700000000 + 301)     # too old: a replay
    assert not verify("whsec_k", None, body) and not verify("whsec_k", "garbage", body)


@pytest.mark.parametrize("addr,why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fd00::1", "private"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "not globally routable"), ("224.0.0.1", "multicast"),
    ("::ffff:127.0.0.1", "loopback (inside ::ffff:7f00:1)"),
    ("64:ff9b::a00:1", "private (inside 64:ff9b::a00:1)"),
    ("2002:c0a8:101::1", "private (inside 2002:c0a8:101::1)"),
    (PUBLIC, None), ("2606:4700:4700::1111", None),
])
def test_address_problems(addr, why):
    assert address_problem(addr) == why


def test_guard_checks_form_and_every_resolved_address():
    async def main() -> None:
        dns = {"hooks.example": [PUBLIC], "inner.example": ["10.0.0.7"],
               "mixed.example": [PUBLIC, "192.168.1.9"]}

        async def resolve(host: str, port: int) -> list[str]:
            if host not in dns:
                raise OSError("no such host")
            return dns[host]
        g = UrlGuard(resolve=resolve)
        assert await g.check("https://hooks.example/x") == "https://hooks.example/x"
        for url, words in [("http://inner.example/x", "private"),
                           ("http://mixed.example/x", "192.168.1.9"),
                           ("http://nowhere.example/x", "does not resolve"),
                           ("ftp://hooks.example/x", "scheme"), ("http:///x", "no host"),
                           ("http://[::1]:80/x", "loopback"),
                           ("http://hooks.example:99999/x", "not a URL"),
                           ("http://hooks.example/a b", "white space")]:
            with pytest.raises(UrlRefused, match=words):
                await g.check(url)
        # the system resolver: numeric forms of 127.0.0.1 and localhost are names for it
        real = UrlGuard()
        for url in ("http://localhost/x", "http://2130706433/x", "http://127.1/x"):
            with pytest.raises(UrlRefused, match="loopback"):
                await real.check(url)
        # configured: all allowed, or one network
        assert await UrlGuard(allow_private=True).check("http://127.0.0.1:9/x")
        g2 = UrlGuard.from_config(False, ["10.0.0.0/24"])
        g2.resolve = resolve
        assert await g2.check("http://inner.example/x")
        with pytest.raises(UrlRefused):
            await g2.check("http://mixed.example/x")
        with pytest.raises(ConfigError):
            UrlGuard.from_config(False, ["10.0.0.0/33"])
    asyncio.run(main())


# --- subscriptions over the API -----------------------------------------------------------------


def test_subscription_api_refuses_inner_urls_and_shows_the_secret_once(tmp_path):
    async def scenario(engine: Engine, api: Api) -> None:
        dns = {"public.example": [PUBLIC], "inner.example": ["10.20.30.40"],
               "meta.example": ["169.254.169.254"]}

        async def resolve(host: str, port: int) -> list[str]:
            if host in dns:
                return dns[host]
            return [a[4][0] for a in await asyncio.get_running_loop().getaddrinfo(host, port)]
        assert engine.webhooks is not None
        engine.webhooks.guard.resolve = resolve
        for url in ["http://127.0.0.1:9/h", "http://localhost:9/h", "http://[::1]/h",
                    "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/h",
                    "http://[::ffff:127.0.0.1]/h", "http://2130706433/h", "http://0.0.0.0/h",
                    "http://inner.example/h", "http://meta.example/h", "file:///etc/passwd",
                    "gopher://public.example/"]:
            status, body = await api.call("POST", "v1/subscriptions",
                                          json={"url": url, "events": ["task"]})
            assert status == 400 and body["where"] == "url", (url, body)
        status, body = await api.call("POST", "v1/subscriptions",
                                      json={"url": "https://public.example/h", "events": ["x"]})
        assert status == 400 and body["where"] == "$.events[0]", body
        status, body = await api.call("POST", "v1/subscriptions",
                                      json={"url": "https://public.example/h", "events": []})
        assert status == 400 and body["where"] == "$.events", body
        status, body = await api.call("POST", "v1/subscriptions", json={
            "url": "https://public.example/h", "events": ["task"], "jobId": "bad id!"})
        assert status == 400 and body["where"] == "jobId", body
        made = await subscribe(api, "https://public.example/h", ["task", "charging", "task"],
                               jobId="j-1", description="care desk")
        assert made["secret"].startswith("whsec_") and len(made["secret"]) > 40
        assert made["events"] == ["task", "charging"] and made["jobId"] == "j-1"
        assert made["owner"] == "api"
        status, page = await api.call("GET", "v1/subscriptions")
        assert status == 200 and [s["subscriptionId"] for s in page["items"]] == \
            [made["subscriptionId"]]
        assert "secret" not in page["items"][0]
        async with api.http.get(api.url + "v1/subscriptions", headers=api.headers) as r:
            assert made["secret"] not in await r.text()
        status, body = await api.call("GET", "v1/subscriptions", params={"bogus": "1"})
        assert status == 400 and body["where"] == "bogus"
        status, _ = await api.call("DELETE", f"v1/subscriptions/{made['subscriptionId']}")
        assert status == 204
        status, body = await api.call("DELETE", f"v1/subscriptions/{made['subscriptionId']}")
        assert status == 404 and body["error"] == "not_found"
    with_engine(tmp_path, scenario, allow_private=False)


def test_private_urls_are_accepted_when_the_engine_allows_them(tmp_path):
    async def scenario(engine: Engine, api: Api) -> None:
        made = await subscribe(api, "http://127.0.0.1:9/h", ["job"])
        assert made["url"] == "http://127.0.0.1:9/h"
    with_engine(tmp_path, scenario, allow_private=True)


# --- deliveries -----------------------------------------------------------------------------------


def test_every_event_arrives_signed_with_a_stable_id_through_500s_and_timeouts(tmp_path):
    async def scenario(engine: Engine, api: Api) -> None:
        flaky = await Receiver(lambda e, n: 500 if n <= 3 else 200).start()
        slow = await Receiver(lambda e, n: "sleep" if n <= 2 else 204).start()
        try:
            a = await subscribe(api, flaky.url, ["task"])
            b = await subscribe(api, slow.url, ["task"])
            flaky.secret, slow.secret = a["secret"], b["secret"]
            tids = await finished_tasks(engine, api, 5)
            for rcv in (flaky, slow):
                await wait_for(lambda: len(rcv.delivered()) == 5, 30, "5 deliveries")
            for rcv, sub, fails in ((flaky, a, 3), (slow, b, 2)):
                done = rcv.delivered()
                assert sorted(r["json"]["data"]["taskId"] for r in done.values()) == sorted(tids)
                assert all(r["valid"] for r in rcv.requests), "a bad signature"
                by_event = collections.defaultdict(list)
                for r in rcv.requests:
                    by_event[r["event_id"]].append(r)
                assert set(by_event) == set(done)
                for eid, reqs in by_event.items():
                    # every attempt: the same event id, the same bytes, attempts 1, 2, 3, …
                    assert len(reqs) >= fails + 1
                    assert [r["attempt"] for r in reqs] == list(range(1, len(reqs) + 1))
                    assert {r["body"] for r in reqs} == {reqs[0]["body"]}
                    j = reqs[0]["json"]
                    assert j["eventId"] == eid and j["type"] == "task.finished"
                    assert j["subscriptionId"] == sub["subscriptionId"]
                    assert j["data"]["state"] == "CANCELLED"
                    assert j["data"]["operation"] == "QUERY"
                # one event, two subscribers: the same event id at both
            assert set(flaky.delivered()) == set(slow.delivered())
            # the outbox is empty again; nothing died
            await wait_for(lambda: engine.webhooks is not None and
                           engine.webhooks.counts["delivered"] == 10, 10, "acks")
            assert await engine.store.due_entries(1e12) == []
            status, page = await api.call("GET", "v1/dead-letters")
            assert status == 200 and page["items"] == []
        finally:
            await flaky.stop()
            await slow.stop()
    with_engine(tmp_path, scenario, max_attempts=10)


def test_dead_letter_after_n_failures_is_listed_and_replayed(tmp_path):
    async def scenario(engine: Engine, api: Api) -> None:
        state = {"up": False}
        rcv = await Receiver(lambda e, n: 200 if state["up"] else 503).start()
        try:
            sub = await subscribe(api, rcv.url, ["task"])
            rcv.secret = sub["secret"]
            other = await subscribe(api, "http://127.0.0.1:9/never", ["job"])
            [tid] = await finished_tasks(engine, api, 1)

            async def dead() -> list[dict[str, Any]]:
                status, page = await api.call("GET", "v1/dead-letters")
                assert status == 200
                return page["items"]
            end = time.monotonic() + 20
            while not (items := await dead()):
                assert time.monotonic() < end, "no dead letter"
                await asyncio.sleep(0.05)
            [d] = items
            assert d["attempts"] == 3 and d["lastError"] == "HTTP 503"
            assert d["subscriptionId"] == sub["subscriptionId"]
            assert d["type"] == "task.finished" and d["body"]["data"]["taskId"] == tid
            assert len(rcv.requests) == 3 and {r["event_id"] for r in rcv.requests} == \
                {d["eventId"]}
            status, page = await api.call("GET", "v1/dead-letters",
                                          params={"subscriptionId": other["subscriptionId"]})
            assert status == 200 and page["items"] == []
            await asyncio.sleep(0.3)
            assert len(rcv.requests) == 3                   # given up: no more attempts
            state["up"] = True
            status, body = await api.call("POST", f"v1/dead-letters/{d['deliveryId']}/replay")
            assert status == 202 and body["deliveryId"] == d["deliveryId"]
            await wait_for(lambda: rcv.delivered(), 10, "the replay")
            last = rcv.requests[-1]
            assert last["event_id"] == d["eventId"] and last["attempt"] == 1 and last["valid"]
            assert last["body"] == rcv.requests[0]["body"]
            assert await dead() == []
            status, body = await api.call("POST", f"v1/dead-letters/{d['deliveryId']}/replay")
            assert status == 404 and body["where"] == "deliveryId"
        finally:
            await rcv.stop()
    with_engine(tmp_path, scenario, max_attempts=3)


def test_a_name_that_rebinds_to_loopback_is_refused_at_delivery(tmp_path):
    async def scenario(engine: Engine, api: Api) -> None:
        rcv = await Receiver().start()
        answers = {"n": 0}

        async def resolve(host: str, port: int) -> list[str]:
            assert host == "rebind.example"
            answers["n"] += 1
            return [PUBLIC] if answers["n"] == 1 else ["127.0.0.1"]   # public, then not
        hooks = engine.webhooks
        assert hooks is not None
        hooks.guard.resolve = resolve
        try:
            sub = await subscribe(api, f"http://rebind.example:{rcv.port}/hook", ["task"])
            rcv.secret = sub["secret"]
            await finished_tasks(engine, api, 1)
            status, page = None, {"items": []}
            end = time.monotonic() + 20
            while not page["items"]:
                assert time.monotonic() < end, "no dead letter"
                await asyncio.sleep(0.05)
                status, page = await api.call("GET", "v1/dead-letters")
            [d] = page["items"]
            assert "loopback" in d["lastError"], d
            assert rcv.requests == []                 # never connected
            # the control: allowed, the same URL reaches the same receiver
            hooks.guard.allow_private = True
            status, _ = await api.call("POST", f"v1/dead-letters/{d['deliveryId']}/replay")
            assert status == 202
            await wait_for(lambda: rcv.delivered(), 10, "the replay")
            assert rcv.requests[-1]["valid"]
        finally:
            await rcv.stop()
    with_engine(tmp_path, scenario, allow_private=False, max_attempts=2)


def test_deleted_subscription_gets_nothing_more_and_health_reports_the_loop(tmp_path):
    async def scenario(engine: Engine, api: Api) -> None:
        rcv = await Receiver(lambda e, n: 500).start()
        try:
            sub = await subscribe(api, rcv.url, ["task"])
            await finished_tasks(engine, api, 1)
            await wait_for(lambda: rcv.requests, 10, "a first attempt")
            status, _ = await api.call("DELETE", f"v1/subscriptions/{sub['subscriptionId']}")
            assert status == 204
            assert engine.webhooks is not None
            await wait_for(lambda: engine.webhooks.counts["dropped"] == 1, 10, "the drop")
            n = len(rcv.requests)
            await asyncio.sleep(0.3)
            assert len(rcv.requests) == n and await engine.store.due_entries(1e12) == []
            async with api.http.get(api.url + "health") as r:
                assert r.status == 200
            assert engine.webhooks.loop.task is not None
            engine.webhooks.loop.task.cancel()
            await asyncio.sleep(0.05)
            async with api.http.get(api.url + "health") as r:
                body = await r.json()
                assert r.status == 503 and body["where"] == "webhooks", body
        finally:
            await rcv.stop()
    with_engine(tmp_path, scenario)


# --- charging events (IF-4) and job events through the real engine -------------------------------


def test_charging_event_of_a_real_update_carries_the_if4_fields(tmp_path):
    async def scenario(w: World) -> None:
        hooks = w.engine.webhooks
        assert hooks is not None
        hooks.guard.allow_private = True        # the receiver is on loopback
        hooks.config.poll_interval = 0.02
        rcv = await Receiver().start()
        try:
            async with aiohttp.ClientSession() as http:
                api = Api(w.engine, http)
                sub = await subscribe(api, rcv.url, ["charging", "task"])
                rcv.secret = sub["secret"]
                dev, test_dev = w.device(0), w.device(1)
                await w.register(dev)
                await w.register(test_dev)
                await w.store.update_device(dev.dev_id, {"devdetail": {"./DevDetail/FwV": "2.3.9"}})
                cid = await upload_firmware(w)
                tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
                test_tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]),
                                                       msisdn=test_dev.msisdn, test_cycle=True)
                for t in (tid, test_tid):
                    task = await w.wait_state(t, {S.SUCCEEDED, S.FAILED})
                    assert task.state == S.SUCCEEDED, task.cause

                def of(kind: str) -> list[dict[str, Any]]:
                    return [r["json"] for r in rcv.delivered().values()
                            if r["json"]["type"] == kind]
                await wait_for(lambda: len(of("task.finished")) == 2 and of("charging"), 20,
                               "two task events and a charging event")
                await asyncio.sleep(0.3)                   # nothing more comes
                [ch] = of("charging")
                assert all(r["valid"] for r in rcv.requests)
                data = ch["data"]
                assert data["taskId"] == tid and data["operation"] == "UPDATE"
                assert data["device"]["devId"] == dev.dev_id
                assert data["device"]["imei"] == dev.dev_id.split(":", 1)[1]
                assert data["device"]["msisdn"] == dev.msisdn
                assert data["device"]["devInfo"].get("./DevInfo/Mod") == "EX100"
                assert data["package"] == {"contentId": cid, "version": "2.4.0"}
                assert data["result"]["status"] == "SUCCEEDED" and data["result"]["code"] == 200
                assert abs(ch["time"] - time.time()) < 60
                # the test-cycle task: its task event says so, and it has no charging event
                finished = {e["data"]["taskId"]: e["data"] for e in of("task.finished")}
                assert finished[test_tid]["testCycle"] is True
                assert finished[tid]["testCycle"] is False
                assert finished[tid]["result"]["fumoResult"] == 200
                # queryable: GET /v1/charging, the same event id and shape
                status, page = await api.call("GET", "v1/charging")
                assert status == 200 and page["nextCursor"] is None
                [item] = page["items"]
                assert item["eventId"] == ch["eventId"]
                assert {k: v for k, v in item.items() if k != "eventId"} == \
                    {**data, "time": item["time"]}
                status, page = await api.call("GET", "v1/charging",
                                              params={"from": str(time.time() + 3600)})
                assert status == 200 and page["items"] == []
                status, body = await api.call("GET", "v1/charging", params={"from": "soon"})
                assert status == 400 and body["where"] == "from"
        finally:
            await rcv.stop()
    run_world(tmp_path, scenario)


def test_job_events_state_changes_and_progress(tmp_path):
    async def scenario(w: World) -> None:
        hooks = w.engine.webhooks
        assert hooks is not None
        hooks.guard.allow_private = True
        hooks.config.poll_interval = 0.02
        rcv = await Receiver().start()
        other = await Receiver().start()
        try:
            async with aiohttp.ClientSession() as http:
                api = Api(w.engine, http)
                sub = await subscribe(api, rcv.url, ["job"])
                rcv.secret = sub["secret"]
                await subscribe(api, other.url, ["job", "task"], jobId="j-someone-else")
                devs = [w.device(i) for i in range(4)]
                for d in devs:
                    await w.register(d)
                status, body = await api.call("POST", "v1/operations/bulk", json={
                    "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]},
                    "targets": [{"msisdn": d.msisdn} for d in devs]})
                assert status == 201, body
                job_id = body["jobId"]

                def events() -> list[dict[str, Any]]:
                    return [r["json"] for r in sorted(rcv.delivered().values(),
                                                      key=lambda r: r["json"]["time"])
                            if r["json"]["data"]["jobId"] == job_id]
                await wait_for(lambda: any(e["type"] == "job.state" and
                                           e["data"]["state"] == "COMPLETED"
                                           for e in events()), 30, "the job's completion")
                evs = events()
                states = [e["data"]["state"] for e in evs if e["type"] == "job.state"]
                assert states[-1] == "COMPLETED" and "RUNNING" in states
                progress = sorted(e["data"]["percent"] for e in evs if e["type"] == "job.progress")
                assert progress == [20, 50, 70, 100]        # 1, 2, 3, 4 of 4 final
                assert all(r["valid"] for r in rcv.requests)
                assert other.requests == []                  # its filter names another job
        finally:
            await rcv.stop()
            await other.stop()
    run_world(tmp_path, scenario, broker=BrokerConfig(retry_delays=(0.3,), tick_interval=0.05))


# --- the same guard on the carrier callback and the HTTP gateway; the serve option ---------------


def test_carrier_callback_and_http_gateway_are_checked_when_configured(tmp_path):
    async def main() -> None:
        for kw, gw, key in [
                ({"carrier_callback_url": "http://127.0.0.1:9/cb"}, None,
                 "carrier_callback_url"),
                ({"carrier_callback_url": "http://169.254.169.254/cb"}, None,
                 "carrier_callback_url"),
                ({}, HttpCallbackGateway("http://localhost:9/pkg0"), "gateway")]:
            e = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                                    **kw), gateway=gw)
            with pytest.raises(ConfigError) as ei:
                await e.start()
            assert ei.value.key == key and "allow-private-callbacks" in str(ei.value)
            assert e.store is None                  # refused before anything was opened
        for extra in ({"allow_private_callbacks": True},
                      {"callback_allow_networks": ("127.0.0.0/8",)}):
            gw = HttpCallbackGateway("http://127.0.0.1:9/pkg0")
            e = Engine(EngineConfig(data_dir=str(tmp_path / "var2"), device_port=0,
                                    api_port=0, carrier_callback_url="http://127.0.0.1:9/cb",
                                    **extra), gateway=gw)
            await e.start()
            assert gw.guard is not None
            await e.stop()
    uvloop.run(main())


def test_carrier_callback_and_gateway_check_addresses_when_connecting():
    async def main() -> None:
        hits = []

        async def handle(request: web.Request) -> web.Response:
            hits.append(request.path)
            return web.json_response({"decision": "accept"})
        runner, port = await local_http(web.post("/{tail:.*}", handle))

        async def resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]                       # a name that now points inside
        guard = UrlGuard(resolve=resolve)
        try:
            cb = http_carrier_callback(f"http://carrier.example:{port}/cb", guard=guard)
            dev = Device(dev_id="IMEI:356938035643809", imei="356938035643809")
            with pytest.raises(aiohttp.ClientError, match="loopback"):
                await cb(dev, "IMEI:356938035643810", "t1")
            assert await http_carrier_callback(f"http://127.0.0.1:{port}/cb",
                                               guard=guard)(dev, "IMEI:1", "t1") is False
            gw = HttpCallbackGateway(f"http://carrier.example:{port}/pkg0", guard=guard)
            with pytest.raises(GatewayError, match="loopback"):
                await gw._send_once("+4917000000001", b"\x00")
            await gw.close()
            gw = HttpCallbackGateway(f"http://127.0.0.1:{port}/pkg0", guard=guard)
            with pytest.raises(GatewayError) as ei:
                await gw._send_once("+4917000000001", b"\x00")
            assert not ei.value.retryable
            await gw.close()
            assert hits == []
            guard.allow_private = True                 # the control: now it goes through
            assert await cb(dev, "IMEI:356938035643810", "t1") is True
            assert hits == ["/cb"]
        finally:
            await runner.cleanup()
    asyncio.run(main())


def test_serve_option_and_a_refused_callback_exits_2(tmp_path, capsys):
    args = build_parser().parse_args(["serve", "--allow-private-callbacks",
                                      "--callback-allow-network", "10.0.0.0/8"])
    assert args.allow_private_callbacks is True and args.callback_allow_network == ["10.0.0.0/8"]
    assert build_parser().parse_args(["serve"]).allow_private_callbacks is False
    rc = cli_main(["serve", "--data", str(tmp_path / "var"), "--device-port", "0",
                   "--api-port", "0", "--carrier-callback", "http://127.0.0.1:9/cb"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "carrier_callback_url" in err and "--allow-private-callbacks" in err


def test_a_system_gets_only_its_own_events_and_sees_only_its_own_subscriptions():
    """Subscriptions record who made them: a non-admin's gets its own system's task, job and
    charging events only (an admin's all of them), and the listings, deletes and replays of
    one system do not reach another's."""
    from dmengine.errors import UnknownResource
    from dmengine.model import OutboxEntry
    from dmengine.store.memory import MemoryStore
    from dmengine.webhooks import Webhooks

    async def main() -> None:
        store = MemoryStore()
        hooks = Webhooks(store, UrlGuard(allow_private=True))
        a = await hooks.create_subscription("http://127.0.0.1:9/a", ["task", "job", "charging"],
                                            owner="sysA")
        b = await hooks.create_subscription("http://127.0.0.1:9/b", ["task", "job", "charging"],
                                            owner="sysB")
        admin = await hooks.create_subscription("http://127.0.0.1:9/c", ["task", "charging"],
                                                owner="ops", all_owners=True)
        for eid, kind, topic in (("ev-t", "webhook", "task"), ("ev-j", "webhook", "job"),
                                 ("ev-c", "charging", "charging")):
            await store.enqueue(OutboxEntry(entry_id=eid, kind=kind, topic=topic, due=1.0,
                                            payload={"owner": "sysA", "time": 5.0,
                                                     "task_id": "t1"}))
        subs = await hooks._subscriptions()
        got = {}
        for e in await store.claim_entries(10.0, 10, 60.0):
            got[e.entry_id] = sorted(d.target for d in await hooks._fan_out(e, subs, 70.0))
        assert got == {"ev-t": sorted([a.sub_id, admin.sub_id]), "ev-j": [a.sub_id],
                       "ev-c": sorted([a.sub_id, admin.sub_id])}
        assert [s.sub_id for s in (await hooks.list_subscriptions(scope="sysB")).items] == \
            [b.sub_id]
        with pytest.raises(UnknownResource):
            await hooks.delete_subscription(a.sub_id, scope="sysB")
        await store.dead_letter(f"ev-t.{a.sub_id}", error="HTTP 500")
        assert (await hooks.dead_letters(scope="sysB")).items == []
        assert len((await hooks.dead_letters(scope="sysA")).items) == 1
        with pytest.raises(UnknownResource):
            await hooks.replay(f"ev-t.{a.sub_id}", scope="sysB")
        assert [e.event_id for e in (await hooks.charging_events(scope="sysA")).items] == ["ev-c"]
        assert (await hooks.charging_events(scope="sysB")).items == []
        await hooks.delete_subscription(a.sub_id, scope="sysA")
    asyncio.run(main())
