"""Which code is measured into each service's (simulated) enclave.

In SGX the MRENCLAVE is the hash of everything loaded into the enclave, and
gramine-sgx-sign computes it. In simulation each service's MRENCLAVE is the
SHA-256 over its own package and the shared package (see
`simulation.measure_code`), so editing a trainer's code changes the trainer's
identity and nothing else's, as it would in SGX.
"""

from __future__ import annotations

from pathlib import Path

from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform, simulated_identity_for

SERVICE_PACKAGES = {
    "attestation": "hfl_attestation",
    "aggregator": "hfl_aggregator",
    "trainer": "hfl_trainer",
}


def service_identity(
    role: str, platform: SimulatedPlatform | Path, isv_svn: int = 1
) -> EnclaveIdentity:
    """The simulated enclave identity of the service that plays `role`."""
    return simulated_identity_for(
        SERVICE_PACKAGES[role], role, isv_svn, platform, extra_packages=("hfl_common",)
    )
