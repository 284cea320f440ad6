"""deploy/sgx-images.sh orchestrates the SGX image builds and the trainers' policy.

No image is built here (a Docker build of Gramine images takes minutes and
needs the network). The script runs for real against a recording stand-in for
the docker CLI (DOCKER=...): it logs each command, `create` returns the image
name as the container id, and `cp` hands out the SIGSTRUCT that image would
contain (real SIGSTRUCTs, signed with a test RSA-3072 key the way
gramine-sgx-sign signs them). The pinning is the real
`python -m hfl_common.sigstruct --pin-into`, so the test checks what the
trainers' policy ends up accepting, and in which order the images were built.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hfl_common.sigstruct import parse_sigstruct, policy_roles_toml

from .prom_helpers import REPO
from .test_gramine_manifests import render as render_manifest
from .test_sigstruct import build_sigstruct

ISV_PROD_ID = {"attestation": 1, "aggregator": 2, "trainer": 3, "relay": 4}
TAG = "7"

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "create":
    print(args[1])
elif args[0] == "cp":
    source, dest = args[1], args[2]
    image, _, path = source.partition(":/")
    name = os.path.basename(path)
    built = [json.loads(line) for line in open(os.environ["FAKE_DOCKER_LOG"])]
    if not any(a[0] == "build" and image in a for a in built):
        sys.exit(f"fake docker: {{image}} was never built")
    if name.endswith(".sig"):
        shutil.copyfile(os.path.join(os.environ["FAKE_SIGS"], name), dest)
    else:
        open(dest, "w").write("{{}}")
"""


def _mrenclave(service: str) -> bytes:
    return bytes([0x10 + ISV_PROD_ID[service]]) * 32


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=3, key_size=3072)


def _run(
    tmp_path: Path,
    key: rsa.RSAPrivateKey,
    roles: tuple[str, ...],
    relay_key: rsa.RSAPrivateKey | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[list[str]], Path]:
    """sgx-images.sh in a scratch copy of deploy/ whose agreed policy has `roles`, signed
    by `key`; the images are signed with `key` too (the relay's with `relay_key`)."""
    tree = tmp_path / "repo"
    (tree / "deploy" / "config").mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "sgx-images.sh", tree / "deploy")
    sigs = {
        role: parse_sigstruct(build_sigstruct(key, mrenclave=b"\0" * 32, isv_prod_id=n, isv_svn=1))
        for role, n in ISV_PROD_ID.items()
        if role in roles
    }
    policy = '[trust]\nroot = "intel"\n\n' + policy_roles_toml(sigs, include_mrenclave=False)
    (tree / "deploy" / "config" / "policy.toml").write_text(policy)
    (tree / "deploy" / "config" / "plan.toml").write_text("# plan\n")
    (tree / "deploy" / "config" / "initial_weights.npz").write_bytes(b"npz")
    sig_dir = tmp_path / "sigs"
    sig_dir.mkdir()
    for service, prod_id in ISV_PROD_ID.items():
        (sig_dir / f"hfl-{service}.sig").write_bytes(
            build_sigstruct(
                relay_key if service == "relay" and relay_key is not None else key,
                mrenclave=_mrenclave(service),
                isv_prod_id=prod_id,
                isv_svn=1,
            )
        )
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    key_file = tmp_path / "enclave-key.pem"
    key_file.write_text("not read by the stand-in\n")
    log = tmp_path / "docker.log"
    log.write_text("")
    env = {
        **os.environ,
        "DOCKER": str(docker),
        "FAKE_DOCKER_LOG": str(log),
        "FAKE_SIGS": str(sig_dir),
        "SGX_SIGNING_KEY": str(key_file),
        "HFL_SGX_IMAGE_TAG": TAG,
        "GRAMINE_BUILD": str(tmp_path / "out"),
        "GRAMINE_POLICY_PY": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(tree / "deploy" / "sgx-images.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return proc, calls, tree


def _builds(calls: list[list[str]]) -> list[dict[str, Any]]:
    out = []
    for args in calls:
        if args[0] != "build":
            continue
        build_args = dict(
            a.split("=", 1) for flag, a in itertools.pairwise(args) if flag == "--build-arg"
        )
        out.append(
            {
                "file": args[args.index("-f") + 1],
                "tag": args[args.index("-t") + 1],
                "context": args[-1],
                "args": build_args,
                "secret": any(a.startswith("id=sgx_signing_key,") for a in args),
            }
        )
    return out


def test_a_tiered_federation_gets_a_relay_image_pinned_for_trainers(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    proc, calls, tree = _run(tmp_path, signing_key, tuple(ISV_PROD_ID))
    assert proc.returncode == 0, proc.stderr
    builds = _builds(calls)
    assert [b["tag"] for b in builds] == [
        f"hfl-sgx-attestation:{TAG}",
        f"hfl-sgx-aggregator:{TAG}",
        f"hfl-sgx-relay:{TAG}",
        f"hfl-sgx-trainer:{TAG}",
    ]
    relay = builds[2]
    # The relay is built FROM the aggregator image of this run, with its own manifest,
    # signed with the same key (a BuildKit secret), from the gramine/ context.
    assert relay["file"] == "deploy/sgx-relay.Dockerfile"
    assert relay["args"]["AGGREGATOR_IMAGE"] == f"hfl-sgx-aggregator:{TAG}"
    assert relay["context"] == "gramine"
    assert relay["secret"]
    assert all(b["secret"] for b in builds)
    # The central images (and the relay FROM the aggregator's) carry the agreed policy;
    # the trainer the pinned one.
    assert [b["args"].get("POLICY_FILE") for b in builds] == [
        "policy.toml",
        "policy.toml",
        None,
        "policy.trainer.toml",
    ]
    pinned = tomllib.loads((tree / "deploy" / "config" / "policy.trainer.toml").read_text())
    for service in ("attestation", "aggregator", "relay"):
        assert pinned["roles"][service]["mrenclave"] == [_mrenclave(service).hex()], service
    # Trainers are pinned by signer only: they are built after this policy.
    assert "mrenclave" not in pinned["roles"]["trainer"]
    assert (tmp_path / "out" / "hfl-relay.sig").read_bytes()[960:992] == _mrenclave("relay")
    assert "pinned attestation aggregator relay by MRENCLAVE" in proc.stdout


def test_a_flat_federation_builds_no_relay_image(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    proc, calls, tree = _run(tmp_path, signing_key, ("attestation", "aggregator", "trainer"))
    assert proc.returncode == 0, proc.stderr
    assert [b["tag"] for b in _builds(calls)] == [
        f"hfl-sgx-attestation:{TAG}",
        f"hfl-sgx-aggregator:{TAG}",
        f"hfl-sgx-trainer:{TAG}",
    ]
    assert "no [roles.relay]: no relay image" in proc.stdout
    pinned = tomllib.loads((tree / "deploy" / "config" / "policy.trainer.toml").read_text())
    assert "relay" not in pinned["roles"]


def test_a_relay_signed_with_another_key_stops_the_build_before_the_trainer(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    """The pinning refuses a relay SIGSTRUCT the agreed [roles.relay] does not accept (its
    signer is not the policy's), and no trainer image is built with a half-pinned policy."""
    other = rsa.generate_private_key(public_exponent=3, key_size=3072)
    proc, calls, tree = _run(tmp_path, signing_key, tuple(ISV_PROD_ID), relay_key=other)
    assert proc.returncode != 0
    assert re.search(r"MRSIGNER .* is not in \[roles\.relay\]", proc.stderr), proc.stderr
    assert f"hfl-sgx-trainer:{TAG}" not in [b["tag"] for b in _builds(calls)]
    assert not (tree / "deploy" / "config" / "policy.trainer.toml").exists()


def test_the_relay_dockerfile_signs_the_relay_manifest_and_runs_it() -> None:
    text = (REPO / "deploy" / "sgx-relay.Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"^FROM \$\{AGGREGATOR_IMAGE\}$", text, re.MULTILINE)
    (copy,) = re.findall(r"^COPY (\S+) (\S+)$", text, re.MULTILINE)
    assert (REPO / "gramine" / copy[0]).is_file(), f"context gramine/ has no {copy[0]}"
    assert copy == ("relay.manifest.template", "/opt/hfl/gramine/relay.manifest.template")
    for target in ("manifests", "sign"):
        run = re.search(rf"make -f gramine/gramine\.mk {target} ([^\n]*)", text)
        assert run, f"no `make ... {target}`"
        assert "GRAMINE_SERVICES=relay" in run.group(1), run.group(1)
    assert re.search(r"^ENV HFL_SERVICE=relay$", text, re.MULTILINE)
    assert "test -s build/hfl-relay.sig" in text
    # Its healthcheck polls the metrics port the relay manifest fixes.
    argv = render_manifest("relay")["loader"]["argv"]
    metrics = int(argv[argv.index("--metrics-listen") + 1].rpartition(":")[2])
    assert f"{{'relay':{metrics}}}" in text.replace(" ", "")
