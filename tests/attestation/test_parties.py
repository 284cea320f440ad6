"""Parties, not keys: the policy enrols parties, a trainer proves its party with an
enrolment the party's key signed for its enclave key, and its certificate names the party."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from prometheus_client import CollectorRegistry

from hfl_common.api import attestation_pb2, attestation_pb2_grpc
from hfl_common.attest_client import (
    bootstrap_attestation_service,
    evidence_quote,
    obtain_certificate,
)
from hfl_common.config import AttestationPolicy, parse_policy
from hfl_common.enrolment import Enrolment, PartySigner, public_key_text
from hfl_common.errors import ConfigError, InvalidArgumentError, PermissionDeniedError
from hfl_common.ratls import EnclaveKey
from hfl_common.server import PeerIdentity, party_of
from hfl_common.tee import EnclaveIdentity, SimulatedPlatform, SimulatedProvider

from .conftest import Identities, ServiceFactory, VerifierFactory, policy_toml

Providers = Callable[[EnclaveIdentity], SimulatedProvider]


@pytest.fixture(scope="module")
def alice() -> PartySigner:
    return PartySigner.generate("alice")


@pytest.fixture(scope="module")
def bob() -> PartySigner:
    return PartySigner.generate("bob")


def _party_policy(
    platform: SimulatedPlatform,
    identities: Identities,
    operator_key: EnclaveKey,
    *parties: PartySigner,
) -> AttestationPolicy:
    text = policy_toml(platform, identities, operator_key.spki_sha256) + "".join(
        f'\n[parties.{p.party}]\npublic_key = "{public_key_text(p.key)}"\n' for p in parties
    )
    return parse_policy(text, "party-policy.toml")


@pytest.fixture
def party_policy(
    platform: SimulatedPlatform,
    identities: Identities,
    operator_key: EnclaveKey,
    alice: PartySigner,
    bob: PartySigner,
) -> AttestationPolicy:
    return _party_policy(platform, identities, operator_key, alice, bob)


def test_an_enrolled_trainer_gets_a_certificate_naming_its_party(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    party_policy: AttestationPolicy,
    alice: PartySigner,
) -> None:
    service = start_service(service_policy=party_policy)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        key = EnclaveKey.generate()
        issued = obtain_certificate(
            pinned, key, provider_for(identities.trainer), "trainer", "t1", party=alice
        )
    peer = PeerIdentity.from_pem(issued.cert_pem)
    assert (peer.role, peer.party) == ("trainer", "alice")


def _refusal(
    stub: attestation_pb2_grpc.AttestationServiceStub,
    request: attestation_pb2.IssueCertificateRequest,
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.IssueCertificate(request, timeout=5)
    return caught.value


def _trainer_request(
    key: EnclaveKey,
    provider: SimulatedProvider,
    enrolment_for: tuple[PartySigner, bytes] | None,
    role: attestation_pb2.Role = attestation_pb2.ROLE_TRAINER,
) -> attestation_pb2.IssueCertificateRequest:
    role_name = attestation_pb2.Role.Name(role).removeprefix("ROLE_").lower()
    extensions = []
    if enrolment_for is not None:
        signer, spki_sha = enrolment_for
        extensions.append(signer.extension(spki_sha))
    request = attestation_pb2.IssueCertificateRequest(
        csr=key.csr("t", (), role_name, extensions), role=role, label="t"
    )
    request.evidence.sgx_quote = evidence_quote(key, provider)
    return request


def test_trainers_without_an_enrolment_or_with_a_stolen_one_are_refused(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    party_policy: AttestationPolicy,
    alice: PartySigner,
    bob: PartySigner,
) -> None:
    registry = CollectorRegistry()
    service = start_service(service_policy=party_policy, registry=registry)
    trainer = provider_for(identities.trainer)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        key = EnclaveKey.generate()
        cases = {
            # un-enrolled under a policy that lists parties
            "party_enrolment_missing": _trainer_request(key, trainer, None),
            # alice's enrolment of another key, copied into this key's request
            "party_enrolment_invalid": _trainer_request(
                key, trainer, (alice, EnclaveKey.generate().spki_sha256)
            ),
            # a party the policy does not list
            "party_not_enrolled": _trainer_request(
                key, trainer, (PartySigner.generate("mallory"), key.spki_sha256)
            ),
        }
        for reason, request in cases.items():
            err = _refusal(pinned.stub, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, reason
            details = err.details() or ""
            assert details, reason
        # bob's key signing as "alice": the signature does not verify under alice's key
        forged = PartySigner("alice", bob.key)
        err = _refusal(pinned.stub, _trainer_request(key, trainer, (forged, key.spki_sha256)))
        assert "not signed by that party's key" in (err.details() or "")
        # an aggregator cannot enrol in a party
        aggregator = _trainer_request(
            key,
            provider_for(identities.aggregator),
            (alice, key.spki_sha256),
            attestation_pb2.ROLE_AGGREGATOR,
        )
        err = _refusal(pinned.stub, aggregator)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = {"party_enrolment_missing": 1, "party_enrolment_invalid": 2, "party_not_enrolled": 1}
    for reason, count in expected.items():
        value = registry.get_sample_value(
            "hfl_attestation_certificate_refusals_total", {"role": "trainer", "reason": reason}
        )
        assert value == count, reason


def test_the_refusal_reasons_name_what_is_missing(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    party_policy: AttestationPolicy,
) -> None:
    service = start_service(service_policy=party_policy)
    with (
        bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned,
        pytest.raises(PermissionDeniedError) as caught,
    ):
        obtain_certificate(
            pinned, EnclaveKey.generate(), provider_for(identities.trainer), "trainer", "t"
        )
    assert "enrols parties (alice, bob)" in str(caught.value)
    assert "--party NAME --party-key FILE" in str(caught.value)


def test_policy_parties_are_parsed_and_checked(
    platform: SimulatedPlatform,
    identities: Identities,
    operator_key: EnclaveKey,
    alice: PartySigner,
) -> None:
    base = policy_toml(platform, identities, operator_key.spki_sha256)
    policy = _party_policy(platform, identities, operator_key, alice)
    assert list(policy.parties) == ["alice"]
    assert public_key_text(policy.parties["alice"].public_key) == public_key_text(alice.key)
    assert parse_policy(base, "p").parties == {}
    with pytest.raises(ConfigError, match=r"\[parties.alice\] public_key is not base64"):
        parse_policy(base + '[parties.alice]\npublic_key = "%%%"\n', "p.toml")
    with pytest.raises(ConfigError, match=r"\[parties\] Alice! is not a valid party name"):
        parse_policy(base + '[parties."Alice!"]\npublic_key = "AA=="\n', "p.toml")
    twice = public_key_text(alice.key)
    with pytest.raises(ConfigError, match="is also party a's key; one key per party"):
        parse_policy(
            base + f'[parties.a]\npublic_key = "{twice}"\n[parties.b]\npublic_key = "{twice}"\n',
            "p.toml",
        )


def test_a_garbled_enrolment_is_invalid_argument_not_a_crash() -> None:
    for raw in (b"", b"\xff" * 10, b"\xa1\x61v\x01", bytes(2000)):
        with pytest.raises(InvalidArgumentError):
            Enrolment.decode(raw)


def test_party_of_counts_the_party_when_the_certificate_names_one(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    party_policy: AttestationPolicy,
    alice: PartySigner,
) -> None:
    service = start_service(service_policy=party_policy)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        peers = [
            PeerIdentity.from_pem(
                obtain_certificate(
                    pinned,
                    EnclaveKey.generate(),
                    provider_for(identities.trainer),
                    "trainer",
                    f"t{i}",
                    party=alice,
                ).cert_pem
            )
            for i in range(2)
        ]
    # two keys of one party are one party
    assert {party_of(p) for p in peers} == {"party:alice"}
    assert len({p.peer_id for p in peers}) == 2
