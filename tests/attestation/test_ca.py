"""The federation CA: sealed key, restart, the leaves it issues."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from hfl_attestation.ca import (
    CA_KEY_FILE,
    CA_KEY_SEAL_PURPOSE,
    FederationCA,
    check_label,
    load_csr,
)
from hfl_common.attest_client import key_dns_name, peer_id_for
from hfl_common.errors import InvalidArgumentError
from hfl_common.ratls import EnclaveKey
from hfl_common.sealing import SimulatedSealingKeys, UnsealError, read_sealed

SECRET = b"\x11" * 32
MRENCLAVE_A = hashlib.sha256(b"attestation A").digest()
MRENCLAVE_B = hashlib.sha256(b"attestation B").digest()


def _sealing(mrenclave: bytes = MRENCLAVE_A) -> SimulatedSealingKeys:
    return SimulatedSealingKeys(SECRET, mrenclave)


def _issue(
    ca: FederationCA, key: EnclaveKey, role: str = "trainer", **kw: object
) -> x509.Certificate:
    csr = load_csr(key.csr("t", (), role))
    leaf = ca.issue(
        csr,
        role=role,
        evidence_extensions=[],
        lifetime_seconds=int(kw.get("lifetime", 600)),  # type: ignore[call-overload]
        label=str(kw.get("label", "")),
    )
    return leaf.certificate


def test_ca_key_is_stored_only_sealed(tmp_path: Path) -> None:
    FederationCA.load_or_create(tmp_path, _sealing())
    blob = (tmp_path / CA_KEY_FILE).read_bytes()
    assert b"-----BEGIN" not in blob
    with pytest.raises(ValueError, match=r"(?i)could not deserialize|invalid|unsupported"):
        serialization.load_der_private_key(blob, password=None)
    # the right identity opens it; another enclave identity on the same machine cannot
    key_der = read_sealed(_sealing(), CA_KEY_SEAL_PURPOSE, tmp_path / CA_KEY_FILE)
    assert serialization.load_der_private_key(key_der, password=None) is not None
    with pytest.raises(UnsealError, match="sealed by a different enclave identity"):
        read_sealed(_sealing(MRENCLAVE_B), CA_KEY_SEAL_PURPOSE, tmp_path / CA_KEY_FILE)


def test_ca_survives_restart_and_earlier_leaves_still_chain(tmp_path: Path) -> None:
    first = FederationCA.load_or_create(tmp_path, _sealing())
    leaf = _issue(first, EnclaveKey.generate())
    again = FederationCA.load_or_create(tmp_path, _sealing())
    assert again.pem == first.pem
    again.verify_issued(leaf)  # raises if the restarted CA is not the one that issued it
    leaf.verify_directly_issued_by(again.certificate)


def test_another_enclave_identity_cannot_take_over_the_ca(tmp_path: Path) -> None:
    FederationCA.load_or_create(tmp_path, _sealing())
    with pytest.raises(UnsealError, match="sealed by a different enclave identity"):
        FederationCA.load_or_create(tmp_path, _sealing(MRENCLAVE_B))


def test_ca_certificate_is_a_long_lived_path_constrained_ca(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = FederationCA.load_or_create(tmp_path, _sealing(), now=now)
    cert = ca.certificate
    assert "hfl federation CA" in cert.subject.rfc4514_string()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0
    assert cert.not_valid_after_utc - now >= dt.timedelta(days=364)


def test_issued_leaf_carries_role_id_key_pinned_names_and_short_lifetime(tmp_path: Path) -> None:
    ca = FederationCA.load_or_create(tmp_path, _sealing())
    key = EnclaveKey.generate()
    before = dt.datetime.now(dt.UTC)
    leaf = _issue(ca, key, "aggregator", lifetime=900, label="agg-1")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "hfl://role/aggregator",
        f"hfl://id/{peer_id_for(key.spki_sha256)}",
    ]
    assert san.get_values_for_type(x509.DNSName) == [
        "aggregator.hfl.internal",
        key_dns_name(key.spki_sha256),
    ]
    assert key_dns_name(key.spki_sha256) == f"k-{key.spki_sha256.hex()[:32]}.hfl.internal"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - before
    assert dt.timedelta(seconds=890) < lifetime <= dt.timedelta(seconds=901)
    assert "agg-1" in leaf.subject.rfc4514_string()


def test_csr_with_a_broken_signature_is_refused() -> None:
    csr = bytearray(EnclaveKey.generate().csr("t", (), "trainer"))
    csr[-5] ^= 0xFF  # inside the signature
    with pytest.raises(InvalidArgumentError, match=r"PKCS#10|signature does not verify"):
        load_csr(bytes(csr))


def test_garbage_csr_is_refused_as_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="not DER PKCS#10"):
        load_csr(b"\x30\x03\x02\x01\x00")
    with pytest.raises(InvalidArgumentError, match="empty"):
        load_csr(b"")


def test_label_cannot_smuggle_names_into_a_certificate() -> None:
    with pytest.raises(InvalidArgumentError, match=r"label 'aggregator\.hfl\.internal/x'"):
        check_label("aggregator.hfl.internal/x")
    assert check_label("trainer-1") == "trainer-1"
