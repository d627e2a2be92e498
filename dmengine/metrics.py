"""Prometheus metrics of the engine (L3): the device port, the work (tasks, jobs, scheduler,
webhooks, charging), the store, the API and content downloads.

Everything hangs off a registry the caller passes in (STYLE.md habit 12: no global state), so
two servers in one process (or one test after another) never share counters::

    registry = prometheus_client.CollectorRegistry()
    metrics = DeviceMetrics(registry)
    server = DmServer(config, handler, metrics=metrics)

The API port serves ``prometheus_client.generate_latest(registry)`` on ``/metrics``.

Counting is on the hot path of every DM message: ``prometheus_client``'s ``Counter.inc()``
takes a lock and costs about a microsecond, ten of them per message were 15–25 % of the
server's time.  So every class here bumps plain integers (and :class:`Histo` buckets) and is
itself the collector that turns them into metric families when the registry is scraped.  The
event loop is single-threaded, and a scrape reading a counter one message late is harmless;
the one writer outside the loop, the store's commit thread, only adds to its own histograms.

One process serves (``dmengine serve`` runs one event loop: the LMDB store, the session table
and the scheduler's pacing live in it), so these in-process counters are the whole truth and
no multiprocess aggregation is needed.  A second process would need prometheus_client's
multiprocess mode or its own scrape target.

Labels are bounded: never a device, a task or a free text.  Encodings, end reasons, caps,
schemes, auth causes (:func:`auth_cause` maps the engine's reasons to a fixed set), task
states, operations, gateways, results and route names come from small fixed sets; the one
open label, ``job_id``, exists only for RUNNING jobs, at most :data:`MAX_JOB_SERIES` of them.

Families (names as exposed; counters end in ``_total``):

Device port (:class:`DeviceMetrics`, fed from ``_dmcore.pyx``, ``_devport.pyx``, ``server.py``)

* ``dmengine_device_messages_received_total{encoding}`` / ``..._messages_sent_total{encoding}``
* ``dmengine_device_received_bytes_total{encoding}`` / ``..._sent_bytes_total{encoding}``
* ``dmengine_device_sessions_started_total``, ``..._sessions_ended_total{reason}``
* ``dmengine_device_sessions_in_flight``, ``dmengine_device_connections`` (gauges)
* ``dmengine_device_rejected_total{cap}`` (503s by admission control: sessions, pending,
  connections, connections_per_address, auth_backoff), ``dmengine_device_http_errors_total{status}``
* ``dmengine_device_cut_off_total{reason}`` (connections the server aborted because the
  device read too slowly: send_rate)
* ``dmengine_device_auth_failures_total{scheme,cause}``
* ``dmengine_device_codec_errors_total{encoding}`` (bodies that are not a DM message: 400)
* ``dmengine_device_request_seconds`` (histogram: complete request → reply written)
* ``dmengine_device_session_seconds`` (histogram: a whole session, first package 1 → end)

Work (:class:`TaskMetrics`, :class:`WorkGauges`, :class:`WebhookMetrics`)

* ``dmengine_tasks_created_total{operation}``, ``dmengine_task_transitions_total{state}``
* ``dmengine_task_retries_total`` (package #0 sent again), ``dmengine_task_expiries_total``
* ``dmengine_tasks{state}``, ``dmengine_jobs{state}`` (gauges, refreshed every few seconds
  from the jobs' own counters: see :class:`WorkGauges`)
* ``dmengine_job_progress_ratio{job_id}``, ``dmengine_job_eta_seconds{job_id}`` (RUNNING jobs
  only).  The label is ``job_id``, not ``job``: Prometheus gives every series the scrape
  target's own ``job`` label and would rename ours to ``exported_job``
* ``dmengine_scheduler_lag_seconds``, ``dmengine_scheduler_pass_seconds`` (histograms)
* ``dmengine_notifications_total{gateway,result}``
* ``dmengine_webhook_deliveries_total{result}``, ``dmengine_webhook_dead_letters_total``,
  ``dmengine_webhook_backlog`` (gauge: outbox entries not yet delivered)
* ``dmengine_charging_events_total{kind}`` (kind: the operation charged, UPDATE, QUERY …)

Store (:class:`StoreMetrics`): ``dmengine_store_commit_seconds``,
``dmengine_store_commit_batch_size`` (histograms), ``dmengine_store_map_used_bytes``,
``dmengine_store_map_size_bytes``, ``dmengine_store_readers`` (gauges).

API (:class:`ApiMetrics`): ``dmengine_api_requests_total{route,status,role}``,
``dmengine_api_request_seconds{route}`` (histogram).

Content (:class:`ContentMetrics`): ``dmengine_content_downloads_total{result}``,
``dmengine_content_sent_bytes_total``, ``dmengine_content_range_requests_total``.

Process: prometheus_client's ``process_*`` and ``python_*`` collectors, and
``dmengine_gc_pause_seconds{generation}`` (histogram: how long each garbage collection stopped
the process; :class:`GcPauses`) (:func:`add_process_collectors`).
"""
from __future__ import annotations

import gc
import logging
import time
from bisect import bisect_left
from typing import Any, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from ._metrics import LATENCY_BOUNDS, SESSION_BOUNDS, DeviceCounters
from .model import JobState, TaskState

__all__ = ["DeviceMetrics", "TaskMetrics", "WorkGauges", "WebhookMetrics", "StoreMetrics",
           "ApiMetrics", "RouteCalls", "ContentMetrics", "GcPauses", "Histo", "auth_cause",
           "add_process_collectors",
           "ENCODINGS", "LATENCY_BUCKETS", "SESSION_BUCKETS", "MAX_JOB_SERIES"]

log = logging.getLogger("dmengine.metrics")

ENCODINGS = ("xml", "wbxml")

#: request latency buckets, seconds: a DM message normally takes well under a millisecond in
#: the server; the tail covers handler hooks that wait on the store.  Whole DM sessions: a
#: few round trips over a mobile network, up to downloads and users answering opt-in
#: questions.  (Defined in the compiled counters, dmengine/_metrics.pyx.)
LATENCY_BUCKETS: tuple[float, ...] = LATENCY_BOUNDS
SESSION_BUCKETS: tuple[float, ...] = SESSION_BOUNDS
#: the scheduler: from a task being due to its package #0 handed to the gateway; and a pass
SCHEDULER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 300.0)
#: API calls (the store's group commit is a few milliseconds; imports and listings longer)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0)
#: one store write batch, run + commit + fsync
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
#: ops per write batch (DEFAULT_BATCH_SIZE is 2000)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000)
#: one garbage collection (a generation-0 pass over a busy server's young objects: ~0.1 s)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: at most this many RUNNING jobs get their own progress/ETA series (the label's bound)
MAX_JOB_SERIES = 50


class Histo:
    """A histogram of plain integers: ``observe`` is a bisect and two adds (no lock).

    Buckets are Prometheus' ``le`` (a value equal to a bound falls into that bucket)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            acc += n
            out.append(("+Inf" if bound == float("inf") else _num(bound), acc))
        return out

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, buckets=self.cumulative(), sum_value=self.total)


def _histogram(name: str, doc: str, bounds: Sequence[float], counts: Sequence[int],
               total: float) -> HistogramMetricFamily:
    h = Histo(bounds)
    h.counts = list(counts)
    h.total = total
    return h.family(name, doc)


def _num(bound: float) -> str:
    return repr(float(bound))


def _labelled_histo(name: str, doc: str, label: str,
                    histos: Mapping[str, Histo]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=[label])
    for key, h in sorted(histos.items()):
        fam.add_metric([key], h.cumulative(), sum_value=h.total)
    return fam


def _counter(name: str, doc: str, labels: Sequence[str],
             values: Mapping[Any, int]) -> CounterMetricFamily:
    """A counter family from ``{label value (or tuple of them): count}``."""
    fam = CounterMetricFamily(name, doc, labels=list(labels))
    for key, v in sorted(values.items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], v)
    return fam


class _Collector:
    """Families are produced at scrape time; ``describe`` returns none (no clash checks)."""

    __slots__ = ()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:     # pragma: no cover - every subclass has one
        return iter(())


# --- the device port ---------------------------------------------------------------------------

#: the engine's failed-authentication reasons (auth.py, _session.pyx) → a fixed cause label;
#: first match wins, anything else is "other" (the reason texts may quote what a device sent)
AUTH_CAUSES: tuple[tuple[str, str], ...] = (
    ("no cred", "missing_credentials"),
    ("no x-syncml-hmac", "missing_credentials"),
    ("no body", "missing_credentials"),
    ("unknown device", "unknown_device"),
    ("account belongs to another device", "wrong_device"),
    ("user name does not match", "wrong_user"),
    ("not accepted", "wrong_scheme"),
    ("no nonce", "no_nonce"),
    ("digest mismatch", "wrong_credentials"),
    ("hmac mismatch", "wrong_credentials"),
    ("wrong password", "wrong_credentials"),
    ("keeps only its key", "wrong_scheme"),
    ("hmac", "bad_hmac_header"),            # parse errors of the x-syncml-hmac header
)


def auth_cause(reason: str | None) -> str:
    """The bounded ``cause`` label of a failed authentication's reason text."""
    if not reason:
        return "other"
    r = reason.lower()
    for needle, cause in AUTH_CAUSES:
        if needle in r:
            return cause
    return "other"


class DeviceMetrics(DeviceCounters, _Collector):
    """The device port's metrics, registered on ``registry`` as one collector.

    The per-message counters (messages and bytes by encoding, sessions started, ended and in
    flight, connections, the request-latency and session-time histograms) live in the
    compiled base :class:`dmengine._metrics.DeviceCounters`, which the compiled device port
    calls as C methods (``_metrics.pxd``); the rare events here.
    ``prefix`` lets a process with several device ports keep them apart.
    """

    # no instance dict: the methods Python code calls are found on the type without a dict
    # look-up first
    __slots__ = ("registry", "prefix", "rejections", "cut_offs", "auth_failures",
                 "codec_errors", "errors")

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.registry = registry
        self.prefix = prefix + "_device"
        self.rejections: dict[str, int] = {}
        self.cut_offs: dict[str, int] = {}
        self.auth_failures: dict[tuple[str, str], int] = {}     # (scheme, cause) -> n
        self.codec_errors = dict.fromkeys(ENCODINGS, 0)
        self.errors: dict[str, int] = {}
        registry.register(self)

    def rejected(self, cap: str) -> None:
        self.rejections[cap] = self.rejections.get(cap, 0) + 1
        self.errors["503"] = self.errors.get("503", 0) + 1

    def auth_failed(self, scheme: str, reason: str | None = None) -> None:
        key = (scheme or "none", auth_cause(reason))
        self.auth_failures[key] = self.auth_failures.get(key, 0) + 1

    def codec_error(self, encoding: str) -> None:
        """A body that does not decode as a DM message (answered 400)."""
        self.codec_errors[encoding] = self.codec_errors.get(encoding, 0) + 1
        self.errors["400"] = self.errors.get("400", 0) + 1

    def cut_off(self, reason: str) -> None:
        self.cut_offs[reason] = self.cut_offs.get(reason, 0) + 1

    def http_error(self, status: int) -> None:
        key = str(status)
        self.errors[key] = self.errors.get(key, 0) + 1

    # --- the collector ---------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        c = self.counts()
        for name, doc, values in (
                ("messages_received", "DM messages received from devices", c["msg_in"]),
                ("messages_sent", "DM messages sent to devices", c["msg_out"]),
                ("received_bytes", "DM message body bytes received", c["bytes_in"]),
                ("sent_bytes", "DM message body bytes sent", c["bytes_out"]),
                ("codec_errors", "request bodies that are not a DM message (400), by encoding",
                 self.codec_errors)):
            yield _counter(f"{p}_{name}", doc, ["encoding"], values)
        yield CounterMetricFamily(f"{p}_sessions_started", "DM sessions started",
                                  value=self.started)
        yield _counter(f"{p}_sessions_ended", "DM sessions ended, by reason", ["reason"],
                       self.ended)
        yield GaugeMetricFamily(f"{p}_sessions_in_flight",
                                "DM sessions open in the session table", value=self.in_flight)
        yield GaugeMetricFamily(f"{p}_connections", "open device connections",
                                value=self.connections)
        yield _counter(f"{p}_rejected", "requests answered 503 by admission control, by cap",
                       ["cap"], self.rejections)
        yield _counter(f"{p}_auth_failures",
                       "device authentications that failed, by scheme and cause",
                       ["scheme", "cause"], self.auth_failures)
        yield _counter(f"{p}_cut_off", "connections aborted by the server, by reason",
                       ["reason"], self.cut_offs)
        yield _counter(f"{p}_http_errors", "requests answered with an HTTP error", ["status"],
                       self.errors)
        yield _histogram(f"{p}_request_seconds",
                         "time from a complete request to its reply being written",
                         LATENCY_BUCKETS, self.buckets, self.latency_sum)
        yield _histogram(f"{p}_session_seconds",
                         "whole DM sessions: first message to the session's end",
                         SESSION_BUCKETS, self.session_buckets, self.session_sum)


# --- the work ----------------------------------------------------------------------------------


class TaskMetrics(_Collector):
    """Counters of the services (tasks, the scheduler, charging), same pattern as
    :class:`DeviceMetrics` (plain integers, one collector)."""

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.prefix = prefix
        self.created: dict[str, int] = {}
        self.transitions: dict[str, int] = {}
        self.retries = 0
        self.expiries = 0
        #: package #0 results, all gateways together (``by_gateway`` splits them)
        self.notifications: dict[str, int] = {}
        self.by_gateway: dict[tuple[str, str], int] = {}
        self.charging: dict[str, int] = {}
        self.lag = Histo(SCHEDULER_BUCKETS)
        self.passes = Histo(SCHEDULER_BUCKETS)
        registry.register(self)  # type: ignore[arg-type]

    def task_created(self, operation: str, n: int = 1) -> None:
        self.created[operation] = self.created.get(operation, 0) + n

    def task_moved(self, state: str, n: int = 1) -> None:
        self.transitions[state] = self.transitions.get(state, 0) + n
        if state == "EXPIRED":
            self.expiries += n

    def task_retried(self) -> None:
        """A task's device is notified again (second package #0 and later)."""
        self.retries += 1

    def notification(self, result: str, gateway: str = "unknown",
                     lag: float | None = None) -> None:
        """A package #0 ``sent`` / ``failed`` through ``gateway``; ``lag``: seconds from the
        task being due to the send (sent ones only)."""
        self.notifications[result] = self.notifications.get(result, 0) + 1
        key = (gateway, result)
        self.by_gateway[key] = self.by_gateway.get(key, 0) + 1
        if lag is not None:
            self.lag.observe(max(lag, 0.0))

    def scheduler_pass(self, seconds: float) -> None:
        self.passes.observe(seconds)

    def charged(self, kind: str) -> None:
        self.charging[kind] = self.charging.get(kind, 0) + 1

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        yield _counter(f"{p}_tasks_created", "tasks created, by operation", ["operation"],
                       self.created)
        yield _counter(f"{p}_task_transitions", "task state changes, by the state entered",
                       ["state"], self.transitions)
        yield CounterMetricFamily(f"{p}_task_retries",
                                  "package #0 sent again for a task (2nd attempt and later)",
                                  value=self.retries)
        yield CounterMetricFamily(f"{p}_task_expiries", "tasks that expired",
                                  value=self.expiries)
        yield _counter(f"{p}_notifications", "package #0 notifications, by gateway and result",
                       ["gateway", "result"], self.by_gateway)
        yield _counter(f"{p}_charging_events", "IF-4 charging events written, by operation",
                       ["kind"], self.charging)
        yield self.lag.family(f"{p}_scheduler_lag_seconds",
                              "from a task being due (the pass that took it) to its package #0 "
                              "handed to the gateway")
        yield self.passes.family(f"{p}_scheduler_pass_seconds", "scheduler passes")


class WorkGauges(_Collector):
    """Gauges of the work now: tasks and jobs per state, the progress and ETA of RUNNING jobs,
    the webhook backlog.  Never computed per scrape: whoever owns the store (the engine)
    calls :meth:`update` every few seconds with what the store's own counters say (the jobs'
    task counts, read in O(jobs), see ``bulk.JobTally``; the outbox's entry count), and a
    scrape reads the last snapshot.

    ``dmengine_tasks{state}`` counts the tasks of jobs (the store keeps per-job counters, no
    global ones); tasks of single operations (doOperation) show in the counters of
    :class:`TaskMetrics` only."""

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine",
                 max_jobs: int = MAX_JOB_SERIES) -> None:
        self.prefix = prefix
        self.max_jobs = max_jobs
        self.tasks: dict[str, int] = {}
        self.jobs: dict[str, int] = {}
        self.running: list[tuple[str, float, float | None]] = []
        self.backlog: int | None = None
        self.updated = 0.0            # monotonic time of the last update (0: never)
        registry.register(self)  # type: ignore[arg-type]

    def update(self, *, tasks: Mapping[str, int] | None = None,
               jobs: Mapping[str, int] | None = None,
               running: Iterable[tuple[str, float, float | None]] | None = None,
               backlog: int | None = None) -> None:
        """``running``: (job id, progress 0..1, ETA seconds or None) of RUNNING jobs, most
        important first; only the first ``max_jobs`` get series."""
        if tasks is not None:
            self.tasks = {str(k): int(v) for k, v in tasks.items()}
        if jobs is not None:
            self.jobs = {str(k): int(v) for k, v in jobs.items()}
        if running is not None:
            self.running = list(running)[:self.max_jobs]
        if backlog is not None:
            self.backlog = backlog
        self.updated = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        # every state, 0 included: a state's series never vanishes (no gaps, no stale
        # "RUNNING 1" left on a dashboard when the last job ends)
        for name, doc, values, states in (
                ("tasks", "tasks of jobs now in each state", self.tasks, TaskState),
                ("jobs", "jobs now in each state", self.jobs, JobState)):
            fam = GaugeMetricFamily(f"{p}_{name}", doc, labels=["state"])
            for state in states:
                fam.add_metric([state.value], values.get(state.value, 0))
            yield fam
        prog = GaugeMetricFamily(f"{p}_job_progress_ratio",
                                 "final tasks / targets of RUNNING jobs", labels=["job_id"])
        eta = GaugeMetricFamily(f"{p}_job_eta_seconds",
                                "seconds to a RUNNING job's last target at its rate so far",
                                labels=["job_id"])
        for job_id, ratio, seconds in self.running:
            prog.add_metric([job_id], ratio)
            if seconds is not None:
                eta.add_metric([job_id], seconds)
        yield prog
        yield eta
        if self.backlog is not None:
            yield GaugeMetricFamily(f"{p}_webhook_backlog",
                                    "outbox entries (events, deliveries) not yet done",
                                    value=self.backlog)


class WebhookMetrics(_Collector):
    """The push dispatcher's outcomes, read at scrape time from its own ``counts`` dict
    (``delivered``, ``retried``, ``dead``, ``dropped``; dmengine/webhooks.py keeps them)."""

    RESULTS = ("delivered", "retried", "dead", "dropped")

    def __init__(self, registry: CollectorRegistry, counts: Mapping[str, int], *,
                 prefix: str = "dmengine") -> None:
        self.prefix = prefix
        self.counts = counts
        registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        c = self.counts
        yield _counter(f"{p}_webhook_deliveries", "webhook delivery attempts, by result",
                       ["result"], {r: c.get(r, 0) for r in self.RESULTS})
        yield CounterMetricFamily(f"{p}_webhook_dead_letters",
                                  "webhook deliveries given up (dead letters)",
                                  value=c.get("dead", 0))


# --- the store ---------------------------------------------------------------------------------


class StoreMetrics(_Collector):
    """Write batches (observed by the store's writer thread through ``store.on_commit``) and
    the map and reader gauges (``store.info()``, a few LMDB calls, read at scrape time)."""

    def __init__(self, registry: CollectorRegistry, store: Any = None, *,
                 prefix: str = "dmengine") -> None:
        self.prefix = prefix + "_store"
        self.commit = Histo(COMMIT_BUCKETS)
        self.batch = Histo(BATCH_BUCKETS)
        self.store = None
        if store is not None:
            self.attach(store)
        registry.register(self)  # type: ignore[arg-type]

    def attach(self, store: Any) -> None:
        self.store = store
        if hasattr(store, "on_commit"):
            store.on_commit = self.committed

    def committed(self, ops: int, seconds: float) -> None:   # the store's writer thread
        self.commit.observe(seconds)
        self.batch.observe(ops)

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        yield self.commit.family(f"{p}_commit_seconds",
                                 "store write batches: running the ops, commit and fsync")
        yield self.batch.family(f"{p}_commit_batch_size", "ops per store write batch")
        info = getattr(self.store, "info", None)
        if info is None:
            return
        try:
            i = info()
        except Exception as exc:      # a closed store: no gauges, the scrape goes on
            log.debug("store info for metrics: %s", exc)
            return
        yield GaugeMetricFamily(f"{p}_map_used_bytes", "bytes of the LMDB map in use",
                                value=i["used_bytes"])
        yield GaugeMetricFamily(f"{p}_map_size_bytes", "the LMDB map size (grows on demand)",
                                value=i["map_size"])
        yield GaugeMetricFamily(f"{p}_readers", "LMDB reader slots in use",
                                value=i["readers"])


# --- the API and content -----------------------------------------------------------------------


class RouteCalls:
    """One API route's calls: counts by (status, role) and the latency histogram."""

    __slots__ = ("counts", "latency")

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], int] = {}
        self.latency = Histo(API_BUCKETS)

    def observe(self, status: int, role: str, seconds: float) -> None:
        key = (status, role)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.latency.observe(seconds)


class ApiMetrics(_Collector):
    """API calls by route name (the route's name or template, never its path), status and
    role (``anonymous`` before a key is checked)."""

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.prefix = prefix + "_api"
        self.by_route: dict[str, RouteCalls] = {}
        registry.register(self)  # type: ignore[arg-type]

    def route(self, route: str) -> "RouteCalls":
        """The calls of ``route``, made on its first call (a route never called has no
        series).  The API's wrapper keeps its route's and counts into it directly: on every
        call, a lookup and a label tuple fewer than :meth:`observe`."""
        got = self.by_route.get(route)
        if got is None:
            got = self.by_route[route] = RouteCalls()
        return got

    def observe(self, route: str, status: int, role: str, seconds: float) -> None:
        self.route(route).observe(status, role, seconds)

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """Calls by (route, status, role), as exported."""
        return {(route, str(status), role): n
                for route, calls in self.by_route.items()
                for (status, role), n in calls.counts.items()}

    @property
    def latency(self) -> dict[str, Histo]:
        return {route: calls.latency for route, calls in self.by_route.items()}

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        yield _counter(f"{p}_requests", "API requests, by route, status and role",
                       ["route", "status", "role"], self.requests)
        yield _labelled_histo(f"{p}_request_seconds", "API request latency, by route", "route",
                              self.latency)


class ContentMetrics(_Collector):
    """Package downloads of the device port's ``/content/`` route (GET; HEAD is no download)."""

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.prefix = prefix + "_content"
        self.downloads: dict[str, int] = {}
        self.sent_bytes = 0
        self.ranges = 0
        registry.register(self)  # type: ignore[arg-type]

    #: HTTP status of a content answer → the ``result`` label
    RESULTS = {200: "full", 206: "partial", 404: "not_found", 416: "unsatisfiable"}

    def download(self, status: int, nbytes: int, ranged: bool) -> None:
        """A GET answered ``status`` with ``nbytes`` body bytes; ``ranged``: it asked for a
        range (a resumed or partial download)."""
        result = self.RESULTS.get(status, "error")
        self.downloads[result] = self.downloads.get(result, 0) + 1
        self.sent_bytes += nbytes
        if ranged:
            self.ranges += 1

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        yield _counter(f"{p}_downloads", "content GET requests, by result", ["result"],
                       self.downloads)
        yield CounterMetricFamily(f"{p}_sent_bytes",
                                  "content body bytes answered (as Content-Length promised)",
                                  value=self.sent_bytes)
        yield CounterMetricFamily(f"{p}_range_requests",
                                  "content GETs with a Range header (resumed downloads)",
                                  value=self.ranges)


class GcPauses(_Collector):
    """How long each garbage collection stopped the process, by generation
    (``dmengine_gc_pause_seconds``).  prometheus_client's ``python_gc_*`` count collections
    and objects, not time — and time is what a collection costs a server: in a campaign the
    generation-0 passes over thousands of sessions' live objects were 15 % of its CPU before
    ``server.DEFAULT_GC_THRESHOLDS`` was raised (issue 16).  One per process
    (:func:`gc_pauses`): ``gc.callbacks`` is process-wide."""

    def __init__(self) -> None:
        self.pauses = {g: Histo(GC_BUCKETS) for g in range(3)}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: Mapping[str, Any]) -> None:
        # collections do not nest and run with the GIL held: one start time is enough
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].observe(time.perf_counter() - self._started)

    def collect(self) -> Iterator[Metric]:
        yield _labelled_histo("dmengine_gc_pause_seconds",
                              "garbage collections: how long each stopped the process",
                              "generation", {str(g): h for g, h in self.pauses.items()})


_GC_PAUSES: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """The process's one :class:`GcPauses` (its callback installed on first use)."""
    global _GC_PAUSES
    if _GC_PAUSES is None:
        _GC_PAUSES = GcPauses()
    return _GC_PAUSES


#: families that describe one process, not a share of the server's work: the main process's
#: samples are shown, the device processes' left out (a sum of start times means nothing)
PER_PROCESS_FAMILIES = frozenset({"process_start_time_seconds", "process_max_fds", "python_info"})


class MergedRegistry:
    """``registry``'s families with the samples of other processes' exposition ``texts``
    added, for ``generate_latest``: counters, gauges and histograms summed per sample name
    and label set (requests, sessions, CPU seconds, memory of the whole server), except the
    PER_PROCESS_FAMILIES and the ``_created`` times (the main process's).  A series only
    another process has (a status only it answered) joins its family."""

    def __init__(self, registry: Any, texts: list[str]) -> None:
        self.registry = registry
        self.texts = texts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families
        theirs: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Any]] = {}
        for text in self.texts:
            for fam in text_string_to_metric_families(text):
                if fam.name in PER_PROCESS_FAMILIES:
                    continue
                into = theirs.setdefault(fam.name, {})
                for s in fam.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    have = into.get(key)
                    into[key] = s if have is None or s.name.endswith("_created") \
                        else have._replace(value=have.value + s.value)
        for fam in self.registry.collect():
            other = theirs.get(fam.name)
            if other:
                samples = []
                for s in fam.samples:
                    o = other.pop((s.name, tuple(sorted(s.labels.items()))), None)
                    if o is not None and not s.name.endswith("_created"):
                        s = s._replace(value=s.value + o.value)
                    samples.append(s)
                fam.samples = samples + list(other.values())
            yield fam


def add_process_collectors(registry: CollectorRegistry) -> None:
    """prometheus_client's standard ``process_*`` (CPU, memory, descriptors) and ``python_*``
    (version, garbage collector) families on ``registry``, and the collector's pauses."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(gc_pauses())  # type: ignore[arg-type]
