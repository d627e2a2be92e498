"""The device port over several processes (L6): ``serve --device-processes N``.

Python runs one thread at a time in a process, so the device sessions of a busy campaign
(HTTP, the codecs, the session engine, the handler) reach a second core only in a second
process.  The main process (the one ``serve`` started, which alone runs the API, the
scheduler and the webhooks) listens on the device port with ``SO_REUSEPORT`` and starts
``N - 1`` device processes that listen on the same port: the kernel spreads new connections
over them.  What they share is the store: LMDB serialises their writes, and each process's
read cache forgets what the others wrote (the written-keys log, dmengine/store/lmdb.py).  A
session lives in the process that began it, so the RespURIs each process hands out name a
port of its own (``ServerConfig.session_port``).

A device process is ``python -m dmengine.devprocs``, its configuration pickled on its
standard input (never on its command line, where other users of the machine could read it;
it comes from the main process only) — an ``EngineConfig`` with role ``device``.  When it
listens it prints one line of JSON (``pid``, ``session_port``, ``metrics_port``) and keeps
its standard input open: at end of file (the main process is gone, however it went) it
stops, as it does on SIGTERM.  Its metrics are served on a loopback port for the main
process, whose ``/metrics`` adds them to its own (``metrics.MergedRegistry``).  One that
exits unasked is started again after a pause (1 s, doubling up to 30 s).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import pickle
import signal
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    from .engine import Engine, EngineConfig

log = logging.getLogger("dmengine.devprocs")

START_TIMEOUT = 60.0          #: seconds a device process has to say it listens
RESTART_PAUSES = (1.0, 30.0)  #: first and longest pause before a dead one is started again
SCRAPE_TIMEOUT = 2.0          #: seconds the main /metrics waits for a device process's


class DeviceProcess:
    """One device process as the main process sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.session_port: int | None = None
        self.metrics_port: int | None = None
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None \
            and self.metrics_port is not None


class DeviceProcesses:
    """Starts, watches and stops the device processes of a main process."""

    def __init__(self, config: EngineConfig, count: int, *,
                 on_lost: Callable[[set[str]], Awaitable[Any]] | None = None) -> None:
        self.config = config
        #: called when one exited unasked, with the tasks the live ones' sessions hold: the
        #: main process puts the tasks of the sessions that were lost back (Scheduler.recover)
        self.on_lost = on_lost
        self.procs = [DeviceProcess(i + 1) for i in range(count)]
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._session: Any = None          # aiohttp client for the scrapes

    async def start(self) -> None:
        """Starts every device process and waits until each listens (ConfigError if one
        cannot: its own error is on the standard error stream they share)."""
        try:
            await asyncio.gather(*(self._spawn(p) for p in self.procs))
        except BaseException:
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(p)) for p in self.procs]

    async def _spawn(self, p: DeviceProcess) -> None:
        p.metrics_port = p.session_port = None
        pkg_parent = str(pathlib.Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_parent, env.get("PYTHONPATH")) if x)
        proc = p.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dmengine.devprocs", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(pickle.dumps((self.config, p.index, logging.getLogger().level)))
        await proc.stdin.drain()              # (kept open: its end stops the process)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
            info = json.loads(line)
        except (asyncio.TimeoutError, ValueError):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise ConfigError(f"device process {p.index} did not start (exit status "
                              f"{proc.returncode}; its error is above)",
                              key="device_processes") from None
        p.session_port = int(info["session_port"])
        p.metrics_port = int(info["metrics_port"])
        log.info("device process %d (pid %d) listens; its sessions on port %d",
                 p.index, proc.pid, p.session_port)

    async def _watch(self, p: DeviceProcess) -> None:
        while True:
            assert p.proc is not None
            code = await p.proc.wait()
            if self._stopping:
                return
            p.metrics_port = None
            log.error("device process %d (pid %d) exited with status %s: starting it again "
                      "(the sessions it held are lost; their tasks are due again)",
                      p.index, p.proc.pid, code)
            await self._recover(p)
            if not await self._respawn(p):
                return

    async def _recover(self, p: DeviceProcess) -> None:
        """The job tasks of the sessions the exited process held go back to PENDING."""
        if self.on_lost is None:
            return
        try:
            held = await self.running_tasks()
            if held is None:
                log.error("device process %d: its sessions' tasks not recovered: a live "
                          "device process did not say which tasks its sessions hold", p.index)
            else:
                await self.on_lost(held)
        except Exception:
            log.exception("device process %d: its sessions' tasks not recovered", p.index)

    async def _respawn(self, p: DeviceProcess) -> bool:
        """Starts ``p`` again after a pause that doubles while it cannot start; False when
        the main process stops meanwhile."""
        pause = RESTART_PAUSES[0]
        while True:
            await asyncio.sleep(pause)
            if self._stopping:
                return False
            try:
                await self._spawn(p)
            except ConfigError as exc:
                log.error("%s; trying again in %.0f s", exc, min(pause * 2, RESTART_PAUSES[1]))
                pause = min(pause * 2, RESTART_PAUSES[1])
                continue
            p.restarts += 1
            return True

    async def stop(self, deadline: float | None = None) -> None:
        """SIGTERM to each (they finish their sessions, like this process), then SIGKILL
        to any still running ``deadline`` seconds (the shutdown deadline + 5) later."""
        self._stopping = True
        if deadline is None:
            deadline = float(self.config.server_overrides.get("shutdown_deadline", 10.0)) + 5
        live = [p.proc for p in self.procs if p.proc is not None and p.proc.returncode is None]
        for proc in live:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if live:
            await asyncio.wait([asyncio.ensure_future(q.wait()) for q in live],
                               timeout=deadline)
            for proc in live:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def health(self) -> list[str]:
        """What is wrong, for ``/health``: device processes not running now."""
        return [f"device process {p.index} is not running (restarted {p.restarts} times)"
                for p in self.procs if not p.running]

    async def running_tasks(self) -> set[str] | None:
        """The tasks the sessions of the running device processes hold (None when one of
        them does not answer: then nobody can tell whose a task is)."""
        import aiohttp
        session = self._client()
        held: set[str] = set()
        for p in self.procs:
            if not p.running:
                continue
            try:
                async with session.get(f"http://127.0.0.1:{p.metrics_port}/running") as r:
                    if r.status != 200:
                        return None
                    held.update(await r.json())
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return None
        return held

    def _client(self) -> Any:
        import aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))
        return self._session

    async def scrape(self) -> list[str]:
        """The exposition text of each running device process's metrics (one that does not
        answer within SCRAPE_TIMEOUT is left out of this scrape)."""
        import aiohttp
        session = self._client()

        async def one(port: int) -> str | None:
            try:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                    return await r.text() if r.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None
        texts = await asyncio.gather(*(one(p.metrics_port) for p in self.procs
                                       if p.running and p.metrics_port is not None))
        return [t for t in texts if t is not None]


async def serve_metrics(engine: Engine) -> int:
    """A device process's metrics (``/metrics``) and the tasks its live sessions hold
    (``/running``, a JSON list of task ids) on a loopback port, for the main process;
    returns the port."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(engine.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    async def running(_request: web.Request) -> web.Response:
        assert engine.broker is not None
        held = [t for t in list(engine.broker.sessions.running)
                if engine.broker.sessions.in_session(t)]
        return web.json_response(held)
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/running", running)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine.metrics_runner = runner
    return int(runner.addresses[0][1])


async def _run(config: EngineConfig, index: int) -> None:
    from .engine import Engine
    from .server import tune_gc
    engine = Engine(config)
    await engine.start()
    tune_gc()
    assert engine.server is not None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def stdin_readable() -> None:         # end of file: the main process is gone
        try:
            gone = not os.read(0, 4096)
        except OSError:
            gone = True
        if gone:
            loop.remove_reader(0)
            stop.set()
    loop.add_reader(0, stdin_readable)
    print(json.dumps({"pid": os.getpid(), "index": index,
                      "session_port": engine.server.session_port,
                      "metrics_port": engine.metrics_port}), flush=True)
    try:
        await stop.wait()
    finally:
        await engine.stop()


def main() -> None:
    import uvloop

    from . import logs
    config, index, level = pickle.load(sys.stdin.buffer)    # from the main process only
    logs.setup(None, logging.getLevelName(level).lower()
               if logging.getLevelName(level).lower() in logs.LEVELS else None)
    uvloop.run(_run(config, index))


if __name__ == "__main__":
    main()
