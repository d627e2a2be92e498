"""``dmengine jobs …`` and ``dmengine tasks …`` (L6): campaigns and tasks of a running server,
over its API (:class:`dmengine.client.Client`).

::

    dmengine jobs create --operation-file query.json --capability cap-ex100 --stages 1,10,100 --rate 50
    dmengine jobs list [--state RUNNING] [--owner api]
    dmengine jobs show JOB          # progress, counts, rate, ETA
    dmengine jobs watch JOB         # a progress bar (a line per change off a terminal)
    dmengine jobs pause|restart|cancel JOB
    dmengine jobs tasks JOB [--state FAILED]
    dmengine tasks show|history|cancel TASK

``--url`` (default http://127.0.0.1:8081) names the server; the API key is ``--api-key``, else
``$DMENGINE_API_KEY``, else the file ``dmengine serve`` keeps (``./var/api-key``).  Exit
status: 0 done, 1 the API refused (its message is printed) or could not be reached, 2 a usage
error (nothing was sent).  The client's answers are the API's Structs
(:mod:`dmengine.wsi.schemas`); ``--json`` prints them as the API's JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from typing import Any, Awaitable, Callable

from .client import (DEFAULT_API_KEY_FILE, DEFAULT_API_URL, Client, ClientError, JobOut,
                     read_api_key, to_builtins)

__all__ = ["register_cli", "JobsClient", "parse_stages", "parse_window", "build_job_body",
           "watch_job", "one_line"]

JOB_STATES = ("SCHEDULED", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED", "FAILED")
TASK_STATES = ("PENDING", "NOTIFIED", "IN_PROGRESS", "WAITING_USER", "SUCCEEDED", "FAILED",
               "CANCELLED", "EXPIRED")
FINAL_JOB_STATES = ("COMPLETED", "CANCELLED", "FAILED")


class Usage(Exception):
    """A command line that cannot be sent (exit status 2)."""


#: the job and task calls are :class:`dmengine.client.Client`'s (kept under this name for
#: code written against it)
JobsClient = Client


# --- building a createDeployments body from the command line --------------------------------------


def parse_stages(text: str, *, threshold: float | None = None, approval: bool = False
                 ) -> list[dict[str, Any]]:
    """``1,10,100`` → three stages; ``threshold`` and ``approval`` hold for every stage but
    the last (the server checks the order and that the last is 100)."""
    try:
        pcts = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise Usage(f"--stages is a comma-separated list of percents, not {text!r}") from None
    if not pcts:
        raise Usage("--stages names no stage")
    out = []
    for i, p in enumerate(pcts):
        st: dict[str, Any] = {"percent": p}
        if i < len(pcts) - 1:
            if threshold is not None:
                st["successThreshold"] = threshold
            if approval:
                st["approval"] = True
        out.append(st)
    return out


def _clock(text: str) -> int:
    h, _, m = text.partition(":")
    try:
        hh, mm = int(h), int(m or 0)
    except ValueError:
        raise Usage(f"a time of day is HH:MM, not {text!r}") from None
    if not (0 <= hh <= 24 and 0 <= mm < 60) or hh * 3600 + mm * 60 > 86400:
        raise Usage(f"a time of day is HH:MM, not {text!r}")
    return hh * 3600 + mm * 60


_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def parse_days(text: str) -> list[int]:
    """``mon-fri``, ``sat,sun`` or ``0,1,2`` (0 = Monday)."""
    out: list[int] = []
    for part in text.lower().split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            a = _DAYS[lo[:3]] if lo[:3] in _DAYS else int(lo)
            b = (_DAYS[hi[:3]] if hi[:3] in _DAYS else int(hi)) if dash else a
        except ValueError:
            raise Usage(f"--days is like mon-fri, sat,sun or 0,1,2 — not {text!r}") from None
        if not (0 <= a <= 6 and 0 <= b <= 6):
            raise Usage(f"days are 0 (Monday) … 6 (Sunday), not {part!r}")
        out.extend(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return sorted(set(out))


def parse_window(text: str, days: list[int] | None = None) -> dict[str, Any]:
    """``02:00-05:00`` → ``{start: 7200, end: 18000}`` (a window may pass midnight)."""
    start, dash, end = text.partition("-")
    if not dash:
        raise Usage(f"--window is HH:MM-HH:MM, not {text!r}")
    w: dict[str, Any] = {"start": _clock(start), "end": _clock(end)}
    if days is not None:
        w["days"] = days
    return w


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise Usage(f"a time is epoch seconds or ISO 8601, not {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def _read_json(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise Usage(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Usage(f"{path} is not JSON: {exc}") from None


def build_job_body(args: argparse.Namespace) -> dict[str, Any]:
    """The createDeployments body: the operation file (an operation such as
    ``{"operation": "QUERY", "nodes": [...]}``, or a whole body with ``operation`` inside),
    then what the options say on top."""
    data = _read_json(args.operation_file)
    if not isinstance(data, dict):
        raise Usage(f"{args.operation_file} holds no JSON object")
    body: dict[str, Any] = dict(data) if isinstance(data.get("operation"), dict) \
        else {"operation": data}
    sel: dict[str, Any] = dict(body.get("selection") or {})
    dev_ids = list(args.dev_id or [])
    if args.devices_file:
        try:
            with open(args.devices_file, encoding="utf-8") as f:
                dev_ids += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        except OSError as exc:
            raise Usage(f"cannot read {args.devices_file}: {exc.strerror or exc}") from None
    if dev_ids:
        sel["devIds"] = dev_ids
    for opt, key in (("capability", "capability"), ("tac", "tac"), ("model", "model"),
                     ("firmware", "firmware")):
        v = getattr(args, opt)
        if v is not None:
            sel[key] = v
    if not sel:
        raise Usage("name the devices: --capability, --tac, --model, --firmware, --dev-id or "
                    "--devices-file (or a selection in the operation file)")
    body["selection"] = sel
    if args.stages:
        body["stages"] = parse_stages(args.stages, threshold=args.success_threshold,
                                      approval=args.approval)
    elif args.success_threshold is not None or args.approval:
        raise Usage("--success-threshold and --approval go with --stages")
    days = parse_days(args.days) if args.days else None
    if args.window:
        body["windows"] = [parse_window(w, days) for w in args.window]
    elif days is not None:
        raise Usage("--days goes with --window")
    if args.max_failure_ratio is not None or args.min_finished is not None:
        rule = dict(body.get("stopRule") or {})
        if args.max_failure_ratio is not None:
            rule["maxFailureRatio"] = args.max_failure_ratio
        if args.min_finished is not None:
            rule["minFinished"] = args.min_finished
        body["stopRule"] = rule
    for opt, key in (("name", "name"), ("owner", "owner"), ("rate", "rateLimit"),
                     ("concurrency", "concurrency"), ("tz", "tz"), ("priority", "priority"),
                     ("policy", "acceptDevicePolicy")):
        v = getattr(args, opt)
        if v is not None:
            body[key] = v
    if args.start_at:
        body["startAt"] = _when(args.start_at)
    if args.end_at:
        body["endAt"] = _when(args.end_at)
    if args.b_optin:
        body["bOptin"] = True
    if args.test_cycle:
        body["testCycle"] = True
    return body


# --- printing ------------------------------------------------------------------------------------


def _t(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc) \
        .isoformat(timespec="seconds").replace("+00:00", "Z")


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _counts(c: dict[Any, int]) -> str:
    return ", ".join(f"{s} {c[s]}" for s in TASK_STATES if c.get(s)) or "none"


def _op_name(job: JobOut) -> str:
    op = job.operation
    # an operation view is tagged on "operation" (UPDATE, QUERY…); a bootstrap job has none
    return "BOOTSTRAP" if op is None else str(op.__struct_config__.tag)


def one_line(job: JobOut) -> str:
    return (f"{job.job_id}  {job.state:<9}  {_op_name(job):<9}  "
            f"{job.final}/{job.targets} final ({job.progress:.1%})  "
            f"{job.name or ''}")


def show_job(job: JobOut, file: Any = None) -> None:
    out = file or sys.stdout
    rows = [
        ("job", f"{job.job_id}  {job.state}" + (f"  \"{job.name}\"" if job.name else "")),
        ("owner", job.owner or "-"),
        ("operation", _op_name(job)),
        ("progress", f"{job.final} of {job.targets} targets final "
                     f"({job.progress:.1%}); {job.total} tasks started"),
        ("outcome", f"{job.succeeded} succeeded, {job.failed} failed or expired"),
        ("counts", _counts(job.counts)),
    ]
    if job.test_counts:
        rows.append(("test cycle", _counts(job.test_counts)))
    stages = job.stages
    if stages:
        cur = min(job.stage, len(stages) - 1)
        rows.append(("stage", f"{cur + 1} of {len(stages)} (up to {stages[cur].percent:g} %)"))
    rows.append(("rate", f"{job.rate:.2f} tasks/s" if job.rate else "-"))
    rows.append(("ETA", _dur(job.eta_seconds)))
    if job.cause:
        rows.append(("cause", job.cause))
    rows.append(("created", _t(job.created)))
    if job.started:
        rows.append(("started", _t(job.started)))
    if job.finished:
        rows.append(("finished", _t(job.finished)))
    for k, v in rows:
        print(f"{k:<10} {v}", file=out)


def _dump(obj: Any) -> None:
    """An answer (Structs) as the API's JSON, as the commands printed it before the client
    was typed: ``json.dump`` of the JSON values, indented."""
    json.dump(to_builtins(obj), sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- commands ------------------------------------------------------------------------------------


def _key(args: argparse.Namespace) -> str:
    key = args.api_key or os.environ.get("DMENGINE_API_KEY") or read_api_key(args.api_key_file)
    if not key:
        raise Usage(f"no API key: give --api-key, set DMENGINE_API_KEY, or run where "
                    f"`dmengine serve` wrote {args.api_key_file}")
    return key


def _run(args: argparse.Namespace, fn: Callable[[JobsClient], Awaitable[int | None]]) -> int:
    """Runs ``fn`` with a client; maps failures to the exit status (1 API, 2 usage)."""
    prog = f"dmengine {args.command} {getattr(args, 'sub_cmd', '')}".rstrip()
    try:
        key = _key(args)

        async def main() -> int | None:
            c = JobsClient(args.url, key)
            try:
                return await fn(c)
            finally:
                await c.close()
        return int(asyncio.run(main()) or 0)
    except Usage as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        if exc.status == 0:
            print(f"{prog}: cannot reach the server: {exc.message}", file=sys.stderr)
        else:
            where = f" (at {exc.where})" if exc.where else ""
            print(f"{prog}: {exc.error}: {exc.message}{where}", file=sys.stderr)
        return 1


def _create(args: argparse.Namespace) -> int:
    try:
        body = build_job_body(args)
    except Usage as exc:
        print(f"dmengine jobs create: {exc}", file=sys.stderr)
        return 2

    async def fn(c: JobsClient) -> int:
        r = await c.create_job(body)
        if args.json:
            _dump(r)
        else:
            print(f"job {r.job_id} {r.state}: {r.targets} targets")
        return 0
    return _run(args, fn)


def _list(args: argparse.Namespace) -> int:
    async def fn(c: JobsClient) -> int:
        cursor, items = args.cursor, []
        while True:
            page = await c.jobs(state=args.state, owner=args.owner, cursor=cursor,
                                limit=args.limit)
            items += page.items
            cursor = page.next_cursor
            if not args.all or cursor is None:
                break
        if args.json:
            _dump({"items": items, "nextCursor": cursor})
        else:
            for j in items:
                print(one_line(j))
            if cursor:
                print(f"(more: --cursor {cursor} or --all)", file=sys.stderr)
        return 0
    return _run(args, fn)


def _show(args: argparse.Namespace) -> int:
    async def fn(c: JobsClient) -> int:
        job = await c.get_job(args.job_id)
        _dump(job) if args.json else show_job(job)
        return 0
    return _run(args, fn)


def _watch_line(job: JobOut) -> str:
    return one_line(job) + (f"  {job.rate:.1f}/s  ETA {_dur(job.eta_seconds)}"
                            if job.rate else "")


def _bar_fields(job: JobOut) -> dict[str, Any]:
    """What the bar shows of a job.  Rate and ETA are the server's (tasks finished per second
    since the job started), not rich's own estimate from the polls: a watch started late, or
    a pause, would throw that off."""
    final = job.state in FINAL_JOB_STATES
    return {"description": f"{job.job_id} {job.state}", "completed": job.final,
            "total": job.targets,
            "outcome": f"[green]{job.succeeded} succeeded[/] [red]{job.failed} failed[/]",
            "speed": f"{job.rate:.1f} tasks/s" if job.rate else "- tasks/s",
            "eta": "ETA " + ("-" if final else _dur(job.eta_seconds))}


async def watch_job(c: Client, job_id: str, *, interval: float = 2.0, console: Any = None,
                    json_lines: bool = False, file: Any = None) -> JobOut:
    """Follows a job until it is COMPLETED, CANCELLED or FAILED and returns its last view.
    With ``console`` (a rich Console): a progress bar — final/targets, succeeded and failed,
    rate and ETA — left in its final state.  Without: a line to ``file`` (stdout) whenever
    the job moved (not for a new ETA alone), or with ``json_lines`` the job as one JSON
    object a line."""
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("final"), TextColumn("{task.fields[outcome]}"),
                      TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[eta]}"),
                      console=console, transient=False) as bar:
            job = await c.get_job(job_id)
            task = bar.add_task(**_bar_fields(job))
            while job.state not in FINAL_JOB_STATES:
                await asyncio.sleep(interval)
                job = await c.get_job(job_id)
                bar.update(task, **_bar_fields(job))
            bar.refresh()
        return job
    out = file or sys.stdout
    last = None
    while True:
        job = await c.get_job(job_id)
        now = (job.state, job.stage, job.total, job.final, job.cause)
        if now != last:
            out.write((json.dumps(to_builtins(job)) if json_lines else _watch_line(job)) + "\n")
            out.flush()
            last = now
        if job.state in FINAL_JOB_STATES:
            return job
        await asyncio.sleep(interval)


def _watch(args: argparse.Namespace) -> int:
    from rich.console import Console
    console = Console()                   # stdout: the bar replaces the lines there
    show = not args.json and (args.progress if args.progress is not None
                              else console.is_terminal)

    async def fn(c: JobsClient) -> int:
        job = await watch_job(c, args.job_id, interval=args.interval,
                              console=console if show else None, json_lines=args.json)
        if job.cause and not args.json:
            print(job.cause)
        return 0 if job.state == "COMPLETED" else 1
    return _run(args, fn)


def _control(args: argparse.Namespace) -> int:
    action = args.sub_cmd

    async def fn(c: JobsClient) -> int:
        job = await c.control(args.job_id, action, getattr(args, "cause", None))
        if args.json:
            _dump(job)
        else:
            print(f"job {job.job_id} {job.state}" + (f": {job.cause}" if job.cause else ""))
        return 0
    return _run(args, fn)


def _job_tasks(args: argparse.Namespace) -> int:
    async def fn(c: JobsClient) -> int:
        cursor, items = args.cursor, []
        while True:
            page = await c.tasks(args.job_id, state=args.state, cursor=cursor, limit=args.limit)
            items += page.items
            cursor = page.next_cursor
            if not args.all or cursor is None:
                break
        if args.json:
            _dump({"items": items, "nextCursor": cursor})
        else:
            for t in items:
                print(f"{t.task_id}  {t.status:<12}  {t.dev_id}  "
                      f"attempts {t.attempts}  {t.cause or ''}")
            if cursor:
                print(f"(more: --cursor {cursor} or --all)", file=sys.stderr)
        return 0
    return _run(args, fn)


def _task_show(args: argparse.Namespace) -> int:
    async def fn(c: JobsClient) -> int:
        t = await c.get_task(args.task_id)
        if args.json:
            _dump(t)
            return 0
        rows: list[tuple[str, Any]] = [
            ("task", f"{t.task_id}  {t.status}"), ("device", t.dev_id),
            ("operation", t.operation), ("job", t.job_id or "-"),
            ("attempts", t.attempts), ("created", _t(t.created)),
            ("updated", _t(t.updated)), ("finished", _t(t.finished)),
            ("cause", t.cause or "-")]
        res = t.result
        if res is not None:
            if res.fumo_result is not None:
                rows.append(("FUMO", res.fumo_result))
            for k, v in res.statuses.items():
                rows.append(("status", f"{k}: {v}"))
            for k, v in res.nodes.items():
                rows.append(("node", f"{k} = {v}"))
        for k, v in rows:
            print(f"{k:<10} {v}")
        return 0
    return _run(args, fn)


def _task_history(args: argparse.Namespace) -> int:
    async def fn(c: JobsClient) -> int:
        hist = await c.task_history(args.task_id)
        if args.json:
            _dump(hist)
            return 0
        for h in hist:
            codes = "".join(f"  {k} {v}" for k, v in (("dmStatus", h.dm_status),
                                                      ("resultCode", h.result_code))
                            if v is not None)
            print(f"{_t(h.time)}  {h.from_state or '-':>12} -> {h.to_state:<12}"
                  f"{codes}  {h.cause or ''}")
        return 0
    return _run(args, fn)


def _task_cancel(args: argparse.Namespace) -> int:
    async def fn(c: JobsClient) -> int:
        r = await c.cancel_task(args.task_id)
        _dump(r) if args.json else print(f"task {r.task_id} {r.status}")
        return 0
    return _run(args, fn)


# --- the parsers -------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, json_out: bool = True) -> None:
    p.add_argument("--url", default=DEFAULT_API_URL,
                   help="API of a running server (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $DMENGINE_API_KEY, else the file --api-key-file)")
    p.add_argument("--api-key-file", default=DEFAULT_API_KEY_FILE,
                   help="file holding the API key, as `dmengine serve` writes it "
                        "(default: %(default)s)")
    if json_out:
        p.add_argument("--json", action="store_true", help="print the API's answer as JSON")


def _state(value: str, states: tuple[str, ...]) -> str:
    v = value.upper()
    if v not in states:
        raise argparse.ArgumentTypeError(f"one of {', '.join(states)}")
    return v


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="items per page (server default 100)")
    p.add_argument("--cursor", default=None, help="continue from this cursor")
    p.add_argument("--all", action="store_true", help="every page, not just the first")


def register_cli(subparsers: Any) -> None:
    """Adds ``jobs create|list|get|watch|pause|restart|cancel|tasks`` and
    ``tasks get|history|cancel`` (the issue's verbs; ``show`` is an alias of ``get``, the
    name earlier versions had)."""
    jobs = subparsers.add_parser(
        "jobs", help="campaigns (bulk jobs) of a running server",
        description="Create, watch and control jobs of a running server over its API.  Exit "
                    "status: 0 done, 1 the API refused or was not reached, 2 usage error.")
    js = jobs.add_subparsers(dest="sub_cmd", required=True)

    c = js.add_parser("create", help="createDeployments: a job over a device selection",
                      description="Creates a job: the operation comes from a JSON file (an "
                                  "operation such as {\"operation\": \"QUERY\", \"nodes\": "
                                  "[\"./DevInfo/Mod\"]}, or a whole createDeployments body); "
                                  "the options select the devices and set the schedule.")
    c.add_argument("--operation-file", required=True, metavar="FILE",
                   help="JSON: the operation, or a createDeployments body ('-': stdin)")
    g = c.add_argument_group("selection (devices named, or a query)")
    g.add_argument("--capability", help="capability oid")
    g.add_argument("--tac", help="type allocation code (first 8 IMEI digits)")
    g.add_argument("--model", help="./DevInfo/Mod")
    g.add_argument("--firmware", help="./DevDetail/FwV")
    g.add_argument("--dev-id", action="append", metavar="DEVID", help="a device (repeatable)")
    g.add_argument("--devices-file", metavar="FILE", help="DevIds, one per line")
    s = c.add_argument_group("schedule")
    s.add_argument("--name")
    s.add_argument("--owner", help="who asked (default: the API's: api)")
    s.add_argument("--stages", metavar="P1,P2,…",
                   help="staged rollout, percents of the targets, e.g. 1,10,100")
    s.add_argument("--success-threshold", type=float, metavar="RATIO",
                   help="each stage but the last must reach this success ratio (0..1)")
    s.add_argument("--approval", action="store_true",
                   help="each stage but the last waits for `jobs restart`")
    s.add_argument("--rate", type=float, metavar="N", help="notifications per second")
    s.add_argument("--concurrency", type=int, metavar="N", help="tasks in flight at most")
    s.add_argument("--window", action="append", metavar="HH:MM-HH:MM",
                   help="daily window (repeatable), in the device's zone, else --tz, else UTC")
    s.add_argument("--days", metavar="DAYS", help="the windows' days: mon-fri, sat,sun, 0,1,2")
    s.add_argument("--tz", help="the windows' time zone, e.g. Europe/Berlin")
    s.add_argument("--max-failure-ratio", type=float, metavar="RATIO",
                   help="stop rule: pause when this ratio of finished tasks failed")
    s.add_argument("--min-finished", type=int, metavar="N",
                   help="stop rule: only after N tasks finished")
    s.add_argument("--priority", type=int)
    s.add_argument("--start-at", metavar="TIME", help="epoch seconds or ISO 8601")
    s.add_argument("--end-at", metavar="TIME", help="epoch seconds or ISO 8601")
    s.add_argument("--b-optin", action="store_true", help="ask the user first (UI alert)")
    s.add_argument("--policy", type=int, choices=(10, 20, 30, 40),
                   help="acceptDevicePolicy (default 10)")
    s.add_argument("--test-cycle", action="store_true", help="a test run: no charging")
    _common(c)
    c.set_defaults(func=_create)

    p = js.add_parser("list", help="getJobs: jobs, newest last")
    p.add_argument("--state", type=lambda v: _state(v, JOB_STATES), help="|".join(JOB_STATES))
    p.add_argument("--owner")
    _paging(p)
    _common(p)
    p.set_defaults(func=_list)

    p = js.add_parser("get", aliases=["show"], help="getJob: progress, counts, rate, ETA")
    p.add_argument("job_id", metavar="JOB")
    _common(p)
    p.set_defaults(func=_show)

    p = js.add_parser("watch", help="follow a job until it ends (exit 0 when COMPLETED)",
                      description="A progress bar (final/targets, succeeded, failed, rate, "
                                  "ETA) until the job ends; off a terminal, or with --json, "
                                  "a line (a JSON object) whenever the job moved.  Exit 0 "
                                  "when it COMPLETED, 1 when it was CANCELLED or FAILED.")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stdout is a terminal and no --json)")
    _common(p, json_out=False)
    p.add_argument("--json", action="store_true",
                   help="the job as one JSON object a line whenever it moved (no bar)")
    p.set_defaults(func=_watch)

    for action, help_ in (("pause", "pauseJob: no new notifications, sessions under way finish"),
                          ("restart", "restartJob: resume (and approve the next stage)"),
                          ("cancel", "cancelJob: cancel what is not final, keep the rest")):
        p = js.add_parser(action, help=help_)
        p.add_argument("job_id", metavar="JOB")
        if action != "restart":
            p.add_argument("--cause", help="why (kept as the job's cause)")
        _common(p)
        p.set_defaults(func=_control)

    p = js.add_parser("tasks", help="getTasks: a job's tasks")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--state", type=lambda v: _state(v, TASK_STATES), help="|".join(TASK_STATES))
    _paging(p)
    _common(p)
    p.set_defaults(func=_job_tasks)

    tasks = subparsers.add_parser("tasks", help="tasks of a running server",
                                  description="Exit status: 0 done, 1 the API refused or was "
                                              "not reached, 2 usage error.")
    ts = tasks.add_subparsers(dest="sub_cmd", required=True)
    for name, help_, fn in (("get", "getTaskById: status, device, result", _task_show),
                            ("history", "getTaskHistory: every state change", _task_history),
                            ("cancel", "cancelTask", _task_cancel)):
        p = ts.add_parser(name, help=help_, aliases=["show"] if name == "get" else [])
        p.add_argument("task_id", metavar="TASK")
        _common(p)
        p.set_defaults(func=fn)
