"""deploy/monitoring: the alert rules and the Grafana dashboard read only metrics that the
gateways and the web process really serve."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from migrations_app.metrics import exposition
from ocpp_gateway.metrics import GatewayMetrics
from tests.deploy.helpers import DEPLOY

MONITORING = DEPLOY / "monitoring"
# Names Prometheus itself gives every target.
SCRAPE_METRICS = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def served_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


@pytest.fixture
def served(db) -> set[str]:
    gateway = GatewayMetrics(
        "csms-1",
        stations=lambda: 0,
        backlog=lambda: 0,
        events_written=lambda: 0,
        events_dropped=lambda: 0,
    )
    return served_names(generate_latest(gateway.registry).decode()) | served_names(
        exposition().decode()
    )


def used_names(expression: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expression)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", without_strings))
    return {word for word in words if word.startswith("csms_")} | (words & SCRAPE_METRICS)


def test_every_alert_rule_is_complete_and_reads_served_metrics(served):
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {rule["alert"] for rule in rules}
    assert {
        "CsmsMigrateBatchAutoPaused",
        "CsmsMigrateFailureRatioHigh",
        "CsmsGatewayDown",
        "CsmsGatewayEventBacklogGrowing",
    } <= alerts
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        names = used_names(rule["expr"])
        assert names, rule["alert"]
        assert names - SCRAPE_METRICS <= served, (rule["alert"], names - served)


def test_every_dashboard_panel_reads_served_metrics(served):
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 10
    for expression in expressions:
        names = used_names(expression)
        assert names and names <= served, (expression, names - served)
    variable = dashboard["templating"]["list"][0]
    assert used_names(variable["definition"]) <= served


def test_the_scrape_example_loads_the_rules_and_sends_the_token():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["csms-migrate-web"]["authorization"]["type"] == "Bearer"
    assert "csms-gateway" in jobs
