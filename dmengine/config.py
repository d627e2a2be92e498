"""The settings of the L4 services (one dataclass the engine builds and the services share).

``content_base_url`` and ``server_url`` are set by the engine once the device port listens;
the services read them when they need them, so a change reaches every one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import auth

#: Seconds between notification attempts: attempt k waits RETRY_DELAYS[min(k, len-1)].
DEFAULT_RETRY_DELAYS = (60.0, 300.0, 900.0, 3600.0)
DEFAULT_MAX_NOTIFICATIONS = 4          #: notifications before a silent device expires the task
DEFAULT_TASK_TTL = 7 * 86400.0         #: deadline of a task that names none
DEFAULT_OPTIN_TIMEOUT = 300            #: MAXDT of the opt-in confirm alert, seconds
DEFAULT_DEFAULT_FUMO_PATH = "./FUMO/1"
#: Nodes a DIAG reads when the capability names none (DevDetail and DevInfo leaves).
DEFAULT_DIAG_NODES = ("./DevDetail/FwV", "./DevDetail/SwV", "./DevDetail/HwV",
                      "./DevDetail/DevTyp", "./DevDetail/OEM", "./DevInfo/Man",
                      "./DevInfo/Mod", "./DevInfo/Lang")


@dataclass
class BrokerConfig:
    server_id: str = "dmengine"
    content_base_url: str = "http://127.0.0.1:8080/content"
    server_url: str = "http://127.0.0.1:8080/dm"     #: the device port, written into bootstraps
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    max_notifications: int = DEFAULT_MAX_NOTIFICATIONS
    task_ttl: float = DEFAULT_TASK_TTL
    optin_timeout: int = DEFAULT_OPTIN_TIMEOUT
    optin_text: str = "Your operator wants to manage this device. Accept?"
    default_fumo_path: str = DEFAULT_DEFAULT_FUMO_PATH
    diag_nodes: tuple[str, ...] = DEFAULT_DIAG_NODES
    #: package-0 ui-mode of a task without opt-in: the seeds' bOptin=false means "in the
    #: background" (1); an opt-in task is always sent with 3 (user interaction)
    notify_ui_mode: int = 1
    #: notifications of a task signed with the device's stored nonce before package #0 goes out
    #: signed with the re-synchronisation nonce (PROTOCOL.md §8.2): a device that lost its
    #: nonces drops the first ones as forged; None: never re-synchronise
    resync_after: int | None = 2
    resync_window: float = 86400.0     #: how long the device may then open with that nonce
    #: the reading of "0x00000000" our package #0 uses (the session accepts both)
    resync_nonce: bytes = auth.RESYNC_NONCE_ASCII
    tick_interval: float = 1.0         #: how often the scheduler loop looks for due tasks
    #: retries wait retry_delays[k] times a random factor in [1 - jitter, 1 + jitter], so a
    #: crowd of devices that failed together does not come back together
    retry_jitter: float = 0.1
    # --- DMSCHED: the budgets every job shares ---
    max_notify_rate: float | None = None   #: package #0 per second over all jobs (None: no cap)
    max_in_flight: int | None = None       #: job tasks started and not final, over all jobs
    job_batch: int = 5000                  #: tasks a job may start in one pass at most
    #: a task claimed by a scheduler pass is not due again for this long (claim_due's lease)
    claim_lease: float = 120.0
    claim_page: int = 2000                 #: due tasks claimed per pass
    notify_parallel: int = 512             #: notifications under way at once in a pass


__all__ = ["BrokerConfig", "DEFAULT_RETRY_DELAYS", "DEFAULT_MAX_NOTIFICATIONS", "DEFAULT_TASK_TTL",
           "DEFAULT_OPTIN_TIMEOUT", "DEFAULT_DEFAULT_FUMO_PATH", "DEFAULT_DIAG_NODES"]
