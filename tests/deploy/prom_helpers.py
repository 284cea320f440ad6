"""Test-side helpers for Prometheus and Grafana: local scrape configs, known metric names.

`render_local_config` points Prometheus at a federation running as local
processes (127.0.0.1:<port>) with the same job and role labels, and the same
alert rules, as deploy/prometheus/prometheus.yml; integration tests run
Prometheus (or `promtool`) against it.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
            labels = {"component": role}
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for tools that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status code and body of a plain-HTTP GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode(errors="replace")


# One sample of an instant vector: its labels and its value.
Sample = tuple[dict[str, str], float]


@dataclass
class PrometheusServer:
    """A real `prometheus` process on 127.0.0.1, with its log and TSDB in a test directory."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    log: IO[bytes]

    @classmethod
    def start(
        cls, config_text: str, directory: Path, *, timeout: float = 60.0, attempts: int = 3
    ) -> PrometheusServer:
        """Write `config_text`, start Prometheus on a free port and wait for /-/ready.

        Prometheus cannot listen on port 0 and report the port, so a port that was free is
        picked; if another process takes it first, Prometheus exits and a new port is tried.
        """
        binary = require_tool("prometheus", "prometheus")
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(config_text)
        failure = ""
        for attempt in range(attempts):
            port = free_port()
            log_path = directory / f"prometheus-{attempt}.log"
            log = log_path.open("wb")
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            server = cls(process, f"http://127.0.0.1:{port}", log_path, log)
            try:
                server.wait_ready(timeout)
            except AssertionError as err:
                server.stop()
                failure = str(err)
                if "address already in use" not in server.tail():
                    raise
                continue
            return server
        raise AssertionError(f"prometheus did not start in {attempts} attempts: {failure}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            try:
                status, _ = http_get(f"{self.url}/-/ready", timeout=2.0)
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.2)
        raise AssertionError(
            f"prometheus at {self.url} was not ready within {timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{self.tail()}"
        )

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful /api/v1/<path> answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}")
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"prometheus /api/v1/{path}{query} answered {status}: {body}")
        return answer["data"]

    def query(self, expr: str) -> list[Sample]:
        """An instant query; the samples of the resulting vector."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr!r} gave a {data['resultType']}, not an instant vector")
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait `grace` seconds, then SIGKILL; harmless if already stopped."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
