"""The verifier on a real SGX quote from Intel hardware, with Intel's collateral."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from hfl_common.config import AttestationPolicy, RolePolicy, TrustRoot
from hfl_common.tee.collateral import FileCollateral
from hfl_common.tee.roots import INTEL_SGX_ROOT_CA_DER
from hfl_common.tee.verify import QuoteVerifier

from .conftest import REAL_QUOTE_TIME

REAL_MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
REAL_MRSIGNER = bytes.fromhex("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
REAL_STATUS = "ConfigurationAndSWHardeningNeeded"


def _policy(
    make_policy: Callable[..., AttestationPolicy], accepted: frozenset[str]
) -> AttestationPolicy:
    return make_policy(
        trust_root=TrustRoot.INTEL,
        accepted=accepted,
        roles={
            "trainer": RolePolicy(
                mrenclave=(REAL_MRENCLAVE,), mrsigner=(REAL_MRSIGNER,), isv_prod_id=0, min_isv_svn=0
            )
        },
    )


@pytest.fixture
def lenient(
    make_policy: Callable[..., AttestationPolicy], real_collateral_path: Path
) -> QuoteVerifier:
    policy = _policy(make_policy, frozenset({"UpToDate", REAL_STATUS}))
    return QuoteVerifier(policy, FileCollateral(real_collateral_path), registry=CollectorRegistry())


def test_embedded_intel_root_is_the_root_of_the_real_collateral(
    real_collateral_path: Path,
) -> None:
    chain = json.loads(real_collateral_path.read_text())["pck_crl_issuer_chain"]
    root = x509.load_pem_x509_certificates(chain.encode())[-1]
    assert root.subject == root.issuer
    assert root.public_bytes(serialization.Encoding.DER) == INTEL_SGX_ROOT_CA_DER


def test_real_quote_is_accepted_with_its_tcb_status_and_advisories(
    lenient: QuoteVerifier, real_quote: bytes
) -> None:
    verdict = lenient.verify_quote(real_quote, "trainer", at=REAL_QUOTE_TIME)
    assert verdict.accepted, verdict.reason
    assert verdict.reason_code == "ok"
    assert verdict.tcb_status == REAL_STATUS
    assert verdict.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert not verdict.simulated
    m = verdict.measurements
    assert m is not None
    assert (m.mrenclave, m.mrsigner) == (REAL_MRENCLAVE, REAL_MRSIGNER)
    assert (m.isv_prod_id, m.isv_svn, m.debug, m.tee_type) == (0, 0, False, "SGX")
    assert m.report_data.startswith(b"Hello, world!")
    assert verdict.to_proto().measurements.mrenclave == REAL_MRENCLAVE


def test_real_quote_is_refused_by_a_strict_policy(
    make_policy: Callable[..., AttestationPolicy], real_collateral_path: Path, real_quote: bytes
) -> None:
    strict = QuoteVerifier(
        _policy(make_policy, frozenset({"UpToDate"})), FileCollateral(real_collateral_path)
    )
    verdict = strict.verify_quote(real_quote, "trainer", at=REAL_QUOTE_TIME)
    assert not verdict.accepted
    assert verdict.reason_code == "tcb_status_not_accepted"
    assert verdict.reason == (
        "platform TCB status ConfigurationAndSWHardeningNeeded is not accepted by the policy "
        "(accepted: UpToDate); advisories INTEL-SA-00289, INTEL-SA-00615"
    )


def test_real_quote_is_refused_when_an_advisory_is_rejected(
    make_policy: Callable[..., AttestationPolicy], real_collateral_path: Path, real_quote: bytes
) -> None:
    policy = make_policy(
        trust_root=TrustRoot.INTEL,
        accepted=frozenset({REAL_STATUS}),
        rejected_advisories=frozenset({"INTEL-SA-00615"}),
        roles={"trainer": RolePolicy((REAL_MRENCLAVE,), (), None, 0)},
    )
    verdict = QuoteVerifier(policy, FileCollateral(real_collateral_path)).verify_quote(
        real_quote, "trainer", at=REAL_QUOTE_TIME
    )
    assert verdict.reason_code == "advisory_rejected"
    assert "INTEL-SA-00615" in verdict.reason


def test_real_quote_today_is_refused_because_its_collateral_expired(
    lenient: QuoteVerifier, real_quote: bytes
) -> None:
    verdict = lenient.verify_quote(real_quote, "trainer", at=int(time.time()))
    assert not verdict.accepted
    assert verdict.reason_code == "collateral_expired"
    assert verdict.reason.startswith("collateral has expired (")
    assert "CrlExpired" in verdict.reason
    assert verdict.reason.endswith("refresh it from your PCCS")


def test_real_quote_with_any_byte_flipped_in_body_or_signature_is_refused(
    lenient: QuoteVerifier, real_quote: bytes
) -> None:
    rng = random.Random(20250619)
    body = rng.sample(range(48, 432), 24)
    signature = rng.sample(range(436, 436 + 64), 12)
    for offset in sorted(body + signature):
        mutated = bytearray(real_quote)
        mutated[offset] ^= 1 << rng.randrange(8)
        verdict = lenient.verify_quote(bytes(mutated), "trainer", at=REAL_QUOTE_TIME)
        assert not verdict.accepted, offset
        assert verdict.reason_code in {"signature_invalid", "debug_enclave"}, (
            offset,
            verdict.reason,
        )


def test_body_byte_flip_reports_the_invalid_signature(
    lenient: QuoteVerifier, real_quote: bytes
) -> None:
    mutated = bytearray(real_quote)
    mutated[48 + 64] ^= 0xFF  # first byte of MRENCLAVE
    verdict = lenient.verify_quote(bytes(mutated), "trainer", at=REAL_QUOTE_TIME)
    assert verdict.reason_code == "signature_invalid"
    assert "ISV enclave report signature is invalid" in verdict.reason


def test_tdx_quote_is_refused_for_an_sgx_role(lenient: QuoteVerifier, tdx_quote: bytes) -> None:
    verdict = lenient.verify_quote(tdx_quote, "trainer", at=REAL_QUOTE_TIME)
    assert not verdict.accepted
    assert verdict.reason_code == "not_sgx"
    assert "TDX quote" in verdict.reason


def test_real_quote_under_a_simulation_policy_is_an_untrusted_root(
    make_verifier: Callable[..., QuoteVerifier], real_quote: bytes
) -> None:
    verdict = make_verifier().verify_quote(real_quote, "trainer", at=REAL_QUOTE_TIME)
    assert verdict.reason_code == "untrusted_root"
    assert "'Intel SGX Root CA'" in verdict.reason
    assert "not the simulation root the policy pins" in verdict.reason
