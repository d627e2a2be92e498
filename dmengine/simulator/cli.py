"""``dmengine simulate``: a fleet of virtual devices against a device port.

The lead's ``dmengine/cli.py`` calls ``register_cli(subparsers)``; the sub-command's
``func`` runs the fleet and prints a JSON summary (sessions, messages/s, outcomes, p50/p99).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from typing import Any

__all__ = ["register_cli", "run_simulate"]


def _share(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"a share is between 0 and 1, got {text}")
    return v


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="drive N virtual DM devices against a device port",
        description="Runs client-initiated DM sessions of N virtual devices over real HTTP "
                    "and prints a JSON summary.")
    p.add_argument("--url", default="http://127.0.0.1:8080/dm",
                   help="device port URL (default: %(default)s)")
    p.add_argument("--devices", type=int, default=100, help="number of devices")
    p.add_argument("--first-index", type=int, default=0,
                   help="index of the first device (IMEI/credentials derive from it)")
    p.add_argument("--encoding", choices=("xml", "wbxml"), default="wbxml")
    p.add_argument("--auth", choices=("md5", "basic", "hmac", "none"), default="md5")
    p.add_argument("--server-id", default="dmengine")
    p.add_argument("--concurrency", type=int, default=100,
                   help="devices in a session at the same time")
    p.add_argument("--sessions", type=int, default=1, help="sessions per device")
    p.add_argument("--duration", type=float, default=None,
                   help="run for this many seconds instead of a fixed number of sessions")
    p.add_argument("--ui-answer", choices=("accept", "decline", "cancel", "timeout",
                                           "unsupported"), default="accept")
    p.add_argument("--report-later", action="store_true",
                   help="report FUMO results (1226) in a later session instead of the same one")
    p.add_argument("--fault-timeout", type=_share, default=0.0,
                   help="share of devices that stop answering after package 1")
    p.add_argument("--fault-drop", type=_share, default=0.0,
                   help="share of devices that drop the connection once mid-session")
    p.add_argument("--fault-wrong-credentials", type=_share, default=0.0)
    p.add_argument("--fault-decline-optin", type=_share, default=0.0)
    p.add_argument("--fault-fail-update", type=_share, default=0.0,
                   help="share of devices whose firmware update fails")
    p.add_argument("--fail-update-code", type=int, default=410,
                   help="FUMO result code of a failing update (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cafile", default=None, help="CA bundle for an https:// device port")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per message")
    p.add_argument("--register", nargs="?", const="http://127.0.0.1:8081", default=None,
                   metavar="API_URL",
                   help="first register the fleet (DevIds, MSISDNs, DM accounts) with the "
                        "server through importDeviceInstances at API_URL (default "
                        "%(const)s), replacing records of the same devices")
    p.add_argument("--api-key", default=None,
                   help="API key for --register (default: $DMENGINE_API_KEY, else the file "
                        "--api-key-file)")
    p.add_argument("--api-key-file", default="var/api-key",
                   help="file holding the API key, as `dmengine serve` writes it "
                        "(default: %(default)s)")
    p.add_argument("--capability", default=None, metavar="OID",
                   help="capability recorded on the devices --register/--write-import provide")
    p.add_argument("--write-import", default=None, metavar="FILE",
                   help="write the fleet as an import CSV (for `dmengine devices import`); "
                        "without --register nothing else runs")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="be the SMS centre instead of starting sessions: listen for package 0 "
                        "posted by `dmengine serve --gateway http:http://HOST:PORT/pkg0` and "
                        "run each notified device's session (devices are made when notified "
                        "and dropped after their sessions: a fleet of millions fits); prints "
                        "'package 0 listener: URL', serves GET /stats, and prints the JSON "
                        "summary on SIGTERM/SIGINT")
    p.add_argument("--retry-503", type=int, default=3, metavar="N",
                   help="times a message answered 503 is sent again (default: %(default)s)")
    p.add_argument("--report-retries", type=int, default=5, metavar="N",
                   help="sessions a device starts again (backoff from 1 s) when one failed "
                        "before its Generic Alert (FUMO result) was delivered "
                        "(default: %(default)s)")
    p.add_argument("--max-idle", type=int, default=1024,
                   help="idle keep-alive connections kept to the server (default: %(default)s)")
    p.set_defaults(func=run_simulate)
    return p


async def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    import ssl

    from .device import DeviceProfile
    from .fleet import FaultShares, Fleet, HttpClient

    profile = DeviceProfile(server_url=args.url, server_id=args.server_id,
                            encoding=args.encoding, auth=args.auth, ui_answer=args.ui_answer,
                            report_in_same_session=not args.report_later)
    faults = FaultShares(timeout=args.fault_timeout, drop=args.fault_drop,
                         wrong_credentials=args.fault_wrong_credentials,
                         decline_optin=args.fault_decline_optin,
                         fail_update=args.fault_fail_update,
                         fail_update_code=args.fail_update_code)
    ctx = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    client = HttpClient(ssl_context=ctx, timeout=args.timeout,
                        max_idle_per_host=getattr(args, "max_idle", 1024))
    listen = getattr(args, "listen", None)
    fleet = Fleet(profile, args.devices, faults=faults, seed=args.seed,
                  first_index=args.first_index, client=client, lazy=bool(listen),
                  retry_503=getattr(args, "retry_503", 3),
                  report_retries=getattr(args, "report_retries", 0))
    fleet.keep_reports = False
    if getattr(args, "write_import", None) or getattr(args, "register", None):
        try:
            await _provision(args, fleet)
        except BaseException:
            fleet.close()
            raise
        if not args.register:
            fleet.close()
            return {"written": args.write_import, "devices": len(fleet.devices)}
    # as the server's entry point does (server.tune_gc): the devices built above are long-lived,
    # so the collector stops scanning them; Fleet.run raises the generation-0 threshold
    gc.collect()
    gc.freeze()
    if listen:
        try:
            return await _listen(listen, fleet)
        finally:
            gc.unfreeze()
            fleet.close()
    try:
        stats = await fleet.run(duration=args.duration, sessions_per_device=args.sessions,
                                concurrency=args.concurrency)
    finally:
        gc.unfreeze()
        fleet.close()
    return stats.summary()


async def _listen(where: str, fleet: Any) -> dict[str, Any]:
    """--listen: package 0 over HTTP starts the sessions, until SIGTERM/SIGINT."""
    import signal

    from .fleet import DEFAULT_GC_THRESHOLD0
    from .pkg0http import Pkg0Listener
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        raise RegistrationFailed(f"--listen wants HOST:PORT, not {where!r}")
    listener = Pkg0Listener(fleet, host.strip("[]") or "127.0.0.1", int(port))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    thresholds = gc.get_threshold()
    if thresholds[0] < DEFAULT_GC_THRESHOLD0:
        gc.set_threshold(DEFAULT_GC_THRESHOLD0, *thresholds[1:])
    try:
        url = await listener.start()
    except OSError as exc:
        raise RegistrationFailed(f"cannot listen on {where}: {exc}") from None
    print(f"package 0 listener: {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await listener.close()
        await fleet.wait_idle(timeout=5.0)
        gc.set_threshold(*thresholds)
    return listener.stats()


class RegistrationFailed(Exception):
    """--register did not register the whole fleet (the run would end in auth failures)."""


async def _provision(args: argparse.Namespace, fleet: Any) -> None:
    """--write-import FILE and/or --register API_URL: the fleet's devices with the
    credentials each derives from its index (fleet.registration_csv)."""
    from .fleet import registration_csv
    if args.write_import:
        try:
            with open(args.write_import, "wb") as f:
                for block in registration_csv(fleet.devices, capability=args.capability):
                    f.write(block)
        except OSError as exc:
            raise RegistrationFailed(f"cannot write {args.write_import}: {exc}") from None
        print(f"wrote {len(fleet.devices)} device(s) to {args.write_import}", file=sys.stderr)
    if not args.register:
        return
    import os

    from ..client import Client, ClientError, print_report, read_api_key
    key = args.api_key or os.environ.get("DMENGINE_API_KEY") or read_api_key(args.api_key_file)
    if not key:
        raise RegistrationFailed(f"no API key for --register: give --api-key, set "
                                 f"DMENGINE_API_KEY, or run where {args.api_key_file} is")
    try:
        async with Client(args.register, key) as c:
            report = await c.import_devices(
                registration_csv(fleet.devices, capability=args.capability), format="csv",
                upsert=True)
    except ClientError as exc:
        how = "cannot reach it" if exc.status == 0 else f"HTTP {exc.status}"
        raise RegistrationFailed(f"registering the fleet at {args.register} failed "
                                 f"({how}): {exc}") from None
    print(f"registered {report.created + report.replaced} device(s) at {args.register} "
          f"(created {report.created}, replaced {report.replaced})", file=sys.stderr)
    if report.rejected:
        print_report(report, file=sys.stderr)
        raise RegistrationFailed(f"{report.rejected} device(s) of the fleet were rejected")


def run_simulate(args: argparse.Namespace) -> int:
    try:
        import uvloop
        summary = uvloop.run(_simulate(args)) if hasattr(uvloop, "run") \
            else asyncio.run(_simulate(args))
    except KeyboardInterrupt:
        return 130
    except RegistrationFailed as exc:
        print(f"dmengine simulate: {exc}", file=sys.stderr)
        return 2
    if "written" in summary:
        return 0
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if summary["sessions"] or "pkg0_posts" in summary else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m dmengine.simulator.cli`` works without the lead's CLI too."""
    ap = argparse.ArgumentParser(prog="dmengine")
    sub = ap.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
