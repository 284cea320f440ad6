"""Fixtures for the TEE tests: the real DCAP sample, simulated platforms, policies."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hfl_common.config import AttestationPolicy, RolePolicy, TrustRoot
from hfl_common.tee.collateral import CollateralSource, DirectoryCollateral
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform
from hfl_common.tee.verify import QuoteVerifier

DCAP_DATA = Path(__file__).resolve().parent.parent / "data" / "dcap"

# The real sample's verification time: a minute after its TCB info was issued.
REAL_QUOTE_TIME = 1750330631


@pytest.fixture(scope="session")
def real_quote() -> bytes:
    return (DCAP_DATA / "sgx_quote").read_bytes()


@pytest.fixture(scope="session")
def real_collateral_path() -> Path:
    return DCAP_DATA / "sgx_quote_collateral.json"


@pytest.fixture(scope="session")
def tdx_quote() -> bytes:
    return (DCAP_DATA / "tdx_quote").read_bytes()


@pytest.fixture(scope="session")
def sim_platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    """One simulated machine for the whole session (keys and certificates made once)."""
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sgx") / "platform")


@pytest.fixture(scope="session")
def other_platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    """A second simulated machine with a different development root."""
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sgx-other") / "platform")


@pytest.fixture(scope="session")
def trainer_identity(sim_platform: SimulatedPlatform) -> EnclaveIdentity:
    return EnclaveIdentity(
        mrenclave=bytes.fromhex("aa" * 32),
        mrsigner=sim_platform.mrsigner,
        isv_prod_id=3,
        isv_svn=2,
    )


PolicyFactory = Callable[..., AttestationPolicy]


@pytest.fixture(scope="session")
def make_policy(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> PolicyFactory:
    """Build a policy; defaults: simulation root of sim_platform, the trainer identity."""

    def build(
        *,
        trust_root: TrustRoot = TrustRoot.SIMULATION,
        roles: Mapping[str, RolePolicy] | None = None,
        accepted: frozenset[str] = frozenset({"UpToDate"}),
        rejected_advisories: frozenset[str] = frozenset(),
        allow_debug: bool = False,
        simulation_root_sha256: bytes | None = None,
    ) -> AttestationPolicy:
        if roles is None:
            roles = {
                "trainer": RolePolicy(
                    mrenclave=(trainer_identity.mrenclave,),
                    mrsigner=(trainer_identity.mrsigner,),
                    isv_prod_id=3,
                    min_isv_svn=2,
                )
            }
        pin = simulation_root_sha256
        if pin is None and trust_root is TrustRoot.SIMULATION:
            pin = sim_platform.root_sha256
        return AttestationPolicy(
            roles=roles,
            accepted_tcb_statuses=accepted,
            rejected_advisories=rejected_advisories,
            allow_debug=allow_debug,
            trust_root=trust_root,
            simulation_root_sha256=pin,
            operator_spki_sha256=frozenset(),
            certificate_lifetime_seconds=3600,
            sha256=b"\x00" * 32,
        )

    return build


VerifierFactory = Callable[..., QuoteVerifier]


@pytest.fixture
def make_verifier(sim_platform: SimulatedPlatform, make_policy: PolicyFactory) -> VerifierFactory:
    """A verifier over sim_platform's collateral directory, with a fresh registry."""

    def build(
        policy: AttestationPolicy | None = None,
        collateral: CollateralSource | None = None,
        registry: CollectorRegistry | None = None,
        simulation_root_der: bytes | None = None,
    ) -> QuoteVerifier:
        policy = policy or make_policy()
        root = simulation_root_der
        if root is None and policy.trust_root is TrustRoot.SIMULATION:
            root = sim_platform.root_der
        return QuoteVerifier(
            policy,
            collateral or DirectoryCollateral(sim_platform.collateral_dir),
            simulation_root_der=root,
            registry=registry or CollectorRegistry(),
        )

    return build
