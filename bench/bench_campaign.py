"""The headline benchmark (issue 16): a firmware campaign over N devices, end to end.

Three processes on this machine, each started the way a user starts it:

* the server: ``python -m dmengine serve --data DIR --device-port 0 --api-port 0
  --gateway http:LISTENER`` (URLs and API key read from what it prints);
* the simulator: ``python -m dmengine simulate --listen HOST:PORT --devices N --url DEVICE``:
  the phones and their SMS centre.  The server's HTTP gateway posts every package 0 to its
  listener (``dmengine.simulator.pkg0http``), the notified device runs real HTTP DM sessions
  against the device port, downloads the package from the content URL the server names, and
  reports the result in a Generic Alert 1226; ``--fault-fail-update`` of the devices (2 %)
  report a failed update, ``--fault-drop`` of them (0.1 %) drop the connection half-way
  through a message and send it again.  The fleet is lazy: a device exists while it is in a
  session (a million ``VirtualDevice``\\ s do not fit in the simulator's share of memory);
* this process: the API client, the clock, and the /proc reader.

Per size N it: writes the fleet's import CSV (``fleet.registration_csv``, not timed),
registers the capability, imports the N devices through ``POST /v1/devices/import``
(timed), uploads a 4 KB firmware package through ``POST /v1/content`` and creates a FUMO
job over every device through ``POST /v1/jobs`` (``createDeployments``: UPDATE with that
content, selection by capability, no rate limit, a concurrency cap; timed), then polls
``GET /v1/jobs/{id}`` until every task is final, noting when 50 %, 99 % and 100 % were.
The job's counts must equal what the simulator did (its devices' update results and the
updates the server recorded: succeeded and failed), else the benchmark fails.

Reported per N: import s, job creation s, notifications/s, DM sessions/s, messages/s (device
→ server DM POSTs), time to 50 / 99 / 100 % final, server CPU s and peak RSS (/proc/PID of
the server), simulator CPU s, store bytes per device (DIR/store after the run / N), and the
cost per device against the smallest N (flat = linear).

Sizes: ``DMENGINE_CAMPAIGN_SIZES`` (comma-separated, default ``10000,100000,N``) where N is
``DMENGINE_CAMPAIGN_N`` (``make bench-campaign N=…``, default 1,000,000).  A size is run
only if the largest run so far projects it (linearly) under ``DMENGINE_CAMPAIGN_MAX_S``
seconds (default 1200); otherwise the projection is reported instead.  The job's
concurrency cap: ``DMENGINE_CAMPAIGN_CONCURRENCY`` (default :data:`DEFAULT_CONCURRENCY`,
chosen by the sweep ``DMENGINE_CAMPAIGN_SWEEP=1`` runs at 20,000 devices first: the fastest
of 1,000 / 2,000 / 4,000 / 6,000 is used).  ``DMENGINE_CAMPAIGN_SERVE_ARGS`` adds ``serve``
options (e.g. ``--scheduler-tick 0.1 --job-batch 500``); ``DMENGINE_CAMPAIGN_PROFILE`` records
the server with py-spy (:func:`profile_path`); ``DMENGINE_CAMPAIGN_KEEP=1`` keeps the data
directories.  ``--quick``: 2,000 devices, bench/results/campaign.json left alone when it exists.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

from bench.common import RESULTS, ROOT, Row, write_results

NAME = "campaign"
CAPABILITY = "cap-campaign"
FAIL_SHARE = 0.02            # devices whose update fails (FUMO result 410)
DROP_SHARE = 0.001           # devices that drop the connection mid-message once
FIRMWARE = bytes((i * 131 + 7) & 0xFF for i in range(4096))
#: the job's concurrency cap: 30,000-device runs on this host (load ~4 from other work, scheduler
#: pass every 0.25 s) completed at 723 tasks/s with 4,000 and 785 with 8,000, no 503s either
#: way; but 100,000 devices at 8,000 met the device port's pending cap (2,951 503s, 928 sessions
#: given up and notified again a minute later: 100 % at 277 s, 99 % at 176 s); at 2,000 and
#: the default 1 s pass: 625/s, no 503s
DEFAULT_CONCURRENCY = 4000
#: the device port's cap on connections from one address: every simulated phone connects
#: from 127.0.0.1 (a carrier's NAT looks the same)
CONNECTIONS_PER_ADDRESS = 20_000
#: scheduler pacing of `serve` (see the module's doc): a pass every 0.1 s starts the next
#: tasks sooner after others end than the default 1 s (with the job's window full, a pass
#: starts what ended since the last; 100,000 devices, wall seconds per simulator CPU-second:
#: 2.59 and 2.59 at 0.1 s, 2.64–2.78 in four runs at 0.25 s, 2.62 at 0.05 s).  Two device
#: processes (the machine's two cores; ``serve --device-processes``): 100,000 devices back
#: to back on the same host, 101 s with one and 81 s with two, server CPU 104 → 109 s, no
#: 503s (12,725 with one)
SERVE_ARGS: list[str] = ["--scheduler-tick", "0.1", "--device-processes", "2"]
POLL = 0.25                  # seconds between job polls
STALL_S = 180.0              # no task became final for this long: the run is stuck

SERVER_LINE = re.compile(r"^(device port|API|docs|metrics|health|content|API key): (\S+)$")
SIM_LINE = re.compile(r"^package 0 listener: (\S+)$")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(path: str) -> tuple[float, float, int, int]:
    """(user s, system s, minor faults, major faults) from a /proc ``stat`` file (a
    process's: its threads included; a thread's under ``task/``)."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7]),
            int(fields[9]))


def _stat_cpu_s(path: str) -> float:
    """User + system CPU seconds from a /proc ``stat`` file."""
    user, system, _, _ = proc_stat(path)
    return user + system


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, all) clock ticks of the machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks[:8])


def with_children(pid: int) -> list[int]:
    """``pid`` and its live child processes (the server's device processes,
    ``serve --device-processes``)."""
    out = [pid]
    for name in os.listdir("/proc"):
        if name.isdigit() and name != str(pid):
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue                   # ended meanwhile
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process and its children (threads included)."""
    total = 0.0
    for p in with_children(pid):
        try:
            total += _stat_cpu_s(f"/proc/{p}/stat")
        except OSError:
            pass
    return total


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a live process and its children; each process's own
    id is "MainThread" (the event loops, summed: their share is what bounds the server, the
    rest runs beside them).  Python does not name its other threads for the OS: they count
    under their comm (the program's name)."""
    out: dict[str, float] = {}
    for p in with_children(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/comm") as f:
                    name = f.read().strip()
                spent = _stat_cpu_s(f"/proc/{p}/task/{tid}/stat")
            except OSError:
                continue                       # the thread ended meanwhile
            if tid == str(p):
                name = "MainThread"
            out[name] = out.get(name, 0.0) + spent
    return out


def status_kb(pid: int, key: str) -> int:
    """A /proc status figure in kB, summed over the process and its children (VmHWM: the sum
    of each one's peak, an upper bound of the server's)."""
    total = 0
    for p in with_children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def du(path: str) -> int:
    """Bytes allocated on disk under ``path`` (as ``du``: sparse files count what they use)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def store_breakdown(path: str) -> dict[str, Any]:
    """Entries and bytes (pages × page size) of each named database of the LMDB store at
    ``path``, and the pages of the file no database uses (LMDB's free list: copy-on-write
    leaves old pages free for later transactions)."""
    import lmdb
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=256, subdir=True)
    try:
        info, st = env.info(), env.stat()
        psize = st["psize"]
        out: dict[str, Any] = {}
        used = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]
        for name in names:
            try:
                db = env.open_db(name, create=False)
            except lmdb.Error:
                continue
            with env.begin() as txn:
                s = txn.stat(db)
            pages = s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
            used += pages
            out[name.decode("utf-8", "replace")] = {"entries": s["entries"],
                                                    "bytes": pages * psize}
        file_pages = info["last_pgno"] + 1
        out["(free pages)"] = {"entries": 0, "bytes": max(0, file_pages - used - 2) * psize}
        return out
    finally:
        env.close()


class Proc:
    """A child process whose stdout goes to a file we read lines from (a pipe nobody drains
    would block it)."""

    def __init__(self, argv: list[str], base: str, name: str) -> None:
        self.out_path = os.path.join(base, f"{name}.out")
        self.err_path = os.path.join(base, f"{name}.err")
        self.out = open(self.out_path, "w")
        self.err = open(self.err_path, "w")
        self.name = name
        self.p = subprocess.Popen(argv, cwd=ROOT, stdout=self.out, stderr=self.err, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_lines(self, pattern: re.Pattern[str], until: str, timeout: float = 60.0
                   ) -> dict[str, str]:
        seen: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while until not in seen:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.p.returncode}: "
                                   f"{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} printed only {seen}: {self.tail()}")
            with open(self.out_path) as f:
                for line in f:
                    m = pattern.match(line.strip())
                    if m:
                        if m.lastindex == 1:
                            seen[until] = m.group(1)
                        else:
                            seen[m.group(1)] = m.group(2)
            time.sleep(0.05)
        return seen

    def tail(self, n: int = 2000) -> str:
        try:
            with open(self.err_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> str:
        """SIGTERM, wait; returns what it printed on stdout."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.out.close()
        self.err.close()
        with open(self.out_path) as f:
            return f.read()


# --- one campaign -------------------------------------------------------------------------


@dataclass
class Outcome:
    n: int
    concurrency: int
    import_s: float = 0.0
    content_s: float = 0.0
    create_s: float = 0.0
    to_final: dict[float, float] = field(default_factory=dict)   # share -> seconds
    server_cpu_import_s: float = 0.0
    server_cpu_s: float = 0.0        # job creation to 100 % final
    server_main_cpu_s: float = 0.0   # of it, the event loop's thread
    server_other_cpu_s: float = 0.0  # of it, the other threads (LMDB writer, executors)
    server_first_cpu_s: float = 0.0  # of it, the process started (scheduler, API, its share
                                     # of the device port); the rest: its device processes
    idle_share: float = 0.0          # of the machine's CPU time over the run (/proc/stat)
    server_peak_rss_mb: float = 0.0  # VmHWM over the whole run
    server_hwm_import_mb: float = 0.0   # VmHWM after the import
    server_hwm_create_mb: float = 0.0   # VmHWM after the job's creation
    server_rss_end_mb: float = 0.0
    server_peak_anon_mb: float = 0.0  # RssAnon sampled while the job ran (no mapped store)
    server_rss_file_end_mb: float = 0.0
    sim_cpu_s: float = 0.0
    sim_peak_rss_mb: float = 0.0
    store_bytes: int = 0
    store_dbs: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    sim: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # per tenth of the tasks made final: where the cost goes as the store fills (is the
    # cost per device flat within the run?)
    tenths: list[dict[str, float]] = field(default_factory=list)

    @property
    def complete_s(self) -> float:
        return self.to_final[1.0]


def write_import_csv(path: str, n: int) -> int:
    """The simulator's devices (index 0..n-1) as the import CSV, with the capability."""
    from dmengine.simulator.device import DeviceProfile
    from dmengine.simulator.fleet import Fleet, registration_csv
    fleet = Fleet(DeviceProfile(), n, lazy=True)
    with open(path, "wb") as f:
        for block in registration_csv(fleet.devices, capability=CAPABILITY, block=10_000):
            f.write(block)
    return os.path.getsize(path)


async def _stream(path: str) -> Any:
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                return
            yield block


async def _json(r: aiohttp.ClientResponse, want: int, what: str) -> Any:
    body = await r.json(content_type=None)
    if r.status != want:
        raise RuntimeError(f"{what} answered {r.status}: {body}")
    return body


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+)$")


async def scrape(s: aiohttp.ClientSession, api: str) -> dict[str, float]:
    """The server's /metrics, summed over label sets (name{labels} -> value, name -> sum)."""
    out: dict[str, float] = {}
    async with s.get(api + "metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            out[name + labels] = value
            if labels:
                out[name] = out.get(name, 0.0) + value
    return out


def profile_format(path: str) -> str:
    return "speedscope" if path.endswith(".json") else "flamegraph" if path.endswith(".svg") \
        else "raw"


async def drive(o: Outcome, api: str, key: str, csv_path: str, server_pid: int,
                sim_pid: int, sim_url: str, profile: str | None = None) -> None:
    headers = {"X-API-Key": key}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as s:
        async with s.post(api + "v1/capabilities", json={
                "oid": CAPABILITY, "make": "Acme", "model": "EX100",
                "firmwareVersions": ["2.3.9"], "moPaths": {"fumo": "./FUMO/1"}}) as r:
            await _json(r, 201, "createDeviceCapability")
        # 1. the devices
        cpu0 = cpu_s(server_pid)
        t0 = time.perf_counter()
        async with s.post(api + "v1/devices/import", data=_stream(csv_path),
                          headers={"Content-Type": "text/csv"}) as r:
            rep = await _json(r, 200, "importDeviceInstances")
        o.import_s = time.perf_counter() - t0
        o.server_cpu_import_s = cpu_s(server_pid) - cpu0
        o.server_hwm_import_mb = status_kb(server_pid, "VmHWM") / 1024
        if rep["created"] != o.n or rep["rejected"]:
            raise RuntimeError(f"import: {rep}")
        # 2. the package
        t0 = time.perf_counter()
        async with s.post(api + "v1/content", data=FIRMWARE, params={
                "name": "ex100-2.4.0.bin", "sha256": hashlib.sha256(FIRMWARE).hexdigest(),
                "capability": CAPABILITY, "from": "2.3.9", "to": "2.4.0"}) as r:
            content = await _json(r, 201, "uploadContent")
        o.content_s = time.perf_counter() - t0
        content_id = content.get("contentId") or content["content_id"]
        # 3. the job
        spy = None
        if profile:
            # py-spy on the server from job creation to 100 % final (--nonblocking: the
            # server is not paused to be sampled; py-spy refuses it with --native)
            extra = os.environ.get("DMENGINE_CAMPAIGN_PYSPY", "").split()
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                    "record", "-p", str(server_pid), "--threads",
                                    *([] if "--native" in extra else ["--nonblocking"]), *extra,
                                    "--rate", "200", "--format", profile_format(profile),
                                    "-o", profile], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
        sim0 = cpu_s(sim_pid)
        cpu0 = cpu_s(server_pid)
        first0 = _stat_cpu_s(f"/proc/{server_pid}/stat")
        idle0 = machine_idle()
        threads0 = thread_cpu_s(server_pid)
        t0 = time.perf_counter()
        async with s.post(api + "v1/jobs", json={
                "name": f"campaign {o.n:,} devices",
                "operation": {"operation": "UPDATE", "contentId": content_id},
                "selection": {"capability": CAPABILITY},
                "concurrency": o.concurrency}) as r:
            created = await _json(r, 201, "createDeployments")
        o.create_s = time.perf_counter() - t0
        o.server_hwm_create_mb = status_kb(server_pid, "VmHWM") / 1024
        if created["targets"] != o.n:
            raise RuntimeError(f"the job selected {created['targets']} of {o.n} devices")
        job_id = created["jobId"]
        # 5. until every task is final
        marks = [0.5, 0.99, 1.0]
        last_final, last_change = -1, time.perf_counter()
        tenth = _Tenths(o, server_pid, sim_pid, t0)
        while True:
            async with s.get(api + f"v1/jobs/{job_id}") as r:
                job = await _json(r, 200, "getJob")
            now = time.perf_counter()
            final = job["final"]
            anon = status_kb(server_pid, "RssAnon") / 1024
            if anon > o.server_peak_anon_mb:
                o.server_peak_anon_mb = anon
            for share in marks:
                if share not in o.to_final and final >= share * o.n:
                    o.to_final[share] = now - t0
            if final != last_final:
                last_final, last_change = final, now
            tenth.sample(final, now)
            if final >= o.n:
                break
            if now - last_change > STALL_S:
                raise RuntimeError(f"stuck at {final:,} of {o.n:,} final for {STALL_S:.0f} s: "
                                   f"{json.dumps(job)[:2000]}")
            await asyncio.sleep(POLL)
        o.server_cpu_s = cpu_s(server_pid) - cpu0
        o.server_first_cpu_s = _stat_cpu_s(f"/proc/{server_pid}/stat") - first0
        idle1 = machine_idle()
        o.idle_share = (idle1[0] - idle0[0]) / max(1e-9, idle1[1] - idle0[1])
        threads = thread_cpu_s(server_pid)
        o.server_main_cpu_s = threads.get("MainThread", 0.0) - threads0.get("MainThread", 0.0)
        o.server_other_cpu_s = o.server_cpu_s - o.server_main_cpu_s
        o.sim_cpu_s = cpu_s(sim_pid) - sim0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.get_running_loop().run_in_executor(None, spy.wait)
        o.job = job
        # the job's COMPLETED state follows in the scheduler's next pass
        for _ in range(40):
            if job["state"] == "COMPLETED":
                break
            await asyncio.sleep(0.25)
            async with s.get(api + f"v1/jobs/{job_id}") as r:
                job = await _json(r, 200, "getJob")
        o.job = job
        o.metrics = await scrape(s, api)
        async with aiohttp.ClientSession() as plain:
            async with plain.get(sim_url.rsplit("/", 1)[0] + "/stats") as r:
                o.sim = await r.json(content_type=None)


class _Tenths:
    """Samples the server at each tenth of the tasks made final: per tenth, the event-loop
    thread's user and system CPU per task, the process's other threads' CPU per task, page
    faults per task (the mapped store: minor faults are pages mapped in, major ones read
    from disk), the mapped store's RSS and the simulator's CPU per task."""

    def __init__(self, o: Outcome, server_pid: int, sim_pid: int, t0: float) -> None:
        self.o, self.pid, self.sim_pid, self.t0 = o, server_pid, sim_pid, t0
        self.next = 1
        self.last = self._read(0, t0)

    def _read(self, final: int, now: float) -> dict[str, float]:
        lu, ls, _, _ = proc_stat(f"/proc/{self.pid}/task/{self.pid}/stat")  # the loop's
        pu, ps, pmin, pmaj = proc_stat(f"/proc/{self.pid}/stat")
        return {"final": final, "t": now, "loop_user": lu, "loop_sys": ls, "cpu": pu + ps,
                "minflt": pmin, "majflt": pmaj, "sim": cpu_s(self.sim_pid)}

    def sample(self, final: int, now: float) -> None:
        if final < self.next * self.o.n / 10:
            return
        cur = self._read(final, now)
        done = max(1, cur["final"] - self.last["final"])
        loop = cur["loop_user"] - self.last["loop_user"] + cur["loop_sys"] - self.last["loop_sys"]
        self.o.tenths.append({
            "final": final,
            "at_s": round(now - self.t0, 2),
            "tasks_per_s": round(done / max(1e-9, now - self.last["t"]), 1),
            "loop_us_per_task": round(loop / done * 1e6, 1),
            "loop_sys_us_per_task": round((cur["loop_sys"] - self.last["loop_sys"]) / done * 1e6, 1),
            "other_us_per_task": round((cur["cpu"] - self.last["cpu"] - loop) / done * 1e6, 1),
            "minflt_per_task": round((cur["minflt"] - self.last["minflt"]) / done, 2),
            "majflt_per_task": round((cur["majflt"] - self.last["majflt"]) / done, 3),
            "rss_file_mb": round(status_kb(self.pid, "RssFile") / 1024, 1),
            "rss_anon_mb": round(status_kb(self.pid, "RssAnon") / 1024, 1),
            "sim_us_per_task": round((cur["sim"] - self.last["sim"]) / done * 1e6, 1),
        })
        self.last = cur
        while self.next <= 10 and final >= self.next * self.o.n / 10:
            self.next += 1


def check(o: Outcome) -> None:
    """The job's counts equal what the simulator did; raises AssertionError otherwise."""
    job, sim = o.job, o.sim
    problems = []
    if job["state"] != "COMPLETED":
        problems.append(f"job state {job['state']} ({job.get('cause')})")
    if job["succeeded"] != sim["updates_succeeded"]:
        problems.append(f"job succeeded {job['succeeded']:,} != simulator updates "
                        f"succeeded {sim['updates_succeeded']:,}")
    if job["failed"] != sim["updates_failed"]:
        problems.append(f"job failed {job['failed']:,} != simulator updates failed "
                        f"{sim['updates_failed']:,}")
    if job["succeeded"] + job["failed"] != o.n:
        problems.append(f"succeeded + failed = {job['succeeded'] + job['failed']:,}, "
                        f"not {o.n:,}: counts {job.get('counts')}")
    if sim.get("alerts_pending"):
        problems.append(f"{sim['alerts_pending']} Generic Alerts not delivered")
    if problems:
        raise AssertionError(f"campaign of {o.n:,} devices: " + "; ".join(problems))


def campaign(n: int, concurrency: int, profile: str | None = None) -> Outcome:
    """One campaign of ``n`` devices; ``profile``: a py-spy recording of the server from job
    creation to the end goes there (``.json`` speedscope, ``.svg`` flame graph, else raw
    collapsed stacks)."""
    base = tempfile.mkdtemp(prefix=f"bench-campaign-{n}-")
    data = os.path.join(base, "var")
    o = Outcome(n=n, concurrency=concurrency)
    server = sim = None
    try:
        csv_path = os.path.join(base, "devices.csv")
        t = time.perf_counter()
        size = write_import_csv(csv_path, n)
        print(f"  {n:,} devices: import CSV {size / 1e6:.0f} MB written in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        port = free_port()
        listener = f"http://127.0.0.1:{port}/pkg0"
        server = Proc([sys.executable, "-m", "dmengine", "serve", "--data", data,
                       "--device-port", "0", "--api-port", "0", "--gateway", f"http:{listener}",
                       "--gateway-rate", "0", "--allow-private-callbacks",
                       *SERVE_ARGS, *os.environ.get("DMENGINE_CAMPAIGN_SERVE_ARGS", "").split(),
                       "--max-connections", str(CONNECTIONS_PER_ADDRESS + 1000),
                       "--max-connections-per-address", str(CONNECTIONS_PER_ADDRESS)],
                      base, "server")
        urls = server.wait_lines(SERVER_LINE, "API key")
        sim = Proc([sys.executable, "-m", "dmengine", "simulate", "--listen", f"127.0.0.1:{port}",
                    "--devices", str(n), "--url", urls["device port"],
                    "--fault-fail-update", str(FAIL_SHARE), "--fault-drop", str(DROP_SHARE),
                    "--retry-503", "10",
                    "--max-idle", str(CONNECTIONS_PER_ADDRESS)], base, "simulator")
        sim_url = sim.wait_lines(SIM_LINE, "listener")["listener"]
        uvloop.run(drive(o, urls["API"], urls["API key"], csv_path, server.pid, sim.pid,
                         sim_url, profile))
        o.server_peak_rss_mb = status_kb(server.pid, "VmHWM") / 1024
        o.server_rss_end_mb = status_kb(server.pid, "VmRSS") / 1024
        o.server_rss_file_end_mb = status_kb(server.pid, "RssFile") / 1024
        o.sim_peak_rss_mb = status_kb(sim.pid, "VmHWM") / 1024
        sim.stop()
        sim = None
        err = server.tail(4000)
        server.stop()
        server = None
        o.store_bytes = du(os.path.join(data, "store"))
        try:
            o.store_dbs = store_breakdown(os.path.join(data, "store"))
        except Exception as exc:      # the breakdown is a detail; the bytes on disk are measured
            o.store_dbs = {"error": {"entries": 0, "bytes": 0, "detail": repr(exc)}}
        if "Traceback" in err:
            print(f"  server stderr (tail):\n{err}", file=sys.stderr, flush=True)
    finally:
        for p in (sim, server):
            if p is not None:
                print(f"  {p.name} stderr (tail):\n{p.tail()}", file=sys.stderr, flush=True)
                p.stop()
        if os.environ.get("DMENGINE_CAMPAIGN_KEEP"):
            print(f"  kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    check(o)
    return o


# --- rows ---------------------------------------------------------------------------------


def rows_for(o: Outcome, ref: Outcome | None) -> list[Row]:
    case = f"FUMO campaign, {o.n:,} devices (concurrency {o.concurrency:,})"
    c = o.complete_s
    sim = o.sim
    out = [
        Row(case, "import through the API", round(o.import_s, 2), "s"),
        Row(case, "job creation (createDeployments)", round(o.create_s, 3), "s"),
        Row(case, "time to 50 % of tasks final", round(o.to_final[0.5], 2), "s"),
        Row(case, "time to 99 % of tasks final", round(o.to_final[0.99], 2), "s"),
        Row(case, "time to 100 % of tasks final", round(c, 2), "s"),
        Row(case, "tasks final per second", round(o.n / c, 1), "1/s"),
        Row(case, "notifications per second", round(sim["notifications"] / c, 1), "1/s"),
        Row(case, "DM sessions per second", round(sim["sessions"] / c, 1), "1/s"),
        Row(case, "DM messages per second (device -> server)", round(sim["messages"] / c, 1),
            "1/s"),
        Row(case, "package downloads per second", round(sim["downloads"] / c, 1), "1/s"),
        Row(case, "server CPU (job creation to 100 % final)", round(o.server_cpu_s, 1), "s"),
        Row(case, "server CPU of the event-loop thread (job creation to 100 % final)",
            round(o.server_main_cpu_s, 1), "s"),
        Row(case, "server CPU of its other threads: LMDB writer, executors (job creation to "
                  "100 % final)", round(o.server_other_cpu_s, 1), "s"),
        Row(case, "server CPU of the process started (scheduler, API, its share of the "
                  "device port; the rest is its device processes')",
            round(o.server_first_cpu_s, 1), "s"),
        Row(case, "machine CPU idle (job creation to 100 % final)",
            round(100 * o.idle_share, 1), "%"),
        Row(case, "server CPU for the import", round(o.server_cpu_import_s, 1), "s"),
        Row(case, "server peak RSS", round(o.server_peak_rss_mb, 1), "MB"),
        Row(case, "server peak anonymous RSS (sampled; the mapped store excluded)",
            round(o.server_peak_anon_mb, 1), "MB"),
        Row(case, "server file-backed RSS at the end (mapped store pages)",
            round(o.server_rss_file_end_mb, 1), "MB"),
        Row(case, "simulator CPU (job creation to 100 % final)", round(o.sim_cpu_s, 1), "s"),
        Row(case, "simulator peak RSS", round(o.sim_peak_rss_mb, 1), "MB"),
        Row(case, "store bytes per device", round(o.store_bytes / o.n), "B"),
        Row(case, "message latency p50 (simulator)", sim.get("latency_p50_ms") or 0.0, "ms"),
        Row(case, "message latency p99 (simulator)", sim.get("latency_p99_ms") or 0.0, "ms"),
        Row(case, "updates succeeded (job = simulator)", float(o.job["succeeded"]), "tasks"),
        Row(case, "updates failed (job = simulator)", float(o.job["failed"]), "tasks"),
        Row(case, "HTTP 503 answers to devices", float(sim.get("rejected_503", 0)), "answers"),
        Row(case, "connections dropped mid-message and resent", float(sim.get("drops", 0)),
            "drops"),
    ]
    if ref is not None and ref.n != o.n:
        base = f"same per device at {ref.n:,} devices"
        for metric, mine, theirs, unit in (
                ("wall time per device", c / o.n * 1e6, ref.complete_s / ref.n * 1e6, "µs"),
                ("server CPU per device", o.server_cpu_s / o.n * 1e6,
                 ref.server_cpu_s / ref.n * 1e6, "µs"),
                ("simulator CPU per device", o.sim_cpu_s / o.n * 1e6,
                 ref.sim_cpu_s / ref.n * 1e6, "µs"),
                ("import time per device", o.import_s / o.n * 1e6, ref.import_s / ref.n * 1e6,
                 "µs")):
            out.append(Row.versus(case, metric, round(mine, 1), unit, base, round(theirs, 1),
                                  higher_is_better=False))
    return out


def summary_line(o: Outcome) -> str:
    return (f"  {o.n:,} devices: import {o.import_s:.1f} s, job {o.create_s:.2f} s, "
            f"50/99/100 % final at {o.to_final[0.5]:.1f}/{o.to_final[0.99]:.1f}/"
            f"{o.complete_s:.1f} s ({o.n / o.complete_s:,.0f} tasks/s), server CPU "
            f"{o.server_cpu_s:.1f} s (loop {o.server_main_cpu_s:.1f}, other threads "
            f"{o.server_other_cpu_s:.1f}; first process {o.server_first_cpu_s:.1f}), "
            f"machine idle {100 * o.idle_share:.0f} %, peak RSS {o.server_peak_rss_mb:.0f} MB (anon "
            f"{o.server_peak_anon_mb:.0f}, file {o.server_rss_file_end_mb:.0f}), simulator CPU "
            f"{o.sim_cpu_s:.0f} s, store {o.store_bytes / o.n:,.0f} B/device")


def profile_path(n: int) -> str | None:
    """``DMENGINE_CAMPAIGN_PROFILE=/tmp/server.txt``: each size's py-spy recording of the server
    goes to ``/tmp/server-N.txt`` (``python -m bench.pyspy_top`` summarises a ``.txt``);
    ``DMENGINE_CAMPAIGN_PYSPY`` adds py-spy options (e.g. ``--gil``)."""
    spec = os.environ.get("DMENGINE_CAMPAIGN_PROFILE")
    if not spec:
        return None
    stem, ext = os.path.splitext(spec)
    return f"{stem}-{n}{ext or '.txt'}"


def run(quick: bool) -> None:
    top = int(os.environ.get("DMENGINE_CAMPAIGN_N", "1000000"))
    if quick:
        sizes = [2000]
    elif os.environ.get("DMENGINE_CAMPAIGN_SIZES"):
        sizes = [int(x) for x in os.environ["DMENGINE_CAMPAIGN_SIZES"].split(",") if x.strip()]
    else:
        sizes = sorted({s for s in (10_000, 100_000) if s < top} | {top})
    max_s = float(os.environ.get("DMENGINE_CAMPAIGN_MAX_S", "1200"))
    concurrency = int(os.environ.get("DMENGINE_CAMPAIGN_CONCURRENCY", DEFAULT_CONCURRENCY))
    load_before = os.getloadavg()
    rows: list[Row] = []
    sweep: dict[int, float] = {}
    if os.environ.get("DMENGINE_CAMPAIGN_SWEEP") and not quick:
        for c in (1000, 2000, 4000, 6000):
            o = campaign(20_000, c)
            sweep[c] = o.complete_s
            print(summary_line(o) + f" [concurrency {c}]", flush=True)
            rows.append(Row(f"concurrency sweep, 20,000 devices, concurrency {c:,}",
                            "time to 100 % of tasks final", round(o.complete_s, 2), "s"))
        concurrency = min(sweep, key=sweep.__getitem__)
    done: list[Outcome] = []
    projection: dict[str, Any] | None = None
    for n in sizes:
        if done:
            last = done[-1]
            projected = last.complete_s * n / last.n
            if projected > max_s:
                projection = {"devices": n, "projected_complete_s": round(projected, 1),
                              "from_devices": last.n, "limit_s": max_s}
                rows.append(Row(f"FUMO campaign, {n:,} devices (not run)",
                                f"projected time to 100 % final (linear from {last.n:,})",
                                round(projected, 1), "s"))
                print(f"  {n:,} devices: not run, projected {projected:.0f} s > {max_s:.0f} s",
                      flush=True)
                continue
        o = campaign(n, concurrency, profile_path(n))
        print(summary_line(o), flush=True)
        for t in o.tenths:
            print(f"    {t}", flush=True)
        print(f"    store ops per device "
              f"{o.metrics.get('dmengine_store_commit_batch_size_sum', 0.0) / o.n:.2f}, "
              f"batches per device "
              f"{o.metrics.get('dmengine_store_commit_batch_size_count', 0.0) / o.n:.3f}, "
              f"garbage-collector pauses {o.metrics.get('dmengine_gc_pause_seconds_sum', 0.0):.2f}"
              f" s in {o.metrics.get('dmengine_gc_pause_seconds_count', 0.0):.0f}", flush=True)
        rows.extend(rows_for(o, done[0] if done else None))
        done.append(o)
    big = done[-1]
    block = {"devices": big.n, "complete_s": round(big.complete_s, 2),
             "p99_s": round(big.to_final[0.99], 2),
             "server_peak_rss_mb": round(big.server_peak_rss_mb, 1),
             "sessions_per_s": round(big.sim["sessions"] / big.complete_s, 1)}
    extra: dict[str, Any] = {
        "campaign": block, "quick": quick, "concurrency": concurrency,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "runs": [{"devices": o.n, "concurrency": o.concurrency, "import_s": round(o.import_s, 2),
                  "create_s": round(o.create_s, 3),
                  "to_final_s": {f"{int(k * 100)}%": round(v, 2) for k, v in o.to_final.items()},
                  "server_cpu_s": round(o.server_cpu_s, 1),
                  "server_cpu_import_s": round(o.server_cpu_import_s, 1),
                  "server_peak_rss_mb": round(o.server_peak_rss_mb, 1),
                  "server_peak_anon_rss_mb": round(o.server_peak_anon_mb, 1),
                  "server_peak_rss_after_import_mb": round(o.server_hwm_import_mb, 1),
                  "server_peak_rss_after_job_creation_mb": round(o.server_hwm_create_mb, 1),
                  "server_file_rss_end_mb": round(o.server_rss_file_end_mb, 1),
                  "sim_cpu_s": round(o.sim_cpu_s, 1),
                  "sim_peak_rss_mb": round(o.sim_peak_rss_mb, 1),
                  "store_bytes_per_device": round(o.store_bytes / o.n),
                  "store_bytes_per_device_by_db": {
                      k: round(v["bytes"] / o.n) for k, v in sorted(
                          o.store_dbs.items(), key=lambda kv: -kv[1]["bytes"])},
                  "simulator": o.sim,
                  # store writes (ops) and write transactions (batches) per device, whole run
                  "store_ops_per_device": round(
                      o.metrics.get("dmengine_store_commit_batch_size_sum", 0.0) / o.n, 2),
                  "store_batches_per_device": round(
                      o.metrics.get("dmengine_store_commit_batch_size_count", 0.0) / o.n, 3),
                  # the server's garbage collections, whole run (dmengine_gc_pause_seconds)
                  "server_gc_pause_s": round(
                      o.metrics.get("dmengine_gc_pause_seconds_sum", 0.0), 2),
                  "server_gc_collections": round(
                      o.metrics.get("dmengine_gc_pause_seconds_count", 0.0)),
                  "tenths": o.tenths,
                  "job": {k: o.job.get(k) for k in ("state", "targets", "total", "counts",
                                                    "final", "succeeded", "failed", "cause")}}
                 for o in done]}
    if sweep:
        extra["concurrency_sweep_complete_s"] = {str(k): round(v, 2) for k, v in sweep.items()}
    if projection is not None:
        extra["projection"] = projection
    if quick and (RESULTS / f"{NAME}.json").exists():
        # a smoke run does not replace the committed numbers
        print("(quick run: bench/results/campaign.json left as it was)")
        from bench.common import table
        print(table(NAME, rows))
        return
    write_results(NAME, rows, **extra)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
