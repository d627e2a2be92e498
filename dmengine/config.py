"""The settings of the L4 services (one dataclass the engine builds and the services share).

``content_base_url`` and ``server_url`` are set by the engine once the device port listens;
the services read them when they need them, so a change reaches every one of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import auth
from .errors import ConfigError

#: Seconds between notification attempts: attempt k waits RETRY_DELAYS[min(k, len-1)].
DEFAULT_RETRY_DELAYS = (60.0, 300.0, 900.0, 3600.0)
DEFAULT_MAX_NOTIFICATIONS = 4          #: notifications before a silent device expires the task
DEFAULT_TASK_TTL = 7 * 86400.0         #: deadline of a task that names none
DEFAULT_OPTIN_TIMEOUT = 300            #: MAXDT of the opt-in confirm alert, seconds
#: An accepted FUMO Exec (or an Exec answered 202) waits for the device's Generic Alert 1226;
#: a device that stays silent is woken again after ALERT_WAIT seconds, then after twice that,
#: and so on, ALERT_FOLLOWUPS times at most (the package is not sent again: the device only
#: needs a session to report in).  After that the task waits for its deadline.
DEFAULT_ALERT_WAIT = 3600.0
DEFAULT_ALERT_FOLLOWUPS = 3
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
    # --- the result alert of an accepted Exec (see DEFAULT_ALERT_WAIT) ---
    alert_wait: float = DEFAULT_ALERT_WAIT
    alert_followups: int = DEFAULT_ALERT_FOLLOWUPS

    def __post_init__(self) -> None:
        """Refuses a value no service could work with (ConfigError naming the field): a
        wrong setting fails at start, not as a stuck or spinning scheduler later."""
        self.retry_delays = tuple(self.retry_delays)
        self.diag_nodes = tuple(self.diag_nodes)
        if not self.retry_delays:
            raise ConfigError("retry_delays needs at least one delay", key="retry_delays")
        for d in self.retry_delays:
            if not (isinstance(d, (int, float)) and math.isfinite(d) and d > 0):
                raise ConfigError(f"retry_delays are seconds > 0, got {d!r}", key="retry_delays")
        positive = ("task_ttl", "resync_window", "tick_interval", "claim_lease", "alert_wait")
        for name in positive:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {v!r}", key=name)
        at_least_one = ("max_notifications", "optin_timeout", "job_batch", "claim_page",
                        "notify_parallel")
        for name in at_least_one:
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}", key=name)
        if not (isinstance(self.alert_followups, int) and self.alert_followups >= 0):
            raise ConfigError(f"alert_followups must be a whole number >= 0, got "
                              f"{self.alert_followups!r}", key="alert_followups")
        if self.claim_page > 10_000:        # the store's largest page (store.base.MAX_PAGE)
            raise ConfigError(f"claim_page is at most 10000, got {self.claim_page}",
                              key="claim_page")
        if not 0 <= self.retry_jitter < 1:
            raise ConfigError(f"retry_jitter must be in [0, 1), got {self.retry_jitter!r}",
                              key="retry_jitter")
        if self.notify_ui_mode not in (0, 1, 2, 3):
            raise ConfigError(f"notify_ui_mode is 0-3 (package #0 ui-mode), got "
                              f"{self.notify_ui_mode!r}", key="notify_ui_mode")
        if self.resync_after is not None and not (isinstance(self.resync_after, int)
                                                  and self.resync_after >= 1):
            raise ConfigError(f"resync_after must be None or >= 1, got {self.resync_after!r}",
                              key="resync_after")
        if self.max_notify_rate is not None and not (math.isfinite(self.max_notify_rate)
                                                     and self.max_notify_rate > 0):
            raise ConfigError(f"max_notify_rate must be None or > 0, got "
                              f"{self.max_notify_rate!r}", key="max_notify_rate")
        if self.max_in_flight is not None and not (isinstance(self.max_in_flight, int)
                                                   and self.max_in_flight >= 1):
            raise ConfigError(f"max_in_flight must be None or >= 1, got {self.max_in_flight!r}",
                              key="max_in_flight")


__all__ = ["BrokerConfig", "DEFAULT_RETRY_DELAYS", "DEFAULT_MAX_NOTIFICATIONS", "DEFAULT_TASK_TTL",
           "DEFAULT_OPTIN_TIMEOUT", "DEFAULT_ALERT_WAIT", "DEFAULT_ALERT_FOLLOWUPS", "DEFAULT_DEFAULT_FUMO_PATH", "DEFAULT_DIAG_NODES"]
