"""Issue 18: the LMDB store must never answer a caller "done" for a write that is not on disk.
Two failures are injected into a real LMDB environment: a commit that fails with an I/O error
(the file may not grow: RLIMIT_FSIZE, as on a full disk) and an exception in the writer thread
itself.  Mutants that answered either as success went unnoticed before."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from dmengine.errors import NotFound, StoreError
from dmengine.model import Job
from dmengine.store.lmdb import LmdbStore

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Run in a child: the file-size limit applies to the whole process.
_CHILD = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from dmengine.errors import StoreError
    from dmengine.model import Job
    from dmengine.store.lmdb import LmdbStore

    async def main(path):
        s = LmdbStore(path)
        await s.create_job(Job(job_id="before"))
        data = os.path.join(path, "data.mdb")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails: EFBIG
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(data), hard))
        big = "x" * 1000                                  # 300 jobs: ~80 new pages
        res = await asyncio.gather(*(s.create_job(Job(job_id=f"j{i}", cause=big))
                                     for i in range(300)), return_exceptions=True)
        out = {"ok": [r.job_id for r in res if isinstance(r, Job)],
               "errors": sorted({f"{type(r).__name__}: {r}" for r in res
                                 if isinstance(r, BaseException)}),
               "other": [repr(r) for r in res
                         if not isinstance(r, (Job, BaseException))]}
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await s.create_job(Job(job_id="after"))           # the store works on afterwards
        await s.close()
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
""")


def test_a_commit_that_fails_on_disk_is_an_error_for_every_caller(tmp_path):
    env_dir = tmp_path / "env"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(env_dir)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["other"] == [], out["other"]          # every caller got a job or an error
    assert out["errors"], "the file-size limit never stopped a commit"
    assert all(e.startswith("StoreError: LMDB write failed") for e in out["errors"]), out["errors"]

    async def check() -> None:
        s = LmdbStore(env_dir)
        try:
            for jid in ("before", "after", *out["ok"]):
                await s.get_job(jid)                   # every acknowledged write is there
            failed = {f"j{i}" for i in range(300)} - set(out["ok"])
            assert failed
            for jid in failed:                          # and no refused one
                with pytest.raises(NotFound):
                    await s.get_job(jid)
            assert (await s.counts())["jobs"] == 2 + len(out["ok"])
        finally:
            await s.close()
    asyncio.run(check())


def test_an_exception_in_the_writer_thread_fails_its_batch_only(tmp_path):
    async def main() -> None:
        s = LmdbStore(tmp_path / "env")
        real_run = s._run
        broken = [True]

        def run(batch):                      # a bug in the writer, once
            if broken and broken.pop():
                raise RuntimeError("writer bug")
            return real_run(batch)
        s._run = run                         # type: ignore[method-assign]
        try:
            with pytest.raises(StoreError, match="store writer failed: RuntimeError"):
                await s.create_job(Job(job_id="lost"))
            assert await s.create_job(Job(job_id="kept"))    # the writer is alive
            with pytest.raises(NotFound):
                await s.get_job("lost")
            assert (await s.get_job("kept")).job_id == "kept"
            assert s.health_problem() is None if hasattr(s, "health_problem") else True
        finally:
            await s.close()
    asyncio.run(main())
    assert os.path.exists(tmp_path / "env")
