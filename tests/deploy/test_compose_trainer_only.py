"""Each organisation runs only its own trainer, and a project goes into a trainer image.

Containers for real, driven through the public surface only:

- the central services (attestation, aggregator) from deploy/compose.yaml
  (`make up HFL_SERVICES="attestation aggregator"`, compose project hfltrn);
- `make party PARTY=party-N` copies what that party is given (policy, plan, its own
  key, the simulated platform) out of the central deployment;
- each party's trainer from deploy/compose.trainer.yaml, its own compose project
  (`make trainer-up`), knowing only the central services' public addresses (this
  host's address and the published ports), its directory, its data and its output;
- a short federation to completion: both trainers exit 0 with the model at home;
- `make trainer-image PROJECT=DIR`: a project from `hfl new` built into an image FROM
  the trainer image, whose trainer loads the project and measures it.

Images: the ones tests/deploy/test_compose_e2e.py builds (same tag, hfl-*:e2e, kept
until the session ends), built here only when absent (and then removed at the end of
the session). HFL_E2E_IMAGE_TAG picks another tag. Everything else this test makes
(containers, volumes, networks, the project images) is removed at the end.

Marked `docker` and `slow`; without a Docker daemon it is skipped with the reason,
except where HFL_REQUIRE_DOCKER=1 (CI): there it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .prom_helpers import REPO

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

TAG = os.environ.get("HFL_E2E_IMAGE_TAG", "e2e")
IMAGES = [f"hfl-{name}:{TAG}" for name in ("attestation", "aggregator", "trainer", "tools")]
CENTRAL = "hfltrn"
PARTIES = ("party-1", "party-2")
ROUNDS = 3
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "COMPOSE_"))},
    "HFL_COMPOSE_PROJECT": CENTRAL,
    "HFL_IMAGE_TAG": TAG,
    "HFL_ROUNDS": str(ROUNDS),
    "HFL_GRAFANA": "0",
}


def run(
    *cmd: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        cwd=REPO,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def make(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    return run("make", "--no-print-directory", *args, timeout=timeout, env=env).stdout


def docker(*args: str, check: bool = True, timeout: float = 300) -> str:
    return run("docker", *args, check=check, timeout=timeout).stdout


def have_image(image: str) -> bool:
    return run("docker", "image", "inspect", image, check=False).returncode == 0


def containers(project: str) -> list[str]:
    return docker(
        "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"
    ).split()


def inspect(cid: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("inspect", cid))
    return data[0]


def leftovers(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    found = containers(project)
    found += docker("volume", "ls", "-q", "--filter", label).split()
    found += docker("network", "ls", "-q", "--filter", label).split()
    return found


def host_address() -> str:
    """This host's address as another machine would use it (not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
        address: str = s.getsockname()[0]
    if address.startswith("127."):
        pytest.fail("no non-loopback address on this host for the trainers to reach")
    return address


def wait_for(what: str, check: Any, timeout: float, interval: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def require_docker() -> None:
    reason = None
    if shutil.which("docker") is None:
        reason = "no docker command"
    else:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if proc.returncode != 0:
            reason = f"no Docker daemon answers: {proc.stderr.strip()}"
    if reason is not None:
        if os.environ.get("HFL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HFL_REQUIRE_DOCKER=1 but {reason}; .ci/run starts dockerd")
        pytest.skip(f"{reason} (set HFL_REQUIRE_DOCKER=1 to make this a failure)")


@pytest.fixture(scope="module")
def images(images_to_remove: set[str]) -> bool:
    """True when the hfl-*:TAG images are there to reuse; False: `make up` builds them."""
    require_docker()
    present = all(have_image(i) for i in IMAGES)
    if not present:
        images_to_remove.update(IMAGES)
    return present


def trainer_project(party: str) -> str:
    return f"{CENTRAL}-{party}"


def trainer_env(party: str) -> dict[str, str]:
    return {
        "HFL_TRAINER_PROJECT": trainer_project(party),
        "HFL_TRAINER_METRICS_PORT": str(19410 + PARTIES.index(party) + 1),
    }


def remove_all() -> None:
    for party in PARTIES:
        run(
            "make", "--no-print-directory", "trainer-down", f"PARTY={party}", "WIPE=1",
            check=False, timeout=300, env=trainer_env(party),
        )  # fmt: skip
    run("make", "--no-print-directory", "down", "WIPE=1", check=False, timeout=300)


@dataclass
class Federation:
    base: Path
    outputs: dict[str, Path]
    party_dirs: dict[str, Path]


@pytest.fixture(scope="module")
def federation(images: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("parties")
    remove_all()
    for project in (CENTRAL, *(trainer_project(p) for p in PARTIES)):
        assert leftovers(project) == [], f"could not clean compose project {project} up"
    address = host_address()
    try:
        make(
            "up", 'HFL_SERVICES=attestation aggregator', f"HFL_BUILD={0 if images else 1}",
            timeout=3000,
        )  # fmt: skip
        outputs: dict[str, Path] = {}
        party_dirs: dict[str, Path] = {}
        for party in PARTIES:
            party_dirs[party] = base / party
            outputs[party] = base / f"{party}-model"
            make("party", f"PARTY={party}", f"PARTY_OUT={party_dirs[party]}")
        for party in PARTIES:
            make(
                "trainer-up", f"PARTY={party}",
                f"AGGREGATOR={address}:7401", f"ATTESTATION={address}:7400",
                f"PARTY_DIR={party_dirs[party]}", f"OUTPUT={outputs[party]}",
                f"TRAINER_IMAGE=hfl-trainer:{TAG}", env=trainer_env(party),
            )  # fmt: skip
        yield Federation(base, outputs, party_dirs)
    finally:
        for project in (CENTRAL, *(trainer_project(p) for p in PARTIES)):
            for cid in containers(project):
                logs = run("docker", "logs", "--tail", "20", cid, check=False)
                print(f"--- {project} {cid}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        remove_all()


def test_each_party_is_given_only_its_own_key(federation: Federation) -> None:
    for party, directory in federation.party_dirs.items():
        assert sorted(p.name for p in directory.iterdir()) == [
            "initial_weights.npz", "key.pem", "plan.toml", "platform", "policy.toml",
        ]  # fmt: skip
        assert not list(directory.rglob("*party*")), party
    one, two = (federation.party_dirs[p] / "key.pem" for p in PARTIES)
    assert one.read_bytes() != two.read_bytes()
    # The central services mount no party's key.
    for cid in containers(CENTRAL):
        mounts = [m.get("Name") or m["Source"] for m in inspect(cid)["Mounts"]]
        service = inspect(cid)["Config"]["Labels"]["com.docker.compose.service"]
        if service != "sim-bootstrap":
            assert not [m for m in mounts if "party" in m], (service, mounts)


def test_trainers_from_their_own_projects_finish_the_federation(federation: Federation) -> None:
    for party in PARTIES:
        (cid,) = containers(trainer_project(party))
        info = inspect(cid)
        # Its own state volume and the party's own files; nothing of the central project.
        names = [m.get("Name", "") for m in info["Mounts"] if m["Type"] == "volume"]
        assert names == [f"{trainer_project(party)}_trainer-state"], names
        binds = {m["Destination"]: m["Source"] for m in info["Mounts"] if m["Type"] == "bind"}
        assert binds["/party"] == str(federation.party_dirs[party])
        networks = set(info["NetworkSettings"]["Networks"])
        assert networks == {f"{trainer_project(party)}_default"}, networks

    def finished() -> list[dict[str, Any]] | None:
        states = [inspect(containers(trainer_project(p))[0])["State"] for p in PARTIES]
        return states if not any(s["Running"] for s in states) else None

    states = wait_for("both trainers to finish", finished, timeout=1500)
    assert [s["ExitCode"] for s in states] == [0, 0], states
    for party in PARTIES:
        out = federation.outputs[party]
        provenance = json.loads((out / "provenance.json").read_text())
        assert provenance["rounds_completed"] == ROUNDS, provenance
        assert provenance["trainer"] == party
        assert len(provenance["aggregator_mrenclave"]) == 64
        assert (out / "model.keras").stat().st_size > 0
    weights = {
        json.loads((federation.outputs[p] / "provenance.json").read_text())["weights_sha256"]
        for p in PARTIES
    }
    assert len(weights) == 1  # both organisations took home the same global model


def test_trainer_down_leaves_nothing_of_the_party_behind(federation: Federation) -> None:
    for party in PARTIES:
        make("trainer-down", f"PARTY={party}", "WIPE=1", env=trainer_env(party))
        assert leftovers(trainer_project(party)) == []


# --------------------------------------------------------------- a project's trainer image


def _wine_table(directory: Path) -> None:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    directory.mkdir(parents=True)
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    rows = [
        ",".join([*(f"{v:.6g}" for v in row), str(int(label))])
        for row, label in zip(x, y, strict=True)
    ]
    (directory / "wine.csv").write_text(header + "\n" + "\n".join(rows) + "\n")


def _build(project: Path, image: str) -> str:
    out = make("trainer-image", f"PROJECT={project}", f"IMAGE={image}",
               f"TRAINER_IMAGE=hfl-trainer:{TAG}", timeout=1200)  # fmt: skip
    found = re.search(r"simulated trainer MRENCLAVE ([0-9a-f]{64})", out)
    assert found, out
    return found.group(1)


def test_a_project_built_into_the_trainer_image_is_loaded_and_measured(
    images: bool, tmp_path: Path
) -> None:
    if not have_image(f"hfl-trainer:{TAG}"):
        pytest.fail(f"hfl-trainer:{TAG} is missing: the federation tests above build it")
    hfl = str(REPO / ".venv" / "bin" / "hfl")
    project = tmp_path / "clinic"
    run(hfl, "new", str(project))
    (project / "__pycache__").mkdir(exist_ok=True)
    (project / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"not measured")
    # What a simulated deployment of this project gives a trainer (hfl init --project
    # measures the trainer with the host's code, not the image's: the trainer logs its
    # own identity before the attestation service, absent here, could refuse it).
    sim = tmp_path / "sim"
    run(hfl, "init", str(sim), "--rounds", "1", "--project", str(project))
    run(
        str(REPO / ".venv" / "bin" / "python"), "-c",
        "import sys; from pathlib import Path; from hfl_common.runtime import "
        "simulated_sealing_secret as s; s(Path(sys.argv[1]))", str(sim / "platform"),
    )  # fmt: skip
    data = tmp_path / "data"
    _wine_table(data)
    # The trainer runs as uid 10001; these are a test's throw-away files.
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    image, edited = f"hfl-trainer-clinic:{TAG}", f"hfl-trainer-clinic:{TAG}-edited"
    name = f"{CENTRAL}-clinic-check"
    try:
        measured = _build(project, image)
        listing = docker(
            "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
            'echo "$HFL_PROJECT"; cd "$HFL_PROJECT" && find . -type f | sort',
        ).split()  # fmt: skip
        assert listing[0] == "/opt/hfl/project/clinic"
        # Exactly the project's files: the stale byte code beside them stayed out.
        expected = sorted(
            f"./{p.relative_to(project)}"
            for p in project.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
        assert "./model.py" in expected
        assert listing[1:] == expected

        # The trainer itself, with the party's data mounted (never in the image): it
        # imports the project, loads and validates the data with the project's
        # function, builds the model and checks it against the plan's initial weights;
        # then its simulated enclave identity is the one that covers the project.
        docker(
            "run", "-d", "--name", name, "--network", "none",
            "-v", f"{sim}:/sim:ro", "-v", f"{data}:/data:ro",
            "-e", "HFL_POLICY=/sim/policy.toml", "-e", "HFL_PLAN=/sim/plan.toml",
            "-e", "HFL_SIM_PLATFORM=/sim/platform",
            "-e", "HFL_PARTY=party-1", "-e", "HFL_PARTY_KEY=/sim/parties/party-1.key.pem",
            image,
        )  # fmt: skip

        def identity_logged() -> str | None:
            logs = run("docker", "logs", name, check=False)
            text = logs.stdout + logs.stderr
            found = re.search(r"SIMULATED trainer enclave.*MRENCLAVE ([0-9a-f]{64})", text)
            if found:
                return found.group(1)
            if not inspect(name)["State"]["Running"]:
                pytest.fail(f"the project's trainer exited before attesting:\n{text[-3000:]}")
            return None

        assert wait_for("the trainer's enclave identity", identity_logged, 600) == measured

        # One line of model.py changed: another trainer identity.
        model = project / "model.py"
        model.write_text(model.read_text().replace('"""', '"""Edited. ', 1))
        assert _build(project, edited) != measured
    finally:
        docker("rm", "-f", "-v", name, check=False)  # -v: its anonymous /var/lib/hfl volume
        docker("rmi", image, edited, check=False)
