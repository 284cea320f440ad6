"""Test-side helpers for Prometheus and Grafana: local scrape configs, known metric names.

`render_local_config` points Prometheus at a federation running as local
processes (127.0.0.1:<port>) with the same job and role labels, and the same
alert rules, as deploy/prometheus/prometheus.yml; integration tests run
Prometheus (or `promtool`) against it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ROLES = ("attestation", "aggregator", "trainer")

# Every metric the services export (the deployment brief's list). Histograms
# also expose <name>_bucket, _sum and _count.
COMMON_METRICS = frozenset(
    {
        "hfl_grpc_requests_total",
        "hfl_grpc_request_duration_seconds",
        "hfl_grpc_received_bytes_total",
        "hfl_grpc_sent_bytes_total",
        "hfl_build_info",
    }
)
ATTESTATION_METRICS = frozenset(
    {
        "hfl_attestation_verifications_total",
        "hfl_attestation_verification_duration_seconds",
        "hfl_attestation_certificates_issued_total",
        "hfl_attestation_collateral_cache_total",
    }
)
AGGREGATOR_METRICS = frozenset(
    {
        "hfl_aggregator_rounds_started_total",
        "hfl_aggregator_rounds_completed_total",
        "hfl_aggregator_rounds_failed_total",
        "hfl_aggregator_current_round",
        "hfl_aggregator_total_rounds",
        "hfl_aggregator_updates_received_total",
        "hfl_aggregator_updates_refused_total",
        "hfl_aggregator_update_bytes_total",
        "hfl_aggregator_aggregation_seconds",
        "hfl_aggregator_connected_trainers",
        "hfl_aggregator_model_version",
        "hfl_aggregator_round_duration_seconds",
        "hfl_aggregator_round_train_loss",
        "hfl_aggregator_round_eval_loss",
        "hfl_aggregator_round_eval_accuracy",
        "hfl_aggregator_last_round_completed_timestamp_seconds",
        "hfl_aggregator_checkpoint_writes_total",
        "hfl_aggregator_last_checkpoint_timestamp_seconds",
        "hfl_aggregator_federation_done",
    }
)
TRAINER_METRICS = frozenset(
    {
        "hfl_trainer_rounds_completed_total",
        "hfl_trainer_examples_total",
        "hfl_trainer_train_loss",
        "hfl_trainer_eval_accuracy",
        "hfl_trainer_examples_per_second",
        "hfl_trainer_upload_bytes_total",
        "hfl_trainer_retries_total",
    }
)
HISTOGRAMS = frozenset(
    {
        "hfl_grpc_request_duration_seconds",
        "hfl_attestation_verification_duration_seconds",
        "hfl_aggregator_aggregation_seconds",
        "hfl_aggregator_round_duration_seconds",
    }
)
# Series Prometheus itself adds to every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds"})
KNOWN_METRICS = (
    COMMON_METRICS
    | ATTESTATION_METRICS
    | AGGREGATOR_METRICS
    | TRAINER_METRICS
    | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    | PROMETHEUS_SERIES
)

# PromQL words that look like metric names but are not.
_PROMQL_WORDS = frozenset(
    {
        "sum",
        "rate",
        "irate",
        "increase",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "max",
        "min",
        "avg",
        "count",
        "histogram_quantile",
        "time",
        "le",
        "offset",
        "bool",
        "topk",
        "bottomk",
        "clamp_min",
        "delta",
        "deriv",
        "changes",
        "resets",
        "vector",
        "scalar",
        "abs",
        "max_over_time",
        "min_over_time",
        "avg_over_time",
        "label_replace",
    }
)


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (identifiers outside {...} and [...])."""
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|'[^']*'", " ", expr)
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", stripped
    )
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", stripped))
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]?", w)}


def render_local_config(
    targets: Mapping[str, Sequence[str]],
    rules_path: Path | None = PROMETHEUS_DIR / "alerts.yml",
    *,
    scrape_interval: str = "1s",
) -> str:
    """A Prometheus config scraping a local federation.

    `targets` maps a role (attestation, aggregator, trainer) to its metrics
    addresses, e.g. {"aggregator": ["127.0.0.1:9401"], "trainer": ["127.0.0.1:9410",
    "127.0.0.1:9411"]}. Jobs and labels match deploy/prometheus/prometheus.yml,
    so the alert rules at `rules_path` (absolute in the output) apply unchanged.
    """
    scrape_configs = []
    for role in ROLES:
        addresses = list(targets.get(role, ()))
        if not addresses:
            continue
        static = []
        for index, address in enumerate(addresses, start=1):
            labels = {"role": role}
            if role == "trainer":
                labels["party"] = f"trainer-{index}"
            static.append({"targets": [address], "labels": labels})
        scrape_configs.append({"job_name": f"hfl-{role}", "static_configs": static})
    unknown = set(targets) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
    config: dict[str, object] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
            "external_labels": {"federation": "hfl-local"},
        },
        "scrape_configs": scrape_configs,
    }
    if rules_path is not None:
        config["rule_files"] = [str(Path(rules_path).resolve())]
    return yaml.safe_dump(config, sort_keys=False)


def require_tool(name: str, package: str) -> str:
    """The tool's path; fails (never skips) with how to install it when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is not on PATH; install it (Debian/Ubuntu: apt-get install -y {package}). "
            "CI installs it in .ci/run; these checks must not be skipped."
        )
    return path
