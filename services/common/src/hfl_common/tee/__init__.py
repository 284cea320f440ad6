"""SGX evidence: DCAP quotes, the simulated TEE, evidence providers and the quote verifier.

- `sgx`: the SGX ECDSA quote v3 layout and a parser that never crashes on garbage.
- `simulation`: a development SGX "machine" (root CA, PCK chain, quoting, collateral).
- `providers`: `EvidenceProvider` with `GramineProvider` and `SimulatedProvider`.
- `collateral`: collateral sources (directory, file, PCCS) and a cache.
- `verify`: `QuoteVerifier` (dcap-qvl plus the policy) giving a `Verdict`.
"""

from hfl_common.tee.collateral import (
    CachedCollateral,
    CollateralSource,
    DirectoryCollateral,
    FileCollateral,
    PccsCollateral,
)
from hfl_common.tee.providers import EvidenceProvider, GramineProvider, SimulatedProvider
from hfl_common.tee.roots import INTEL_SGX_ROOT_CA_DER, INTEL_SGX_ROOT_CA_PEM
from hfl_common.tee.simulation import (
    ROLE_ISV_PROD_ID,
    EnclaveIdentity,
    SimulatedPlatform,
    measure_code,
    simulated_identity_for,
)
from hfl_common.tee.verify import REASON_CODES, Measurements, QuoteVerifier, Verdict

__all__ = [
    "INTEL_SGX_ROOT_CA_DER",
    "INTEL_SGX_ROOT_CA_PEM",
    "REASON_CODES",
    "ROLE_ISV_PROD_ID",
    "CachedCollateral",
    "CollateralSource",
    "DirectoryCollateral",
    "EnclaveIdentity",
    "EvidenceProvider",
    "FileCollateral",
    "GramineProvider",
    "Measurements",
    "PccsCollateral",
    "QuoteVerifier",
    "SimulatedPlatform",
    "SimulatedProvider",
    "Verdict",
    "measure_code",
    "simulated_identity_for",
]
