"""Issue 15: the routes added to the API — capabilities (get, update, delete, list), content
(get, list, delete), getDiagnostics, the paged getTaskHistory — and the API's one shape:
camelCase bodies and answers, errors naming the field in the request's names, the error
shape for routes and methods that do not exist.  Over real HTTP against the real engine.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp

from dmengine.model import TaskState
from conftest import api_client, bounded
from test_broker_e2e import World, run_world

KEY_HEADER = "X-API-Key"


class Api:
    def __init__(self, w: World, http: aiohttp.ClientSession) -> None:
        self.w = w
        self.http = http
        self.url = w.engine.api_url

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {KEY_HEADER: self.w.engine.api_key, **kw.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as r:
            body = await r.read()
            return r.status, (json.loads(body) if body else None)


def with_api(tmp_path: Any, scenario: Any, **kw: Any) -> None:
    async def run(w: World) -> None:
        async with api_client() as http:
            await bounded(scenario(w, Api(w, http)))
    run_world(tmp_path, run, **kw)


def assert_error(body: Any, status: int, want_status: int, where: str | None) -> None:
    assert status == want_status, body
    assert set(body) == {"error", "message", "where"}, body
    assert body["where"] == where, body


def test_capabilities_create_get_update_delete_list(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        status, cap = await api.call("POST", "v1/capabilities", json={
            "oid": "cap-x", "make": "Acme", "model": "X1", "firmwareVersions": ["1.0"],
            "tacs": ["35000001"], "moPaths": {"fumo": "./FUMO/1"}})
        assert status == 201, cap
        assert cap["oid"] == "cap-x" and cap["firmwareVersions"] == ["1.0"]
        assert cap["fumoMode"] == "DOWNLOAD_AND_UPDATE" and cap["created"] > 0
        status, got = await api.call("GET", "v1/capabilities/cap-x")
        assert status == 200 and got == cap
        # a merge-patch: given fields replace, null puts the default back
        status, upd = await api.call("PATCH", "v1/capabilities/cap-x", json={
            "make": "Acme Corp", "tacs": ["35000001", "35000002"], "moPaths": None,
            "fumoMode": "DOWNLOAD_THEN_UPDATE"})
        assert status == 200, upd
        assert upd["make"] == "Acme Corp" and upd["model"] == "X1"
        assert upd["tacs"] == ["35000001", "35000002"] and upd["moPaths"] == {}
        assert upd["fumoMode"] == "DOWNLOAD_THEN_UPDATE" and upd["updated"] >= cap["updated"]
        assert (await w.store.capability_by_tac("35000002")).oid == "cap-x"
        # errors name the field in the body's names
        for patch, code, where in (
                ({"firmwareVersions": "1.0"}, 400, "$.firmwareVersions"),
                ({"firmware_versions": ["1"]}, 400, "$.firmware_versions"),
                ({"oid": "other"}, 400, "$.oid"),
                ({"tacs": ["123"]}, 400, "$.tacs[0]"),
                ({}, 400, "$")):
            status, err = await api.call("PATCH", "v1/capabilities/cap-x", json=patch)
            assert_error(err, status, code, where)
        status, err = await api.call("PATCH", "v1/capabilities/nope", json={"make": "x"})
        assert_error(err, status, 404, "oid")
        # a TAC that is another capability's
        status, _ = await api.call("POST", "v1/capabilities", json={"oid": "cap-y"})
        assert status == 201
        status, err = await api.call("PATCH", "v1/capabilities/cap-y",
                                     json={"tacs": ["35000002"]})
        assert status == 409 and err["error"] == "already_exists"
        status, err = await api.call("POST", "v1/capabilities", json={"oid": "cap-x"})
        assert status == 409
        oids, cursor = [], None
        while True:                          # one a page (the world has a capability too)
            status, page = await api.call("GET", "v1/capabilities", params={
                "limit": "1", **({"cursor": cursor} if cursor else {})})
            assert status == 200 and len(page["items"]) <= 1
            oids += [c["oid"] for c in page["items"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert oids == sorted(oids) and {"cap-x", "cap-y"} <= set(oids)
        status, err = await api.call("GET", "v1/capabilities", params={"limit": "0"})
        assert_error(err, status, 400, "limit")
        status, _ = await api.call("DELETE", "v1/capabilities/cap-y")
        assert status == 204
        assert (await api.call("GET", "v1/capabilities/cap-y"))[0] == 404
        assert (await api.call("DELETE", "v1/capabilities/cap-y"))[0] == 404
    with_api(tmp_path, scenario, n=1)


def test_content_upload_get_list_delete(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        data = b"package-bytes" * 1000
        ids = []
        for cap in ("cap-a", "cap-b", "cap-a"):
            status, rec = await api.call("POST", "v1/content", data=data, params={
                "name": "fw.bin", "sha256": hashlib.sha256(data).hexdigest(),
                "capability": cap, "from": "1.0", "to": "2.0"})
            assert status == 201, rec
            ids.append(rec["contentId"])
        assert rec["size"] == len(data) and rec["fromVersion"] == "1.0"
        assert rec["toVersion"] == "2.0" and "path" not in rec
        assert rec["downloadUrl"].endswith(f"/content/{rec['contentId']}")
        status, got = await api.call("GET", f"v1/content/{ids[0]}")
        assert status == 200 and got["sha256"] == hashlib.sha256(data).hexdigest()
        async with api.http.get(got["downloadUrl"]) as r:       # the device port serves it
            assert r.status == 200 and await r.read() == data
        status, page = await api.call("GET", "v1/content", params={"capability": "cap-a"})
        assert status == 200 and sorted(c["contentId"] for c in page["items"]) == \
            sorted([ids[0], ids[2]])
        status, page = await api.call("GET", "v1/content", params={"limit": "2"})
        assert len(page["items"]) == 2 and page["nextCursor"]
        status, err = await api.call("GET", "v1/content", params={"colour": "red"})
        assert_error(err, status, 400, "colour")
        status, err = await api.call("POST", "v1/content", data=data, params={
            "name": "x", "sha256": "0" * 64})
        assert_error(err, status, 422, "sha256")
        status, err = await api.call("POST", "v1/content", data=data)
        assert_error(err, status, 400, "name")
        status, _ = await api.call("DELETE", f"v1/content/{ids[1]}")
        assert status == 204
        status, err = await api.call("GET", f"v1/content/{ids[1]}")
        assert_error(err, status, 404, "contentId")
        assert (await api.call("DELETE", f"v1/content/{ids[1]}"))[0] == 404
        async with api.http.get(w.engine.device_url.rsplit("/dm", 1)[0]
                                + f"/content/{ids[1]}") as r:
            assert r.status == 404
    with_api(tmp_path, scenario, n=1)


def test_get_diagnostics_of_a_device_and_of_a_task(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        dev = w.device(0)
        await w.register(dev)
        tids = []
        for nodes in (["./DevInfo/Mod"], ["./DevInfo/Lang", "./DevDetail/FwV"]):
            status, r = await api.call("POST", "v1/operations", json={
                "target": {"msisdn": dev.msisdn},
                "operation": {"operation": "DIAG", "nodes": nodes}})
            assert status == 201, r
            tids.append(r["taskId"])
            await w.wait_state(r["taskId"], {TaskState.SUCCEEDED})
        status, r = await api.call("POST", "v1/operations", json={
            "target": {"msisdn": dev.msisdn},
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        query_tid = r["taskId"]
        await w.wait_state(query_tid, {TaskState.SUCCEEDED})
        # the device's latest DIAG results, newest first (by DevId or bare IMEI)
        for ident in (dev.dev_id, dev.dev_id[5:]):
            status, page = await api.call("GET", "v1/diagnostics", params={"devId": ident})
            assert status == 200, page
            assert [d["taskId"] for d in page["items"]] == tids[::-1]
            assert page["nextCursor"] is None
        newest = page["items"][0]
        assert newest["status"] == "SUCCEEDED" and newest["devId"] == dev.dev_id
        assert newest["nodes"] == ["./DevInfo/Lang", "./DevDetail/FwV"]
        assert set(newest["values"]) == {"./DevInfo/Lang", "./DevDetail/FwV"}
        assert newest["values"]["./DevInfo/Lang"] == "en-US"
        assert all(code == 200 for code in newest["statuses"].values())
        status, page = await api.call("GET", "v1/diagnostics",
                                      params={"devId": dev.dev_id, "limit": "1"})
        assert [d["taskId"] for d in page["items"]] == [tids[1]]
        # one task
        status, page = await api.call("GET", "v1/diagnostics", params={"taskId": tids[0]})
        assert status == 200 and [d["taskId"] for d in page["items"]] == [tids[0]]
        assert page["items"][0]["values"] == {"./DevInfo/Mod": page["items"][0]["values"][
            "./DevInfo/Mod"]}
        for params, code, where in (({}, 400, "devId"),
                                    ({"taskId": query_tid}, 400, "taskId"),
                                    ({"taskId": "t-nope"}, 404, "taskId"),
                                    ({"devId": "IMEI:404"}, 404, "devId"),
                                    ({"devId": dev.dev_id, "limit": "500"}, 400, "limit"),
                                    ({"dev_id": dev.dev_id}, 400, "dev_id")):
            status, err = await api.call("GET", "v1/diagnostics", params=params)
            assert_error(err, status, code, where)
    with_api(tmp_path, scenario, n=1)


def test_task_history_is_paged_and_answers_are_camel_case(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        dev = w.device(0)
        await w.register(dev)
        status, r = await api.call("POST", "v1/operations", json={
            "target": {"devId": dev.dev_id}, "bOptin": False, "testCycle": True,
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        assert status == 201
        tid = r["taskId"]
        await w.wait_state(tid, {TaskState.SUCCEEDED})
        status, t = await api.call("GET", f"v1/tasks/{tid}")
        assert status == 200
        assert t["taskId"] == tid and t["devId"] == dev.dev_id and t["status"] == "SUCCEEDED"
        assert t["operation"] == "QUERY" and t["op"] == {"operation": "QUERY",
                                                          "nodes": ["./DevInfo/Mod"]}
        assert t["testCycle"] is True and t["bOptin"] is False
        assert t["acceptDevicePolicy"] == 10 and t["finished"] >= t["created"]
        assert set(t["result"]) == {"statuses", "fumoResult", "nodes", "message"}

        def no_snake(v: Any, path: str = "$") -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    if not k.startswith("./") and not k[:1].isupper():   # node URIs, commands
                        assert "_" not in k, f"{path}.{k}"
                    no_snake(x, f"{path}.{k}")
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    no_snake(x, f"{path}[{i}]")
        no_snake(t)
        items, cursor, pages = [], None, 0
        while True:
            params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
            status, page = await api.call("GET", f"v1/tasks/{tid}/history", params=params)
            assert status == 200 and len(page["items"]) <= 1
            items += page["items"]
            pages += 1
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert pages >= len(items) >= 3
        assert items[0]["toState"] == "PENDING" and items[0]["fromState"] is None
        assert items[-1]["toState"] == "SUCCEEDED"
        assert [h["seq"] for h in items] == list(range(1, len(items) + 1))
        no_snake(items)
        status, err = await api.call("GET", "v1/tasks/t-nope/history")
        assert_error(err, status, 404, "taskId")
        status, err = await api.call("GET", f"v1/tasks/{tid}/history", params={"limit": "x"})
        assert_error(err, status, 400, "limit")
        # the one error shape for what is not a route or not a method of one
        status, err = await api.call("GET", "v1/nothing-here")
        assert_error(err, status, 404, None)
        status, err = await api.call("PUT", "v1/operations", json={})
        assert_error(err, status, 405, None)
        # a service error names the field in the body's names
        status, err = await api.call("POST", "v1/operations", json={
            "target": {"devId": "IMEI:404"},
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        assert_error(err, status, 404, "target.devId")
        status, err = await api.call("POST", "v1/operations", json={
            "target": {"dev_id": dev.dev_id},
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        assert_error(err, status, 400, "$.target.dev_id")
        status, err = await api.call("POST", "v1/operations", json={
            "target": {"devId": dev.dev_id}, "acceptDevicePolicy": 40,
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        assert_error(err, status, 400, "acceptDevicePolicy")   # no carrier callback: refused now
    with_api(tmp_path, scenario, n=1)

