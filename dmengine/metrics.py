"""Prometheus metrics of the device port (L3).

Everything hangs off a registry the caller passes in (STYLE.md habit 12: no global state), so
two servers in one process (or one test after another) never share counters::

    registry = prometheus_client.CollectorRegistry()
    metrics = DeviceMetrics(registry)
    server = DmServer(config, handler, metrics=metrics)

The API port serves ``prometheus_client.generate_latest(registry)`` on ``/metrics``.

Counting is on the hot path of every DM message: ``prometheus_client``'s ``Counter.inc()``
takes a lock and costs about a microsecond, ten of them per message were 15–25 % of the
server's time.  So the server bumps plain integers here and one custom collector turns them
into metric families when the registry is scraped (the event loop is single-threaded, and
a scrape reading a counter one message late is harmless).

Families (names as exposed):

* ``dmengine_device_messages_received_total{encoding}`` / ``..._messages_sent_total{encoding}``
* ``dmengine_device_received_bytes_total{encoding}`` / ``..._sent_bytes_total{encoding}``
* ``dmengine_device_sessions_started_total``, ``..._sessions_ended_total{reason}``
* ``dmengine_device_sessions_in_flight``, ``dmengine_device_connections`` (gauges)
* ``dmengine_device_rejected_total{cap}`` (503s by admission control: sessions, pending,
  connections, connections_per_address), ``dmengine_device_http_errors_total{status}``
* ``dmengine_device_cut_off_total{reason}`` (connections the server aborted because the
  device read too slowly: send_rate)
* ``dmengine_device_request_seconds`` (histogram: complete request → reply written)
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

__all__ = ["DeviceMetrics", "TaskMetrics", "ENCODINGS", "LATENCY_BUCKETS"]

ENCODINGS = ("xml", "wbxml")

#: request latency buckets, seconds: a DM message normally takes well under a millisecond in
#: the server; the tail covers handler hooks that wait on the store.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class DeviceMetrics:
    """The device port's metrics, registered on ``registry`` as one collector.

    ``prefix`` lets a process with several device ports keep them apart.
    """

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.registry = registry
        self.prefix = prefix + "_device"
        self.msg_in = dict.fromkeys(ENCODINGS, 0)
        self.msg_out = dict.fromkeys(ENCODINGS, 0)
        self.bytes_in = dict.fromkeys(ENCODINGS, 0)
        self.bytes_out = dict.fromkeys(ENCODINGS, 0)
        self.started = 0
        self.ended: dict[str, int] = {}
        self.in_flight = 0
        self.connections = 0
        self.rejections: dict[str, int] = {}
        self.cut_offs: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)   # last one is +Inf
        self.latency_sum = 0.0
        registry.register(self)

    # --- the hot path ----------------------------------------------------------------------

    def message_in(self, encoding: str, nbytes: int) -> None:
        self.msg_in[encoding] += 1
        self.bytes_in[encoding] += nbytes

    def message_out(self, encoding: str, nbytes: int) -> None:
        self.msg_out[encoding] += 1
        self.bytes_out[encoding] += nbytes

    def session_started(self) -> None:
        self.started += 1
        self.in_flight += 1

    def session_ended(self, reason: str) -> None:
        self.ended[reason] = self.ended.get(reason, 0) + 1
        self.in_flight -= 1

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1

    def rejected(self, cap: str) -> None:
        self.rejections[cap] = self.rejections.get(cap, 0) + 1
        self.errors["503"] = self.errors.get("503", 0) + 1

    def auth_failed(self, scheme: str) -> None:
        self.auth_failures[scheme] = self.auth_failures.get(scheme, 0) + 1

    def cut_off(self, reason: str) -> None:
        self.cut_offs[reason] = self.cut_offs.get(reason, 0) + 1

    def http_error(self, status: int) -> None:
        key = str(status)
        self.errors[key] = self.errors.get(key, 0) + 1

    def observe_latency(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    # --- the collector ---------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []      # families are produced at scrape time; no name clash checks needed

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        for name, doc, values in (
                ("messages_received", "DM messages received from devices", self.msg_in),
                ("messages_sent", "DM messages sent to devices", self.msg_out),
                ("received_bytes", "DM message body bytes received", self.bytes_in),
                ("sent_bytes", "DM message body bytes sent", self.bytes_out)):
            fam = CounterMetricFamily(f"{p}_{name}", doc, labels=["encoding"])
            for enc, v in values.items():
                fam.add_metric([enc], v)
            yield fam
        yield CounterMetricFamily(f"{p}_sessions_started", "DM sessions started",
                                  value=self.started)
        fam = CounterMetricFamily(f"{p}_sessions_ended", "DM sessions ended, by reason",
                                  labels=["reason"])
        for reason, v in sorted(self.ended.items()):
            fam.add_metric([reason], v)
        yield fam
        yield GaugeMetricFamily(f"{p}_sessions_in_flight",
                                "DM sessions open in the session table", value=self.in_flight)
        yield GaugeMetricFamily(f"{p}_connections", "open device connections",
                                value=self.connections)
        fam = CounterMetricFamily(f"{p}_rejected",
                                  "requests answered 503 by admission control, by cap",
                                  labels=["cap"])
        for cap, v in sorted(self.rejections.items()):
            fam.add_metric([cap], v)
        yield fam
        fam = CounterMetricFamily(f"{p}_auth_failures",
                                  "device authentications that failed, by scheme",
                                  labels=["scheme"])
        for scheme, v in sorted(self.auth_failures.items()):
            fam.add_metric([scheme], v)
        yield fam
        fam = CounterMetricFamily(f"{p}_cut_off", "connections aborted by the server, by reason",
                                  labels=["reason"])
        for reason, v in sorted(self.cut_offs.items()):
            fam.add_metric([reason], v)
        yield fam
        fam = CounterMetricFamily(f"{p}_http_errors", "requests answered with an HTTP error",
                                  labels=["status"])
        for status, v in sorted(self.errors.items()):
            fam.add_metric([status], v)
        yield fam
        cum, acc = [], 0
        for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), self.buckets):
            acc += n
            cum.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        yield HistogramMetricFamily(
            f"{p}_request_seconds", "time from a complete request to its reply being written",
            buckets=cum, sum_value=self.latency_sum)


class TaskMetrics:
    """Task counters of the deployment broker, same pattern as :class:`DeviceMetrics`
    (plain integers, one collector):

    * ``dmengine_tasks_created_total{operation}``
    * ``dmengine_task_transitions_total{state}`` (every move, by the state entered)
    * ``dmengine_notifications_total{result}`` (package #0: ``sent`` / ``failed``)
    """

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.prefix = prefix
        self.created: dict[str, int] = {}
        self.transitions: dict[str, int] = {}
        self.notifications: dict[str, int] = {}
        registry.register(self)  # type: ignore[arg-type]

    def task_created(self, operation: str) -> None:
        self.created[operation] = self.created.get(operation, 0) + 1

    def task_moved(self, state: str) -> None:
        self.transitions[state] = self.transitions.get(state, 0) + 1

    def notification(self, result: str) -> None:
        self.notifications[result] = self.notifications.get(result, 0) + 1

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        for name, doc, label, values in (
                ("tasks_created", "tasks created, by operation", "operation", self.created),
                ("task_transitions", "task state changes, by the state entered", "state",
                 self.transitions),
                ("notifications", "package #0 notifications, by result", "result",
                 self.notifications)):
            fam = CounterMetricFamily(f"{p}_{name}", doc, labels=[label])
            for key, v in sorted(values.items()):
                fam.add_metric([key], v)
            yield fam
