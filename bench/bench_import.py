"""Device import through the API (importDeviceInstances) next to the store's own import.

The engine runs as a user runs it: ``python -m dmengine serve --data DIR`` in its own process,
ports picked by the OS, the API key read from what it prints.  A CSV file of N device rows
(DevId, IMEI, MSISDN, capability, a DM account with server id, client name and the client and
server keys) is written first; the timing covers streaming it to ``POST /v1/devices/import``
with aiohttp (chunked, 1 MiB reads) until the server's answer — parsing, validating, writing
and committing every row.  The same for an NDJSON file of the same devices.

Baseline: ``LmdbStore.import_devices`` of the same devices in this process (records built by a
generator inside the timing, as bench_store does), so the ratio is what HTTP, the streamed
parse and the per-row checks of the API cost on top of the store.  Both write into a fresh
LMDB environment of the same default size.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import msgspec
import uvloop

from bench.common import ROOT, Row, write_results
from dmengine.model import Device, DmAccount
from dmengine.store.lmdb import LmdbStore

NAME = "import"

HEADER = "dev_id,imei,msisdn,capability,server_id,client_name,client_key,server_key\n"
CLIENT_KEY = "DV4giKozqa1xsMX/tjaQjQ=="
SERVER_KEY = "qIUiuFQooZcVh8cn6FkGFQ=="


def _device(i: int) -> Device:
    imei = f"{356938000000000 + i}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=f"+49170{i:08d}",
                  capability="cap-x1",
                  account=DmAccount(server_id="acme-dms", client_name=f"dev{i}",
                                    client_key=CLIENT_KEY, server_key=SERVER_KEY))


def write_csv(path: str, n: int) -> int:
    with open(path, "w") as f:
        f.write(HEADER)
        for start in range(0, n, 10_000):
            f.write("".join(
                f"IMEI:{356938000000000 + i},{356938000000000 + i},+49170{i:08d},cap-x1,"
                f"acme-dms,dev{i},{CLIENT_KEY},{SERVER_KEY}\n"
                for i in range(start, min(n, start + 10_000))))
    return os.path.getsize(path)


def write_ndjson(path: str, n: int) -> int:
    """The same devices as NDJSON rows in the API's names (``devId``, ``account.serverId``…:
    dmengine.wsi.schemas), the unset fields left out."""
    enc = msgspec.json.Encoder()

    def row(i: int) -> bytes:
        d = _device(i)
        assert d.account is not None
        acc = {"serverId": d.account.server_id, "clientName": d.account.client_name,
               "clientKey": d.account.client_key, "serverKey": d.account.server_key}
        return enc.encode({"devId": d.dev_id, "imei": d.imei, "msisdn": d.msisdn,
                           "capability": d.capability, "account": acc})
    with open(path, "wb") as f:
        for start in range(0, n, 10_000):
            f.write(b"".join(row(i) + b"\n" for i in range(start, min(n, start + 10_000))))
    return os.path.getsize(path)


LINE = re.compile(r"^(API|API key): (\S+)$")


def start_server(data: str) -> tuple[subprocess.Popen[str], str, str]:
    p = subprocess.Popen([sys.executable, "-m", "dmengine", "serve", "--data", data,
                          "--device-port", "0", "--api-port", "0"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 60
    assert p.stdout is not None
    while "API key" not in seen:
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"dmengine serve printed only {seen}")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"dmengine serve exited with {p.wait()}")
        m = LINE.match(line.strip())
        if m:
            seen[m.group(1)] = m.group(2)
    return p, seen["API"], seen["API key"]


def stop_server(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def upload(api: str, key: str, path: str, media_type: str) -> tuple[float, dict[str, Any]]:
    async def body() -> Any:
        with open(path, "rb") as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    return
                yield block

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        t0 = time.perf_counter()
        async with s.post(api + "v1/devices/import", data=body(),
                          headers={"X-API-Key": key, "Content-Type": media_type}) as r:
            answer = await r.json()
            dt = time.perf_counter() - t0
            if r.status != 200:
                raise RuntimeError(f"import answered {r.status}: {answer}")
    return dt, answer


def api_import(base: str, path: str, media_type: str, n: int) -> tuple[float, float, float]:
    """(seconds, server peak RSS MB before, after) of one import into a fresh server."""
    data = os.path.join(base, f"var-{media_type.split('/')[1]}")
    p, api, key = start_server(data)
    try:
        before = peak_rss_mb(p.pid)
        secs, answer = uvloop.run(upload(api, key, path, media_type))
        after = peak_rss_mb(p.pid)
    finally:
        stop_server(p)
        shutil.rmtree(data, ignore_errors=True)
    if answer["created"] != n or answer["rejected"]:
        raise RuntimeError(f"import answer: {answer}")
    return secs, before, after


async def _store_import(path: str, n: int) -> float:
    s = LmdbStore(path)
    try:
        t0 = time.perf_counter()
        rep = await s.import_devices(_device(i) for i in range(n))
        dt = time.perf_counter() - t0
        assert rep.created == n and not rep.rejected
    finally:
        await s.close()
    return dt


def run(quick: bool) -> None:
    n = 50_000 if quick else 1_000_000
    load_before = os.getloadavg()
    base = tempfile.mkdtemp(prefix="bench-import-")
    rows: list[Row] = []
    try:
        csv_path = os.path.join(base, "devices.csv")
        csv_bytes = write_csv(csv_path, n)
        base_s = uvloop.run(_store_import(os.path.join(base, "baseline"), n))
        shutil.rmtree(os.path.join(base, "baseline"), ignore_errors=True)
        baseline = f"store.import_devices in-process, same {n:,} devices"
        api_s, rss0, rss1 = api_import(base, csv_path, "text/csv", n)
        case = f"import {n:,} devices through the API (CSV, {csv_bytes / 1e6:.0f} MB streamed)"
        rows.append(Row.versus(case, "wall time", round(api_s, 2), "s", baseline,
                               round(base_s, 2), higher_is_better=False))
        rows.append(Row.versus(case, "rows/s", round(n / api_s), "1/s", baseline,
                               round(n / base_s)))
        rows.append(Row(case, "server peak RSS", round(rss1, 1), "MB"))
        rows.append(Row(case, "server peak RSS before the import", round(rss0, 1), "MB"))
        os.unlink(csv_path)
        nd_path = os.path.join(base, "devices.ndjson")
        nd_bytes = write_ndjson(nd_path, n)
        nd_s, _, nd_rss = api_import(base, nd_path, "application/x-ndjson", n)
        case = f"import {n:,} devices through the API (NDJSON, {nd_bytes / 1e6:.0f} MB streamed)"
        rows.append(Row.versus(case, "wall time", round(nd_s, 2), "s", baseline,
                               round(base_s, 2), higher_is_better=False))
        rows.append(Row.versus(case, "rows/s", round(n / nd_s), "1/s", baseline,
                               round(n / base_s)))
        rows.append(Row(case, "server peak RSS", round(nd_rss, 1), "MB"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    write_results(NAME, rows, load_average={"before": load_before, "after": os.getloadavg()},
                  quick=quick, rows_imported=n)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
