"""Issue 14: "A device that connects on its own runs its pending job task then" — through the
real engine (LMDB, device port over HTTP) and the simulator: a job paced so that it has not
reached the device yet; the device opens a session by itself (alert 1201) and its task runs in
that session, ahead of the job's order, once; the other targets keep their order and nobody
gets two tasks."""
from __future__ import annotations

import asyncio
import time

from dmengine.model import JobState, QueryOp, Selection, Stage, TaskState
from dmengine.store.base import all_pages

from test_broker_e2e import World, run_world
from test_jobs import FAST, register_all

J = JobState
S = TaskState


async def tasks_of(w: World, job_id: str) -> list:
    return await all_pages(lambda c: w.broker.jobs.tasks_of(job_id, cursor=c, limit=300))


def test_a_device_that_connects_on_its_own_runs_its_pending_target(tmp_path):
    n = 40

    async def scenario(w: World) -> None:
        ids = await register_all(w, n)
        w.silent.update(w.device(i).msisdn for i in range(n))       # every phone is off
        job = await w.broker.jobs.create(QueryOp(nodes=["./DevInfo/Mod"]),
                                         Selection(capability="cap-ex100"), rate_limit=0.5)
        await asyncio.sleep(0.3)
        before = await w.store.get_job(job.job_id)
        assert before.total < 5                  # pacing is far from the last devices
        late = w.device(n - 1)
        assert job.job_id in await w.store.pending_job_targets(late.dev_id)
        await w.fleet.run_session(late, alert=1201)   # the phone comes by itself
        mine = [t for t in await tasks_of(w, job.job_id) if t.dev_id == late.dev_id]
        assert len(mine) == 1
        made = w.engine.task_metrics.created.get("QUERY", 0)
        assert made == (await w.store.get_job(job.job_id)).total      # early ones counted too
        done = await w.wait_state(mine[0].task_id, {S.SUCCEEDED, S.FAILED})
        assert done.state == S.SUCCEEDED, done.cause
        assert await w.store.pending_job_targets(late.dev_id) == []
        # a second session of the same device starts nothing new
        await w.fleet.run_session(late, alert=1201)
        mine = [t for t in await tasks_of(w, job.job_id) if t.dev_id == late.dev_id]
        assert len(mine) == 1
        after = await w.store.get_job(job.job_id)
        assert after.total >= before.total + 1
        # the job's targets are still every device once: the late one traded places
        targets = await w.store.job_targets(job.job_id, 0, n)
        assert sorted(targets) == sorted(ids)
        made = {t.dev_id for t in await tasks_of(w, job.job_id)}
        assert set(targets[:after.total]) >= made - {late.dev_id} and late.dev_id in targets[:after.total]
        # the rest still come in the job's order, each once
        w.silent.clear()
        await w.broker.jobs.restart(job.job_id) if after.state == J.PAUSED else None
        await w.store.update_job(job.job_id, {"rate_limit": None})
        end = time.monotonic() + 60
        while (j := await w.store.get_job(job.job_id)).state == J.RUNNING and time.monotonic() < end:
            await asyncio.sleep(0.05)
        per_device = sorted(t.dev_id for t in await tasks_of(w, job.job_id))
        assert per_device == sorted(ids)

    run_world(tmp_path, scenario, n=n, broker=FAST)


def test_no_early_start_when_the_job_is_paused_or_its_stage_is_full(tmp_path):
    n = 40

    async def scenario(w: World) -> None:
        await register_all(w, n)
        w.silent.update(w.device(i).msisdn for i in range(n))
        staged = await w.broker.jobs.create(
            QueryOp(nodes=["./DevInfo/Mod"]), Selection(capability="cap-ex100"),
            stages=[Stage(percent=5, success_threshold=0.9), Stage(percent=100)])
        await asyncio.sleep(0.3)
        j = await w.store.get_job(staged.job_id)
        assert j.total == 2                       # 5 % of 40: the stage is full
        late = w.device(n - 1)
        await w.fleet.run_session(late, alert=1201)
        assert not [t for t in await tasks_of(w, staged.job_id) if t.dev_id == late.dev_id]
        await w.broker.jobs.cancel(staged.job_id)

        paced = await w.broker.jobs.create(QueryOp(nodes=["./DevInfo/Mod"]),
                                           Selection(capability="cap-ex100"), rate_limit=0.5)
        await w.broker.jobs.pause(paced.job_id)
        await w.fleet.run_session(late, alert=1201)
        assert not [t for t in await tasks_of(w, paced.job_id) if t.dev_id == late.dev_id]
        assert paced.job_id in await w.store.pending_job_targets(late.dev_id)
        await w.broker.jobs.restart(paced.job_id)
        await w.fleet.run_session(late, alert=1201)
        mine = [t for t in await tasks_of(w, paced.job_id) if t.dev_id == late.dev_id]
        assert len(mine) == 1
        # a job that ended leaves no pending target behind once the device came
        other = w.device(n - 2)
        assert staged.job_id in await w.store.pending_job_targets(other.dev_id)
        await w.fleet.run_session(other, alert=1201)
        assert staged.job_id not in await w.store.pending_job_targets(other.dev_id)

    run_world(tmp_path, scenario, n=n, broker=FAST)


def test_an_ended_jobs_rate_does_not_fall_with_time():
    """view(): the rate of a job that ended is over its run (started → finished), so two reads
    of it agree; a running job's is over started → now."""
    from dmengine.bulk import view
    from dmengine.model import Job
    done = Job(job_id="j", state=J.COMPLETED, targets=10, total=10,
               counts={S.SUCCEEDED: 10}, started=100.0, finished=110.0)
    assert view(done, 120.0).rate == view(done, 5000.0).rate == 1.0
    assert view(done, 120.0).eta_s is None
    running = Job(job_id="r", state=J.RUNNING, targets=10, total=5,
                  counts={S.SUCCEEDED: 5}, started=100.0)
    assert view(running, 110.0).rate == 0.5 and view(running, 110.0).eta_s == 10.0
