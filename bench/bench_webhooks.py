"""Webhooks benchmark (issue 15): deliveries per second from the outbox to a local receiver.

A receiver (aiohttp, its own process on loopback: its CPU is not the dispatcher's) answers
204 to every POST and counts.  The dispatcher (:class:`dmengine.webhooks.Webhooks` over a real
LMDB store, ``concurrency`` deliveries under way) is given ``N`` task events already in the
outbox and timed from its start until the receiver has counted every delivery and the outbox is
empty again (each delivery: claimed with a lease, fanned out in one write, signed, POSTed,
acknowledged in another write — every write durable).

Cases: one subscriber (N deliveries); four subscribers (one event, four deliveries: N
deliveries from N/4 events).  Baseline, in the same run: a bare aiohttp client POSTing the
same bodies to the same receiver with the same concurrency (no store, no signature) — what the
HTTP part alone costs.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import aiohttp
import uvloop

from bench.common import Row, write_results
from dmengine.model import OutboxEntry, new_id
from dmengine.store.lmdb import LmdbStore
from dmengine.urlguard import UrlGuard
from dmengine.webhooks import WebhookConfig, Webhooks

NAME = "webhooks"
CONCURRENCY = 64

RECEIVER = r"""
import asyncio, sys
from aiohttp import web
import uvloop
count = 0
async def hook(request):
    global count
    await request.read()
    count += 1
    return web.Response(status=204)
async def stats(request):
    return web.json_response({"count": count})
async def main():
    app = web.Application()
    app.router.add_post("/hook/{n}", hook)
    app.router.add_get("/count", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def _count(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/count") as r:
        return int((await r.json())["count"])


async def _wait_count(http: aiohttp.ClientSession, base: str, target: int,
                      timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while await _count(http, base) < target:
        if time.monotonic() > end:
            raise RuntimeError("the receiver did not get every delivery")
        await asyncio.sleep(0.01)


async def dispatcher_case(base: str, n_events: int, subscribers: int) -> tuple[float, int]:
    """(seconds, deliveries) for ``n_events`` events fanned out to ``subscribers``."""
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        store = LmdbStore(os.path.join(tmp, "store"))
        hooks = Webhooks(store, UrlGuard(allow_private=True),
                         WebhookConfig(concurrency=CONCURRENCY, batch=1000, poll_interval=0.005,
                                       timeout=30.0))
        for k in range(subscribers):
            await hooks.create_subscription(f"{base}/hook/{k}", ["task"], owner="bench",
                                            all_owners=True)
        body = {"type": "task.finished", "time": time.time(), "task_id": "t", "job_id": None,
                "dev_id": "IMEI:356938035643809", "owner": "bench", "operation": "QUERY",
                "state": "SUCCEEDED", "cause": "all commands succeeded", "dm_status": None,
                "result_code": None, "test_cycle": False, "attempts": 1,
                "result": {"nodes": {"./DevInfo/Mod": "EX100"}}}
        chunk = 2000
        for i in range(0, n_events, chunk):
            await asyncio.gather(*(store.enqueue(OutboxEntry(
                entry_id=new_id("ev"), kind="webhook", topic="task", due=0.0,
                payload={**body, "task_id": f"t{j}"})) for j in range(i, min(n_events, i + chunk))))
        async with aiohttp.ClientSession() as http:
            before = await _count(http, base)
            t0 = time.perf_counter()
            hooks.start()
            await _wait_count(http, base, before + n_events * subscribers)
            while await store.due_entries(time.time() + 3600, limit=1):
                await asyncio.sleep(0.005)          # every delivery acknowledged
            dt = time.perf_counter() - t0
        assert hooks.counts["delivered"] == n_events * subscribers, hooks.counts
        await hooks.stop()
        await store.close()
    return dt, n_events * subscribers


async def bare_case(base: str, n: int) -> float:
    """Seconds for ``n`` POSTs of a delivery-sized body, ``CONCURRENCY`` at a time."""
    payload = json.dumps({"eventId": new_id("ev"), "type": "task.finished", "time": time.time(),
                          "subscriptionId": new_id("s"), "data": {"taskId": "t"}}).encode()
    payload += b" " * max(0, 420 - len(payload))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:
        before = await _count(http, base)
        it = iter(range(n))

        async def worker() -> None:
            for _ in it:
                async with http.post(f"{base}/hook/0", data=payload,
                                     headers={"Content-Type": "application/json"}) as r:
                    await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        dt = time.perf_counter() - t0
        assert await _count(http, base) == before + n
    return dt


def measure(quick: bool = False) -> list[Row]:
    """The rows (``bench_api`` may add them to api.json: issue 15 names them there too)."""
    n = 2_000 if quick else 20_000
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"

        async def main() -> list[Row]:
            await bare_case(base, min(n, 2_000))                      # warm up
            bare_dt = await bare_case(base, n)
            bare = n / bare_dt
            one_dt, one_n = await dispatcher_case(base, n, 1)
            four_dt, four_n = await dispatcher_case(base, n // 4, 4)
            case = f"{n:,} deliveries to a local receiver (concurrency {CONCURRENCY})"
            return [
                Row.versus(f"{case}, 1 subscriber", "webhook deliveries per second",
                           round(one_n / one_dt, 1), "1/s", "bare aiohttp POSTs, same receiver",
                           round(bare, 1)),
                Row.versus(f"{case}, 4 subscribers per event", "webhook deliveries per second",
                           round(four_n / four_dt, 1), "1/s",
                           "bare aiohttp POSTs, same receiver", round(bare, 1)),
                Row(f"{case}, 1 subscriber", "time to deliver and acknowledge all",
                    round(one_dt, 3), "s"),
            ]
        return uvloop.run(main())
    finally:
        proc.terminate()
        proc.wait(10)


def run(quick: bool = False) -> None:
    write_results(NAME, measure(quick))


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
