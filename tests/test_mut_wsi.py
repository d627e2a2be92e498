"""Issue 18: the API's shared parts — ``wsi/security.py`` (who, how often, what, whose, the
audit), ``wsi/middleware.py`` (the one error shape, body limits, query parsing),
``wsi/common.py`` — with exact expectations, over real HTTP against one real engine (LMDB
store, the API port) shared by the tests of this module (each test is a few requests: a
mutant costs seconds, not the minutes of the whole API suite).  Pure helpers (status and
outcome tables, the id fields kept for the audit) are checked directly too."""
from __future__ import annotations

import asyncio
import io
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from conftest import api_client, bounded
from dmengine.engine import Engine, EngineConfig
from dmengine.errors import (AlreadyExists, ApiError, CodecError, ConfigError, DmError, NotFound,
                             ServiceError, StoreError, ValidationError)
from dmengine.model import Device
from dmengine.wsi import middleware, security
from dmengine.wsi.security import (ROLE_OF, _credential, _ids_of, _outcome, _status_of,
                                   is_public, required_role)

KEY = "k-mut-wsi-0123456789abcdef"
IMEI = "356938035643809"
DEV_ID = f"IMEI:{IMEI}"
QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}


class Api:
    def __init__(self, e: Engine, http: aiohttp.ClientSession) -> None:
        self.e = e
        self.http = http
        self.url = e.api_url

    async def call(self, method: str, path: str, cred: str | None = KEY, *,
                   headers: dict[str, str] | None = None, **kw: Any
                   ) -> tuple[int, Any, Any]:
        h = dict(headers or {})
        if cred is not None:
            h.setdefault("X-API-Key", cred)
        async with self.http.request(method, self.url + path, headers=h, **kw) as r:
            raw = await r.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            return r.status, body, r.headers

    async def key(self, name: str, role: str, **kw: Any) -> tuple[str, str]:
        status, body, _ = await self.call("POST", "v1/keys", json={"name": name, "role": role,
                                                                   **kw})
        assert status == 201, body
        return body["keyId"], body["apiKey"]

    async def audit(self, **params: Any) -> list[dict[str, Any]]:
        status, page, _ = await self.call("GET", "v1/audit", params={"limit": 10000, **params})
        assert status == 200, page
        return list(page["items"])


class Served:
    """One engine for the module, on a loop of its own; ``run`` runs a test's coroutine on
    it, bounded in time."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.loop = asyncio.new_event_loop()
        # private callbacks allowed: the subscriptions' tests name a URL on this host
        self.e = Engine(EngineConfig(data_dir=str(tmp / "var"), device_port=0, api_port=0,
                                     api_key=KEY, allow_private_callbacks=True))
        self.loop.run_until_complete(bounded(self._start(), "the engine's start"))

    async def _start(self) -> None:
        await self.e.start()
        assert self.e.store is not None
        await self.e.store.put_device(Device(dev_id=DEV_ID, imei=IMEI, msisdn="+491701234567"))
        self.http = api_client()
        self.api = Api(self.e, self.http)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(bounded(coro))

    def close(self) -> None:
        async def stop() -> None:
            await self.http.close()
            await self.e.stop()
        self.loop.run_until_complete(bounded(stop(), "the engine's stop"))
        self.loop.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("mut-wsi"))
    try:
        yield s
    finally:
        s.close()


def shape(body: Any, status: int, want: int, code: str, where: str | None,
          message: str | None = None) -> None:
    assert status == want, body
    assert isinstance(body, dict), body          # JSON (answered as application/json)
    assert set(body) == {"error", "message", "where"}, body
    assert (body["error"], body["where"]) == (code, where), body
    if message is not None:
        assert body["message"] == message, body


# --- security: pure helpers --------------------------------------------------------------------

def test_role_table_and_public_routes():
    assert required_role("getTaskById") == "viewer"
    assert required_role("doOperation") == "operator"
    assert required_role("createApiKey") == "admin"
    assert required_role("noSuchRoute") == "admin" and required_role(None) == "admin"
    assert required_role("") == "admin"
    assert is_public("login", "/v1/login") and is_public("health", "/x")
    assert is_public(None, "/health") and is_public(None, "/docs/a.js")
    assert is_public(None, "/docs") and not is_public(None, "/docsx")
    assert not is_public("getTaskById", "/v1/tasks/t") and not is_public(None, "/v1/docs/")
    assert set(ROLE_OF.values()) == {"viewer", "operator", "admin"}


def test_outcome_of_each_status():
    assert [_outcome(s) for s in (200, 201, 204, 302, 399)] == ["ok"] * 5
    assert [_outcome(s) for s in (401, 403)] == ["denied"] * 2
    assert [_outcome(s) for s in (400, 404, 409, 413, 429, 499)] == ["refused"] * 6
    assert [_outcome(s) for s in (500, 503)] == ["failed"] * 2


def test_status_of_each_error():
    assert _status_of(web.HTTPNotFound()) == 404
    assert _status_of(web.HTTPMethodNotAllowed("GET", ["POST"])) == 405
    assert _status_of(ApiError("x", code="c", http_status=413)) == 413
    assert _status_of(ServiceError("x")) == ServiceError("x").http_status
    assert _status_of(ValidationError("x")) == 400
    assert _status_of(NotFound("task", "x")) == 404
    assert _status_of(AlreadyExists("job", "x")) == 409
    assert _status_of(StoreError("x")) == 503
    assert _status_of(CodecError("x")) == 400
    assert _status_of(DmError("x")) == 400
    assert _status_of(RuntimeError("x")) == 500
    assert _status_of(ConfigError("x", key="k")) == 400


def test_ids_of_an_answer_keeps_only_id_fields():
    def resp(obj: Any, **kw: Any) -> web.Response:
        return web.Response(body=json.dumps(obj).encode(), content_type="application/json",
                            **kw)
    assert _ids_of(resp({"taskId": "t1", "secret": "s", "jobId": 5})) == {"taskId": "t1"}
    assert _ids_of(resp({"taskIds": ["a", "b"], "name": "n"})) == \
        {"taskIds": ["a", "b"], "name": "n"}
    assert _ids_of(resp({"taskIds": ["a", 1]})) is None
    assert _ids_of(resp({"keyId": "k" * 300})) == {"keyId": "k" * 256}
    assert _ids_of(resp({"taskIds": ["x" * 300] * 150})) == {"taskIds": ["x" * 256] * 100}
    assert _ids_of(resp({"other": 1})) is None
    assert _ids_of(resp(["taskId"])) is None
    assert _ids_of(web.Response(body=b"{not json", content_type="application/json")) is None
    assert _ids_of(web.Response(text='{"taskId": "t"}')) is None          # text/plain
    big = {"taskId": "t", "pad": "x" * (64 * 1024)}
    assert _ids_of(resp(big)) is None
    edge = {"taskId": "t", "pad": ""}
    edge["pad"] = "x" * (64 * 1024 - len(json.dumps(edge).encode()))
    assert len(json.dumps(edge).encode()) == 64 * 1024
    assert _ids_of(resp(edge)) == {"taskId": "t"}
    assert _ids_of(web.StreamResponse()) is None
    assert set(security.AUDIT_ID_FIELDS) >= {"taskId", "jobId", "keyId", "devId", "name"}


class _Req:
    def __init__(self, headers: dict[str, str]) -> None:
        from multidict import CIMultiDict
        self.headers = CIMultiDict(headers)


def test_credential_from_either_header():
    assert _credential(_Req({"X-API-Key": "a"})) == "a"                   # type: ignore[arg-type]
    assert _credential(_Req({"Authorization": "Bearer b"})) == "b"         # type: ignore[arg-type]
    assert _credential(_Req({"Authorization": "bEaReR  c \t"})) == "c"     # type: ignore[arg-type]
    assert _credential(_Req({"Authorization": "Basic dXNlcjpwdw=="})) == ""  # type: ignore[arg-type]
    assert _credential(_Req({"Authorization": "Bearer"})) == ""            # type: ignore[arg-type]
    assert _credential(_Req({"X-API-Key": "a", "Authorization": "Bearer b"})) == "a"  # type: ignore[arg-type]
    assert _credential(_Req({"X-API-Key": "", "Authorization": "Bearer b"})) == "b"  # type: ignore[arg-type]
    assert _credential(_Req({})) == ""                                     # type: ignore[arg-type]


# --- security over HTTP ------------------------------------------------------------------------

def test_who_401_with_the_challenge(served):
    async def main() -> None:
        api = served.api
        for cred, headers in ((None, {}), ("wrong", {}), (None, {"Authorization": "Bearer x"}),
                              (None, {"Authorization": f"Basic {KEY}"})):
            status, body, h = await api.call("GET", "v1/jobs", cred, headers=headers)
            assert status == 401, body
            assert h["WWW-Authenticate"] == 'Bearer realm="dmengine"'
            shape(body, status, 401, "unauthorized", "X-API-Key",
                  "missing, unknown or revoked API key or userSession")
        # an unknown path is a 401 too, before the router's 404
        status, body, h = await api.call("GET", "v1/no/such/path", None)
        assert status == 401 and h["Content-Type"].startswith("application/json")
        # login with a wrong key: 401 naming the field, with the challenge
        status, body, h = await api.call("POST", "v1/login", None, json={"apiKey": "wrong"})
        shape(body, status, 401, "unauthorized", "$.apiKey")
        assert h["WWW-Authenticate"] == 'Bearer realm="dmengine"'
        assert h["Content-Type"].startswith("application/json")
        # the key as Bearer, in any case of the word
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY} "}):
            status, body, _ = await api.call("GET", "v1/jobs", None, headers=headers)
            assert status == 200, body
        # public routes need nothing
        status, _, _ = await api.call("GET", "openapi.json", None)
        assert status == 200
    served.run(main())


def test_how_often_429_with_retry_after(served):
    async def main() -> None:
        api = served.api
        kid, slow = await api.key("slow-system", "viewer", rate=0.01, burst=2)
        for _ in range(2):
            status, body, _ = await api.call("GET", "v1/jobs", slow)
            assert status == 200, body
        status, body, h = await api.call("POST", "v1/jobs", slow, json={})
        shape(body, status, 429, "rate_limited", None)
        assert body["message"].startswith(f"key:{kid} is over its rate: try again in ")
        assert body["message"].endswith(" s")
        wait = float(body["message"].split("try again in ")[1][:-2])
        assert 90 < wait <= 100, wait
        assert int(h["Retry-After"]) >= 90
        # refused before anything: not in the audit log
        assert [a for a in await api.audit() if a["actor"] == f"key:{kid}"] == []
    served.run(main())


def test_what_403_naming_the_role_and_audited_when_it_changes_something(served):
    async def main() -> None:
        api = served.api
        kid, viewer = await api.key("crm-403", "viewer")
        status, body, _ = await api.call("POST", "v1/jobs", viewer, json={
            "operation": QUERY, "selection": {"devIds": [DEV_ID]}})
        shape(body, status, 403, "forbidden", "role",
              "createDeployments needs the role operator or stronger; this caller is viewer")
        status, body, _ = await api.call("GET", "v1/keys", viewer)
        shape(body, status, 403, "forbidden", "role",
              "listApiKeys needs the role admin or stronger; this caller is viewer")
        entries = [a for a in await api.audit() if a["actor"] == f"key:{kid}"]
        assert len(entries) == 1, entries                     # the GET is not written
        (a,) = entries
        assert (a["action"], a["target"], a["outcome"], a["status"]) == \
            ("createDeployments", "/v1/jobs", "denied", 403)
        assert a["detail"]["needs"] == "operator" and a["detail"]["role"] == "viewer"
        assert a["detail"]["method"] == "POST" and a["detail"]["owner"] == "crm-403"
        assert a["detail"]["address"] == "127.0.0.1"
        assert "made" not in a["detail"] or a["detail"]["made"] is None
        # an operator passes the same check
        _, op = await api.key("crm-403", "operator")
        status, body, _ = await api.call("POST", "v1/jobs", op, json={
            "operation": QUERY, "selection": {"devIds": [DEV_ID]}})
        assert status == 201, body
    served.run(main())


def test_whose_another_systems_job_and_task_are_404(served):
    async def main() -> None:
        api = served.api
        _, mine = await api.key("sys-a", "operator")
        bid, other = await api.key("sys-b", "operator")
        _, admin = await api.key("root", "admin")
        status, body, _ = await api.call("POST", "v1/jobs", mine, json={
            "operation": QUERY, "selection": {"devIds": [DEV_ID]}})
        assert status == 201, body
        job_id = body["jobId"]
        status, body, _ = await api.call("POST", "v1/operations", mine, json={
            "target": {"imei": IMEI}, "operation": {"operation": "DIAG"}})
        assert status == 201, body
        task_id = body["taskId"]
        for method, path, params in (("GET", f"v1/jobs/{job_id}", None),
                                     ("GET", f"v1/jobs/{job_id}/tasks", None),
                                     ("POST", f"v1/jobs/{job_id}/pause", None)):
            status, body, _ = await api.call(method, path, other, params=params)
            shape(body, status, 404, "not_found", "jobId", f"no job {job_id!r}")
        for method, path, params in (("GET", f"v1/tasks/{task_id}", None),
                                     ("POST", f"v1/tasks/{task_id}/cancel", None),
                                     ("GET", "v1/diagnostics", {"taskId": task_id})):
            status, body, _ = await api.call(method, path, other, params=params)
            shape(body, status, 404, "not_found", "taskId", f"no task {task_id!r}")
        # ids that do not exist answer the same
        status, body, _ = await api.call("GET", "v1/jobs/j-none", other)
        shape(body, status, 404, "not_found", "jobId", "no job 'j-none'")
        status, body, _ = await api.call("GET", "v1/tasks/t-none", other)
        shape(body, status, 404, "not_found", "taskId", "no task 't-none'")
        # the POSTs refused so are written, with why; the GETs are not
        got = [a for a in await api.audit() if a["actor"] == f"key:{bid}"]
        assert [(a["action"], a["status"], a["outcome"], a["detail"].get("why")) for a in got] \
            == [("pauseJob", 404, "refused", "not the caller's"),
                ("cancelTask", 404, "refused", "not the caller's")], got
        # the owner and an admin see them
        for cred in (mine, admin):
            status, body, _ = await api.call("GET", f"v1/jobs/{job_id}", cred)
            assert status == 200 and body["jobId"] == job_id, body
            status, body, _ = await api.call("GET", f"v1/tasks/{task_id}", cred)
            assert status == 200 and body["taskId"] == task_id, body
        # listings are scoped: sys-b sees none of sys-a's jobs, the admin sees them
        status, page, _ = await api.call("GET", "v1/jobs", other, params={"limit": 1000})
        assert job_id not in [j["jobId"] for j in page["items"]]
        status, page, _ = await api.call("GET", "v1/jobs", admin, params={"limit": 1000})
        assert job_id in [j["jobId"] for j in page["items"]]
        status, page, _ = await api.call("GET", "v1/jobs", mine, params={"limit": 1000})
        assert job_id in [j["jobId"] for j in page["items"]]
        assert {j["owner"] for j in page["items"]} == {"sys-a"}
    served.run(main())


def test_owner_of_a_new_job(served):
    async def main() -> None:
        api = served.api
        _, op = await api.key("sys-c", "operator")
        _, admin = await api.key("root-c", "admin")
        base = {"operation": QUERY, "selection": {"devIds": [DEV_ID]}}
        status, body, _ = await api.call("POST", "v1/jobs", op, json={**base, "owner": "sys-d"})
        shape(body, status, 403, "forbidden", "owner",
              "only an admin may create a job for another owner than 'sys-c'")
        store = served.e.store

        async def owner(body: Any) -> str:
            return (await store.get_job(body["jobId"])).owner
        for extra in ({}, {"owner": "sys-c"}):
            status, body, _ = await api.call("POST", "v1/jobs", op, json={**base, **extra})
            assert status == 201 and await owner(body) == "sys-c", body
        status, body, _ = await api.call("POST", "v1/jobs", admin, json={**base, "owner": "x"})
        assert status == 201 and await owner(body) == "x", body
        status, body, _ = await api.call("POST", "v1/jobs", admin, json=base)
        assert status == 201 and await owner(body) == "root-c", body
    served.run(main())


def test_the_audit_entry_of_a_call_that_made_something(served):
    async def main() -> None:
        api = served.api
        kid, op = await api.key("sys-e", "operator")
        status, body, _ = await api.call("POST", "v1/operations", op, json={
            "target": {"imei": IMEI}, "operation": QUERY})
        assert status == 201, body
        status, err, _ = await api.call("POST", "v1/operations", op, json={"target": {}})
        assert status == 400, err
        status, err, _ = await api.call("DELETE", "v1/nope", op)
        assert status == 404, err
        got = [a for a in await api.audit(actor=f"key:{kid}")]
        assert [(a["action"], a["target"], a["status"], a["outcome"]) for a in got] == [
            ("doOperation", "/v1/operations", 201, "ok"),
            ("doOperation", "/v1/operations", 400, "refused"),
            ("DELETE /v1/nope", "/v1/nope", 404, "refused")], got
        made = got[0]["detail"]["made"]
        assert made == {"taskId": body["taskId"]}
        assert "made" not in got[1]["detail"] or got[1]["detail"]["made"] is None
        d = got[0]["detail"]
        assert (d["role"], d["owner"], d["method"]) == ("operator", "sys-e", "POST")
        assert d.get("session") is None
        # a session's calls carry the session id
        status, body, _ = await api.call("POST", "v1/users", json={
            "name": "eve", "role": "operator", "password": "a long password 123"})
        assert status == 201, body
        status, ans, _ = await api.call("POST", "v1/login", None,
                                        json={"userName": "eve",
                                              "password": "a long password 123"})
        assert status == 200, ans
        status, body, _ = await api.call("POST", "v1/operations", None, headers={
            "Authorization": f"Bearer {ans['userSession']}"}, json={
            "target": {"imei": IMEI}, "operation": QUERY})
        assert status == 201, body
        (a,) = [a for a in await api.audit(actor="user:eve", action="doOperation")]
        assert a["detail"]["session"] == ans["sessionId"] and a["detail"]["owner"] == "eve"
    served.run(main())


def test_audit_query_times(served):
    async def main() -> None:
        api = served.api
        status, body, _ = await api.call("GET", "v1/audit", params={"from": "yesterday"})
        shape(body, status, 400, "invalid", "from",
              "from is epoch seconds or an ISO-8601 time, not 'yesterday'")
        status, body, _ = await api.call("GET", "v1/audit", params={"to": "soon"})
        shape(body, status, 400, "invalid", "to")
        status, body, _ = await api.call("GET", "v1/audit", params={"from": "", "to": ""})
        assert status == 200 and body["items"], body
        status, body, _ = await api.call("GET", "v1/audit", params={
            "from": "2000-01-01T00:00:00Z", "to": "2001-01-01T00:00:00Z"})
        assert status == 200 and body["items"] == [], body
        status, body, _ = await api.call("GET", "v1/audit", params={"from": "0"})
        assert status == 200 and body["items"], body
    served.run(main())


def test_a_handler_that_fails_is_audited_as_failed(served, monkeypatch, caplog):
    async def main() -> None:
        api = served.api
        kid, op = await api.key("sys-f", "operator")
        broker = served.e.broker

        async def broken(*a: Any, **k: Any) -> Any:
            raise RuntimeError("boom")
        monkeypatch.setattr(broker, "do_operation", broken)
        status, body, _ = await api.call("POST", "v1/operations", op, json={
            "target": {"imei": IMEI}, "operation": QUERY})
        shape(body, status, 500, "internal", None, "internal error (logged by the server)")
        (rec,) = [r for r in caplog.records if r.name == "dmengine.wsi"]
        assert rec.getMessage() == "unexpected error in POST /v1/operations"
        assert rec.exc_info is not None and str(rec.exc_info[1]) == "boom"

        async def gone(*a: Any, **k: Any) -> Any:
            raise StoreError("disk gone")
        monkeypatch.setattr(broker, "do_operation", gone)
        status, body, _ = await api.call("POST", "v1/operations", op, json={
            "target": {"imei": IMEI}, "operation": QUERY})
        shape(body, status, 503, "store_error", None, "disk gone")
        got = await api.audit(actor=f"key:{kid}")
        assert [(a["status"], a["outcome"]) for a in got] == [(500, "failed"), (503, "failed")]
        # the metrics count the failed calls under the caller's role, not as anonymous
        requests = served.e.api_metrics.requests
        assert requests.get(("doOperation", "500", "operator"), 0) >= 1, requests
        assert requests.get(("doOperation", "503", "operator"), 0) >= 1, requests
    served.run(main())


# --- middleware: the one error shape, bodies, queries ------------------------------------------

def test_errors_of_the_router_in_the_one_shape(served):
    async def main() -> None:
        api = served.api
        status, body, _ = await api.call("GET", "v1/no/such/route")
        shape(body, status, 404, "not_found", None, "no route GET /v1/no/such/route")
        status, body, h = await api.call("PUT", "v1/jobs")
        shape(body, status, 405, "method_not_allowed", None, "PUT is not allowed on /v1/jobs")
        assert set(h["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    served.run(main())


def test_body_errors_name_the_field(served):
    async def main() -> None:
        api = served.api
        post = lambda **kw: api.call("POST", "v1/jobs", **kw)  # noqa: E731
        status, body, _ = await post(data=b"{not json", headers={
            "Content-Type": "application/json"})
        shape(body, status, 400, "invalid", "$")
        assert body["message"].startswith("body is not JSON: ")
        status, body, _ = await post(json={"operation": QUERY})
        shape(body, status, 400, "invalid", "$.selection")
        status, body, _ = await post(json={"operation": QUERY, "selection": {"devIds": []},
                                           "bogus": 1})
        shape(body, status, 400, "invalid", "$.bogus")
        assert body["message"] == "Object contains unknown field `bogus`", body
        status, body, _ = await post(json={"operation": {"operation": "QUERY", "nodes": [5]},
                                           "selection": {"devIds": [DEV_ID]}})
        shape(body, status, 400, "invalid", "$.operation.nodes[0]")
        # the largest body allowed is read; one byte more is a 413 that closes the connection
        pad = middleware.MAX_JSON_BODY
        status, body, h = await post(data=io.BytesIO(b" " * (pad + 1)), headers={
            "Content-Type": "application/json"})
        shape(body, status, 413, "too_large", "$",
              f"request body larger than {pad} bytes")
        assert h.get("Connection", "").lower() == "close"

        async def chunks() -> Any:
            for _ in range(pad // 65536 + 2):
                yield b" " * 65536
        status, body, _ = await post(data=chunks(), headers={
            "Content-Type": "application/json"})
        shape(body, status, 413, "too_large", "$")
        doc = json.dumps({"operation": QUERY, "selection": {"devIds": [DEV_ID]}}).encode()
        status, body, _ = await post(data=io.BytesIO(doc + b" " * (pad - len(doc))), headers={
            "Content-Type": "application/json"})
        assert status == 201, body
    served.run(main())


def test_query_errors_name_the_parameter(served):
    async def main() -> None:
        api = served.api
        status, body, _ = await api.call("GET", "v1/keys", params={"bogus": "1"})
        shape(body, status, 400, "invalid", "bogus",
              "unknown query parameter 'bogus' (known: cursor, limit)")
        status, body, _ = await api.call("GET", "v1/keys", params={"limit": "0"})
        shape(body, status, 400, "invalid", "limit")
        assert "parameter `limit`" in body["message"], body
        status, body, _ = await api.call("GET", "v1/keys", params={"limit": "x"})
        shape(body, status, 400, "invalid", "limit")
        status, body, _ = await api.call("GET", "v1/keys", params={"limit": "1"})
        assert status == 200 and len(body["items"]) == 1, body
    served.run(main())


def test_service_errors_in_the_api_names(served):
    async def main() -> None:
        api = served.api
        status, body, _ = await api.call("POST", "v1/operations", json={
            "target": {"imei": "123"}, "operation": QUERY})
        shape(body, status, 404, "not_found", "target.imei", "no device with imei '123'")
        status, body, _ = await api.call("POST", "v1/devices", json={"devId": DEV_ID,
                                                                      "imei": IMEI})
        shape(body, status, 409, "already_exists", None)
        status, body, _ = await api.call("GET", "v1/devices/IMEI:000000000000000")
        assert status == 404 and body["error"] == "not_found", body
    served.run(main())


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    n: int


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    inner: Inner
    items: list[int] = []


def test_msgspec_where_and_error_of():
    def where(cls: Any, doc: Any) -> str:
        with pytest.raises(msgspec.ValidationError) as exc:
            msgspec.convert(doc, cls)
        return middleware.msgspec_where(exc.value)

    assert where(Outer, {"inner": {"n": "x"}}) == "$.inner.n"
    assert where(Outer, {}) == "$.inner"
    assert where(Outer, {"inner": {}}) == "$.inner.n"
    assert where(Outer, {"inner": {"n": 1}, "zz": 1}) == "$.zz"
    assert where(Outer, {"inner": {"n": 1}, "items": [1, "a"]}) == "$.items[1]"
    assert where(Outer, 5) == "$"
    e = middleware._error_of
    assert e(ApiError("m", code="c", http_status=418, where="w")) == (418, "c", "m", "w")
    assert e(ValidationError("m", where="a.dev_id")) == (400, "invalid", "m", "a.devId")
    nf, ae = NotFound("task", "t1"), AlreadyExists("job", "j1")
    assert e(nf) == (404, "not_found", str(nf), None)
    assert e(ae) == (409, "already_exists", str(ae), None)
    se = ServiceError("m", where="target.dev_id")
    assert e(se) == (se.http_status, se.code, "m", "target.devId")
    assert e(StoreError("m")) == (503, "store_error", "m", None)
    assert e(CodecError("m")) == (400, "bad_request", "m", None)


# --- common ------------------------------------------------------------------------------------

def test_services_reach_the_routes(served):
    from dmengine.wsi import common

    class R:
        def __init__(self, e: Any) -> None:
            self.app = {common.ENGINE: e}
    e = served.e
    r = R(e)
    assert common.engine_of(r) is e                                     # type: ignore[arg-type]
    assert common.broker_of(r) is e.broker and common.jobs_of(r) is e.broker.jobs  # type: ignore[arg-type]
    assert common.store_of(r) is e.store and common.content_of(r) is e.content  # type: ignore[arg-type]

    class Bare:
        broker = store = content = None
    for f in (common.broker_of, common.jobs_of, common.store_of, common.content_of):
        with pytest.raises(AssertionError):
            f(R(Bare()))                                               # type: ignore[arg-type]


# --- wsi/jobs: createDeployments, doBulkOperation, listings, control ---------------------------

def test_create_deployments_writes_the_schedule_as_given(served):
    async def main() -> None:
        api = served.api
        status, body, _ = await api.call("POST", "v1/jobs", json={
            "operation": QUERY, "selection": {"devIds": [DEV_ID]}, "name": "sched",
            "bOptin": True, "acceptDevicePolicy": 30, "testCycle": True, "rateLimit": 2.5,
            "concurrency": 3, "windows": [{"start": 60, "end": 120, "days": [1, 2]},
                                          {"start": 7, "end": 8}],
            "tz": "Europe/Berlin", "stopRule": {"maxFailureRatio": 0.25, "minFinished": 4},
            "stages": [{"percent": 50, "successThreshold": 0.5, "approval": True},
                       {"percent": 100}],
            "priority": 7, "startAt": 4102444800, "endAt": 4102448400})
        assert status == 201, body
        assert body == {"jobId": body["jobId"], "state": "SCHEDULED", "targets": 1}
        job = await served.e.store.get_job(body["jobId"])
        assert (job.name, job.b_optin, job.accept_device_policy, job.test_cycle) == \
            ("sched", True, 30, True)
        assert (job.rate_limit, job.concurrency, job.tz, job.priority) == \
            (2.5, 3, "Europe/Berlin", 7)
        assert [(w.start, w.end, w.days) for w in job.windows] == \
            [(60, 120, [1, 2]), (7, 8, list(range(7)))]
        assert (job.stop_rule.max_failure_ratio, job.stop_rule.min_finished) == (0.25, 4)
        assert [(s.percent, s.success_threshold, s.approval) for s in job.stages] == \
            [(50, 0.5, True), (100, 0.0, False)]
        assert (job.start_at, job.end_at) == (4102444800, 4102448400)
        assert job.selection.dev_ids == [DEV_ID]
        # getJob: the record in the API's names and what is derived from it
        status, got, _ = await api.call("GET", f"v1/jobs/{job.job_id}")
        assert status == 200, got
        assert got["jobId"] == job.job_id and got["operation"] == QUERY
        assert (got["final"], got["succeeded"], got["failed"], got["progress"]) == \
            (0, 0, 0, 0.0)
        assert got["rate"] is None and got["etaSeconds"] is None
        assert "op" not in got and "baseFinal" not in got
        assert got["stopRule"] == {"maxFailureRatio": 0.25, "minFinished": 4}
    served.run(main())


def test_create_deployments_refusals(served):
    async def main() -> None:
        api = served.api
        post = lambda body: api.call("POST", "v1/jobs", json={"operation": QUERY, **body})  # noqa: E731
        for body, code, where in (
                ({"selection": {"devIds": [DEV_ID], "capability": "c"}}, "invalid",
                 "selection"),
                ({"selection": {}}, "invalid", "selection"),
                ({"selection": {"devIds": [DEV_ID, "bad id"]}}, "invalid",
                 "selection.devIds[1]"),
                ({"selection": {"capability": "bad oid"}}, "invalid", "selection.capability"),
                ({"selection": {"devIds": [DEV_ID]}, "startAt": 10, "endAt": 5},
                 "invalid", "endAt"),
                ({"selection": {"devIds": [DEV_ID]}, "stages": [{"percent": 20}]},
                 "invalid", "stages[0]")):
            status, err, _ = await post(body)
            assert status == 400, (body, err)
            assert (err["error"], err["where"]) == (code, where), (body, err)
        status, err, _ = await post({"selection": {"devIds": [DEV_ID]}})
        assert status == 201, err
        status, err, _ = await post({"selection": {"capability": "cap-none"}})
        assert status == 201 and err["state"] == "COMPLETED" and err["targets"] == 0, err
        status, err, _ = await api.call("POST", "v1/jobs", json={
            "operation": {"operation": "UPDATE", "contentId": "nope"},
            "selection": {"devIds": [DEV_ID]}})
        assert status == 404 and err["where"] == "operation.contentId", err
    served.run(main())


async def more_devices(served: Served, n: int) -> list[Device]:
    devs = [Device(dev_id=f"IMEI:35693803{i:07d}", imei=f"35693803{i:07d}",
                   msisdn=f"+4915{i:08d}") for i in range(1, n + 1)]
    for d in devs:
        await served.e.store.put_device(d)
    return devs


def test_bulk_operation_targets(served):
    async def main() -> None:
        api = served.api
        devs = await more_devices(served, 3)
        status, body, _ = await api.call("POST", "v1/operations/bulk", json={
            "operation": QUERY, "targets": [{"msisdn": devs[0].msisdn}, {"imei": devs[1].imei},
                                            {"devId": devs[0].dev_id}]})
        assert status == 201 and body["targets"] == 2, body
        job = await served.e.store.get_job(body["jobId"])
        assert job.selection.dev_ids == [devs[0].dev_id, devs[1].dev_id]
        # every target that names no device, with its index; nothing made
        before = len((await served.e.store.list_jobs(limit=1000)).items)
        status, err, _ = await api.call("POST", "v1/operations/bulk", json={
            "operation": QUERY, "targets": [{"msisdn": devs[2].msisdn}, {"msisdn": "+4900"},
                                            {"imei": "356938039999999"}, {}]})
        assert status == 400, err
        assert err["error"] == "not_found" and err["where"] == "targets[1].msisdn"
        assert err["message"] == ("3 of 4 targets cannot be used; no device with msisdn "
                                  "'+4900' (and 2 more: see errors)")
        assert [(e["error"], e["where"]) for e in err["errors"]] == [
            ("not_found", "targets[1].msisdn"), ("not_found", "targets[2].imei"),
            ("invalid", "targets[3]")]
        status, err, _ = await api.call("POST", "v1/operations/bulk", json={
            "operation": QUERY, "targets": [{"devId": "IMEI:000000000000001"}]})
        assert status == 404, err
        assert err["message"] == ("1 of 1 targets cannot be used; no device with dev_id "
                                  "'IMEI:000000000000001'")
        assert err["where"] == "targets[0].devId"
        assert len((await served.e.store.list_jobs(limit=1000)).items) == before
        status, err, _ = await api.call("POST", "v1/operations/bulk", json={
            "operation": QUERY, "targets": [{"msisdn": "+4901"}, {"msisdn": "+4902"}]})
        assert err["message"] == ("2 of 2 targets cannot be used; no device with msisdn "
                                  "'+4901' (and 1 more: see errors)"), err
    served.run(main())


def test_job_listings_and_their_parameters(served):
    async def main() -> None:
        api = served.api
        _, op = await api.key("lister", "operator")
        ids = []
        for _ in range(3):
            status, body, _ = await api.call("POST", "v1/jobs", op, json={
                "operation": QUERY, "selection": {"devIds": [DEV_ID]}})
            ids.append(body["jobId"])
        by_id = sorted(ids)                  # getJobs lists by job id
        status, page, _ = await api.call("GET", "v1/jobs", op, params={"limit": "2"})
        assert status == 200 and [j["jobId"] for j in page["items"]] == by_id[:2], page
        status, page, _ = await api.call("GET", "v1/jobs", op, params={
            "limit": "2", "cursor": page["nextCursor"]})
        assert [j["jobId"] for j in page["items"]] == by_id[2:] and page["nextCursor"] is None
        status, page, _ = await api.call("GET", "v1/jobs", op, params={"state": "running"})
        assert [j["jobId"] for j in page["items"]] == by_id
        status, page, _ = await api.call("GET", "v1/jobs", op, params={"state": "PAUSED",
                                                                      "owner": "lister"})
        assert page == {"items": [], "nextCursor": None}
        status, page, _ = await api.call("GET", "v1/jobs", op, params={"owner": "someone"})
        assert page == {"items": [], "nextCursor": None}
        status, page, _ = await api.call("GET", "v1/jobs", params={"owner": "lister",
                                                                   "state": ""})
        assert [j["jobId"] for j in page["items"]] == by_id        # the admin names the owner
        for params, where, message in (
                ({"state": "sleeping"}, "state", "state is one of SCHEDULED, RUNNING, PAUSED, "
                                                 "COMPLETED, CANCELLED, FAILED, not 'sleeping'"),
                ({"limit": "0"}, "limit", "limit is a number 1..10000"),
                ({"limit": "10001"}, "limit", None), ({"limit": "x"}, "limit", None),
                ({"bogus": "1"}, "bogus", "unknown query parameter 'bogus' (known: cursor, "
                                          "limit, owner, state)")):
            status, err, _ = await api.call("GET", "v1/jobs", op, params=params)
            shape(err, status, 400, "invalid", where, message)
        status, page, _ = await api.call("GET", "v1/jobs", op, params={"limit": "10000"})
        assert status == 200
        # by date
        created = [(await served.e.store.get_job(j)).created for j in ids]
        status, page, _ = await api.call("GET", "v1/jobs/by-date", op, params={
            "from": str(created[1]), "to": str(created[2])})
        assert status == 200 and [j["jobId"] for j in page["items"]] == ids[1:2], page
        status, page, _ = await api.call("GET", "v1/jobs/by-date", op, params={
            "from": str(created[0])})
        assert [j["jobId"] for j in page["items"]] == ids
        status, page, _ = await api.call("GET", "v1/jobs/by-date", op, params={
            "from": "", "to": ""})
        assert [j["jobId"] for j in page["items"]] == ids
        for params, where, message in (
                ({"from": "soon"}, "from", "from is epoch seconds or an ISO-8601 time, "
                                           "not 'soon'"),
                ({"to": "x"}, "to", None),
                ({"from": "-5"}, "from", "from is out of range"),
                ({"from": "300000000000"}, "from", "from is out of range"),
                ({"from": "100", "to": "100"}, "to", "to must be after from (and before the "
                                                     "year 10000)"),
                ({"to": "300000000000"}, "to", None), ({"when": "1"}, "when", None)):
            status, err, _ = await api.call("GET", "v1/jobs/by-date", op, params=params)
            shape(err, status, 400, "invalid", where, message)
    served.run(main())


def test_job_control_with_a_cause_and_the_tasks_listing(served):
    async def main() -> None:
        api = served.api
        devs = await more_devices(served, 2)
        status, body, _ = await api.call("POST", "v1/jobs", json={
            "operation": QUERY, "selection": {"devIds": [d.dev_id for d in devs]},
            "startAt": 4102444800})
        job_id = body["jobId"]
        status, got, _ = await api.call("POST", f"v1/jobs/{job_id}/pause",
                                        json={"cause": "maintenance"})
        assert status == 200 and got["state"] == "PAUSED" and got["cause"] == "maintenance"
        status, got, _ = await api.call("POST", f"v1/jobs/{job_id}/restart", json={"x": 1})
        shape(got, status, 400, "invalid", "$.x")
        status, got, _ = await api.call("POST", f"v1/jobs/{job_id}/restart")
        assert status == 200 and got["state"] == "RUNNING", got
        status, got, _ = await api.call("POST", f"v1/jobs/{job_id}/pause", data=b" ",
                                        headers={"Content-Type": "application/json"})
        assert status == 200 and got["cause"] == "paused by the caller", got
        status, got, _ = await api.call("POST", f"v1/jobs/{job_id}/cancel",
                                        json={"cause": "not needed"})
        assert status == 200 and got["state"] == "CANCELLED" and got["cause"] == "not needed"
        status, got, _ = await api.call("POST", f"v1/jobs/{job_id}/cancel")
        shape(got, status, 409, got["error"], "jobId")
        # a job with tasks: getTasks pages and filters by state
        status, body, _ = await api.call("POST", "v1/jobs", json={
            "operation": QUERY, "selection": {"devIds": [d.dev_id for d in devs]}})
        jid = body["jobId"]
        for _ in range(100):
            if (await served.e.store.get_job(jid)).total == 2:
                break
            await asyncio.sleep(0.05)
        status, page, _ = await api.call("GET", f"v1/jobs/{jid}/tasks", params={"limit": "1"})
        assert status == 200 and len(page["items"]) == 1 and page["nextCursor"], page
        t = page["items"][0]
        assert t["jobId"] == jid and t["devId"] == devs[0].dev_id and t["operation"] == "QUERY"
        assert set(t) >= {"taskId", "status", "attempts", "created", "owner", "result"}
        status, page2, _ = await api.call("GET", f"v1/jobs/{jid}/tasks", params={
            "cursor": page["nextCursor"]})
        assert [x["devId"] for x in page2["items"]] == [devs[1].dev_id]
        status, page, _ = await api.call("GET", f"v1/jobs/{jid}/tasks", params={
            "state": "succeeded"})
        assert page["items"] == []
        status, err, _ = await api.call("GET", f"v1/jobs/{jid}/tasks", params={"state": "x"})
        shape(err, status, 400, "invalid", "state")
        status, err, _ = await api.call("GET", f"v1/jobs/{jid}/tasks", params={"page": "1"})
        shape(err, status, 400, "invalid", "page")
    served.run(main())


def test_bulk_bootstrap_refusals(served):
    async def main() -> None:
        api = served.api
        devs = await more_devices(served, 2)
        base = {"targets": [{"devId": devs[0].dev_id}]}
        status, err, _ = await api.call("POST", "v1/bootstrap", json={**base,
                                                                      "security": "USERPIN"})
        shape(err, status, 400, "invalid", "pin", "USERPIN security needs the PIN")
        status, err, _ = await api.call("POST", "v1/bootstrap", json={
            **base, "security": "USERPIN_NETWORKID"})
        shape(err, status, 400, "invalid", "pin")
        _, op = await api.key("boot-sys", "operator")
        status, err, _ = await api.call("POST", "v1/bootstrap", op, json={**base,
                                                                          "owner": "x"})
        shape(err, status, 403, "forbidden", "owner")
        status, err, _ = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"devId": devs[0].dev_id}, {"msisdn": "+4911"}]})
        assert status == 404 and err["where"] == "targets[1].msisdn", err
        await served.e.store.put_device(Device(dev_id="sn-no-imei", msisdn="+4916000000"))
        status, err, _ = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"devId": devs[0].dev_id}, {"devId": "sn-no-imei"}]})
        shape(err, status, 400, "invalid", "targets[1]",
              "device 'sn-no-imei' has no IMEI, the NETWORKID key")
        status, body, _ = await api.call("POST", "v1/bootstrap", op, json={
            "targets": [{"devId": devs[0].dev_id}, {"devId": devs[1].dev_id},
                        {"imei": devs[0].imei}], "security": "USERPIN", "pin": "1234",
            "name": "boot"})
        assert status == 201, body
        assert len(body["taskIds"]) == 3 and body["taskIds"][0] == body["taskIds"][2]
        job = await served.e.store.get_job(body["jobId"])
        assert (job.name, job.owner, job.targets, job.state.value) == \
            ("boot", "boot-sys", 2, "RUNNING")
        assert job.selection.dev_ids == [devs[0].dev_id, devs[1].dev_id]
    served.run(main())


# --- wsi/schemas: names, views, patches ---------------------------------------------------------

def test_camel_names_and_paths():
    from dmengine.wsi.schemas import camel, camel_path
    assert camel("dev_id") == "devId" and camel("b_optin") == "bOptin"
    assert camel("imei") == "imei" and camel("a_b_c") == "aBC"
    assert camel("eta_seconds") == "etaSeconds"
    assert camel_path(None) is None and camel_path("") == ""
    assert camel_path("$.devId") == "$.devId"
    assert camel_path("$.account.client_name") == "$.account.clientName"
    assert camel_path("targets[3].dev_id") == "targets[3].devId"
    assert camel_path("mo_paths[0].x_y") == "moPaths[0].xY"


def test_views_of_records_round_trip():
    from dmengine.model import Capability, DmAccount, QueryOp, Task, TaskResult
    from dmengine.wsi import schemas as sc
    dev = Device(dev_id=DEV_ID, imei=IMEI, msisdn="+491", tz="UTC",
                 account=DmAccount(server_id="s", client_name="c"))
    v = sc.to_view(dev)
    assert type(v) is sc.DeviceView
    assert msgspec.json.decode(msgspec.json.encode(v))["devId"] == DEV_ID
    assert msgspec.json.decode(msgspec.json.encode(v))["account"]["clientName"] == "c"
    back = sc.to_model(v)
    assert back == dev and type(back.account) is DmAccount
    cap = Capability(oid="cap", tacs=["35693803"], mo_paths={"fumo": "./FUMO"})
    assert sc.to_model(sc.to_view(cap)) == cap
    # a derived view: fields left out, fields added.  Views are cached by their arguments,
    # and a process that ran these tests before (mutmut forks its children from one) has
    # them: a fresh name each run makes view() build them again.
    import uuid
    fresh = uuid.uuid4().hex
    V = sc.view(Device, name=f"DeviceLite{fresh}", exclude={"account", "imei"},
                extra=(("note", str, ""),))
    assert sc.view(Device, name=f"DeviceLite{fresh}", exclude={"account", "imei"},
                   extra=(("note", str, ""),)) is V
    lite = sc.to_view(dev, V, note="n")
    out = msgspec.json.decode(msgspec.json.encode(lite))
    assert out["note"] == "n" and "imei" not in out and "account" not in out
    assert out["devId"] == DEV_ID
    assert sc.to_view(dev, V).note == ""
    # a decoder that ignores unknown fields, and one that does not
    Loose = sc.view(Device, name=f"DeviceLoose{fresh}", forbid_unknown=False)
    assert msgspec.json.decode(b'{"devId": "d", "zz": 1}', type=Loose).dev_id == "d"
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"devId": "d", "zz": 1}', type=sc.DeviceView)
    # the id pattern is in the views' JSON Schema
    TV = sc.view(Task, name=f"TaskForSchema{fresh}", doc="the doc")
    assert TV.__doc__ == "the doc" and TV.__name__ == f"TaskForSchema{fresh}"
    schema = msgspec.json.schema(TV)
    text = json.dumps(schema)
    assert '"pattern"' in text and '"taskId"' in text and '"maxLength"' in text
    # nested records in lists and dicts
    t = Task(task_id="t", dev_id=DEV_ID, op=QueryOp(nodes=["./A"]), correlator="t",
             result=TaskResult(statuses={"Get ./A": 200}, nodes={"./A": "x"}))
    # a view made now is the same as the one made at import, in its schema and its JSON
    for cls, made in ((Device, sc.DeviceView), (Capability, sc.CapabilityView),
                      (TaskResult, sc.TaskResultView), (DmAccount, sc.DmAccountView)):
        again = sc.view(cls, name=f"{made.__name__}{fresh}")
        (a_schema, b_schema) = (msgspec.json.schema(c) for c in (made, again))
        a_def = a_schema["$defs"][made.__name__]
        b_def = b_schema["$defs"][again.__name__]
        b_def = {k: v for k, v in b_def.items() if k != "title"}
        a_def = {k: v for k, v in a_def.items() if k != "title"}
        assert json.dumps(b_def, sort_keys=True).replace(fresh, "") == \
            json.dumps(a_def, sort_keys=True), cls
    assert msgspec.json.encode(sc.to_view(dev, sc.view(Device, name=f"DV{fresh}"))) == \
        msgspec.json.encode(sc.to_view(dev))
    tv = sc.to_view(t, TV)
    assert type(tv.op) is sc.QueryOpView and type(tv.result) is sc.TaskResultView
    assert sc.to_model(msgspec.json.decode(msgspec.json.encode(tv), type=TV)) == t
    assert sc._convert_value([{"k": [dev]}], sc._TO_VIEW)[0]["k"][0] == v


def test_task_summary_and_task_data():
    from dmengine.model import DiagOp, Task, TaskResult, TaskState
    from dmengine.wsi.schemas import task_data, task_summary
    t = Task(task_id="t9", dev_id=DEV_ID, op=DiagOp(), correlator="t9", job_id="j1",
             state=TaskState.FAILED, test_cycle=True, attempts=3, created=1.0, updated=2.0,
             finished=3.0, cause="why", b_optin=True, accept_device_policy=20, deadline=9.0,
             next_attempt=5.0, owner="o", result=TaskResult(statuses={"Get ./X": 404}))
    s = msgspec.json.decode(msgspec.json.encode(task_summary(t)))
    assert s == {"taskId": "t9", "devId": DEV_ID, "jobId": "j1", "owner": "o",
                 "status": "FAILED", "operation": "DIAG", "testCycle": True, "attempts": 3,
                 "created": 1.0, "updated": 2.0, "finished": 3.0, "cause": "why",
                 "result": s["result"]}
    assert s["result"]["statuses"] == {"Get ./X": 404}
    d = msgspec.json.decode(msgspec.json.encode(task_data(t)))
    assert {k: d[k] for k in s} == s
    assert (d["bOptin"], d["acceptDevicePolicy"], d["deadline"], d["nextAttempt"]) == \
        (True, 20, 9.0, 5.0)
    assert d["op"]["operation"] == "DIAG"
    bare = Task(task_id="t0", dev_id=DEV_ID, op=DiagOp(), correlator="t0")
    assert task_summary(bare).result is None and task_data(bare).result is None


def test_patch_changes():
    from dmengine.model import Capability
    from dmengine.wsi.schemas import CapabilityPatch, DevicePatch, patch_changes
    p = msgspec.json.decode(b'{"make": "Acme", "tacs": null, "moPaths": null, "model": null}',
                            type=CapabilityPatch)
    assert patch_changes(p, Capability) == {"make": "Acme", "tacs": [], "mo_paths": {},
                                            "model": ""}
    p = msgspec.json.decode(b'{"fumoMode": null}', type=CapabilityPatch)
    assert patch_changes(p, Capability) == {"fumo_mode": Capability(oid="x").fumo_mode}
    p = msgspec.json.decode(b'{"msisdn": null, "account": {"clientName": "n", '
                            b'"serverNonce": null}}', type=DevicePatch)
    assert patch_changes(p, Device) == {"msisdn": None,
                                        "account": {"client_name": "n", "server_nonce": None}}
    assert patch_changes(msgspec.json.decode(b"{}", type=DevicePatch), Device) == {}


# --- wsi/subscriptions: parameters, scope, the service's absence --------------------------------

HOOK = "http://127.0.0.1:9/hook"


def test_subscriptions_create_list_delete(served):
    async def main() -> None:
        api = served.api
        _, op = await api.key("hooks-a", "operator")
        _, other = await api.key("hooks-b", "operator")
        status, sub, _ = await api.call("POST", "v1/subscriptions", op, json={
            "url": HOOK, "events": ["task"], "description": "d"})
        assert status == 201, sub
        assert sub["secret"] and sub["url"] == HOOK and sub["owner"] == "hooks-a"
        status, err, _ = await api.call("POST", "v1/subscriptions", op, json={
            "url": HOOK, "events": ["task"], "jobId": "bad id"})
        shape(err, status, 400, "invalid", "jobId", "not a job id: 'bad id'")
        for cred, seen in ((op, True), (other, False), (KEY, True)):
            status, page, _ = await api.call("GET", "v1/subscriptions", cred, params={
                "limit": "10000"})
            assert status == 200, page
            ids = [x["subscriptionId"] for x in page["items"]]
            assert (sub["subscriptionId"] in ids) is seen
            assert all("secret" not in x for x in page["items"])
        status, page, _ = await api.call("GET", "v1/subscriptions", op, params={"limit": "1",
                                                                                 "cursor": ""})
        assert status == 200 and len(page["items"]) == 1
        for params, where in (({"limit": "0"}, "limit"), ({"limit": "10001"}, "limit"),
                              ({"limit": "many"}, "limit"), ({"page": "2"}, "page")):
            status, err, _ = await api.call("GET", "v1/subscriptions", op, params=params)
            shape(err, status, 400, "invalid", where)
        status, err, _ = await api.call("GET", "v1/subscriptions", op, params={"x": "1"})
        assert err["message"] == "unknown query parameter 'x' (known: cursor, limit)"
        status, err, _ = await api.call("GET", "v1/subscriptions", op, params={"limit": "0"})
        assert err["message"] == "limit is a number 1..10000"
        status, err, _ = await api.call("DELETE", f"v1/subscriptions/{sub['subscriptionId']}",
                                        other)
        assert status == 404, err
        status, _, _ = await api.call("DELETE", f"v1/subscriptions/{sub['subscriptionId']}", op)
        assert status == 204
    served.run(main())


def test_dead_letters_and_charging_parameters(served):
    async def main() -> None:
        api = served.api
        status, page, _ = await api.call("GET", "v1/dead-letters", params={
            "subscriptionId": "s-none", "limit": "5"})
        assert status == 200 and page == {"items": [], "nextCursor": None}, page
        status, err, _ = await api.call("GET", "v1/dead-letters", params={"sub": "x"})
        shape(err, status, 400, "invalid", "sub")
        status, err, _ = await api.call("POST", "v1/dead-letters/d-none/replay")
        assert status == 404, err
        status, page, _ = await api.call("GET", "v1/charging", params={
            "from": "2000-01-01T00:00:00Z", "to": "4102444800"})
        assert status == 200 and page["items"] == [], page
        status, page, _ = await api.call("GET", "v1/charging", params={"from": "", "to": "0"})
        assert status == 200, page
        for params, where, message in (
                ({"from": "later"}, "from", "from is epoch seconds or an ISO-8601 time, "
                                            "not 'later'"),
                ({"to": "-1"}, "to", "to is epoch seconds or an ISO-8601 time, not '-1'"),
                ({"from": "253402300800"}, "from", None),
                ({"from": "100", "to": "100"}, "to", "to must be after from"),
                ({"from": "100", "to": "50"}, "to", "to must be after from"),
                ({"limit": "0"}, "limit", None), ({"when": "x"}, "when", None)):
            status, err, _ = await api.call("GET", "v1/charging", params=params)
            shape(err, status, 400, "invalid", where, message)
        for edge in ("0", "253402300799"):
            status, page, _ = await api.call("GET", "v1/charging", params={"from": edge})
            assert status == 200, page
        status, page, _ = await api.call("GET", "v1/charging", params={"from": "100",
                                                                       "to": "101"})
        assert status == 200, page
    served.run(main())


def test_push_routes_without_the_webhooks_service(served, monkeypatch):
    async def main() -> None:
        monkeypatch.setattr(served.e, "webhooks", None)
        for method, path in (("GET", "v1/subscriptions"), ("GET", "v1/dead-letters"),
                             ("GET", "v1/charging")):
            status, err, _ = await served.api.call(method, path)
            shape(err, status, 503, "unavailable", None, "push (webhooks) is not running")
    served.run(main())


def test_key_and_user_answers_show_every_field_and_no_secret(served):
    async def main() -> None:
        api = served.api
        status, key, _ = await api.call("POST", "v1/keys", json={
            "name": "sys-k", "role": "viewer", "rate": 7.5, "burst": 3})
        assert status == 201, key
        assert set(key) == {"keyId", "name", "role", "rate", "burst", "created", "createdBy",
                            "revoked", "revokedBy", "apiKey"}
        assert (key["name"], key["role"], key["rate"], key["burst"], key["revoked"],
                key["revokedBy"]) == ("sys-k", "viewer", 7.5, 3, None, None)
        assert key["createdBy"].startswith("key:") and key["created"] > 0
        status, page, _ = await api.call("GET", "v1/keys", params={"limit": "10000"})
        (listed,) = [k for k in page["items"] if k["keyId"] == key["keyId"]]
        assert listed == {k: v for k, v in key.items() if k != "apiKey"}
        status, gone, _ = await api.call("DELETE", f"v1/keys/{key['keyId']}")
        assert status == 200 and gone["revoked"] is not None, gone
        assert gone["revokedBy"] == key["createdBy"]
        # users: the system defaults to the name; a generated password is shown once
        status, user, _ = await api.call("POST", "v1/users", json={
            "name": "ula", "role": "operator", "rate": 2.0, "burst": 4})
        assert status == 201, user
        assert set(user) == {"name", "role", "system", "rate", "burst", "created", "createdBy",
                             "password"}
        assert (user["name"], user["role"], user["system"], user["rate"], user["burst"]) == \
            ("ula", "operator", "ula", 2.0, 4)
        assert user["password"] and user["createdBy"] == key["createdBy"] and user["created"] > 0
        status, user2, _ = await api.call("POST", "v1/users", json={
            "name": "ulb", "role": "viewer", "system": "crm", "password": "long enough pw 1"})
        assert status == 201 and user2["system"] == "crm" and "password" not in user2, user2
        status, page, _ = await api.call("GET", "v1/users", params={"limit": "10000"})
        got = {u["name"]: u for u in page["items"]}
        assert got["ula"] == {k: v for k, v in user.items() if k != "password"}
        assert got["ulb"]["system"] == "crm"
        status, ans, _ = await api.call("POST", "v1/login", None, json={
            "userName": "ulb", "password": "long enough pw 1"})
        assert status == 200 and (ans["role"], ans["owner"]) == ("viewer", "crm"), ans
        status, _, _ = await api.call("DELETE", "v1/users/ulb")
        assert status == 204
    served.run(main())


def test_a_failed_login_is_audited_as_anonymous(served):
    async def main() -> None:
        api = served.api
        status, body, _ = await api.call("POST", "v1/login", None, json={
            "apiKey": "not-a-key-of-anyone"})
        assert status == 401, body
        entries = [a for a in await api.audit(action="login") if a["status"] == 401]
        a = entries[-1]
        assert (a["actor"], a["outcome"], a["target"]) == ("anonymous", "denied", "/v1/login")
        d = a["detail"]
        assert d["with"] == "apiKey" and d.get("role") is None and d.get("owner") is None
        assert d.get("session") is None and d["method"] == "POST"
    served.run(main())


def test_bulk_bootstrap_makes_each_task_of_the_job(served):
    async def main() -> None:
        import re
        from dmengine.model import BootstrapOp
        api = served.api
        devs = await more_devices(served, 2)
        # an IMEI field without an IMEI-form id, and an IMEI-form id without the field
        await served.e.store.put_device(Device(dev_id="sn-with-imei", imei="356938037777777",
                                               msisdn="+4916111111"))
        await served.e.store.put_device(Device(dev_id="IMEI:356938038888888",
                                               msisdn="+4916222222"))
        status, body, _ = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"devId": devs[0].dev_id}, {"devId": "sn-with-imei"},
                        {"devId": "IMEI:356938038888888"}, {"devId": devs[0].dev_id}],
            "security": "USERPIN_NETWORKID", "pin": "1234", "serverId": "srv-x"})
        assert status == 201, body
        job_id, tids = body["jobId"], body["taskIds"]
        assert re.fullmatch(r"j[0-9a-f]+", job_id), job_id
        assert all(isinstance(t, str) for t in tids) and len(set(tids)) == 3
        assert tids[0] == tids[3]
        job = await served.e.store.get_job(job_id)
        assert (job.name, job.owner, job.op, job.targets) == ("", "api", None, 3)
        assert job.started is not None and job.started > 0
        for tid, dev in zip(tids, [devs[0].dev_id, "sn-with-imei", "IMEI:356938038888888"]):
            t = await served.e.store.get_task(tid)
            assert (t.job_id, t.dev_id, t.owner) == (job_id, dev, "api")
            assert isinstance(t.op, BootstrapOp) and t.op.security == "USERPIN_NETWORKID"
            assert t.op.account.server_id == "srv-x"
    served.run(main())


def test_bulk_bootstrap_stopped_midway_keeps_what_it_made(served, monkeypatch):
    async def main() -> None:
        from dmengine.errors import InvalidRequest
        api = served.api
        devs = await more_devices(served, 3)
        broker = served.e.broker
        real = broker.do_bootstrap

        async def fails_on_the_second(**kw: Any) -> str:
            if kw["dev_id"] == devs[1].dev_id:
                raise InvalidRequest("this one cannot", where="x")
            return await real(**kw)
        monkeypatch.setattr(broker, "do_bootstrap", fails_on_the_second)
        before = {j.job_id for j in (await served.e.store.list_jobs(limit=1000)).items}
        status, err, _ = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"devId": devs[0].dev_id}, {"devId": devs[0].dev_id},
                        {"devId": devs[1].dev_id}, {"devId": devs[2].dev_id}]})
        shape(err, status, 400, "invalid", "targets[2]", "this one cannot")
        (job,) = [j for j in (await served.e.store.list_jobs(limit=1000)).items
                  if j.job_id not in before]
        assert job.targets == 1
        assert job.cause == f"stopped at device {devs[1].dev_id}: this one cannot"
        assert job.total == 1
    served.run(main())


def test_get_job_derives_counts_progress_rate_and_eta(served):
    async def main() -> None:
        from dmengine.model import TaskState as TS
        api = served.api
        devs = await more_devices(served, 3)
        status, body, _ = await api.call("POST", "v1/jobs", json={
            "operation": QUERY, "selection": {"devIds": [d.dev_id for d in devs]}})
        jid = body["jobId"]
        store = served.e.store
        for _ in range(100):
            if (await store.get_job(jid)).total == 3:
                break
            await asyncio.sleep(0.05)
        tasks = (await store.tasks_by_job(jid, limit=5)).items
        await store.transition(tasks[0].task_id, TS.IN_PROGRESS, cause="t")
        await store.transition(tasks[0].task_id, TS.SUCCEEDED, cause="t")
        await store.transition(tasks[1].task_id, TS.FAILED, cause="t")
        await asyncio.sleep(0.01)
        status, got, _ = await api.call("GET", f"v1/jobs/{jid}")
        assert status == 200, got
        assert (got["final"], got["succeeded"], got["failed"], got["total"]) == (2, 1, 1, 3)
        assert got["progress"] == pytest.approx(2 / 3)
        assert got["rate"] > 0 and got["etaSeconds"] == pytest.approx(1 / got["rate"])
    served.run(main())


def test_error_answer_of_http_errors_and_redirects():
    from aiohttp.test_utils import make_mocked_request
    req = make_mocked_request("POST", "/v1/x")

    def body(resp: web.Response) -> Any:
        return json.loads(resp.body)
    r = middleware.error_answer(req, web.HTTPBadRequest())
    assert r.status == 400 and body(r) == {"error": "http_error", "message": "Bad Request",
                                           "where": None}
    r = middleware.error_answer(req, web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2))
    assert r.status == 413 and body(r)["error"] == "too_large"
    r = middleware.error_answer(req, web.HTTPServiceUnavailable(headers={"Retry-After": "7"}))
    assert r.status == 503 and r.headers["Retry-After"] == "7"
    assert body(r)["error"] == "http_error"
    r = middleware.error_answer(req, web.HTTPNotFound())
    assert body(r) == {"error": "not_found", "message": "no route POST /v1/x", "where": None}
    with pytest.raises(web.HTTPFound):
        middleware.error_answer(req, web.HTTPFound("/elsewhere"))
    r = middleware.error_answer(req, ApiError("big", code="too_large", http_status=413))
    assert r.status == 413 and r.keep_alive is False           # the rest is not read
    r = middleware.error_answer(req, ApiError("small", code="c", http_status=400))
    assert r.keep_alive is not False


def test_bulk_bootstrap_for_another_owner_and_its_job_answer(served):
    async def main() -> None:
        api = served.api
        devs = await more_devices(served, 2)
        await served.e.store.put_device(Device(dev_id="sn-no-imei-2", msisdn="+4916333333"))
        status, err, _ = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"devId": "sn-no-imei-2"}], "security": "USERPIN_NETWORKID",
            "pin": "1234"})
        shape(err, status, 400, "invalid", "targets[0]",
              "device 'sn-no-imei-2' has no IMEI, the USERPIN_NETWORKID key")
        status, body, _ = await api.call("POST", "v1/bootstrap", json={
            "targets": [{"devId": d.dev_id} for d in devs], "owner": "sys-other"})
        assert status == 201, body
        for tid in body["taskIds"]:
            assert (await served.e.store.get_task(tid)).owner == "sys-other"
        status, job, _ = await api.call("GET", f"v1/jobs/{body['jobId']}")
        assert status == 200 and job["operation"] is None and job["owner"] == "sys-other", job
    served.run(main())


def test_a_fresh_view_keeps_the_tag_and_the_struct_options():
    import gc
    import uuid
    from dmengine.model import QueryOp
    from dmengine.wsi import schemas as sc
    fresh = uuid.uuid4().hex
    QV = sc.view(QueryOp, name=f"QueryOpV{fresh}")
    op = QueryOp(nodes=["./A"])
    v = sc.to_view(op, QV)
    assert msgspec.json.decode(msgspec.json.encode(v)) == \
        msgspec.json.decode(msgspec.json.encode(sc.to_view(op)))
    assert msgspec.json.decode(b'{"operation": "QUERY", "nodes": ["./B"]}', type=QV).nodes == \
        ["./B"]
    assert QV.__module__ == "dmengine.wsi.schemas"
    assert not gc.is_tracked(QV(nodes=["./A"]))            # views hold no cycle: gc=False
    with pytest.raises(TypeError):
        QV(["./A"])                                         # keyword-only
    DV = sc.view(Device, name=f"DevV{fresh}", exclude={"imei"})
    assert "imei" not in DV.__struct_fields__ and "msisdn" in DV.__struct_fields__
