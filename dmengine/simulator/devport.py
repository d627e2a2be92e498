"""The device port alone, with an in-memory handler that knows the simulator's devices.

``python -m dmengine.simulator.devport --port 8080`` and then ``dmengine simulate --url
http://127.0.0.1:8080/dm``: a load-test pair without the store, broker or API port (those
come with ``dmengine serve``).  The accounts are derived from the user names (``dev<i>``)
exactly as ``VirtualDevice`` derives them.  Stops gracefully on SIGTERM.
"""
from __future__ import annotations

import asyncio

from ..server import (DEFAULT_SHUTDOWN_DEADLINE, DmServer, MemoryDeviceHandler, ServerConfig,
                      install_uvloop, serve_forever)
from .device import DeviceProfile
from .fleet import account_for_username

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the device port until SIGTERM; prints ``device port: URL`` once listening."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m dmengine.simulator.devport")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--auth", choices=("md5", "basic", "hmac", "none"), default="md5")
    ap.add_argument("--server-id", default="dmengine")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--shutdown-deadline", type=float, default=DEFAULT_SHUTDOWN_DEADLINE)
    args = ap.parse_args(argv)
    profile = DeviceProfile(server_id=args.server_id)
    handler = MemoryDeviceHandler(
        account_factory=lambda dev, user: account_for_username(user, profile))
    handler.record = False
    cfg = ServerConfig(host=args.host, port=args.port, require_auth=args.auth,
                       server_id=args.server_id, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       shutdown_deadline=args.shutdown_deadline)

    def started(server: DmServer) -> None:
        print(f"device port: {server.url}", flush=True)

    install_uvloop()
    asyncio.run(serve_forever(cfg, handler, on_started=started))
    print("stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
