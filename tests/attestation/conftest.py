"""Fixtures for the attestation service tests: one simulated machine, identities, policy.

Everything is real: a simulated SGX platform whose quotes dcap-qvl verifies, a policy
parsed from TOML, the service started in-process on 127.0.0.1 port 0 over TLS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hfl_attestation.service import (
    SELF_CERTIFICATE_VALIDITY,
    AttestationServiceConfig,
    RunningAttestationService,
    start_attestation_service,
)
from hfl_common.attest_client import (
    PinnedAttestationService,
    ServiceCredentials,
    obtain_certificate,
)
from hfl_common.config import AttestationPolicy, parse_policy
from hfl_common.ratls import EnclaveKey
from hfl_common.runtime import simulated_sealing_secret
from hfl_common.sealing import SimulatedSealingKeys
from hfl_common.server import ServerConfig
from hfl_common.tee import (
    DirectoryCollateral,
    EnclaveIdentity,
    QuoteVerifier,
    SimulatedPlatform,
    SimulatedProvider,
)

DCAP_DATA = Path(__file__).resolve().parent.parent / "data" / "dcap"
REAL_QUOTE_TIME = 1750330631


@dataclass(frozen=True)
class Identities:
    attestation: EnclaveIdentity
    aggregator: EnclaveIdentity
    trainer: EnclaveIdentity
    # Same signer and product id as the trainer, but code the policy does not list.
    rogue_trainer: EnclaveIdentity
    rogue_attestation: EnclaveIdentity


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("attest-sgx") / "platform")


def _identity(platform: SimulatedPlatform, tag: str, prod_id: int) -> EnclaveIdentity:
    return EnclaveIdentity(
        mrenclave=hashlib.sha256(tag.encode()).digest(),
        mrsigner=platform.mrsigner,
        isv_prod_id=prod_id,
        isv_svn=2,
    )


@pytest.fixture(scope="session")
def identities(platform: SimulatedPlatform) -> Identities:
    return Identities(
        attestation=_identity(platform, "attestation v1", 1),
        aggregator=_identity(platform, "aggregator v1", 2),
        trainer=_identity(platform, "trainer v1", 3),
        rogue_trainer=_identity(platform, "trainer v1 with a backdoor", 3),
        rogue_attestation=_identity(platform, "attestation v1 with a backdoor", 1),
    )


@pytest.fixture(scope="session")
def operator_key() -> EnclaveKey:
    return EnclaveKey.generate()


def policy_toml(
    platform: SimulatedPlatform, ids: Identities, operator_spki_sha256: bytes, lifetime: int = 3600
) -> str:
    def role(name: str, identity: EnclaveIdentity) -> str:
        return (
            f"[roles.{name}]\n"
            f'mrenclave = ["{identity.mrenclave.hex()}"]\n'
            f'mrsigner = ["{identity.mrsigner.hex()}"]\n'
            f"isv_prod_id = {identity.isv_prod_id}\n"
            f"min_isv_svn = 1\n\n"
        )

    return (
        "# test federation policy\n"
        "[trust]\n"
        'root = "simulation"\n'
        f'simulation_root_sha256 = "{platform.root_sha256.hex()}"\n'
        'accepted_tcb_statuses = ["UpToDate"]\n\n'
        + role("attestation", ids.attestation)
        + role("aggregator", ids.aggregator)
        + role("trainer", ids.trainer)
        + f'[operators]\nspki_sha256 = ["{operator_spki_sha256.hex()}"]\n\n'
        + f"[certificates]\nlifetime_seconds = {lifetime}\n"
    )


@pytest.fixture(scope="session")
def policy(
    platform: SimulatedPlatform, identities: Identities, operator_key: EnclaveKey
) -> AttestationPolicy:
    return parse_policy(
        policy_toml(platform, identities, operator_key.spki_sha256), "test-policy.toml"
    )


VerifierFactory = Callable[..., QuoteVerifier]


@pytest.fixture
def make_verifier(platform: SimulatedPlatform, policy: AttestationPolicy) -> VerifierFactory:
    """A fresh verifier (own registry) under the test policy, for a relying party."""

    def build(registry: CollectorRegistry | None = None) -> QuoteVerifier:
        return QuoteVerifier(
            policy,
            DirectoryCollateral(platform.collateral_dir),
            simulation_root_der=platform.root_der,
            registry=registry or CollectorRegistry(),
        )

    return build


@pytest.fixture
def provider_for(platform: SimulatedPlatform) -> Callable[[EnclaveIdentity], SimulatedProvider]:
    def build(identity: EnclaveIdentity) -> SimulatedProvider:
        return SimulatedProvider(platform, identity)

    return build


ServiceFactory = Callable[..., RunningAttestationService]


@pytest.fixture
def start_service(
    platform: SimulatedPlatform,
    policy: AttestationPolicy,
    identities: Identities,
    tmp_path: Path,
) -> Iterator[ServiceFactory]:
    """Start attestation services in-process on port 0; all stopped at teardown."""
    started: list[RunningAttestationService] = []

    def start(
        *,
        identity: EnclaveIdentity | None = None,
        state_dir: Path | None = None,
        registry: CollectorRegistry | None = None,
        service_policy: AttestationPolicy | None = None,
        port: int = 0,
        self_certificate_validity: dt.timedelta = SELF_CERTIFICATE_VALIDITY,
    ) -> RunningAttestationService:
        identity = identity or identities.attestation
        use_policy = service_policy or policy
        registry = registry or CollectorRegistry()
        verifier = QuoteVerifier(
            use_policy,
            DirectoryCollateral(platform.collateral_dir),
            simulation_root_der=platform.root_der,
            registry=registry,
        )
        secret = simulated_sealing_secret(platform.directory)
        service = start_attestation_service(
            AttestationServiceConfig(
                server=ServerConfig(
                    service="attestation",
                    port=port,
                    max_workers=4,
                    grace_seconds=0.5,
                    require_client_auth=False,
                ),
                state_dir=state_dir or tmp_path / "attestation-state",
                self_certificate_validity=self_certificate_validity,
            ),
            policy=use_policy,
            verifier=verifier,
            provider=SimulatedProvider(platform, identity),
            sealing=SimulatedSealingKeys(secret, identity.mrenclave),
            registry=registry,
        )
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(0)


CredentialsFactory = Callable[..., ServiceCredentials]


@pytest.fixture
def credentials_for(
    provider_for: Callable[[EnclaveIdentity], SimulatedProvider],
) -> CredentialsFactory:
    """Attested ServiceCredentials for an identity, from a pinned attestation service."""

    def build(
        pinned: PinnedAttestationService,
        identity: EnclaveIdentity,
        role: str,
        user_data: bytes = b"",
    ) -> ServiceCredentials:
        key = EnclaveKey.generate()
        issued = obtain_certificate(
            pinned, key, provider_for(identity), role, f"{role}-test", user_data
        )
        return ServiceCredentials(key, issued)

    return build
