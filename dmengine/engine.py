"""The engine assembled (L6): store, content, broker, device port, API port, metrics.

``dmengine serve`` and the end-to-end tests build the same thing through :class:`Engine`, so
what the tests drive is what an operator runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from .broker import Broker, BrokerConfig
from .content import CONTENT_PREFIX, ContentService
from .devices import http_carrier_callback
from .errors import ConfigError
from .identity import Identities, IdentityConfig
from .metrics import (ApiMetrics, ContentMetrics, DeviceMetrics, StoreMetrics, TaskMetrics,
                      WorkGauges, add_process_collectors)
from .notify.base import Gateway
from .server import DmServer, ServerConfig
from .store.base import Store
from .store.lmdb import DEFAULT_MAX_MAPPED, LmdbStore
from .urlguard import UrlGuard, UrlRefused
from .webhooks import WebhookConfig, Webhooks

log = logging.getLogger("dmengine.engine")


#: the main process's default share of new device-port connections, as a part of an even
#: share (bench_campaign over two processes: an even spread had the main at 86 % of a core
#: and the device process at 46 % at 100k devices; at 1M, 0.25 left the device process 12 %
#: busier than the main and its pending cap answered 9,406 503s — 0.3 evened them there;
#: since a job's tasks are made and notified in one write the main process does less per
#: device: at 100k, 0.3 left it at 27.2 s of CPU and the device process at 30.1 s with 373
#: and 1,117 503s in two runs; 0.4: 28.9 and 29.3 s, no 503s)
MAIN_SHARE_OF_EVEN = 0.8


@dataclass
class EngineConfig:
    """What ``dmengine serve`` configures.  ``host`` is the device port's bind address (devices
    may need it public); the API port (DMWSI and the unauthenticated ``/metrics`` and
    ``/health``) binds ``api_host`` on its own, loopback unless told otherwise, and speaks TLS
    with ``api_tls_cert``/``api_tls_key``.  The API key never appears in the config's repr, so
    logging a config cannot leak it."""

    data_dir: str = "./var"
    host: str = "127.0.0.1"                 # device port
    api_host: str = "127.0.0.1"             # API port
    device_port: int = 8080
    api_port: int = 8081
    device_path: str = "/dm"
    server_id: str = "dmengine"
    require_auth: str = "md5"
    public_url: str | None = None          # how devices reach the device port (RespURI, PkgURL)
    tls_cert: str | None = None             # device port TLS
    tls_key: str | None = None
    api_tls_cert: str | None = None         # API port TLS
    api_tls_key: str | None = None
    carrier_callback_url: str | None = None
    #: outgoing URLs (webhooks, carrier callback, HTTP package-0 gateway) may name loopback,
    #: link-local and private addresses (tests, one-machine set-ups); see dmengine/urlguard.py
    allow_private_callbacks: bool = False
    #: networks (CIDR) those URLs may name even so (an SMS centre on the operator's network)
    callback_allow_networks: tuple[str, ...] = ()
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    #: default: generated once, kept in DATA/api-key; the store keeps it (hashed) as the
    #: first admin key (dmengine/identity.py)
    api_key: str | None = field(default=None, repr=False)
    #: userSession lifetime, per-identity rate limits, password hashing
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    server_overrides: dict[str, Any] = field(default_factory=dict)
    #: seconds between refreshes of the work gauges (tasks and jobs per state, job progress,
    #: webhook backlog): each reads the open jobs and the outbox's size, never every task
    metrics_interval: float = 5.0
    #: bytes of store pages the server keeps mapped before the writer remaps the store (its
    #: RSS stays bounded; the pages stay in the page cache); None: never
    store_max_mapped: int | None = DEFAULT_MAX_MAPPED
    #: processes that serve the device port (``SO_REUSEPORT``): this one (which alone runs the
    #: API, the scheduler and the webhooks) and ``device_processes - 1`` device processes
    #: (dmengine/devprocs.py) — Python runs one thread at a time per process, so device
    #: sessions reach a second core only in a second process.  Each process's RespURIs name
    #: a port of its own (ServerConfig.session_port): devices must be able to reach those
    #: ports on the device port's host (with ``public_url``: its host)
    device_processes: int = 1
    #: with ``device_processes > 1``: the share (0..1) of new device-port connections this
    #: process takes, the device processes splitting the rest evenly.  None:
    #: ``MAIN_SHARE_OF_EVEN / device_processes`` — the scheduler, package #0 and the API
    #: keep this process busier than a device process (an even spread left it the bottleneck
    #: of a campaign while the device process idled a third of the time)
    main_device_share: float | None = None
    #: "main", or "device" in a device process: the device port alone (no API, scheduler,
    #: webhooks), its metrics on a loopback port for the main process's /metrics
    role: str = "main"

    def __post_init__(self) -> None:
        if not 1 <= self.device_processes <= 64:
            raise ConfigError("device_processes must be between 1 and 64",
                              key="device_processes")
        if self.main_device_share is not None and not 0.0 <= self.main_device_share <= 1.0:
            raise ConfigError("main_device_share must be between 0 and 1",
                              key="main_device_share")
        if self.role not in ("main", "device"):
            raise ConfigError(f"role must be main or device, not {self.role!r}", key="role")
        if self.store_max_mapped is not None and self.store_max_mapped < 16 << 20:
            raise ConfigError("store_max_mapped must be at least 16 MiB (or None: never)",
                              key="store_max_mapped")
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ConfigError("api_tls_cert and api_tls_key go together",
                              key="api_tls_key" if self.api_tls_key is None else "api_tls_cert")

    def main_share(self) -> float:
        """This process's share of new device-port connections (``main_device_share``)."""
        if self.main_device_share is not None:
            return self.main_device_share
        return MAIN_SHARE_OF_EVEN / self.device_processes

    def api_ssl_context(self) -> ssl.SSLContext | None:
        """The API port's TLS context, or None for plain HTTP."""
        if self.api_tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.api_tls_cert, self.api_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the API TLS certificate/key: {exc}",
                              key="api_tls_cert") from exc
        return ctx


def load_or_create_api_key(data_dir: pathlib.Path) -> str:
    path = data_dir / "api-key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(24)
    while key.startswith("-"):        # a key must pass as `--api-key KEY` on a command line
        key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


class Engine:
    """Starts and stops every part in order (store first up, last down)."""

    def __init__(self, config: EngineConfig, *, gateway: Gateway | None = None,
                 store: Store | None = None) -> None:
        self.config = config
        self.gateway = gateway
        self.store: Store | None = store
        self.registry = CollectorRegistry()
        self.metrics = DeviceMetrics(self.registry)
        self.task_metrics = TaskMetrics(self.registry)
        self.work_gauges = WorkGauges(self.registry)
        self.store_metrics = StoreMetrics(self.registry)
        self.api_metrics = ApiMetrics(self.registry)
        self.content_metrics = ContentMetrics(self.registry)
        add_process_collectors(self.registry)
        self._tally: Any = None
        self._gauges_task: asyncio.Task[None] | None = None
        self.content: ContentService | None = None
        self.broker: Broker | None = None
        self.identity: Identities | None = None
        self.webhooks: Webhooks | None = None
        self.server: DmServer | None = None
        self.api_runner: Any = None
        self.api_port: int | None = None
        self.api_key: str = ""
        #: the other device processes (main role, device_processes > 1): devprocs.DeviceProcesses
        self.device_processes: Any = None
        #: a device process's loopback metrics endpoint (role "device") and its runner
        self.metrics_port: int | None = None
        self.metrics_runner: Any = None
        #: set when stop() begins: /ready answers 503 from then on (dmengine/wsi/system.py)
        self.draining = False

    async def start(self) -> "Engine":
        cfg = self.config
        api_ssl = cfg.api_ssl_context()    # a bad certificate fails before anything is open
        guard = UrlGuard.from_config(cfg.allow_private_callbacks, cfg.callback_allow_networks)
        await check_callback_urls(cfg, self.gateway, guard)     # so is a refused callback URL
        data = pathlib.Path(cfg.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        device_only = cfg.role == "device"
        if not device_only:
            self.api_key = cfg.api_key or load_or_create_api_key(data)
        if self.store is None:
            self.store = LmdbStore(data / "store", max_mapped=self._mapped_per_process())
        self.store_metrics.attach(self.store)
        if not device_only:
            self.identity = Identities(self.store, cfg.identity)
            await self.identity.ensure_serve_key(self.api_key)
        self.content = ContentService(self.store, data / "content")
        self.content.metrics = self.content_metrics
        shared = cfg.device_processes > 1 or device_only
        scfg = ServerConfig(host=cfg.host, port=cfg.device_port, path=cfg.device_path,
                            server_id=cfg.server_id, require_auth=cfg.require_auth,
                            public_url=cfg.public_url, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                            reuse_port=shared, session_port=0 if shared else None,
                            steer=((cfg.main_share(), cfg.device_processes)
                                   if cfg.device_processes > 1 else None),
                            **cfg.server_overrides)
        callback = http_carrier_callback(cfg.carrier_callback_url, guard=guard) \
            if cfg.carrier_callback_url else None
        self.broker = Broker(self.store, self.gateway, config=cfg.broker,
                             carrier_callback=callback, content=self.content,
                             metrics=self.task_metrics)
        self.server = DmServer(scfg, self.broker, metrics=self.metrics)
        if not device_only:
            self.content.sweep_temp()    # temp files of uploads a dead process left behind
        self.server.add_get_route(CONTENT_PREFIX, self.content.device_route())
        await self.server.start()
        base = cfg.public_url or self.server.url.rsplit(cfg.device_path, 1)[0]
        self.broker.config.content_base_url = f"{base.rstrip('/')}/content"
        self.broker.config.server_id = cfg.server_id
        self.broker.config.server_url = (f"{cfg.public_url.rstrip('/')}{cfg.device_path}"
                                         if cfg.public_url else self.server.url)
        from . import devprocs
        if device_only:
            self.metrics_port = await devprocs.serve_metrics(self)
            return self
        if cfg.device_processes > 1:
            # the others bind the port this one got (device_port 0: a free one)
            assert self.server.port is not None
            self.device_processes = devprocs.DeviceProcesses(
                dataclasses.replace(cfg, device_port=self.server.port, role="device",
                                    api_key=None, device_processes=1,
                                    store_max_mapped=self._mapped_per_process()),
                cfg.device_processes - 1,
                on_lost=self._sessions_lost)
            await self.device_processes.start()
        from .wsi.app import start_api   # L5 is imported lazily: the API is optional in tests
        self.api_runner, self.api_port = await start_api(self, cfg.api_host, cfg.api_port,
                                                         ssl_context=api_ssl)
        self.broker.start()
        self.webhooks = Webhooks(self.store, guard, cfg.webhooks, registry=self.registry)
        self.webhooks.start()
        from .bulk import JobTally
        self._tally = JobTally(self.store)
        self._gauges_task = asyncio.get_running_loop().create_task(self._refresh_loop())
        return self

    def _mapped_per_process(self) -> int | None:
        """``store_max_mapped`` is the server's: with device processes each gets its share
        (each maps the store on its own; the pages are the same page cache, but every
        process's RSS counts them)."""
        cfg = self.config
        if cfg.store_max_mapped is None or cfg.role == "device":
            return cfg.store_max_mapped
        return max(16 << 20, cfg.store_max_mapped // cfg.device_processes)

    async def _sessions_lost(self, held: set[str]) -> int:
        """A device process exited: the job tasks cut off in its sessions go back to PENDING
        (``held``: those the live device processes' sessions have)."""
        assert self.broker is not None
        return await self.broker.scheduler.recover(lost=held)

    async def refresh_metrics(self) -> None:
        """Updates the work gauges from the store's own counters (see bulk.JobTally): what a
        scrape then shows.  The loop started by :meth:`start` calls it every
        ``metrics_interval`` seconds."""
        assert self._tally is not None and self.store is not None
        tasks, jobs, running = await self._tally.refresh()
        counts = await self.store.counts()
        self.work_gauges.update(tasks=tasks, jobs=jobs, running=running,
                                backlog=counts.get("outbox", 0))

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as exc:     # a store fault shows in /health; gauges stay stale
                log.warning("metrics: work gauges not refreshed: %s", exc)
            await asyncio.sleep(self.config.metrics_interval)

    @property
    def device_url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def api_url(self) -> str:
        cfg = self.config
        host = cfg.api_host if ":" not in cfg.api_host else f"[{cfg.api_host}]"
        scheme = "https" if cfg.api_tls_cert else "http"
        return f"{scheme}://{host}:{self.api_port}/"

    def urls(self) -> list[tuple[str, str]]:
        api = self.api_url
        return [("device port", self.device_url), ("API", api), ("docs", api + "docs"),
                ("metrics", api + "metrics"), ("health", api + "health"),
                ("ready", api + "ready"),
                ("content", self.device_url.rsplit(self.config.device_path, 1)[0] + "/content/")]

    async def stop(self) -> None:
        self.draining = True
        if self._gauges_task is not None:
            self._gauges_task.cancel()
            try:
                await self._gauges_task
            except asyncio.CancelledError:
                pass
            self._gauges_task = None
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.broker is not None and self.config.role == "main":
            await self.broker.stop()
        stopping = None
        if self.device_processes is not None:       # they drain while this one does
            stopping = asyncio.get_running_loop().create_task(self.device_processes.stop())
        if self.server is not None:
            await self.server.shutdown()
        if stopping is not None:
            await stopping
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        if self.gateway is not None:
            await self.gateway.close()
        if self.store is not None:
            await self.store.close()

    async def __aenter__(self) -> "Engine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def check_callback_urls(cfg: EngineConfig, gateway: Gateway | None,
                              guard: UrlGuard) -> None:
    """The outgoing URLs of the configuration pass the guard (resolved now; every connection
    checks again): the carrier callback of policy 40 and the HTTP package-0 gateway."""
    urls = [("carrier_callback_url", cfg.carrier_callback_url)]
    from .notify.http import HttpCallbackGateway
    if isinstance(gateway, HttpCallbackGateway):
        gateway.guard = guard
        urls.append(("gateway", gateway.url))
    for key, url in urls:
        if not url:
            continue
        try:
            await guard.check(url)
        except UrlRefused as exc:
            raise ConfigError(f"{url!r} refused: {exc} (--allow-private-callbacks or "
                              f"--callback-allow-network CIDR allows it)", key=key) from None


def gateway_from_spec(spec: str | None) -> Gateway | None:
    """``kannel:http://host:port?user=U&password=P``, ``http:URL`` or None."""
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "kannel":
        from urllib.parse import parse_qs, urlsplit

        from .notify.kannel import KannelGateway
        u = urlsplit(rest)
        q = parse_qs(u.query)
        return KannelGateway(f"{u.scheme}://{u.netloc}", q.get("user", [""])[0],
                             q.get("password", [""])[0])
    if kind == "http":
        from .notify.http import HttpCallbackGateway
        return HttpCallbackGateway(rest)
    raise ConfigError(f"unknown gateway {spec!r} (kannel:URL or http:URL)", key="gateway")


async def run_until_signal(engine: Engine, on_ready: Any = None) -> None:
    """Serves until SIGINT/SIGTERM, then shuts down gracefully.  ``on_ready()`` runs once the
    handlers are installed (so a signal right after the URLs are announced is still graceful)."""
    import signal
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        await engine.stop()
