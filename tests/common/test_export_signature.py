"""An exported model is signed by the trainer's enclave key under the federation CA.

Real keys and a real federation CA (hfl_attestation.ca); the quote check against a policy
runs in tests/cli/test_project.py on a whole federation's export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from hfl_attestation.ca import FederationCA, load_csr
from hfl_common.export_signature import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    SIGNER_FILE,
    ExportRefusedError,
    ExportSigner,
    sign_export,
    verify_export,
    verify_main,
)
from hfl_common.ratls import EnclaveKey
from hfl_common.sealing import SimulatedSealingKeys

PLAN_SHA = "ab" * 32


def _ca(state: Path, name: bytes) -> FederationCA:
    return FederationCA.load_or_create(
        state, SimulatedSealingKeys(b"\x11" * 32, hashlib.sha256(name).digest())
    )


def _signer(ca: FederationCA, role: str = "trainer") -> ExportSigner:
    key = EnclaveKey.generate()
    leaf = ca.issue(
        load_csr(key.csr("trainer-1", (), role)),
        role=role,
        evidence_extensions=[],
        lifetime_seconds=600,
        label="trainer-1",
    ).certificate
    return ExportSigner(key, leaf.public_bytes(serialization.Encoding.PEM), ca.pem)


def _export(directory: Path, signer: ExportSigner) -> Path:
    directory.mkdir()
    (directory / "model.keras").write_bytes(b"model bytes " * 100)
    (directory / "provenance.json").write_text('{"plan": "x"}\n')
    sign_export(
        directory,
        ["model.keras", "provenance.json"],
        signer,
        plan_sha256=PLAN_SHA,
        model_version=5,
        rounds_completed=5,
        trainer="trainer-1",
        aggregator_mrenclave="cd" * 32,
    )
    return directory


@pytest.fixture
def federation(tmp_path: Path) -> FederationCA:
    return _ca(tmp_path / "ca", b"federation")


def test_a_signed_export_verifies_and_says_what_it_is(
    tmp_path: Path, federation: FederationCA
) -> None:
    out = _export(tmp_path / "out", _signer(federation))

    result = verify_export(out, federation.pem, plan_sha256=PLAN_SHA)

    assert (
        result.manifest["files"]["model.keras"]
        == hashlib.sha256((out / "model.keras").read_bytes()).hexdigest()
    )
    assert result.manifest["model_version"] == 5
    assert result.manifest["aggregator_mrenclave"] == "cd" * 32
    assert (
        result.manifest["federation_ca_sha256"]
        == hashlib.sha256(
            federation.certificate.public_bytes(serialization.Encoding.DER)
        ).hexdigest()
    )
    assert "trained under the given plan" in result.checks


def test_one_changed_byte_of_the_model_is_refused(tmp_path: Path, federation: FederationCA) -> None:
    out = _export(tmp_path / "out", _signer(federation))
    data = bytearray((out / "model.keras").read_bytes())
    data[10] ^= 1
    (out / "model.keras").write_bytes(bytes(data))

    with pytest.raises(ExportRefusedError, match=r"model.keras: its SHA-256 is not the one"):
        verify_export(out, federation.pem)


def test_a_rewritten_manifest_no_longer_matches_its_signature(
    tmp_path: Path, federation: FederationCA
) -> None:
    out = _export(tmp_path / "out", _signer(federation))
    (out / "model.keras").write_bytes(b"the host's own model")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"]["model.keras"] = hashlib.sha256(b"the host's own model").hexdigest()
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    with pytest.raises(ExportRefusedError, match=r"signature does not verify"):
        verify_export(out, federation.pem)


def test_a_signature_by_another_key_is_refused(tmp_path: Path, federation: FederationCA) -> None:
    out = _export(tmp_path / "out", _signer(federation))
    other = EnclaveKey.generate()
    (out / SIGNATURE_FILE).write_bytes(other.sign((out / MANIFEST_FILE).read_bytes()))

    with pytest.raises(ExportRefusedError, match=r"signature does not verify"):
        verify_export(out, federation.pem)


def test_a_certificate_from_another_federations_ca_is_refused(
    tmp_path: Path, federation: FederationCA
) -> None:
    elsewhere = _ca(tmp_path / "other-ca", b"another federation")
    out = _export(tmp_path / "out", _signer(elsewhere))

    with pytest.raises(ExportRefusedError, match=r"not issued by the federation CA you gave"):
        verify_export(out, federation.pem)
    # ... and it does verify against its own CA: the refusal is the CA, nothing else.
    assert verify_export(out, elsewhere.pem).manifest["model_version"] == 5


def test_an_aggregators_signature_is_not_a_trainers(
    tmp_path: Path, federation: FederationCA
) -> None:
    out = _export(tmp_path / "out", _signer(federation, role="aggregator"))

    with pytest.raises(ExportRefusedError, match=r"the signer is a aggregator, not a trainer"):
        verify_export(out, federation.pem)


def test_a_file_added_to_the_export_is_refused(tmp_path: Path, federation: FederationCA) -> None:
    out = _export(tmp_path / "out", _signer(federation))
    (out / "extra.py").write_text("print('hi')\n")

    with pytest.raises(ExportRefusedError, match=r"extra.py: in .* but not signed"):
        verify_export(out, federation.pem)


def test_another_plan_is_refused(tmp_path: Path, federation: FederationCA) -> None:
    out = _export(tmp_path / "out", _signer(federation))

    with pytest.raises(ExportRefusedError, match=r"not the plan you gave"):
        verify_export(out, federation.pem, plan_sha256="ef" * 32)


def test_cli_exit_codes_verified_refused_unusable(
    tmp_path: Path, federation: FederationCA, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _export(tmp_path / "out", _signer(federation))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(federation.pem)

    assert verify_main([str(out), "--ca", str(ca)]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True

    (out / "provenance.json").write_text('{"plan": "y"}\n')
    assert verify_main([str(out), "--ca", str(ca)]) == 1
    assert capsys.readouterr().err.startswith("refused: provenance.json: its SHA-256")

    (out / SIGNER_FILE).unlink()
    assert verify_main([str(out), "--ca", str(ca)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "signer.pem: no signer.pem" in err
    assert len(err.strip().splitlines()) == 1
