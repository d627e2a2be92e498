"""Issue 18: the cancelTask route must cancel (a mutant that only read the task and answered
with its state went unnoticed), over real HTTP against the real engine: the stored task, its
history and the phone's next session all show it."""
from __future__ import annotations

from dmengine.model import QueryOp, TaskState

from test_api_routes import Api, assert_error, with_api
from test_broker_e2e import World

S = TaskState


def test_cancel_task_route_cancels_the_stored_task(tmp_path):
    async def scenario(w: World, api: Api) -> None:
        dev = w.device(0)
        await w.register(dev)
        w.silent.add(dev.msisdn)                     # the phone is off: the task stays open
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn)
        before = await w.store.get_task(tid)
        assert before.state in (S.PENDING, S.NOTIFIED)
        status, body = await api.call("POST", f"v1/tasks/{tid}/cancel")
        assert status == 200, body
        assert body == {"taskId": tid, "status": "CANCELLED"}
        stored = await w.store.get_task(tid)
        assert stored.state == S.CANCELLED and stored.cause == "cancelled by the caller"
        status, got = await api.call("GET", f"v1/tasks/{tid}")
        assert status == 200 and got["status"] == "CANCELLED", got
        status, hist = await api.call("GET", f"v1/tasks/{tid}/history")
        assert status == 200
        last = hist["items"][-1]
        assert (last["fromState"], last["toState"]) == (before.state.value, "CANCELLED"), last
        assert last["cause"] == "cancelled by the caller"
        # a final task is a 409, an unknown one a 404, each naming the task
        status, err = await api.call("POST", f"v1/tasks/{tid}/cancel")
        assert_error(err, status, 409, "taskId")
        status, err = await api.call("POST", "v1/tasks/no-such-task/cancel")
        assert_error(err, status, 404, "taskId")
        # the phone comes back: nothing is run for the cancelled task
        w.silent.discard(dev.msisdn)
        rep = await w.fleet.run_session(dev, alert=1201)
        assert rep.outcome == "completed", rep
        after = await w.store.get_task(tid)
        assert after.state == S.CANCELLED and after.result is None
        assert len((await w.broker.get_task_history(tid))) == len(hist["items"])
    with_api(tmp_path, scenario)
