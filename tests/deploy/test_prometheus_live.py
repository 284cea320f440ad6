"""A real Prometheus scrapes a live local federation and loads the alert rules.

The attestation service, the aggregator and two trainers run as processes
(simulated SGX, mutual RA-TLS), started the way `hfl run` starts them. A real
`prometheus` (Debian package `prometheus`; a missing binary fails, never skips)
scrapes their metrics endpoints every second with the jobs, labels and alert
rules of deploy/prometheus, and is asked through its HTTP API what it saw.
Every service's exposition also goes through `promtool check metrics`.

One module fixture runs all of that once, records what it observed, and stops
every process; the tests below assert on the record, one behaviour each.

Trainers exit when the federation is done, and a round of the small CNN on
digits takes a fraction of a second, so the plan has far more rounds than the
test waits for: the federation is still running while Prometheus is queried,
and the fixture stops it with SIGTERM.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from hfl_cli.local import PlanOptions, Prepared, prepare
from hfl_cli.run import FederationError, Supervisor, start_federation

from .prom_helpers import (
    PROMETHEUS_DIR,
    PrometheusServer,
    Sample,
    http_get,
    render_local_config,
    require_tool,
)

ALERTS = PROMETHEUS_DIR / "alerts.yml"
TRAINERS = 2
# Far more than the test waits for (rounds take ~0.2 s here); the test stops the federation.
ROUNDS = 500
METRICS_TIMEOUT_SECONDS = 90.0
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Federation:
    """Metrics addresses (host:port) of the running services, by service name."""

    metrics: dict[str, str]

    def targets(self) -> dict[str, list[str]]:
        trainers = [self.metrics[f"trainer-{i}"] for i in range(1, TRAINERS + 1)]
        return {
            "attestation": [self.metrics["attestation"]],
            "aggregator": [self.metrics["aggregator"]],
            "trainer": trainers,
        }


def start_local_federation(supervisor: Supervisor, prepared: Prepared) -> Federation:
    """Attestation, aggregator, trainers and an operator certificate, exactly as `hfl run`."""
    start_federation(supervisor, prepared, TRAINERS)
    return Federation({s.name: f"127.0.0.1:{s.metrics_port}" for s in supervisor.services})


def _values(samples: list[Sample], label: str) -> dict[str, float]:
    return {labels.get(label, ""): value for labels, value in samples}


def _alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


# A check answers None when it holds, else what Prometheus showed instead.
Check = Callable[[PrometheusServer], str | None]
RULES_CHECK = "the alert rules are loaded, healthy and silent"


def federation_checks(federation: Federation) -> dict[str, Check]:
    m = federation.metrics
    expected_up = {
        (m["attestation"], "hfl-attestation", "attestation", ""),
        (m["aggregator"], "hfl-aggregator", "aggregator", ""),
        *(
            (m[f"trainer-{i}"], "hfl-trainer", "trainer", f"trainer-{i}")
            for i in range(1, TRAINERS + 1)
        ),
    }
    alerts = _alert_names()

    def all_targets_up(prom: PrometheusServer) -> str | None:
        seen = {
            (s["instance"], s["job"], s["component"], s.get("party", ""), v)
            for s, v in prom.query('up{job=~"hfl-.+"}')
        }
        want = {(*target, 1.0) for target in expected_up}
        return None if seen == want else f"up series {sorted(seen)}, want {sorted(want)}"

    def aggregator_completed_rounds(prom: PrometheusServer) -> str | None:
        samples = prom.query('hfl_aggregator_rounds_completed_total{job="hfl-aggregator"}')
        ok = len(samples) == 1 and samples[0][1] > 0
        return None if ok else f"hfl_aggregator_rounds_completed_total: {samples}"

    def ca_issued_certificates(prom: PrometheusServer) -> str | None:
        # One per enclave key (aggregator, each trainer) and one for the operator.
        want = 1 + TRAINERS + 1
        samples = prom.query(
            'sum(hfl_attestation_certificates_issued_total{job="hfl-attestation"})'
        )
        ok = len(samples) == 1 and samples[0][1] >= want
        return None if ok else f"certificates issued in all {samples}, want at least {want}"

    def aggregator_grpc_requests(prom: PrometheusServer) -> str | None:
        by_method = _values(
            prom.query(
                'sum by (method) (hfl_grpc_requests_total{job="hfl-aggregator",'
                'service="hfl.v1.AggregatorService",code="OK"})'
            ),
            "method",
        )
        ok = bool(by_method) and all(v > 0 for v in by_method.values())
        return None if ok else f"OK calls to hfl.v1.AggregatorService by method: {by_method}"

    def trainers_completed_rounds(prom: PrometheusServer) -> str | None:
        by_party = _values(
            prom.query('hfl_trainer_rounds_completed_total{job="hfl-trainer"}'), "party"
        )
        want = {f"trainer-{i}" for i in range(1, TRAINERS + 1)}
        ok = set(by_party) == want and all(v > 0 for v in by_party.values())
        return None if ok else f"hfl_trainer_rounds_completed_total by party: {by_party}"

    def alert_rules_loaded_and_healthy(prom: PrometheusServer) -> str | None:
        rules = [r for g in prom.api("rules", type="alert")["groups"] for r in g["rules"]]
        state = {r["name"]: (r["health"], r["state"], r.get("lastError", "")) for r in rules}
        # A healthy federation fires nothing (HflFirstRoundNotCompleted may be pending at start).
        ok = set(state) == alerts and all(
            health == "ok" and s != "firing" for health, s, _ in state.values()
        )
        return None if ok else f"(health, state, error) by rule {state}, want {sorted(alerts)}"

    return {
        "every target is up with its job, role and party": all_targets_up,
        "the aggregator completed rounds": aggregator_completed_rounds,
        "the CA issued every certificate": ca_issued_certificates,
        "the aggregator served gRPC calls": aggregator_grpc_requests,
        "every trainer completed rounds": trainers_completed_rounds,
        RULES_CHECK: alert_rules_loaded_and_healthy,
    }


def wait_for_checks(
    prom: PrometheusServer, supervisor: Supervisor, checks: dict[str, Check], timeout: float
) -> dict[str, str]:
    """Poll until every check holds at once; the ones that did not at the last poll."""
    deadline = time.monotonic() + timeout
    failing: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            supervisor.check_alive()
        except FederationError as exc:
            raise AssertionError(
                "a federation process ended while Prometheus was being queried (raise ROUNDS "
                f"if the federation finished): {exc}"
            ) from exc
        failing = {}
        for name, check in checks.items():
            problem = check(prom)
            if problem is not None:
                failing[name] = problem
        if not failing:
            break
        time.sleep(POLL_SECONDS)
    return failing


def renamed_labels(prom: PrometheusServer) -> dict[str, list[str]]:
    """hfl series whose own labels clashed with target labels: exported_<label> -> metrics.

    Prometheus (honor_labels: false) keeps the target's label and renames the scraped one
    to exported_<label>, so queries and alerts on that label silently see the wrong value.
    """
    names = prom.api("labels", **{"match[]": '{__name__=~"hfl_.+"}'})
    renamed: dict[str, list[str]] = {}
    for label in sorted(n for n in names if n.startswith("exported_")):
        samples = prom.query(f'count by (__name__, job) ({{__name__=~"hfl_.+", {label}!=""}})')
        renamed[label] = sorted({f"{s['__name__']} (job {s['job']})" for s, _ in samples})
    return renamed


def promtool_check_metrics(promtool: str, exposition: str) -> tuple[int, str]:
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _descendants_in(directory: Path) -> list[str]:
    """Processes below this one whose command line names `directory` (leftovers)."""
    leftovers = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if str(directory) in cmdline:
            leftovers.append(f"{child.pid}: {cmdline}")
    return leftovers


@dataclass(frozen=True)
class Observation:
    """What a real Prometheus, promtool and the process table showed of one live federation."""

    federation: Federation
    unmet: dict[str, str]  # checks that did not hold within the timeout, with what was seen
    federation_done: list[float]
    renamed_labels: dict[str, list[str]]
    promtool: dict[str, tuple[int, str]]  # by service: exit code and output
    exits: dict[str, int | None]  # by process, after SIGTERM
    leftovers: list[str]
    prometheus_log: str
    declared: set[str]  # every series name the services' expositions declare


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Observation:
    """Run the federation and Prometheus once, look at everything, stop everything."""
    require_tool("prometheus", "prometheus")
    promtool = require_tool("promtool", "prometheus")
    base = tmp_path_factory.mktemp("prometheus-live")
    prepared = prepare(base / "federation", PlanOptions(trainers=TRAINERS, rounds=ROUNDS))
    supervisor = Supervisor(prepared.directory)
    prom: PrometheusServer | None = None
    try:
        federation = start_local_federation(supervisor, prepared)
        for name, address in federation.metrics.items():
            status, body = http_get(f"http://{address}/readyz")
            assert (status, body) == (200, "ok\n"), f"{name} /readyz answered {status} {body!r}"
        config = render_local_config(federation.targets(), ALERTS, scrape_interval="1s")
        prom = PrometheusServer.start(config, base / "prometheus")
        checks = federation_checks(federation)
        unmet = wait_for_checks(prom, supervisor, checks, METRICS_TIMEOUT_SECONDS)
        done = [v for _, v in prom.query('hfl_aggregator_federation_done{job="hfl-aggregator"}')]
        renamed = renamed_labels(prom)
        declared: set[str] = set()
        linted = {}
        for name, address in federation.metrics.items():
            status, exposition = http_get(f"http://{address}/metrics")
            assert status == 200, f"{name} /metrics answered {status}"
            linted[name] = promtool_check_metrics(promtool, exposition)
            declared |= _declared_series(exposition)
    finally:
        if prom is not None:
            prom.stop()
        supervisor.stop_all()
    assert prom is not None
    exits = {s.name: s.process.returncode for s in supervisor.services}
    exits["prometheus"] = prom.process.returncode
    return Observation(
        federation,
        unmet,
        done,
        renamed,
        linted,
        exits,
        _descendants_in(base),
        prom.tail(),
        declared,
    )


def _declared_series(exposition: str) -> set[str]:
    """Series names an exposition declares (# TYPE), including those with no sample yet
    (a labelled counter nobody incremented, e.g. refusals in a healthy run)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            names |= {name + s for s in suffixes.get(kind, ())}
    return names


@pytest.mark.slow
def test_prometheus_scrapes_every_service_of_a_live_federation(observed: Observation) -> None:
    unmet = {k: v for k, v in observed.unmet.items() if k != RULES_CHECK}
    assert unmet == {}, f"prometheus log:\n{observed.prometheus_log}"
    # Seen while the federation ran, not as the record of a finished one.
    assert observed.federation_done == [0.0]


@pytest.mark.slow
def test_every_metric_the_dashboard_and_alerts_use_is_really_exported(
    observed: Observation,
) -> None:
    dashboard = PROMETHEUS_DIR.parent / "grafana" / "dashboards" / "hfl.json"
    used = set()
    for path in (dashboard, ALERTS):
        used |= set(re.findall(r"\b(hfl_[a-z_]+)", path.read_text()))
    assert len(used) > 20
    assert sorted(used - observed.declared) == []


@pytest.mark.slow
def test_alert_rules_load_healthy_and_stay_silent(observed: Observation) -> None:
    assert RULES_CHECK not in observed.unmet, observed.unmet.get(RULES_CHECK)


@pytest.mark.slow
def test_every_metrics_exposition_passes_promtool(observed: Observation) -> None:
    assert set(observed.promtool) == {"attestation", "aggregator", "trainer-1", "trainer-2"}
    assert observed.promtool == {name: (0, "") for name in observed.promtool}


@pytest.mark.slow
def test_no_metric_label_is_renamed_by_prometheus(observed: Observation) -> None:
    assert observed.renamed_labels == {}


@pytest.mark.slow
def test_no_process_of_the_federation_or_prometheus_is_left_running(
    observed: Observation,
) -> None:
    assert all(code is not None for code in observed.exits.values()), observed.exits
    assert observed.exits["prometheus"] == 0
    assert observed.leftovers == []


@pytest.mark.slow
def test_every_service_exits_zero_within_the_sigterm_grace(observed: Observation) -> None:
    services = {k: v for k, v in observed.exits.items() if k != "prometheus"}
    assert services == {name: 0 for name in services}
