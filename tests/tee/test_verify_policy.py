"""The verifier on simulated quotes: accepted when all is right, each refusal with its reason."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hfl_common.api import attestation_pb2
from hfl_common.config import AttestationPolicy, RolePolicy, TrustRoot
from hfl_common.errors import ConfigError, EvidenceError
from hfl_common.tee.collateral import FileCollateral
from hfl_common.tee.sgx import ATTR_EINITTOKEN_KEY, ATTR_INIT, ATTR_MODE64BIT, ATTR_PROVISIONKEY
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform
from hfl_common.tee.verify import REASON_CODES, QuoteVerifier, classify_dcap_error

PolicyFactory = Callable[..., AttestationPolicy]
VerifierFactory = Callable[..., QuoteVerifier]

KEY_HASH = hashlib.sha256(b"the enclave's TLS key").digest()
REPORT_DATA = KEY_HASH + bytes(32)


def _identity(base: EnclaveIdentity, **changes: object) -> EnclaveIdentity:
    values = {
        "mrenclave": base.mrenclave,
        "mrsigner": base.mrsigner,
        "isv_prod_id": base.isv_prod_id,
        "isv_svn": base.isv_svn,
    }
    values.update(changes)
    return EnclaveIdentity(**values)  # type: ignore[arg-type]


def _collateral_file(tmp_path: Path, text: str) -> FileCollateral:
    path = tmp_path / "collateral.json"
    path.write_text(text)
    return FileCollateral(path)


def test_simulated_quote_is_accepted_up_to_date(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier().verify_quote(quote, "trainer", report_data_prefix=KEY_HASH)
    assert verdict.accepted, verdict.reason
    assert (verdict.reason_code, verdict.tcb_status, verdict.simulated) == ("ok", "UpToDate", True)
    assert verdict.measurements is not None
    assert verdict.measurements.mrenclave == trainer_identity.mrenclave
    assert verdict.root_sha256 == sim_platform.root_sha256
    proto = verdict.to_proto()
    assert isinstance(proto, attestation_pb2.Verdict)
    assert proto.accepted
    assert proto.simulated
    assert proto.role == attestation_pb2.ROLE_TRAINER
    assert proto.measurements.isv_svn == 2
    assert proto.measurements.tee_type == "SGX"
    verdict.raise_if_refused()  # does not raise


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (
            {"mrenclave": b"\xbb" * 32},
            "mrenclave_mismatch",
            "quote MRENCLAVE " + "bb" * 32 + " is not one the policy accepts for role trainer",
        ),
        (
            {"mrsigner": b"\xcc" * 32},
            "mrsigner_mismatch",
            "quote MRSIGNER " + "cc" * 32 + " is not one the policy accepts for role trainer",
        ),
        (
            {"isv_prod_id": 2},
            "isv_prod_id_mismatch",
            "quote ISVPRODID 2 is not the policy's 3 for role trainer",
        ),
        (
            {"isv_svn": 1},
            "isv_svn_too_low",
            "quote ISVSVN 1 is below the policy minimum 2 for role trainer",
        ),
    ],
)
def test_identity_mismatches_are_refused_with_their_reason(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
    change: dict[str, object],
    code: str,
    message: str,
) -> None:
    quote = sim_platform.quote(_identity(trainer_identity, **change), REPORT_DATA)
    verdict = make_verifier().verify_quote(quote, "trainer")
    assert not verdict.accepted
    assert verdict.reason_code == code
    assert verdict.reason.startswith(message)
    assert verdict.tcb_status == "UpToDate"  # the crypto passed; the policy refused
    with pytest.raises(EvidenceError, match=message) as e:
        verdict.raise_if_refused()
    assert e.value.reason_code == code


def test_mrsigner_only_policy_accepts_any_code_of_that_signer(
    make_verifier: VerifierFactory,
    make_policy: PolicyFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    policy = make_policy(roles={"trainer": RolePolicy((), (trainer_identity.mrsigner,), 3, 0)})
    quote = sim_platform.quote(_identity(trainer_identity, mrenclave=b"\x01" * 32), REPORT_DATA)
    assert make_verifier(policy).verify_quote(quote, "trainer").accepted


def test_debug_enclave_is_refused(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA, debug=True)
    verdict = make_verifier().verify_quote(quote, "trainer")
    assert verdict.reason_code == "debug_enclave"
    assert "debug enclave" in verdict.reason
    assert verdict.measurements is not None
    assert verdict.measurements.debug


def test_debug_enclave_stays_refused_even_if_policy_allows_debug(
    make_verifier: VerifierFactory,
    make_policy: PolicyFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    # dcap-qvl 0.7.0 refuses debug enclaves itself; allow_debug cannot override it.
    quote = sim_platform.quote(trainer_identity, REPORT_DATA, debug=True)
    verdict = make_verifier(make_policy(allow_debug=True)).verify_quote(quote, "trainer")
    assert verdict.reason_code == "debug_enclave"
    assert "Debug mode is enabled" in verdict.reason


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (ATTR_INIT, "MODE64BIT not set"),
        (ATTR_MODE64BIT, "INIT not set"),
        (ATTR_INIT | ATTR_MODE64BIT | ATTR_PROVISIONKEY, "PROVISIONKEY set"),
        (ATTR_INIT | ATTR_MODE64BIT | ATTR_EINITTOKEN_KEY, "EINITTOKEN_KEY set"),
    ],
)
def test_invalid_attributes_are_refused(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
    flags: int,
    message: str,
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA, attributes_flags=flags)
    verdict = make_verifier().verify_quote(quote, "trainer")
    assert verdict.reason_code == "attributes_invalid"
    assert verdict.reason == f"enclave attributes 0x{flags:016x} are invalid: {message}"


def test_revoked_pck_is_refused(
    tmp_path: Path,
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    collateral = _collateral_file(tmp_path, sim_platform.collateral_json(revoke_pck=True))
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier(collateral=collateral).verify_quote(quote, "trainer")
    assert verdict.reason_code == "pck_revoked"
    assert "CertRevoked" in verdict.reason


def test_expired_collateral_is_refused_with_advice(
    tmp_path: Path,
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    old = sim_platform.collateral_json(now=int(time.time()) - 45 * 24 * 3600)
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier(collateral=_collateral_file(tmp_path, old)).verify_quote(
        quote, "trainer"
    )
    assert verdict.reason_code == "collateral_expired"
    assert verdict.reason.startswith("collateral has expired (")
    assert verdict.reason.endswith("; refresh it from your PCCS")


def test_verifying_after_the_collateral_next_update_is_refused(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier().verify_quote(quote, "trainer", at=int(time.time()) + 60 * 86400)
    assert verdict.reason_code == "collateral_expired"


def test_quote_from_a_different_development_root_is_untrusted(
    make_verifier: VerifierFactory,
    other_platform: SimulatedPlatform,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    quote = other_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier().verify_quote(quote, "trainer")
    assert verdict.reason_code == "untrusted_root"
    assert other_platform.root_sha256.hex() in verdict.reason
    assert (
        f"not the simulation root the policy pins (SHA-256 {sim_platform.root_sha256.hex()})"
        in (verdict.reason)
    )


def test_simulation_root_under_an_intel_policy_is_not_allowed(
    make_verifier: VerifierFactory,
    make_policy: PolicyFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    verifier = make_verifier(make_policy(trust_root=TrustRoot.INTEL))
    verdict = verifier.verify_quote(sim_platform.quote(trainer_identity, REPORT_DATA), "trainer")
    assert verdict.reason_code == "simulation_not_allowed"
    assert "'hfl simulated SGX root'" in verdict.reason
    assert "does not allow simulation" in verdict.reason
    assert not verdict.simulated


def test_report_data_not_bound_is_refused(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    other = hashlib.sha256(b"another key").digest()
    verdict = make_verifier().verify_quote(quote, "trainer", report_data_prefix=other)
    assert verdict.reason_code == "report_data_mismatch"
    assert verdict.reason.startswith(f"quote report_data[0:32] is {KEY_HASH.hex()}, expected ")


def test_out_of_date_tcb_is_refused_by_a_strict_policy(
    tmp_path: Path,
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    collateral = _collateral_file(tmp_path, sim_platform.collateral_json(tcb_status="OutOfDate"))
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier(collateral=collateral).verify_quote(quote, "trainer")
    assert verdict.reason_code == "tcb_status_not_accepted"
    assert verdict.reason == (
        "platform TCB status OutOfDate is not accepted by the policy (accepted: UpToDate)"
    )


def test_out_of_date_tcb_is_accepted_when_the_policy_says_so(
    tmp_path: Path,
    make_verifier: VerifierFactory,
    make_policy: PolicyFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    collateral = _collateral_file(tmp_path, sim_platform.collateral_json(tcb_status="OutOfDate"))
    policy = make_policy(accepted=frozenset({"UpToDate", "OutOfDate"}))
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier(policy, collateral=collateral).verify_quote(quote, "trainer")
    assert verdict.accepted
    assert verdict.tcb_status == "OutOfDate"


def test_rejected_advisory_is_refused(
    tmp_path: Path,
    make_verifier: VerifierFactory,
    make_policy: PolicyFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    text = sim_platform.collateral_json(
        tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615", "INTEL-SA-00657")
    )
    policy = make_policy(
        accepted=frozenset({"UpToDate", "SWHardeningNeeded"}),
        rejected_advisories=frozenset({"INTEL-SA-00657"}),
    )
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier(policy, collateral=_collateral_file(tmp_path, text)).verify_quote(
        quote, "trainer"
    )
    assert verdict.reason_code == "advisory_rejected"
    assert verdict.reason == (
        "platform is affected by advisory INTEL-SA-00657, which the policy rejects"
    )
    assert verdict.advisory_ids == ("INTEL-SA-00615", "INTEL-SA-00657")


def test_role_not_in_policy_is_refused(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    verdict = make_verifier().verify_quote(quote, "aggregator")
    assert verdict.reason_code == "role_not_in_policy"
    assert verdict.reason == "role 'aggregator' is not in the policy (roles: trainer)"


def test_missing_collateral_is_refused_naming_the_file(
    tmp_path: Path,
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    verifier = make_verifier(collateral=FileCollateral(tmp_path / "nope.json"))
    verdict = verifier.verify_quote(sim_platform.quote(trainer_identity, REPORT_DATA), "trainer")
    assert verdict.reason_code == "collateral_unavailable"
    assert str(tmp_path / "nope.json") in verdict.reason


def test_garbage_is_refused_as_malformed(make_verifier: VerifierFactory) -> None:
    verdict = make_verifier().verify_quote(b"\x03\x00garbage", "trainer")
    assert verdict.reason_code == "quote_malformed"
    assert verdict.measurements is None
    assert verdict.to_proto().reason_code == "quote_malformed"


def test_metrics_count_results_and_reasons(
    make_verifier: VerifierFactory,
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
) -> None:
    registry = CollectorRegistry()
    verifier = make_verifier(registry=registry)
    good = sim_platform.quote(trainer_identity, REPORT_DATA)
    verifier.verify_quote(good, "trainer")
    verifier.verify_quote(good, "trainer")
    verifier.verify_quote(b"junk", "trainer")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    total = "hfl_attestation_verifications_total"
    assert value(total, role="trainer", result="accepted", reason="ok") == 2
    assert value(total, role="trainer", result="refused", reason="quote_malformed") == 1
    assert value("hfl_attestation_verification_duration_seconds_count") == 3


def test_simulation_policy_requires_the_pinned_root(
    make_policy: PolicyFactory, sim_platform: SimulatedPlatform, other_platform: SimulatedPlatform
) -> None:
    collateral = FileCollateral(sim_platform.collateral_path)
    with pytest.raises(ConfigError, match="no simulation root certificate was given"):
        QuoteVerifier(make_policy(), collateral)
    with pytest.raises(
        ConfigError,
        match=f"has SHA-256 {other_platform.root_sha256.hex()}, but the policy pins "
        f"{sim_platform.root_sha256.hex()}",
    ):
        QuoteVerifier(make_policy(), collateral, simulation_root_der=other_platform.root_der)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("Verification failed: TCBInfo expired", "collateral_expired"),
        ("Verification failed: QE Identity expired", "collateral_expired"),
        ("Failed to verify certificate chain\n\nCaused by:\n    CertRevoked", "pck_revoked"),
        ("Signature is invalid for qe_report in quote", "signature_invalid"),
        ("QE report hash mismatch", "signature_invalid"),
        ("Failed to verify certificate chain: CertExpired", "certificate_expired"),
        ("TCB status is invalid: Revoked", "tcb_status_not_accepted"),
        ("Unknown QE vendor ID", "verification_failed"),
    ],
)
def test_dcap_qvl_errors_map_to_reason_codes(message: str, code: str) -> None:
    got, reason = classify_dcap_error(message)
    assert got == code
    assert got in REASON_CODES
    assert message.splitlines()[0].strip() in reason
