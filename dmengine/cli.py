"""`dmengine` / `python -m dmengine`: serve, simulate, bench, store … (L6: wires every layer)."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .config import BrokerConfig
    from .webhooks import WebhookConfig


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from . import logs
    from .errors import ConfigError
    from .engine import Engine, EngineConfig, gateway_from_spec, run_until_signal
    from .identity import IdentityConfig

    logs.setup(args.log_format, args.log_level)      # before anything logs

    mapped_mb = args.store_max_mapped_mb      # (0: never; EngineConfig checks the bound)
    store = {} if mapped_mb is None else {"store_max_mapped": (mapped_mb << 20) or None}
    try:
        cfg = EngineConfig(data_dir=args.data, host=args.host, api_host=args.api_host,
                           device_port=args.device_port, api_port=args.api_port,
                           device_path=args.path, server_id=args.server_id,
                           require_auth=args.auth, public_url=args.public_url,
                           tls_cert=args.tls_cert, tls_key=args.tls_key,
                           api_tls_cert=args.api_tls_cert, api_tls_key=args.api_tls_key,
                           carrier_callback_url=args.carrier_callback,
                           allow_private_callbacks=args.allow_private_callbacks,
                           callback_allow_networks=tuple(args.callback_allow_network or ()),
                           broker=_broker_config(args),
                           device_processes=args.device_processes,
                           main_device_share=args.main_device_share,
                           webhooks=_webhook_config(args),
                           **store,
                           identity=IdentityConfig(**{k: v for k, v in (
                               ("session_ttl", args.session_ttl), ("default_rate", args.api_rate),
                               ("default_burst", args.api_burst)) if v is not None}),
                           server_overrides={k: v for k, v in (
                               ("max_connections", args.max_connections),
                               ("max_connections_per_address", args.max_connections_per_address))
                               if v is not None})
    except ConfigError as exc:
        if exc.key != "store_max_mapped":
            raise
        raise ConfigError("--store-max-mapped-mb must be 0 (never) or at least 16",
                          key="--store-max-mapped-mb") from None

    async def main() -> None:
        gateway = gateway_from_spec(args.gateway)
        if gateway is not None and args.gateway_rate is not None:
            from .notify.base import TokenBucket
            # 0: no limit (the SMS centre paces itself); else a bucket of a second's worth
            gateway.limiter = TokenBucket(args.gateway_rate, max(1, int(args.gateway_rate))) \
                if args.gateway_rate > 0 else None
        engine = Engine(cfg, gateway=gateway)
        try:
            await engine.start()
        except OSError as exc:          # port taken, data dir not writable, ...
            await engine.stop()
            raise ConfigError(f"cannot start: {exc}") from None
        from .server import tune_gc
        tune_gc()                       # start-up objects out of the collector's sight

        def announce() -> None:
            for label, url in engine.urls():
                print(f"{label}: {url}", flush=True)
            # to the terminal once, never through logging (a log is shipped and kept)
            print(f"API key: {engine.api_key}", flush=True)
        await run_until_signal(engine, on_ready=announce)

    uvloop.run(main())
    return 0


#: ``serve`` options that set a BrokerConfig field (field → option dest): a refused value is
#: reported under the option's name, as the operator typed it
BROKER_OPTIONS = {
    "tick_interval": "scheduler_tick", "job_batch": "job_batch",
    "notify_parallel": "notify_parallel", "retry_delays": "retry_delays",
    "retry_jitter": "retry_jitter", "max_notifications": "max_notifications",
    "task_ttl": "task_ttl", "claim_lease": "claim_lease", "claim_page": "claim_page",
    "max_notify_rate": "max_notify_rate", "max_in_flight": "max_in_flight",
    "alert_wait": "alert_wait", "alert_followups": "alert_followups",
}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _broker_config(args: argparse.Namespace) -> BrokerConfig:
    from .config import BrokerConfig
    from .errors import ConfigError
    given = {f: getattr(args, d) for f, d in BROKER_OPTIONS.items()
             if getattr(args, d, None) is not None}
    try:
        return BrokerConfig(server_id=args.server_id, **given)
    except ConfigError as exc:
        if exc.key not in BROKER_OPTIONS:
            raise
        opt = _option(BROKER_OPTIONS[exc.key])
        raise ConfigError(str(exc).replace(exc.key, opt, 1), key=opt) from None


def _webhook_config(args: argparse.Namespace) -> WebhookConfig:
    """The charging log's retention (``--charging-max-age``, ``--charging-max-events``; 0
    lifts that bound)."""
    from .errors import ConfigError
    from .webhooks import WebhookConfig
    given: dict[str, float | int | None] = {}
    for field, dest in (("charging_max_age", "charging_max_age"),
                        ("charging_max_events", "charging_max_events")):
        v = getattr(args, dest, None)
        if v is not None:
            if v < 0:
                raise ConfigError(f"{_option(dest)} must be >= 0 (0: no such limit), got {v}",
                                  key=_option(dest))
            given[field] = v or None
    return WebhookConfig(**given)  # type: ignore[arg-type]


def _seconds_list(text: str) -> tuple[float, ...]:
    """``--retry-delays 60,300,900``: seconds, comma-separated."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seconds separated by commas (e.g. 60,300,900,3600), not {text!r}") from None


def _bench(args: argparse.Namespace) -> int:
    from bench.__main__ import main as bench_main
    return bench_main(list(args.names) + (["--quick"] if args.quick else []))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmengine", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the DM server (device port + API port)")
    s.add_argument("--data", default="./var", help="data directory (LMDB store, content, API key)")
    s.add_argument("--host", default="127.0.0.1", help="listen address of the device port")
    s.add_argument("--api-host", default="127.0.0.1",
                   help="listen address of the API port (DMWSI, /metrics, /health)")
    s.add_argument("--device-port", type=int, default=8080)
    s.add_argument("--api-port", type=int, default=8081)
    s.add_argument("--path", default="/dm", help="device POST path")
    s.add_argument("--server-id", default="dmengine")
    s.add_argument("--auth", default="md5", choices=["md5", "basic", "hmac", "none"],
                   help="DM-level authentication required from devices")
    s.add_argument("--public-url", help="base URL devices use to reach the device port")
    s.add_argument("--tls-cert", help="HTTPS on the device port: certificate chain (PEM)")
    s.add_argument("--tls-key", help="HTTPS on the device port: private key (PEM)")
    s.add_argument("--api-tls-cert", help="HTTPS on the API port: certificate chain (PEM)")
    s.add_argument("--api-tls-key", help="HTTPS on the API port: private key (PEM)")
    s.add_argument("--session-ttl", type=float, default=None, metavar="S",
                   help="seconds a userSession from login lives (default 3600)")
    s.add_argument("--api-rate", type=float, default=None, metavar="PER_S",
                   help="API calls per second of a key or user without its own rate "
                        "(default 50; 0: no limit; the key serve prints has none)")
    s.add_argument("--api-burst", type=int, default=None, metavar="N",
                   help="API calls at once above that rate (default 100)")
    s.add_argument("--gateway", help="package-0 gateway: kannel:URL?user=U&password=P or http:URL")
    s.add_argument("--carrier-callback", help="URL for acceptDevicePolicy 40")
    s.add_argument("--allow-private-callbacks", action="store_true",
                   help="let webhooks, the carrier callback and the HTTP gateway call loopback, "
                        "link-local and private addresses (tests, one machine); off: refused")
    s.add_argument("--callback-allow-network", action="append", metavar="CIDR",
                   help="a network those URLs may call even so (repeatable)")
    s.add_argument("--gateway-rate", type=float, default=None, metavar="PER_S",
                   help="package 0 handed to the gateway per second at most (default 50; "
                        "0: no limit)")
    s.add_argument("--scheduler-tick", type=float, default=None, metavar="S",
                   help="seconds between scheduler passes (default 1)")
    s.add_argument("--job-batch", type=int, default=None, metavar="N",
                   help="tasks a job starts in one scheduler pass at most (default 5000)")
    s.add_argument("--notify-parallel", type=int, default=None, metavar="N",
                   help="package-0 notifications under way at once in a pass (default 512)")
    # the scheduler's clock and budgets (dmengine/config.py BrokerConfig)
    s.add_argument("--retry-delays", type=_seconds_list, default=None, metavar="S,S,…",
                   help="seconds before notifying a silent device again, per attempt (the "
                        "last one repeats; default 60,300,900,3600), spread by --retry-jitter")
    s.add_argument("--retry-jitter", type=float, default=None, metavar="F",
                   help="retry delays vary by ± this share, in [0, 1) (default 0.1)")
    s.add_argument("--max-notifications", type=int, default=None, metavar="N",
                   help="package-0 notifications of a task before a silent device expires "
                        "it (default 4)")
    s.add_argument("--task-ttl", type=float, default=None, metavar="S",
                   help="deadline of a task that names none, seconds (default 604800: 7 days)")
    s.add_argument("--claim-lease", type=float, default=None, metavar="S",
                   help="a task a scheduler pass claimed is not due again for this long "
                        "(default 120)")
    s.add_argument("--claim-page", type=int, default=None, metavar="N",
                   help="due tasks one scheduler pass claims at most (default 2000, max 10000)")
    s.add_argument("--max-notify-rate", type=float, default=None, metavar="PER_S",
                   help="package-0 notifications per second over all jobs (default: no cap)")
    s.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="job tasks started and not final, over all jobs (default: no cap)")
    s.add_argument("--alert-wait", type=float, default=None, metavar="S",
                   help="after an accepted FUMO Exec, seconds without the device's result "
                        "alert before it is woken to report (doubling each time; the package "
                        "is not sent again; default 3600)")
    s.add_argument("--alert-followups", type=int, default=None, metavar="N",
                   help="such wake-ups at most; then the task waits for its deadline "
                        "(default 3; 0: none)")
    s.add_argument("--charging-max-age", type=float, default=None, metavar="S",
                   help="charging events (GET /v1/charging) older than this are deleted "
                        "(default 7776000: 90 days; 0: kept whatever their age)")
    s.add_argument("--charging-max-events", type=int, default=None, metavar="N",
                   help="the charging log keeps the newest N events (default and 0: no count "
                        "limit)")
    s.add_argument("--device-processes", type=int, default=1, metavar="N",
                   help="processes serving the device port (SO_REUSEPORT): this one and N-1 "
                        "device processes, each with a port of its own for its sessions' "
                        "RespURIs (devices must reach those ports too); 2 puts device "
                        "sessions on a second core")
    s.add_argument("--main-device-share", type=float, default=None, metavar="F",
                   help="with --device-processes: the share (0..1) of new device "
                        "connections this process takes (it also runs the scheduler and the "
                        "API); the device processes split the rest evenly (default 0.8/N)")
    s.add_argument("--max-connections", type=int, default=None,
                   help="open device-port connections at most (default 10000)")
    s.add_argument("--max-connections-per-address", type=int, default=None,
                   help="device-port connections from one address (IPv6: one /64) at most "
                        "(default 256; a load generator or a carrier NAT needs more)")
    s.add_argument("--store-max-mapped-mb", type=int, default=None, metavar="MB",
                   help="store pages the server keeps mapped before it remaps the store "
                        "(they stay in the kernel's page cache; bounds the RSS); 0: never "
                        "(default 1024)")
    s.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines on stderr: text, or json (one object per line with the "
                        "session, device, task and job ids); default $DMENGINE_LOG_FORMAT "
                        "or text")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                   help="default $DMENGINE_LOG_LEVEL or info")
    s.set_defaults(func=_serve)

    b = sub.add_parser("bench", help="run the benchmarks (bench/)")
    b.add_argument("names", nargs="*")
    b.add_argument("--quick", action="store_true")
    b.set_defaults(func=_bench)

    # Sub-commands owned by their layers.
    try:
        from .simulator.cli import register_cli as register_simulate
        register_simulate(sub)
    except ImportError:
        pass
    from .store.admin import register_cli as register_store
    register_store(sub)
    from .client import register_cli as register_devices
    from .client import register_content_cli
    register_devices(sub)
    register_content_cli(sub)
    from .jobs_cli import register_cli as register_jobs
    register_jobs(sub)
    from .keys_cli import register_cli as register_keys
    register_keys(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ConfigError
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as exc:      # a wrong option: say which, no traceback
        where = f" ({exc.key})" if exc.key else ""
        print(f"dmengine: configuration error{where}: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
