"""Prometheus collectors of the device port (L3).

Everything hangs off a registry the caller passes in (STYLE.md habit 12: no global state), so
two servers in one process (or one test after another) never share counters::

    registry = prometheus_client.CollectorRegistry()
    metrics = DeviceMetrics(registry)
    server = DmServer(config, handler, metrics=metrics)

The API port serves ``prometheus_client.generate_latest(registry)`` on ``/metrics``.
Counting is on the hot path of every DM message, so the labelled children are resolved once
here and the server only calls ``inc()`` / ``observe()`` on cached objects.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DeviceMetrics", "ENCODINGS", "LATENCY_BUCKETS"]

ENCODINGS = ("xml", "wbxml")

#: request latency buckets, seconds: a DM message normally takes well under a millisecond in
#: the server; the tail covers handler hooks that wait on the store.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)

#: reasons a session ends, as the server reports them (other strings are accepted too)
END_REASONS = ("completed", "aborted", "timeout", "restarted", "error", "shutdown",
               "auth_failed")

#: why a request got an HTTP error instead of a DM reply
HTTP_ERRORS = ("400", "404", "405", "408", "413", "415", "431", "503")


class DeviceMetrics:
    """The device port's collectors, registered on ``registry``.

    ``prefix`` lets a process with several device ports keep them apart.
    """

    __slots__ = ("registry", "messages_in", "messages_out", "bytes_in", "bytes_out",
                 "sessions_started", "sessions_ended", "sessions_in_flight", "connections",
                 "rejected_503", "http_errors", "latency", "_msg_in", "_msg_out",
                 "_bytes_in", "_bytes_out", "_ended", "_http_err")

    def __init__(self, registry: CollectorRegistry, *, prefix: str = "dmengine") -> None:
        self.registry = registry
        p = prefix + "_device"
        self.messages_in = Counter(f"{p}_messages_received", "DM messages received from devices",
                                   ["encoding"], registry=registry)
        self.messages_out = Counter(f"{p}_messages_sent", "DM messages sent to devices",
                                    ["encoding"], registry=registry)
        self.bytes_in = Counter(f"{p}_received_bytes", "DM message body bytes received",
                                ["encoding"], registry=registry)
        self.bytes_out = Counter(f"{p}_sent_bytes", "DM message body bytes sent",
                                 ["encoding"], registry=registry)
        self.sessions_started = Counter(f"{p}_sessions_started", "DM sessions started",
                                        registry=registry)
        self.sessions_ended = Counter(f"{p}_sessions_ended", "DM sessions ended, by reason",
                                      ["reason"], registry=registry)
        self.sessions_in_flight = Gauge(f"{p}_sessions_in_flight",
                                        "DM sessions open in the session table",
                                        registry=registry)
        self.connections = Gauge(f"{p}_connections", "open device connections",
                                 registry=registry)
        self.rejected_503 = Counter(f"{p}_rejected", "requests answered 503 by admission control",
                                    ["cap"], registry=registry)
        self.http_errors = Counter(f"{p}_http_errors", "requests answered with an HTTP error",
                                   ["status"], registry=registry)
        self.latency = Histogram(f"{p}_request_seconds",
                                 "time from a complete request to its reply being written",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        # resolved children: the hot path touches only these
        self._msg_in = {e: self.messages_in.labels(e) for e in ENCODINGS}
        self._msg_out = {e: self.messages_out.labels(e) for e in ENCODINGS}
        self._bytes_in = {e: self.bytes_in.labels(e) for e in ENCODINGS}
        self._bytes_out = {e: self.bytes_out.labels(e) for e in ENCODINGS}
        self._ended = {r: self.sessions_ended.labels(r) for r in END_REASONS}
        self._http_err = {s: self.http_errors.labels(s) for s in HTTP_ERRORS}

    # --- hot-path helpers ----------------------------------------------------------------

    def message_in(self, encoding: str, nbytes: int) -> None:
        self._msg_in[encoding].inc()
        self._bytes_in[encoding].inc(nbytes)

    def message_out(self, encoding: str, nbytes: int) -> None:
        self._msg_out[encoding].inc()
        self._bytes_out[encoding].inc(nbytes)

    def session_started(self) -> None:
        self.sessions_started.inc()
        self.sessions_in_flight.inc()

    def session_ended(self, reason: str) -> None:
        child = self._ended.get(reason)
        if child is None:
            child = self._ended[reason] = self.sessions_ended.labels(reason)
        child.inc()
        self.sessions_in_flight.dec()

    def rejected(self, cap: str) -> None:
        self.rejected_503.labels(cap).inc()
        self._http_err["503"].inc()

    def http_error(self, status: int) -> None:
        key = str(status)
        child = self._http_err.get(key)
        if child is None:
            child = self._http_err[key] = self.http_errors.labels(key)
        child.inc()

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
