"""deploy/: the Grafana dashboard and the Prometheus rules name only metrics the server
exports, their PromQL parses (with a PromQL parser and with Prometheus's own, through
promtool), and the rules pass ``promtool check rules`` and their unit tests."""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
from typing import Any, Iterator

import promql_parser
import pytest
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.obs_flow import full_run

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dmengine.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
#: series Prometheus makes itself for every target (not the server's)
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
#: the sample names a family of each type exposes
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                             "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",),
            "info": ("_info",), "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum",
                                                                      "_gcount")}


def promtool() -> str:
    assert pathlib.Path(PROMTOOL).exists(), \
        "promtool is not installed: run `make deps` (Debian's prometheus package has it)"
    return PROMTOOL


# --- the expressions ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in doc["panels"]:
        yield p
        yield from p.get("panels", [])          # a collapsed row keeps its panels


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus receives it: Grafana's interval variables become a
    duration, the others (inside label matchers) a regex."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    doc = dashboard()
    for p in panels(doc):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", grafana_to_promql(t["expr"])))
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", v["definition"])
            assert m, v["definition"]
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for g in doc["groups"] for r in g["rules"]]


def metric_names(node: Any) -> set[str]:
    """Every metric name a parsed PromQL expression selects."""
    if isinstance(node, promql_parser.VectorSelector):
        names = {node.name} if node.name else set()
        names |= {m.value for m in node.matchers.matchers if m.name == "__name__"}
        return names
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    if isinstance(node, promql_parser.Call):
        return set().union(*(metric_names(a) for a in node.args))
    if isinstance(node, promql_parser.AggregateExpr):
        return metric_names(node.expr) | (metric_names(node.param) if node.param else set())
    if isinstance(node, promql_parser.BinaryExpr):
        return metric_names(node.lhs) | metric_names(node.rhs)
    if isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr,
                         promql_parser.SubqueryExpr)):
        return metric_names(node.expr)
    assert isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)), node
    return set()


def test_metric_names_are_found_in_every_kind_of_expression():
    """The walker itself: selectors under functions, aggregations, binary operators,
    subqueries and __name__ matchers are all found."""
    e = promql_parser.parse(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[5m]))) / on() group_left() '
        '(max_over_time(b[10m:1m]) + -c) or topk(3, {__name__="d"}) > bool 2')
    assert metric_names(e) == {"a_bucket", "b", "c", "d"}


# --- what the server exports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return uvloop.run(full_run(tmp_path_factory.mktemp("deploy")))


def exported(metrics_text: str) -> tuple[set[str], set[str]]:
    """(sample names present, names a declared family exposes once it has samples)."""
    present, declared = set(), set()
    for fam in text_string_to_metric_families(metrics_text):
        present |= {s.name for s in fam.samples}
        declared |= {fam.name + sfx for sfx in SUFFIXES.get(fam.type, ("",))}
    return present, declared


def test_every_metric_in_dashboard_and_rules_is_exported(run):
    """After a full run (sessions, a bad digest, an undecodable message, a task, a job,
    webhook deliveries), each metric the dashboard and the alerts name is on /metrics —
    with samples, or (a labelled family nothing has counted yet) declared."""
    present, declared = exported(run.metrics)
    missing: dict[str, list[str]] = {}
    empty: dict[str, list[str]] = {}
    for where, expr in dashboard_exprs() + rule_exprs():
        for name in metric_names(promql_parser.parse(expr)):
            if name in SYNTHETIC or name in present:
                continue
            (empty if name in declared else missing).setdefault(name, []).append(where)
    assert not missing, "named but not exported:\n" + "\n".join(
        f"  {n}: {', '.join(w[:3])}" for n, w in sorted(missing.items()))
    # the run's own traffic shows in the families the dashboard's headline panels read
    for name in ("dmengine_device_sessions_started_total",
                 "dmengine_device_messages_received_total",
                 "dmengine_device_request_seconds_bucket", "dmengine_task_transitions_total",
                 "dmengine_notifications_total"):
        assert name in present, name


def test_the_dashboard_is_an_importable_grafana_dashboard():
    doc = dashboard()
    from deploy.grafana.build_dashboard import render
    assert DASHBOARD.read_text() == render(), \
        "deploy/grafana/dmengine.json differs from build_dashboard.py: run the script"
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"] == "dmengine"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = " | ".join(p["title"] for p in panels(doc)).lower()
    for topic in ("sessions/s", "messages/s", "latency", "authentication failures",
                  "tasks by state", "job progress", "job eta", "scheduler lag",
                  "commit latency", "gateway sends", "webhook deliveries"):
        assert topic in titles, topic
    for p in panels(doc):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # every query is narrowed to the chosen instances
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])


def test_every_dashboard_expression_parses_in_prometheus(tmp_path):
    """Prometheus's own parser (promtool) reads each dashboard query, as a recording rule."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    r = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True,
                       text=True, timeout=120, cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool(), "check", "config", str(PROM_CONFIG)], capture_output=True,
                       text=True, timeout=60, cwd=PROM_CONFIG.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    # the alerts the issue asks for are there, each with a summary
    alerts = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"]}
    for name in ("DmengineDeviceServerErrors", "DmengineApiErrors",
                 "DmengineSchedulerFallingBehind", "DmengineStoreNearMapLimit",
                 "DmengineGatewayFailing", "DmengineWebhooksDeadLettering"):
        assert name in alerts and alerts[name]["annotations"]["summary"], name


def test_promtool_unit_tests_can_fail(tmp_path):
    """The rules' unit tests are not vacuous: a store map at 85 % must not fire."""
    text = RULES_TEST.read_text().replace("'950x20'", "'850x20'", 1)
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    (tmp_path / "t.yml").write_text(text)
    r = subprocess.run([promtool(), "test", "rules", "t.yml"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "DmengineStoreNearMapLimit" in r.stdout + r.stderr
