"""The simulated TEE: a development "SGX machine" whose quotes dcap-qvl verifies.

A `SimulatedPlatform` is what Intel and one SGX machine are together, in a
directory: a development root CA ("hfl simulated SGX root", ECDSA P-256, the
profile of Intel's SGX Root CA), a PCK Processor CA under it, a PCK leaf
certificate carrying Intel's SGX extension (PPID, TCB, PCE-ID, FMSPC, SGX type),
a TCB signing certificate, a quoting-enclave attestation key, and the collateral
(TCB info, QE identity, CRLs) signed under the same root. Its quotes are
byte-exact SGX ECDSA quotes v3 (see hfl_common.tee.sgx), so the verifier checks
them through the very same dcap-qvl path as real ones, with the development
root pinned by the policy instead of Intel's.

Several processes of one local federation share one platform directory, as
several enclaves share one machine and one Intel root. The directory holds the
development keys (simulation only, files 0600); nothing of it is ever a
production secret. `<dir>/root_ca.pem` is the root a simulation policy pins
(by the SHA-256 of its DER) and `<dir>/collateral/<FMSPC>.json` the collateral
a verifier reads offline.

Enclave identity in simulation: MRENCLAVE is `measure_code` of the service's
own Python files, so changing a trainer's code changes its identity as it would
in SGX; MRSIGNER is SHA-256 of the little-endian modulus of a development
RSA-3072 signing key (as SGX computes MRSIGNER from SIGSTRUCT's modulus).
ISV_PROD_ID follows the convention in `ROLE_ISV_PROD_ID`. What that identity
does NOT measure (libraries, run-time patches) is in `measure`'s docstring.

The package: `measure` (EnclaveIdentity, measure_code, simulated_identity_for,
check_no_code_injection) and `platform` (SimulatedPlatform, its keys, quotes and
collateral).
"""

from hfl_common.tee.simulation.measure import (
    CODE_INJECTING_ENVIRONMENT,
    ROLE_ISV_PROD_ID,
    EnclaveIdentity,
    check_no_code_injection,
    measure_code,
    package_code_files,
    simulated_identity_for,
)
from hfl_common.tee.simulation.platform import (
    DEFAULT_COLLATERAL_VALIDITY_SECONDS,
    SGX_EXTENSION_OID,
    SIMULATED_ROOT_CN,
    SIMULATION_ORG,
    PlatformFacts,
    SimulatedPlatform,
    load_or_create_signing_key,
    mrsigner_of,
    sgx_extension_value,
)

__all__ = [
    "CODE_INJECTING_ENVIRONMENT",
    "DEFAULT_COLLATERAL_VALIDITY_SECONDS",
    "ROLE_ISV_PROD_ID",
    "SGX_EXTENSION_OID",
    "SIMULATED_ROOT_CN",
    "SIMULATION_ORG",
    "EnclaveIdentity",
    "PlatformFacts",
    "SimulatedPlatform",
    "check_no_code_injection",
    "load_or_create_signing_key",
    "measure_code",
    "mrsigner_of",
    "package_code_files",
    "sgx_extension_value",
    "simulated_identity_for",
]
