"""Prometheus: the scrape config and alert rules are valid, and the alerts fire when they should.

`promtool` (Debian package `prometheus`) checks syntax and runs the rules
against synthetic series; it must be installed: a missing promtool fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .prom_helpers import (
    KNOWN_METRICS,
    PROMETHEUS_DIR,
    metric_names,
    render_local_config,
    require_tool,
)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
AGG = 'job="hfl-aggregator",instance="aggregator:9401",component="aggregator"'


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool", "prometheus")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False, timeout=120)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_promtool_accepts_the_scrape_config() -> None:
    proc = promtool("check", "config", str(CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_service_is_scraped_with_job_and_role_labels() -> None:
    jobs = {j["job_name"]: j["static_configs"] for j in load_yaml(CONFIG)["scrape_configs"]}
    targets = {
        job: sorted((t, s["labels"]["component"]) for s in static for t in s["targets"])
        for job, static in jobs.items()
    }
    assert targets == {
        "hfl-attestation": [("attestation:9400", "attestation")],
        "hfl-aggregator": [("aggregator:9401", "aggregator")],
        "hfl-trainer": [("trainer-1:9410", "trainer"), ("trainer-2:9410", "trainer")],
    }


def test_alert_rules_use_only_exported_metrics() -> None:
    rules = [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"HflRoundStalled", "HflAttestationRefusals", "HflTrainerDown"} <= names
    assert "HflCheckpointFailing" in names
    for rule in rules:
        unknown = metric_names(rule["expr"]) - KNOWN_METRICS
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def _run_rule_tests(
    tmp_path: Path, tests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return promtool("test", "rules", str(path))


def _alert(eval_time: str, name: str, alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": alerts}


def test_round_stalled_fires_only_while_the_federation_is_not_done(tmp_path: Path) -> None:
    labels = {"job": "hfl-aggregator", "instance": "aggregator:9401", "component": "aggregator"}
    stalled = {
        "exp_labels": {**labels, "severity": "warning"},
        "exp_annotations": {
            "summary": "No federated round completed for 24m 0s",
            "description": (
                "aggregator:9401 is at round 3 and the federation is not done. Check trainer "
                "liveness (HflTrainerDown), refused updates (hfl_aggregator_updates_refused_total) "
                "and attestation refusals."
            ),
        },
    }
    series = [
        # The last round completed at t=60s; nothing since.
        {
            "series": f"hfl_aggregator_last_round_completed_timestamp_seconds{{{AGG}}}",
            "values": "60x40",
        },
        {"series": f"hfl_aggregator_current_round{{{AGG}}}", "values": "3x40"},
    ]
    running = {
        "interval": "1m",
        "input_series": [
            *series,
            {"series": f"hfl_aggregator_federation_done{{{AGG}}}", "values": "0x40"},
        ],
        "alert_rule_test": [
            _alert("10m", "HflRoundStalled", []),  # 9 minutes since the last round
            _alert("25m", "HflRoundStalled", [stalled]),  # 24 minutes, pending since 16m
        ],
    }
    done = {
        "interval": "1m",
        "input_series": [
            *series,
            {"series": f"hfl_aggregator_federation_done{{{AGG}}}", "values": "1x40"},
        ],
        "alert_rule_test": [_alert("25m", "HflRoundStalled", [])],
    }
    proc = _run_rule_tests(tmp_path, [running, done])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_trainer_down_fires_after_two_minutes(tmp_path: Path) -> None:
    trainer = {"job": "hfl-trainer", "instance": "trainer-2:9410", "component": "trainer"}
    trainer["party"] = "trainer-2"
    up = 'up{job="hfl-trainer",instance="trainer-2:9410",component="trainer",party="trainer-2"}'
    test = {
        "interval": "1m",
        "input_series": [{"series": up, "values": "1 1 0 0 0 0"}],
        "alert_rule_test": [
            _alert("3m", "HflTrainerDown", []),  # down for 1 minute: pending
            _alert(
                "5m",
                "HflTrainerDown",
                [
                    {
                        "exp_labels": {**trainer, "severity": "critical"},
                        "exp_annotations": {
                            "summary": "Trainer trainer-2 (trainer-2:9410) is down",
                            "description": (
                                "Prometheus cannot scrape trainer-2:9410 for 2 minutes: the "
                                "trainer process or its host is gone."
                            ),
                        },
                    }
                ],
            ),
        ],
    }
    proc = _run_rule_tests(tmp_path, [test])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_relay_down_fires_after_two_minutes(tmp_path: Path) -> None:
    """A relay scraped by the Kubernetes PodMonitor (job hfl-relay) that stops answering."""
    relay = {"job": "hfl-relay", "instance": "10.1.2.3:9401", "component": "relay"}
    up = 'up{job="hfl-relay",instance="10.1.2.3:9401",component="relay"}'
    test = {
        "interval": "1m",
        "input_series": [{"series": up, "values": "1 1 0 0 0 0"}],
        "alert_rule_test": [
            _alert("3m", "HflRelayDown", []),  # down for 1 minute: pending
            _alert("3m", "HflServiceDown", []),
            _alert(
                "5m",
                "HflRelayDown",
                [
                    {
                        "exp_labels": {**relay, "severity": "critical"},
                        "exp_annotations": {
                            "summary": "Relay 10.1.2.3:9401 is down",
                            "description": (
                                "Prometheus cannot scrape 10.1.2.3:9401 for 2 minutes: its group "
                                "of trainers misses the root's rounds until it is back (it "
                                "resumes from its sealed state)."
                            ),
                        },
                    }
                ],
            ),
        ],
    }
    proc = _run_rule_tests(tmp_path, [test])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_trainer_down_is_quiet_once_the_federation_is_done(tmp_path: Path) -> None:
    # Trainers exit 0 when the federation is done and stay exited (compose
    # restart: on-failure); that is not an outage. Before `done`, it is.
    up = 'up{job="hfl-trainer",instance="trainer-1:9410",component="trainer",party="trainer-1"}'
    done = f"hfl_aggregator_federation_done{{{AGG}}}"
    test = {
        "interval": "1m",
        "input_series": [
            {"series": up, "values": "1 0 0 0 0 0 0 0 0 0"},
            {"series": done, "values": "0 0 0 0 0 1 1 1 1 1"},
        ],
        "alert_rule_test": [
            _alert(
                "4m",
                "HflTrainerDown",
                [
                    {
                        "exp_labels": {
                            "job": "hfl-trainer",
                            "instance": "trainer-1:9410",
                            "component": "trainer",
                            "party": "trainer-1",
                            "severity": "critical",
                        },
                        "exp_annotations": {
                            "summary": "Trainer trainer-1 (trainer-1:9410) is down",
                            "description": (
                                "Prometheus cannot scrape trainer-1:9410 for 2 minutes: the "
                                "trainer process or its host is gone."
                            ),
                        },
                    }
                ],
            ),
            _alert("9m", "HflTrainerDown", []),
        ],
    }
    proc = _run_rule_tests(tmp_path, [test])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_attestation_refusals_and_checkpoint_errors_fire(tmp_path: Path) -> None:
    att = 'job="hfl-attestation",instance="attestation:9400"'
    refused = (
        "hfl_attestation_verifications_total"
        f'{{{att},role="trainer",result="refused",reason="debug_enclave"}}'
    )
    accepted = (
        f'hfl_attestation_verifications_total{{{att},role="trainer",result="accepted",reason="ok"}}'
    )
    ckpt_err = f'hfl_aggregator_checkpoint_writes_total{{{AGG},result="error"}}'
    ckpt_ok = f'hfl_aggregator_checkpoint_writes_total{{{AGG},result="ok"}}'
    test = {
        "interval": "1m",
        "input_series": [
            {"series": refused, "values": "0 0 0 6 12 18"},
            {"series": accepted, "values": "0+60x5"},
            {"series": ckpt_err, "values": "0 0 0 1 1 1"},
            {"series": ckpt_ok, "values": "0+1x5"},
        ],
        "alert_rule_test": [
            _alert("2m", "HflAttestationRefusals", []),
            _alert(
                "5m",
                "HflAttestationRefusals",
                [
                    {
                        "exp_labels": {
                            "job": "hfl-attestation",
                            "instance": "attestation:9400",
                            "role": "trainer",
                            "reason": "debug_enclave",
                            "severity": "warning",
                        },
                        "exp_annotations": {
                            "summary": "Attestation refused trainer evidence: debug_enclave",
                            "description": (
                                "attestation:9400 refuses trainer evidence at 0.06/s (reason "
                                "debug_enclave). Compare the peer's MRENCLAVE/ISVSVN/TCB status "
                                "with the policy."
                            ),
                        },
                    }
                ],
            ),
            _alert("2m", "HflCheckpointFailing", []),
            _alert(
                "5m",
                "HflCheckpointFailing",
                [
                    {
                        "exp_labels": {
                            "job": "hfl-aggregator",
                            "instance": "aggregator:9401",
                            "component": "aggregator",
                            "result": "error",
                            "severity": "critical",
                        },
                        "exp_annotations": {
                            "summary": "Sealed checkpoint writes are failing on aggregator:9401",
                            "description": (
                                "1 checkpoint writes failed in 15 minutes; a restart would lose "
                                "the rounds since the last good checkpoint (disk full? sealed "
                                "volume not writable?)."
                            ),
                        },
                    }
                ],
            ),
        ],
    }
    proc = _run_rule_tests(tmp_path, [test])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_config_for_a_loopback_federation_is_valid(tmp_path: Path) -> None:
    text = render_local_config(
        {
            "attestation": ["127.0.0.1:19400"],
            "aggregator": ["127.0.0.1:19401"],
            "trainer": ["127.0.0.1:19410", "127.0.0.1:19411"],
        }
    )
    config = yaml.safe_load(text)
    assert config["rule_files"] == [str(ALERTS.resolve())]
    trainers = next(j for j in config["scrape_configs"] if j["job_name"] == "hfl-trainer")
    assert [s["labels"]["party"] for s in trainers["static_configs"]] == ["trainer-1", "trainer-2"]
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    proc = promtool("check", "config", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_config_refuses_an_unknown_role() -> None:
    with pytest.raises(ValueError, match=r"unknown roles \['worker'\]"):
        render_local_config({"worker": ["127.0.0.1:1"]})
