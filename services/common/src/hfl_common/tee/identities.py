"""Which code is measured into each service's (simulated) enclave.

In SGX the MRENCLAVE is the hash of everything loaded into the enclave, and
gramine-sgx-sign computes it. In simulation each service's MRENCLAVE is the
SHA-256 over its own package and the shared package (see
`simulation.measure_code`), so editing a trainer's code changes the trainer's
identity and nothing else's, as it would in SGX.

A trainer that runs a federation project (`hfl new`, `--project DIR`) measures
the project's files too, as Gramine lists them among the trusted files: editing
one line of the project's model.py gives the trainer another identity, which a
policy naming the old one refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from hfl_common.errors import InvalidArgumentError
from hfl_common.tee.simulation import (
    EnclaveIdentity,
    SimulatedPlatform,
    measure_code,
    simulated_identity_for,
)

SERVICE_PACKAGES = {
    "attestation": "hfl_attestation",
    "aggregator": "hfl_aggregator",
    "trainer": "hfl_trainer",
    # A relay is the aggregator's code started with --relay-upstream (docs/architecture.md).
    "relay": "hfl_aggregator",
}


def service_identity(
    role: str, platform: SimulatedPlatform | Path, isv_svn: int = 1, project: Path | None = None
) -> EnclaveIdentity:
    """The simulated enclave identity of the service that plays `role`.

    `project` (trainers only) is a federation project directory whose files are
    measured with the trainer's code (see `project_files`).
    """
    identity = simulated_identity_for(
        SERVICE_PACKAGES[role], role, isv_svn, platform, extra_packages=("hfl_common",)
    )
    if project is None:
        return identity
    if role != "trainer":
        raise InvalidArgumentError(f"only a trainer runs a project's code, not the {role}")
    project_digest = measure_code(project_files(project), base=project)
    combined = hashlib.sha256(
        b"hfl trainer with project v1\x00" + identity.mrenclave + project_digest
    ).digest()
    return dataclasses.replace(identity, mrenclave=combined)


def project_files(project: Path) -> list[Path]:
    """Every file of a project directory (what Gramine trusts under it), caches excluded.

    Names are measured relative to the directory, so where a party keeps it does not
    matter; hidden entries and __pycache__ are left out. Keep data out of the project.
    """
    if not project.is_dir():
        raise InvalidArgumentError(f"project directory {project} does not exist")
    files = [
        p
        for p in project.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(project).parts)
        and p.suffix != ".pyc"
    ]
    if not files:
        raise InvalidArgumentError(f"project directory {project} holds no files")
    return files
