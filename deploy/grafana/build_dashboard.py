"""Writes deploy/grafana/dmengine.json, the Grafana dashboard of dmengine (run it after an
edit: ``python deploy/grafana/build_dashboard.py``; tests/test_deploy.py checks the JSON is
what this script makes, and that every metric its queries name is one the server exports).

Kept as code because the 30-odd panels share one shape (a time series of PromQL targets on
the ``datasource`` variable, narrowed to the ``instance`` variable); the JSON is what Grafana
imports (Dashboards → New → Import, or a provisioning directory).
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

OUT = pathlib.Path(__file__).with_name("dmengine.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
I = 'instance=~"$instance"'


def s(name: str, extra: str = "") -> str:
    """A selector of ``name`` narrowed to the chosen instances (plus ``extra`` matchers)."""
    return f"{name}{{{I}{', ' + extra if extra else ''}}}"


def rate(name: str, extra: str = "") -> str:
    return f"rate({s(name, extra)}[{RI}])"


def q(p: float, hist: str, by: str = "", extra: str = "") -> str:
    """The ``p`` quantile of histogram ``hist`` (its _bucket series), by ``by`` labels."""
    labels = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({p}, sum by ({labels}) ({rate(hist + '_bucket', extra)}))"


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def panel(self, title: str, targets: list[tuple[str, str]], *, unit: str = "short",
              w: int = 8, h: int = 8, kind: str = "timeseries", description: str = "",
              stack: bool = False, minv: float | None = 0, maxv: float | None = None,
              thresholds: list[tuple[float, str]] | None = None,
              instant: bool = False) -> None:
        if self.x + w > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit}
        if minv is not None:
            defaults["min"] = minv
        if maxv is not None:
            defaults["max"] = maxv
        if kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                  "showPoints": "never", "spanNulls": False,
                                  "stacking": {"mode": "normal" if stack else "none",
                                               "group": "A"}}
        steps = [{"color": "green", "value": None}]
        steps += [{"color": c, "value": v} for v, c in (thresholds or [])]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
        defaults["color"] = {"mode": "thresholds" if kind != "timeseries" else "palette-classic"}
        panel: dict[str, Any] = {
            "type": kind, "title": title, "id": self._id(), "datasource": DS,
            "description": description,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                         "legendFormat": legend, "range": not instant, "instant": instant,
                         **({"format": "time_series"})}
                        for i, (expr, legend) in enumerate(targets)],
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom",
                                           "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "bargauge":
            panel["options"] = {"orientation": "horizontal", "displayMode": "gradient",
                                "showUnfilled": True, "reduceOptions": {
                                    "calcs": ["lastNotNull"], "fields": "", "values": False}}
        elif kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                  "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "auto",
                                "justifyMode": "auto", "orientation": "auto"}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def build() -> dict[str, Any]:
    L = Layout()
    L.row("Overview")
    L.panel("Sessions/s", [(f"sum({rate('dmengine_device_sessions_started_total')})",
                            "started")], kind="stat", w=4, h=4, unit="ops")
    L.panel("Messages/s in", [(f"sum({rate('dmengine_device_messages_received_total')})",
                               "received")], kind="stat", w=4, h=4, unit="ops")
    L.panel("Sessions in flight", [(f"sum({s('dmengine_device_sessions_in_flight')})",
                                    "in flight")], kind="stat", w=4, h=4)
    L.panel("Request p99", [(q(0.99, "dmengine_device_request_seconds"), "p99")],
            kind="stat", w=4, h=4, unit="s", thresholds=[(0.05, "yellow"), (0.25, "red")])
    L.panel("Scheduler lag p99", [(q(0.99, "dmengine_scheduler_lag_seconds"), "p99")],
            kind="stat", w=4, h=4, unit="s", thresholds=[(10, "yellow"), (60, "red")])
    L.panel("Store map used", [(f"max({s('dmengine_store_map_used_bytes')} / "
                                f"{s('dmengine_store_map_size_bytes')})", "used")],
            kind="stat", w=4, h=4, unit="percentunit", maxv=1,
            thresholds=[(0.8, "yellow"), (0.9, "red")])

    L.row("Device port")
    L.panel("Sessions/s", [
        (f"sum({rate('dmengine_device_sessions_started_total')})", "started"),
        (f"sum by (reason) ({rate('dmengine_device_sessions_ended_total')})",
         "ended: {{reason}}")], unit="ops",
        description="DM sessions started, and ended by reason")
    L.panel("Messages/s", [
        (f"sum by (encoding) ({rate('dmengine_device_messages_received_total')})",
         "in {{encoding}}"),
        (f"sum by (encoding) ({rate('dmengine_device_messages_sent_total')})",
         "out {{encoding}}")], unit="ops")
    L.panel("Bytes/s", [
        (f"sum by (encoding) ({rate('dmengine_device_received_bytes_total')})",
         "in {{encoding}}"),
        (f"sum by (encoding) ({rate('dmengine_device_sent_bytes_total')})",
         "out {{encoding}}")], unit="Bps")
    L.panel("Request latency", [
        (q(0.5, "dmengine_device_request_seconds"), "p50"),
        (q(0.9, "dmengine_device_request_seconds"), "p90"),
        (q(0.99, "dmengine_device_request_seconds"), "p99")], unit="s",
        description="complete request to reply written, in the server")
    L.panel("Session duration", [
        (q(0.5, "dmengine_device_session_seconds"), "p50"),
        (q(0.99, "dmengine_device_session_seconds"), "p99")], unit="s",
        description="a whole DM session, package 1 to its end")
    L.panel("Open sessions and connections", [
        (f"sum({s('dmengine_device_sessions_in_flight')})", "sessions in flight"),
        (f"sum({s('dmengine_device_connections')})", "connections")])
    L.panel("Authentication failures/s", [
        (f"sum by (scheme, cause) ({rate('dmengine_device_auth_failures_total')})",
         "{{scheme}} {{cause}}")], unit="ops",
        description="device credentials that failed: a wrong password, a stale nonce, "
                    "a bad HMAC")
    L.panel("Errors/s", [
        (f"sum by (status) ({rate('dmengine_device_http_errors_total')})", "HTTP {{status}}"),
        (f"sum by (encoding) ({rate('dmengine_device_codec_errors_total')})",
         "undecodable {{encoding}}"),
        (f"sum by (reason) ({rate('dmengine_device_cut_off_total')})", "cut off: {{reason}}")],
        unit="ops")
    L.panel("Rejected by admission control/s", [
        (f"sum by (cap) ({rate('dmengine_device_rejected_total')})", "{{cap}}")], unit="ops",
        description="503 + Retry-After: a cap (sessions, connections, per address) was reached")

    L.row("Tasks and jobs")
    L.panel("Tasks by state", [(f"sum by (state) ({s('dmengine_tasks')})", "{{state}}")],
            stack=True)
    L.panel("Task moves/s", [
        (f"sum by (state) ({rate('dmengine_task_transitions_total')})", "to {{state}}"),
        (f"sum by (operation) ({rate('dmengine_tasks_created_total')})",
         "created {{operation}}")], unit="ops")
    L.panel("Retries and expiries/s", [
        (f"sum({rate('dmengine_task_retries_total')})", "retries"),
        (f"sum({rate('dmengine_task_expiries_total')})", "expiries")], unit="ops")
    L.panel("Jobs by state", [(f"sum by (state) ({s('dmengine_jobs')})", "{{state}}")],
            stack=True)
    L.panel("Job progress", [(f"max by (job_id) ({s('dmengine_job_progress_ratio')})",
                              "{{job_id}}")], kind="bargauge", unit="percentunit", maxv=1,
            instant=True, description="share of each running job's tasks that are final")
    L.panel("Job ETA", [(f"max by (job_id) ({s('dmengine_job_eta_seconds')})", "{{job_id}}")],
            kind="bargauge", unit="s", instant=True,
            description="remaining tasks over the recent completion rate, per running job")

    L.row("Scheduler and package 0")
    L.panel("Scheduler lag (due → notified)", [
        (q(0.5, "dmengine_scheduler_lag_seconds"), "p50"),
        (q(0.99, "dmengine_scheduler_lag_seconds"), "p99")], unit="s",
        thresholds=[(60, "red")])
    L.panel("Scheduler pass duration", [
        (q(0.5, "dmengine_scheduler_pass_seconds"), "p50"),
        (q(0.99, "dmengine_scheduler_pass_seconds"), "p99")], unit="s")
    L.panel("Gateway sends/s", [
        (f"sum by (gateway, result) ({rate('dmengine_notifications_total')})",
         "{{gateway}} {{result}}")], unit="ops", description="package #0 handed to the gateway")

    L.row("Store")
    L.panel("Commit latency", [
        (q(0.5, "dmengine_store_commit_seconds"), "p50"),
        (q(0.99, "dmengine_store_commit_seconds"), "p99")], unit="s",
        description="one group commit (a write transaction and its fsync)")
    L.panel("Commit batch size", [
        (f"sum({rate('dmengine_store_commit_batch_size_sum')}) / "
         f"sum({rate('dmengine_store_commit_batch_size_count')})", "mean ops per commit"),
        (q(0.99, "dmengine_store_commit_batch_size"), "p99")])
    L.panel("Map and readers", [
        (f"sum({s('dmengine_store_map_used_bytes')})", "map used"),
        (f"sum({s('dmengine_store_map_size_bytes')})", "map size")], unit="bytes")
    L.panel("Reader slots in use", [(f"sum({s('dmengine_store_readers')})", "readers")],
            w=8)

    L.row("Webhooks, charging, API, content")
    L.panel("Webhook deliveries/s", [
        (f"sum by (result) ({rate('dmengine_webhook_deliveries_total')})", "{{result}}"),
        (f"sum({rate('dmengine_webhook_dead_letters_total')})", "dead letters")], unit="ops")
    L.panel("Webhook backlog", [(f"sum({s('dmengine_webhook_backlog')})", "backlog")])
    L.panel("Charging events/s", [
        (f"sum by (kind) ({rate('dmengine_charging_events_total')})", "{{kind}}")],
        unit="ops")
    L.panel("API requests/s", [
        (f"sum by (route, status) ({rate('dmengine_api_requests_total')})",
         "{{route}} {{status}}")], unit="ops", w=12)
    L.panel("API latency p99 by route", [
        (q(0.99, "dmengine_api_request_seconds", by="route"), "{{route}}")], unit="s", w=12)
    L.panel("Content downloads/s", [
        (f"sum by (result) ({rate('dmengine_content_downloads_total')})", "{{result}}"),
        (f"sum({rate('dmengine_content_range_requests_total')})", "range requests")],
        unit="ops")
    L.panel("Content bytes/s", [(f"sum({rate('dmengine_content_sent_bytes_total')})", "sent")],
            unit="Bps")

    L.row("Process")
    L.panel("CPU", [(f"sum by (instance) ({rate('process_cpu_seconds_total')})",
                     "{{instance}}")], unit="percentunit")
    L.panel("Resident memory", [(f"sum by (instance) ({s('process_resident_memory_bytes')})",
                                 "{{instance}}")], unit="bytes")
    L.panel("Open file descriptors", [
        (f"sum by (instance) ({s('process_open_fds')})", "{{instance}} open"),
        (f"max by (instance) ({s('process_max_fds')})", "{{instance}} max")])

    return {
        "__inputs": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "dmengine: OMA DM sessions, tasks and jobs, scheduler, store, "
                       "package 0, webhooks (metrics of the API port's /metrics)",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": L.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["dmengine", "oma-dm"],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
             "definition": "label_values(dmengine_device_sessions_started_total, instance)",
             "query": {"query": "label_values(dmengine_device_sessions_started_total, "
                                "instance)", "refId": "PrometheusVariableQueryEditor"},
             "includeAll": True, "multi": True, "allValue": ".*", "current": {},
             "refresh": 2, "regex": "", "sort": 1, "hide": 0, "options": []}]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "dmengine",
        "uid": "dmengine-overview",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
