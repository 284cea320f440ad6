"""Grafana provisioning: the datasource, the dashboard provider and the hfl dashboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .prom_helpers import KNOWN_METRICS, REPO, metric_names

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "hfl.json"


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in load_dashboard()["panels"] if p["type"] != "row"]


def all_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_datasource_is_the_compose_prometheus_with_a_fixed_uid() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["uid"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"


def test_dashboard_provider_reads_the_mounted_dashboards() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning/dashboards/hfl.yaml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


def test_dashboard_structure_is_valid() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "hfl"
    assert dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0


def test_every_panel_queries_the_provisioned_datasource() -> None:
    assert len(panels()) >= 10
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            assert target["expr"].strip()


def test_panels_use_only_metrics_the_services_export() -> None:
    for panel in panels():
        for target in panel["targets"]:
            unknown = metric_names(target["expr"]) - KNOWN_METRICS
            assert not unknown, f"panel {panel['title']!r} uses unknown metrics {unknown}"


def test_dashboard_covers_rounds_quality_traffic_attestation_and_liveness() -> None:
    used = set().union(*(metric_names(e) for e in all_exprs()))
    required = {
        "hfl_aggregator_rounds_completed_total",
        "hfl_aggregator_round_duration_seconds_bucket",
        "hfl_aggregator_round_train_loss",
        "hfl_aggregator_round_eval_loss",
        "hfl_aggregator_round_eval_accuracy",
        "hfl_aggregator_update_bytes_total",
        "hfl_aggregator_aggregation_seconds_bucket",
        "hfl_attestation_verifications_total",
        "up",
    }
    assert required <= used, required - used
    assert any('up{job="hfl-trainer"}' in e for e in all_exprs())
    assert any("by (role, result, reason)" in e for e in all_exprs())


def test_metric_name_extraction_ignores_labels_and_functions() -> None:
    expr = 'sum by (le) (rate(hfl_x_bucket{job="a",le="0.5"}[5m])) / on (job) up{job="b"}'
    assert metric_names(expr) == {"hfl_x_bucket", "up"}


def test_dashboard_file_is_plain_json_without_secrets() -> None:
    text = DASHBOARD.read_text()
    assert "password" not in text.lower()
    assert Path(DASHBOARD).suffix == ".json"
