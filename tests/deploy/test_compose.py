"""deploy/compose.yaml, the Dockerfiles and deploy/deploy.mk.

Static checks: the compose file is validated by `docker-compose config`
(Debian package docker-compose; a missing binary fails the test) and
structurally; the Dockerfiles are checked as text. The images are built and
run for real by tests/deploy/test_compose_e2e.py, the bad-input paths of
`make up` by tests/deploy/test_compose_cli.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .prom_helpers import REPO, require_tool

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKER = DEPLOY / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
SIMULATED = {"attestation": 9400, "aggregator": 9401, "trainer-1": 9410, "trainer-2": 9410}
SGX = {f"{name}-sgx": port for name, port in SIMULATED.items()}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, Any]:
    svcs: dict[str, Any] = compose()["services"]
    return svcs


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "COMPOSE_"))}
    return subprocess.run(
        [tool, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("profile", ["simulated", "sgx"])
def test_docker_compose_accepts_the_file(profile: str) -> None:
    proc = docker_compose("--profile", profile, "config", "-q")
    assert proc.returncode == 0, proc.stderr


def test_docker_compose_resolves_both_profiles() -> None:
    proc = docker_compose("--profile", "simulated", "--profile", "sgx", "config")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["services"]
    # docker-compose 1.29 lists services of unselected profiles (grafana) too.
    assert set(resolved) - {"grafana"} == {"sim-bootstrap", "prometheus", *SIMULATED, *SGX}
    # Anchors and merge keys expanded: each SGX service has the devices.
    assert "/dev/sgx_enclave:/dev/sgx_enclave" in resolved["trainer-2-sgx"]["devices"]


def test_each_hfl_service_is_in_exactly_one_profile() -> None:
    svcs = services()
    for name in SIMULATED:
        assert svcs[name]["profiles"] == ["simulated"], name
    for name in SGX:
        assert svcs[name]["profiles"] == ["sgx"], name
    assert svcs["sim-bootstrap"]["profiles"] == ["simulated"]
    assert "profiles" not in svcs["prometheus"]
    # Grafana has no Debian package: `make up` adds it only when its image is there.
    assert svcs["grafana"]["profiles"] == ["grafana"]


def test_sgx_services_get_the_enclave_device_and_aesm_socket_and_keep_the_names() -> None:
    svcs = services()
    for name in SGX:
        svc = svcs[name]
        # Quotes come from the host's AESM: only it needs /dev/sgx_provision.
        assert svc["devices"] == ["/dev/sgx_enclave:/dev/sgx_enclave"]
        assert "sgx_provision" not in yaml.safe_dump(svc)
        assert "/var/run/aesmd:/var/run/aesmd" in svc["volumes"]
        assert svc["networks"]["default"]["aliases"] == [name.removesuffix("-sgx")]
        assert "build" not in svc, f"{name}: SGX images are built and signed by make sgx-images"
        assert svc["image"].startswith("hfl-sgx-")


@pytest.mark.parametrize("name", [*SIMULATED, *SGX])
def test_hfl_services_have_a_readyz_healthcheck_on_their_metrics_port(name: str) -> None:
    port = {**SIMULATED, **SGX}[name]
    test = services()[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(test)


@pytest.mark.parametrize("name", [*SIMULATED, *SGX])
def test_sealed_state_is_a_named_volume_per_service(name: str) -> None:
    top_volumes = set(compose()["volumes"])
    state = [v for v in services()[name]["volumes"] if v.endswith(":/var/lib/hfl")]
    assert len(state) == 1
    volume = state[0].split(":")[0]
    assert volume in top_volumes
    others = [n for n in {**SIMULATED, **SGX} if n != name]
    assert all(state[0] not in services()[o]["volumes"] for o in others)


def test_simulated_services_read_policy_and_plan_from_the_bootstrapped_volume() -> None:
    svcs = services()
    boot = svcs["sim-bootstrap"]
    script = boot["command"][0]
    assert script.startswith('hfl init /sim --rounds "$${HFL_ROUNDS:-10}"\n')
    # The services mount /sim read-only: the sealing secret is made here.
    assert "simulated_sealing_secret" in script
    assert "/opt/hfl/libexec/check_sim_volume.py" in script
    assert set(boot["volumes"]) == {
        "sim-platform:/sim",
        "sim-operator:/operator",
        "party-1-key:/parties/party-1",
        "party-2-key:/parties/party-2",
    }
    for name in SIMULATED:
        vols = svcs[name]["volumes"]
        assert "sim-platform:/sim:ro" in vols
        # The operator's private key is in its own volume, which no service mounts.
        assert not any(v.startswith("sim-operator:") for v in vols), name
        env = svcs[name]["environment"]
        assert env["HFL_POLICY"] == "/sim/policy.toml"
        assert env["HFL_SIM_PLATFORM"] == "/sim/platform"
        deps = svcs[name]["depends_on"]
        assert deps["sim-bootstrap"]["condition"] == "service_completed_successfully"
    for name in ("aggregator", "trainer-1", "trainer-2"):
        assert svcs[name]["environment"]["HFL_PLAN"] == "/sim/plan.toml"


def test_startup_order_follows_health() -> None:
    svcs = services()
    assert svcs["aggregator"]["depends_on"]["attestation"]["condition"] == "service_healthy"
    assert svcs["trainer-1"]["depends_on"]["aggregator"]["condition"] == "service_healthy"
    assert svcs["trainer-2-sgx"]["depends_on"]["aggregator-sgx"]["condition"] == "service_healthy"


def test_each_party_key_is_mounted_by_its_own_trainer_only() -> None:
    svcs = services()
    script = svcs["sim-bootstrap"]["command"][0]
    # hfl init writes every party's key into /sim; the bootstrap moves each out.
    assert 'rm -f "/sim/parties/$$p.key.pem"' in script
    assert 'test -s "/parties/$$p/party.key.pem"' in script
    for name in SIMULATED:
        vols = svcs[name]["volumes"]
        keys = [v for v in vols if v.startswith("party-")]
        if name.startswith("trainer-"):
            assert keys == [f"party-{name[-1]}-key:/etc/hfl-party:ro"], (name, vols)
            key = svcs[name]["environment"]["HFL_PARTY_KEY"]
            assert key == "/etc/hfl-party/party.key.pem"
        else:
            assert keys == [], (name, vols)


def test_trainers_are_distinct_parties() -> None:
    svcs = services()
    for suffix in ("", "-sgx"):
        one = svcs[f"trainer-1{suffix}"]["environment"]
        two = svcs[f"trainer-2{suffix}"]["environment"]
        assert (one["HFL_LABEL"], one["HFL_TRAINER_INDEX"]) == ("trainer-1", "0")
        assert (two["HFL_LABEL"], two["HFL_TRAINER_INDEX"]) == ("trainer-2", "1")
        assert one["HFL_AGGREGATOR"] == "aggregator:7401"


def test_dashboards_are_only_published_on_loopback() -> None:
    svcs = services()
    assert svcs["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert svcs["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    for name in SIMULATED | SGX:
        for port in services()[name].get("ports", []):
            assert port.split(":")[-1] in {"7400", "7401"}, f"{name} publishes {port}"


# --- Dockerfiles ------------------------------------------------------------


def froms(path: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", path.read_text(), flags=re.M)


@pytest.mark.parametrize("service", ["attestation", "aggregator", "trainer"])
def test_service_dockerfile_installs_the_locked_packages_non_root_with_healthcheck(
    service: str,
) -> None:
    path = DOCKER / f"Dockerfile.{service}"
    text = path.read_text()
    assert froms(path) == ["${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    assert f"uv export --frozen --package hfl-{service} --no-dev --no-editable" in text
    assert "--require-hashes" in text
    # hfl's own packages are built with the pinned backend, never an unpinned one.
    assert "--require-hashes -r build-tools.txt" in text
    assert "--no-build-isolation" in text
    assert "rm -rf /opt/build" in text, "the build tools must not stay in the image"
    assert re.search(r"^USER hfl$", text, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*", text, flags=re.M)
    assert "/readyz" in text
    assert f'ENTRYPOINT ["hfl-{service}"]' in text


@pytest.mark.parametrize(
    "path", [p for p in DOCKERFILES if p.name != "Dockerfile.sgx"], ids=lambda p: p.name
)
def test_simulated_dockerfiles_build_without_buildkit_or_docker_hub_frontends(path: Path) -> None:
    text = path.read_text()
    # A `# syntax=` line pulls a frontend image from Docker Hub on every build;
    # RUN --mount needs BuildKit, which a current client without buildx lacks.
    assert not re.search(r"^#\s*syntax=", text, flags=re.M | re.I)
    assert "--mount=" not in text
    assert len(re.findall(r"^(RUN|COPY|ADD)\b", text, flags=re.M)) <= 4, "few layers (vfs)"


def test_tools_image_is_built_on_the_trainer_image() -> None:
    path = DOCKER / "Dockerfile.tools"
    text = path.read_text()
    assert froms(path) == ["${TRAINER_IMAGE}"]
    assert "uv export --frozen --package hfl-cli" in text
    assert "COPY deploy/check_sim_volume.py /opt/hfl/libexec/check_sim_volume.py" in text
    assert 'ENTRYPOINT ["hfl"]' in text


def test_build_tools_are_pinned_by_hash() -> None:
    lines = (DOCKER / "build-tools.txt").read_text().splitlines()
    pins = [line for line in lines if re.match(r"^[a-z0-9-]+==", line)]
    assert {p.split("==")[0] for p in pins} >= {"hatchling", "uv"}
    makefile = (REPO / "Makefile").read_text()
    uv_version = re.search(r"^UV_VERSION := (\S+)$", makefile, flags=re.M)
    assert uv_version
    assert any(p.startswith(f"uv=={uv_version.group(1)} ") for p in pins)
    text = "\n".join(lines)
    for pin in pins:
        name = pin.split("==")[0]
        block = text.split(pin, 1)[1].split("\n", 1)[1]
        assert block.lstrip().startswith("--hash=sha256:"), name


def test_aggregator_image_refuses_tensorflow() -> None:
    text = (DOCKER / "Dockerfile.aggregator").read_text()
    assert "tensorflow must not be in the aggregator image" in text
    assert "services/trainer" not in text


def test_locked_aggregator_dependencies_exclude_tensorflow_and_trainer_has_it() -> None:
    uv = REPO / ".tools" / "bin" / "uv"
    uv_path = str(uv) if uv.exists() else shutil.which("uv")
    assert uv_path, "uv is needed (make install puts it in .tools/bin/uv)"

    def export(package: str) -> str:
        proc = subprocess.run(
            [
                uv_path,
                "export",
                "--frozen",
                "--package",
                package,
                "--no-dev",
                "--no-editable",
                "--no-emit-workspace",
                "--no-header",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            timeout=120,
        )
        return proc.stdout

    aggregator = export("hfl-aggregator")
    assert "numpy==" in aggregator
    assert "tensorflow" not in aggregator
    assert "keras" not in aggregator
    assert "tensorflow-cpu==" in export("hfl-trainer")


def test_sgx_dockerfile_signs_with_a_secret_and_never_copies_a_key() -> None:
    path = DOCKER / "Dockerfile.sgx"
    text = path.read_text()
    assert "ARG SGX_BASE_IMAGE=debian:bookworm-slim" in text
    assert not re.search(r"^#\s*syntax=", text, flags=re.M), "no frontend pulled from Docker Hub"
    assert "--mount=type=secret,id=sgx_signing_key,required=true" in text
    assert "libsgx-dcap-default-qpl" in text
    assert "sgx_default_qcnl.conf" in text
    assert "gramine-sgx " in text
    for line in text.splitlines():
        if line.startswith(("COPY", "ADD")):
            assert not re.search(r"\.pem|key", line, flags=re.I), line
    assert re.search(r"^USER hfl$", text, flags=re.M)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_tag(path: Path) -> None:
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    for image in froms(path):
        name = image
        match = re.fullmatch(r"\$\{(\w+)\}", image)
        if match:
            name = args[match.group(1)]
        if ":" not in name and name in {"builder", "base"}:
            continue  # a stage of this file
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", name), name
        assert not name.endswith(":latest")


def test_qcnl_template_renders_to_json() -> None:
    import json

    text = (DEPLOY / "sgx" / "sgx_default_qcnl.conf.template").read_text()
    rendered = text.replace("@PCCS_URL@", "https://pccs.example/sgx/certification/v4/")
    conf = json.loads(rendered.replace("@USE_SECURE_CERT@", "true"))
    assert conf["pccs_url"] == "https://pccs.example/sgx/certification/v4/"
    assert conf["use_secure_cert"] is True


# --- deploy/deploy.mk and deploy/compose.sh -------------------------------------


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    tool = require_tool("make", "make")
    return subprocess.run(
        [tool, "--no-print-directory", "-f", "deploy/deploy.mk", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
        env=env,
    )


def test_make_targets_call_the_compose_script() -> None:
    for target in ("up", "down", "operator"):
        proc = make("-n", target)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"deploy/compose.sh {target}"
    assert make("-n", "base-images").stdout.strip() == "deploy/base/build-base-images.sh"


def test_make_up_refuses_an_unknown_profile_before_touching_docker() -> None:
    env = {**os.environ, "DOCKER": "/nonexistent/docker"}
    proc = make("up", "PROFILE=prod", env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[0] == (
        "make up: PROFILE must be simulated or sgx, not 'prod'"
    )


def test_make_up_without_docker_says_what_to_install() -> None:
    env = {**os.environ, "DOCKER": "/nonexistent/docker"}
    proc = make("up", env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[0] == (
        "make up: no docker command; install Docker (Debian: apt-get install docker.io) and retry"
    )


def test_root_dockerignore_is_an_allow_list_covering_every_copy() -> None:
    # The classic builder reads only the root .dockerignore.
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context must start from nothing (no .venv, .git, keys)"
    assert "**/*.pem" in lines
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for path in DOCKERFILES:
        # Dockerfile.project's context is a clean copy of the project (trainer-image.sh).
        if path.name in ("Dockerfile.sgx", "Dockerfile.project"):
            continue
        for sources in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", path.read_text(), flags=re.M):
            for raw in sources.split():
                source = raw.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), source


def test_sgx_dockerfile_has_its_own_allow_list_dockerignore() -> None:
    path = DOCKER / "Dockerfile.sgx"
    ignore = path.with_name(path.name + ".dockerignore")
    lines = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    text = path.read_text()
    # Both policies the two-stage build bakes in (deploy/sgx-images.sh).
    copied = set(re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, flags=re.M))
    for sources in copied:
        for raw in sources.split():
            for policy in ("policy.toml", "policy.trainer.toml"):
                source = raw.rstrip("/").replace("${POLICY_FILE}", policy)
                assert any(source == a or source.startswith(a + "/") for a in allowed), source


def test_sgx_images_are_built_central_services_first_then_trainers_pinning_them() -> None:
    script = (DEPLOY / "sgx-images.sh").read_text()
    body = script[script.index('for svc in "${CENTRAL[@]}"; do\n  build') :]
    central = body.index('build "$svc" policy.toml')
    pin = body.index("-m hfl_common.sigstruct --pin-into deploy/config/policy.toml")
    trainer = body.index("build trainer policy.trainer.toml")
    assert central < pin < trainer
    assert "CENTRAL=(attestation aggregator)" in script
    assert make("-n", "sgx-images").stdout.rstrip().endswith("deploy/sgx-images.sh")


def test_sgx_images_without_a_signing_key_says_where_it_looked(tmp_path: Path) -> None:
    env = {**os.environ, "SGX_SIGNING_KEY": str(tmp_path / "missing.pem")}
    proc = subprocess.run(
        ["deploy/sgx-images.sh"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"make sgx-images: no enclave signing key at {tmp_path / 'missing.pem'} "
        "(SGX_SIGNING_KEY=...)"
    )


# --- one organisation's trainer (deploy/compose.trainer.yaml) ----------------------------

TRAINER_COMPOSE = DEPLOY / "compose.trainer.yaml"
PARTY_ENV = {
    "HFL_TRAINER_PARTY": "party-1",
    "HFL_TRAINER_AGGREGATOR": "central.example.org:7401",
    "HFL_TRAINER_ATTESTATION": "central.example.org:7400",
    "HFL_TRAINER_PARTY_DIR": "/srv/hfl/party-1",
    "HFL_TRAINER_OUTPUT": "/srv/hfl/model",
}


def trainer_compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = require_tool("docker-compose", "docker-compose")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "COMPOSE_"))}
    return subprocess.run(
        [tool, "-f", str(TRAINER_COMPOSE), "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**base, **env},
    )


def test_trainer_compose_knows_only_public_addresses_its_own_files_and_data() -> None:
    proc = trainer_compose_config(PARTY_ENV)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert set(config["services"]) == {"trainer"}
    trainer = config["services"]["trainer"]
    env = trainer["environment"]
    assert env["HFL_AGGREGATOR"] == "central.example.org:7401"
    assert env["HFL_ATTESTATION"] == "central.example.org:7400"
    assert (env["HFL_PARTY"], env["HFL_PARTY_KEY"]) == ("party-1", "/party/key.pem")
    assert env["HFL_POLICY"].startswith("/party/")
    assert env["HFL_PLAN"].startswith("/party/")
    # docker-compose 1.29 prints short syntax: SOURCE:TARGET:MODE
    mounts = {
        (v.split(":")[0], v.split(":")[1], v.split(":")[2] == "ro") for v in trainer["volumes"]
    }
    named = {m for m in mounts if not m[0].startswith("/")}
    binds = mounts - named
    # One named volume, its own state; nothing shared with the central services.
    assert named == {("trainer-state", "/var/lib/hfl", False)}
    assert ("/srv/hfl/party-1", "/party", True) in binds
    assert ("/srv/hfl/model", "/output", False) in binds
    assert {t for _s, t, _ro in binds} == {"/party", "/data", "/output"}
    assert {t for _s, t, ro in binds if ro} == {"/party", "/data"}
    assert "depends_on" not in trainer
    assert "networks" not in config or set(config["networks"]) <= {"default"}
    assert trainer["cap_drop"] == ["ALL"]
    assert trainer["read_only"] is True
    assert all(p.startswith("127.0.0.1:") for p in trainer.get("ports", []))


@pytest.mark.parametrize(
    ("missing", "says"),
    [
        ("HFL_TRAINER_AGGREGATOR", "aggregator's public address"),
        ("HFL_TRAINER_ATTESTATION", "attestation service's public address"),
        ("HFL_TRAINER_PARTY_DIR", "party directory"),
    ],
)
def test_trainer_compose_refuses_to_start_without_what_a_party_must_give(
    missing: str, says: str
) -> None:
    proc = trainer_compose_config({k: v for k, v in PARTY_ENV.items() if k != missing})
    assert proc.returncode != 0
    assert says in proc.stderr, proc.stderr


def test_project_image_adds_only_the_project_and_passes_it_to_the_trainer() -> None:
    text = (DOCKER / "Dockerfile.project").read_text()
    assert froms(DOCKER / "Dockerfile.project") == ["${TRAINER_IMAGE}"]
    assert "COPY project/ /opt/hfl/project/${PROJECT_NAME}/" in text
    assert "ENV HFL_PROJECT=/opt/hfl/project/${PROJECT_NAME}" in text
    assert not re.search(r"^USER ", text, flags=re.M)  # the base image's user hfl
    script = (DEPLOY / "trainer-image.sh").read_text()
    # The build context is a copy of what the identity measures, nothing else.
    assert "-name __pycache__" in script
    assert "! -name '*.pyc'" in script


def test_sgx_trainer_image_measures_a_project_only_in_the_trainer() -> None:
    dockerfile = (DOCKER / "Dockerfile.sgx").read_text()
    assert "COPY deploy/config/project/ /opt/hfl/project/" in dockerfile
    assert 'HFL_PROJECT_DIR="$project"' in dockerfile
    assert 'test "${SERVICE}" = trainer' in dockerfile
    script = (DEPLOY / "sgx-images.sh").read_text()
    assert 'build trainer policy.trainer.toml "${project_args[@]}"' in script
    assert 'build "$svc" policy.toml\n' in script  # the central services get no project
    assert "! -name '*.pyc'" in script
