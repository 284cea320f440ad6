"""`make up` on bad input: one line that says what to do, exit 2, nothing started.

These need the docker client (and, but for the first, a daemon); they build
nothing and take seconds. Without Docker they are skipped with the reason
shown, except where HFL_REQUIRE_DOCKER=1 (.ci/run): there they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from .prom_helpers import REPO

pytestmark = pytest.mark.docker

PROJECT = "hflbadinput"
PORTS = (7400, 7401, 9090)


def require_docker(daemon: bool) -> None:
    why = None
    if shutil.which("docker") is None:
        why = "no docker command"
    elif daemon:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if proc.returncode != 0:
            why = f"no Docker daemon answers: {proc.stderr.strip()}"
    if why is None:
        return
    if os.environ.get("HFL_REQUIRE_DOCKER") == "1":
        pytest.fail(f"HFL_REQUIRE_DOCKER=1 but {why}")
    pytest.skip(f"{why} (set HFL_REQUIRE_DOCKER=1 to make this a failure)")


def make_up(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "COMPOSE_"))}
    return subprocess.run(
        ["make", "--no-print-directory", "up"],
        cwd=REPO,
        env={**base, "HFL_COMPOSE_PROJECT": PROJECT, "HFL_GRAFANA": "0", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def leftovers() -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    out = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", label],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    out += subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", label],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out


def first_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("make up:")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return lines[0]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def ports_free() -> None:
    busy = [p for p in PORTS if not port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use here: stop what uses them (make down) first")


def test_without_a_daemon_make_up_says_to_start_it() -> None:
    require_docker(daemon=False)
    proc = make_up(DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert proc.returncode == 2
    assert first_error_line(proc) == (
        "make up: no Docker daemon answers (unix:///nonexistent/docker.sock); "
        "start it (sudo systemctl start docker) and retry"
    )


def test_a_port_in_use_is_named_and_nothing_starts(ports_free: None) -> None:
    require_docker(daemon=True)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 7401))
        blocker.listen(1)
        proc = make_up()
    assert proc.returncode == 2
    assert first_error_line(proc).startswith("make up: port 7401 is already in use on this host")
    assert "built" not in proc.stdout
    assert leftovers() == []


def test_an_unreachable_registry_points_at_make_base_images(ports_free: None) -> None:
    require_docker(daemon=True)
    proc = make_up(HFL_BASE="hub", HFL_PYTHON_IMAGE="registry.invalid/hfl/python:3.11")
    assert proc.returncode == 2
    line = first_error_line(proc)
    assert line.startswith("make up: cannot pull registry.invalid/hfl/python:3.11 (")
    assert line.endswith(
        "build hfl's own base images from Debian packages with 'sudo make base-images' "
        "(docs/deployment.md), then make up again"
    )
    assert leftovers() == []
