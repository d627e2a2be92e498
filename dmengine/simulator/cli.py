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
    client = HttpClient(ssl_context=ctx, timeout=args.timeout)
    fleet = Fleet(profile, args.devices, faults=faults, seed=args.seed,
                  first_index=args.first_index, client=client)
    fleet.keep_reports = False
    # as the server's entry point does (server.tune_gc): the devices built above are long-lived,
    # so the collector stops scanning them; Fleet.run raises the generation-0 threshold
    gc.collect()
    gc.freeze()
    try:
        stats = await fleet.run(duration=args.duration, sessions_per_device=args.sessions,
                                concurrency=args.concurrency)
    finally:
        gc.unfreeze()
        fleet.close()
    return stats.summary()


def run_simulate(args: argparse.Namespace) -> int:
    try:
        import uvloop
        summary = uvloop.run(_simulate(args)) if hasattr(uvloop, "run") \
            else asyncio.run(_simulate(args))
    except KeyboardInterrupt:
        return 130
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if summary["sessions"] else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m dmengine.simulator.cli`` works without the lead's CLI too."""
    ap = argparse.ArgumentParser(prog="dmengine")
    sub = ap.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
