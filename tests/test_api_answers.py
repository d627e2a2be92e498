"""Issue 15 (the getTaskById benchmark): what the API's fast path keeps between calls must
never show a stale or foreign answer, and the one middleware must answer as the two it
replaced.  Over real HTTP against the real engine (test_broker_e2e's World).
"""
from __future__ import annotations

import msgspec

from dmengine.model import TaskState, redact_task
from dmengine.wsi import deployments
from dmengine.wsi.schemas import task_data
from test_api_routes import Api, assert_error, with_api
from test_broker_e2e import World


def _built(task) -> bytes:
    """The answer made from the record with no reuse at all."""
    return msgspec.json.encode(task_data(redact_task(task)))


def test_get_task_by_id_reuses_an_answer_only_for_the_same_record(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        dev = w.device(0)
        await w.register(dev)
        status, r = await api.call("POST", "v1/operations", json={
            "target": {"devId": dev.dev_id},
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        assert status == 201
        tid = r["taskId"]
        await w.wait_state(tid, {TaskState.SUCCEEDED})    # final: the record stays put
        url = w.engine.api_url + f"v1/tasks/{tid}"
        headers = {"X-API-Key": w.engine.api_key}
        raw = []
        for _ in range(2):
            async with api.http.get(url, headers=headers) as resp:
                assert resp.status == 200
                raw.append(await resp.read())
        record = await w.engine.store.get_task(tid)
        assert raw[0] == raw[1] == _built(record)
        assert deployments._ANSWERS[tid][1] == raw[1]
        # the record changes (a real store write): the next read answers the new record,
        # not the kept bytes
        await w.engine.store.update_task(msgspec.structs.replace(record, cause="changed"))
        async with api.http.get(url, headers=headers) as resp:
            fresh = await resp.read()
        record = await w.engine.store.get_task(tid)
        assert record.cause == "changed"
        assert fresh == _built(record) and fresh != raw[0]
        assert msgspec.json.decode(fresh)["cause"] == "changed"
        # an entry whose record differs in any field (here: another store's task of the
        # same id) is not used, and is replaced by the answer of the record read
        other = msgspec.structs.replace(record, attempts=record.attempts + 7)
        deployments._ANSWERS[tid] = (other, b'{"stale":true}')
        status, got = await api.call("GET", f"v1/tasks/{tid}")
        assert status == 200 and got["attempts"] == record.attempts and "stale" not in got
        assert deployments._ANSWERS[tid][0] == record
    with_api(tmp_path, scenario)


def test_answers_kept_are_bounded(tmp_path, monkeypatch):
    from dmengine.bounded import BoundedDict
    monkeypatch.setattr(deployments, "_ANSWERS", BoundedDict(2))

    async def scenario(w: World, api: Api) -> None:
        dev = w.device(0)
        await w.register(dev)
        tids = []
        for _ in range(3):
            status, r = await api.call("POST", "v1/operations", json={
                "target": {"devId": dev.dev_id},
                "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
            assert status == 201
            tids.append(r["taskId"])
            status, t = await api.call("GET", f"v1/tasks/{r['taskId']}")
            assert status == 200 and t["taskId"] == r["taskId"]
        assert list(deployments._ANSWERS) == tids[1:]       # the oldest went
    with_api(tmp_path, scenario)


def test_one_middleware_keeps_auth_first_error_shape_and_role_labels(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        reg = w.engine.registry

        def count(route: str, status: str, role: str) -> float:
            return reg.get_sample_value("dmengine_api_requests_total",
                                        {"route": route, "status": status, "role": role}) or 0

        # no key: a 401 before anything, for a route and for a path no route has
        status, body = await api.call("GET", "v1/tasks/t-nope", headers={"X-API-Key": ""})
        assert_error(body, status, 401, "X-API-Key")
        status, body = await api.call("GET", "v1/nowhere", headers={"X-API-Key": ""})
        assert_error(body, status, 401, "X-API-Key")
        assert count("getTaskById", "401", "anonymous") == 1
        # with the key: the error shape naming the field, counted with the caller's role
        status, body = await api.call("GET", "v1/tasks/t-nope")
        assert_error(body, status, 404, "taskId")
        assert count("getTaskById", "404", "admin") == 1
        status, body = await api.call("GET", "v1/nowhere")
        assert_error(body, status, 404, None)
        assert count("unmatched", "404", "admin") == 1
        status, body = await api.call("PUT", "v1/operations")
        assert_error(body, status, 405, None)
        # public routes need no key and are anonymous
        status, _ = await api.call("GET", "health", headers={"X-API-Key": ""})
        assert status == 200
        assert count("health", "200", "anonymous") == 1
        # a viewer is refused an operator's route (403, anonymous: it did not run) and
        # counted with its role on one it may call
        status, k = await api.call("POST", "v1/keys", json={"name": "oss", "role": "viewer"})
        assert status == 201
        viewer = {"X-API-Key": k["apiKey"]}
        status, body = await api.call("POST", "v1/operations", headers=viewer, json={
            "target": {"devId": "IMEI:356938035643809"},
            "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}})
        assert_error(body, status, 403, "role")
        assert count("doOperation", "403", "anonymous") == 1
        status, body = await api.call("GET", "v1/tasks/t-nope", headers=viewer)
        assert_error(body, status, 404, "taskId")       # not the viewer's: as if missing
        status, _ = await api.call("GET", "v1/jobs", headers=viewer)
        assert status == 200
        assert count("getJobs", "200", "viewer") == 1
    with_api(tmp_path, scenario)
