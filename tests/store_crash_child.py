"""Writer child for tests/test_store_crash.py: ``python store_crash_child.py ENV_DIR RUN_ID``.

Opens the LMDB store (the real group-commit path), makes sure job ``crashjob`` exists, then
runs many concurrent workers, each creating tasks and moving them through states.  After every
acknowledged write it prints one line (flushed) to stdout:

    C <task_id>            the task was created (history entry 1)
    T <task_id> <n>        the task's n-th history entry was written

The parent kills the process with SIGKILL at a random moment and then checks that every line it
read is in the store.  Runs until killed (or for ``--max-seconds``).
"""
from __future__ import annotations

import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dmengine.errors import AlreadyExists  # noqa: E402
from dmengine.model import Job, QueryOp, Task, TaskState  # noqa: E402
from dmengine.store.lmdb import LmdbStore  # noqa: E402

PATH = [TaskState.NOTIFIED, TaskState.IN_PROGRESS, TaskState.PENDING, TaskState.NOTIFIED,
        TaskState.IN_PROGRESS, TaskState.SUCCEEDED]


async def main(path: str, run_id: str, workers: int, max_seconds: float) -> None:
    # a small initial map so that map growth happens under the kills too
    store = LmdbStore(path, map_size=1 << 20, batch_size=500, max_delay=0.001)
    out = sys.stdout
    try:
        await store.create_job(Job(job_id="crashjob"))
    except AlreadyExists:
        pass
    print("READY", flush=True)
    deadline = time.monotonic() + max_seconds
    rnd = random.Random(run_id)

    async def worker(w: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            tid = f"{run_id}-{w}-{n}"
            n += 1
            t = Task(task_id=tid, dev_id=f"IMEI:{rnd.randrange(10**14, 10**15)}",
                     job_id="crashjob" if n % 3 else None,
                     op=QueryOp(nodes=["./DevInfo/Mod"]), test_cycle=(n % 7 == 0),
                     next_attempt=time.time() + 60, deadline=time.time() + 3600)
            await store.create_task(t)
            out.write(f"C {tid}\n")
            out.flush()
            for i, st in enumerate(PATH[: rnd.randrange(1, len(PATH) + 1)]):
                await store.transition(tid, st, cause=f"step {i}", dm_status=200)
                out.write(f"T {tid} {i + 2}\n")
                out.flush()

    await asyncio.gather(*(worker(w) for w in range(workers)))
    await store.close()


if __name__ == "__main__":
    env_dir, run = sys.argv[1], sys.argv[2]
    nworkers = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    secs = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
    asyncio.run(main(env_dir, run, nworkers, secs))
