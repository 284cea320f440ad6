"""Quote verification under the federation's attestation policy.

dcap-qvl checks every signature and certificate (the quote, the QE report, the
PCK chain, the CRLs, the TCB info and QE identity) against the root the policy
trusts; this module decides which root that is, reads the report body, and
applies the policy. `QuoteVerifier.verify_quote` never raises for bad evidence:
it returns a refusing `Verdict` with a reason code and a precise reason.

Checks, in order, and the reason code of a refusal at each:

1. parse the quote (hfl_common.tee.sgx)                      quote_malformed
2. TEE type is SGX (a TDX quote is refused for SGX roles)     not_sgx
3. the PCK chain's root is the one the policy trusts:
   Intel's SGX root for trust root "intel", the pinned
   development root for "simulation"                          untrusted_root
   a development root under an "intel" policy                 simulation_not_allowed
4. collateral for the quote's FMSPC can be had                collateral_unavailable
5. dcap-qvl verification (signatures, chains, CRLs, TCB):
   CRL / TCB info / QE identity past nextUpdate               collateral_expired
   a certificate of the chain has expired                     certificate_expired
   the PCK (or its CA) is in a CRL                            pck_revoked
   a signature or the QE report hash does not verify          signature_invalid
   dcap-qvl refuses a debug enclave itself                    debug_enclave
   anything else dcap-qvl refuses (its message included)      verification_failed
6. TCB status is in accepted_tcb_statuses                     tcb_status_not_accepted
7. no advisory is in rejected_advisories                      advisory_rejected
8. not a debug enclave, unless allow_debug                    debug_enclave
9. attributes: INIT and MODE64BIT set, PROVISIONKEY and
   EINITTOKEN_KEY clear                                       attributes_invalid
10. the role is in the policy                                 role_not_in_policy
11. MRENCLAVE is one of the role's values (if any listed)     mrenclave_mismatch
12. MRSIGNER is one of the role's values (if any listed)      mrsigner_mismatch
13. ISV_PROD_ID equals the role's (if set)                    isv_prod_id_mismatch
14. ISV_SVN is at least the role's minimum                    isv_svn_too_low
15. report_data starts with report_data_prefix (if given)     report_data_mismatch
Accepted: reason code "ok". An unexpected internal error gives "internal_error".

dcap-qvl 0.7.0 refuses debug enclaves unconditionally (step 5), so allow_debug
cannot admit one with this library version.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter, Histogram

from hfl_common.api import attestation_pb2
from hfl_common.config import AttestationPolicy, TrustRoot
from hfl_common.errors import ConfigError, EvidenceError
from hfl_common.tee.collateral import CollateralSource
from hfl_common.tee.roots import INTEL_SGX_ROOT_CA_DER, INTEL_SGX_ROOT_CA_SHA256
from hfl_common.tee.sgx import (
    ATTR_EINITTOKEN_KEY,
    ATTR_INIT,
    ATTR_MODE64BIT,
    ATTR_PROVISIONKEY,
    SgxQuote,
    parse_quote,
    tee_type_name,
)
from hfl_common.tee.simulation import SIMULATED_ROOT_CN

logger = logging.getLogger(__name__)

REASON_CODES = (
    "ok",
    "quote_malformed",
    "not_sgx",
    "untrusted_root",
    "simulation_not_allowed",
    "collateral_unavailable",
    "collateral_expired",
    "certificate_expired",
    "pck_revoked",
    "signature_invalid",
    "verification_failed",
    "tcb_status_not_accepted",
    "advisory_rejected",
    "debug_enclave",
    "attributes_invalid",
    "role_not_in_policy",
    "mrenclave_mismatch",
    "mrsigner_mismatch",
    "isv_prod_id_mismatch",
    "isv_svn_too_low",
    "report_data_mismatch",
    "internal_error",
)

_ROLE_TO_PROTO = {
    "attestation": attestation_pb2.ROLE_ATTESTATION,
    "aggregator": attestation_pb2.ROLE_AGGREGATOR,
    "trainer": attestation_pb2.ROLE_TRAINER,
    "operator": attestation_pb2.ROLE_OPERATOR,
}


@dataclass(frozen=True)
class Measurements:
    """Identity values read from a quote's report body."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: bytes
    tee_type: str
    attributes_flags: int = 0

    @classmethod
    def of(cls, quote: SgxQuote) -> Measurements:
        b = quote.body
        return cls(
            mrenclave=b.mrenclave,
            mrsigner=b.mrsigner,
            isv_prod_id=b.isv_prod_id,
            isv_svn=b.isv_svn,
            debug=b.debug,
            report_data=b.report_data,
            tee_type=tee_type_name(quote.header.tee_type),
            attributes_flags=b.attributes_flags,
        )

    def to_proto(self) -> attestation_pb2.Measurements:
        return attestation_pb2.Measurements(
            mrenclave=self.mrenclave,
            mrsigner=self.mrsigner,
            isv_prod_id=self.isv_prod_id,
            isv_svn=self.isv_svn,
            debug=self.debug,
            report_data=self.report_data,
            tee_type=self.tee_type,
        )


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying a quote for a role. Refusals say why."""

    accepted: bool
    reason_code: str
    reason: str
    role: str
    tcb_status: str = ""
    advisory_ids: tuple[str, ...] = ()
    measurements: Measurements | None = None
    simulated: bool = False
    # SHA-256 of the root the PCK chain was verified against (empty if not reached).
    root_sha256: bytes = field(default=b"", repr=False)

    def to_proto(self) -> attestation_pb2.Verdict:
        msg = attestation_pb2.Verdict(
            accepted=self.accepted,
            reason_code=self.reason_code,
            reason=self.reason,
            tcb_status=self.tcb_status,
            advisory_ids=list(self.advisory_ids),
            role=_ROLE_TO_PROTO.get(self.role, attestation_pb2.ROLE_UNSPECIFIED),
            simulated=self.simulated,
        )
        if self.measurements is not None:
            msg.measurements.CopyFrom(self.measurements.to_proto())
        return msg

    def raise_if_refused(self) -> None:
        """Raise EvidenceError(reason, reason_code) unless accepted."""
        if not self.accepted:
            raise EvidenceError(self.reason, self.reason_code)


class _Refusal(Exception):  # noqa: N818 - internal control flow, never escapes
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# dcap-qvl's error texts (0.7.0) -> our reason codes, first match wins.
_DCAP_ERRORS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Debug mode is enabled"), "debug_enclave"),
    (re.compile(r"CertRevoked|revoked", re.IGNORECASE), "pck_revoked"),
    (re.compile(r"CertExpired|certificate expired", re.IGNORECASE), "certificate_expired"),
    (
        re.compile(
            r"CrlExpired|revocation list expired|TCBInfo expired|QE Identity expired"
            r"|Collateral expired",
            re.IGNORECASE,
        ),
        "collateral_expired",
    ),
    (
        re.compile(
            r"signature is invalid|InvalidSignature|InvalidCrlSignature|hash mismatch", re.I
        ),
        "signature_invalid",
    ),
)


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def classify_dcap_error(message: str) -> tuple[str, str]:
    """Map a dcap-qvl error message to (reason code, reason)."""
    text = _one_line(message)
    if "TCB status is invalid" in text:
        return "tcb_status_not_accepted", f"dcap-qvl refused the TCB status: {text}"
    code = next((c for pattern, c in _DCAP_ERRORS if pattern.search(text)), None)
    if code is None:
        return "verification_failed", f"quote verification failed: {text}"
    if code == "collateral_expired":
        return code, f"collateral has expired ({text}); refresh it from your PCCS"
    if code == "certificate_expired":
        return code, f"a certificate of the quote's chain has expired ({text})"
    if code == "pck_revoked":
        return code, f"the PCK certificate chain is revoked by the collateral's CRL ({text})"
    if code == "debug_enclave":
        return code, f"the quote is from a debug enclave, which dcap-qvl refuses ({text})"
    return code, f"a signature in the quote or its collateral does not verify ({text})"


def _common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


class QuoteVerifier:
    """Verifies SGX quotes for roles under an AttestationPolicy. Thread-safe."""

    def __init__(
        self,
        policy: AttestationPolicy,
        collateral: CollateralSource,
        *,
        simulation_root_der: bytes | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.collateral = collateral
        self._clock = clock
        self._sim_root_der = simulation_root_der
        self._sim_root_sha = (
            hashlib.sha256(simulation_root_der).digest() if simulation_root_der else None
        )
        if policy.trust_root is TrustRoot.SIMULATION:
            if policy.simulation_root_sha256 is None:
                raise ConfigError("a simulation policy must pin simulation_root_sha256")
            if simulation_root_der is None:
                raise ConfigError(
                    "the policy trusts the simulation root, but no simulation root certificate "
                    "was given (pass the platform's root_ca.pem)"
                )
            given = hashlib.sha256(simulation_root_der).digest()
            if given != policy.simulation_root_sha256:
                raise ConfigError(
                    f"the simulation root certificate given has SHA-256 {given.hex()}"
                    f", but the policy pins {policy.simulation_root_sha256.hex()}"
                )
        registry = registry or CollectorRegistry()
        self._verifications = Counter(
            "hfl_attestation_verifications_total",
            "Quote verifications, by role, result and reason code",
            ["role", "result", "reason"],
            registry=registry,
        )
        self._duration = Histogram(
            "hfl_attestation_verification_duration_seconds",
            "Time to verify one quote (parse, collateral, dcap-qvl, policy)",
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )

    def verify_quote(
        self,
        quote: bytes,
        role: str,
        *,
        report_data_prefix: bytes | None = None,
        at: int | None = None,
    ) -> Verdict:
        """Verify `quote` for `role` as of Unix time `at` (default: the clock)."""
        started = time.perf_counter()
        now = int(self._clock()) if at is None else int(at)
        try:
            verdict = self._verify(quote, role, report_data_prefix, now)
        except Exception as exc:  # defensive: bad evidence must never escape as an exception
            logger.exception("internal error while verifying a quote for role %s", role)
            verdict = Verdict(
                False, "internal_error", f"internal error while verifying: {exc!r}", role
            )
        self._duration.observe(time.perf_counter() - started)
        self._verifications.labels(
            role=role if role in _ROLE_TO_PROTO else "unknown",
            result="accepted" if verdict.accepted else "refused",
            reason=verdict.reason_code,
        ).inc()
        if verdict.accepted:
            logger.info(
                "accepted %s quote (MRENCLAVE %s, TCB %s%s)",
                role,
                verdict.measurements.mrenclave.hex() if verdict.measurements else "?",
                verdict.tcb_status,
                ", simulated" if verdict.simulated else "",
            )
        else:
            logger.warning("refused %s quote: %s: %s", role, verdict.reason_code, verdict.reason)
        return verdict

    def _trusted_root(self, quote: SgxQuote) -> tuple[bytes, bool]:
        """The root DER to verify against and whether it is the simulation root."""
        policy = self.policy
        last = quote.pck_chain[-1]
        self_signed = last.issuer == last.subject
        last_sha = hashlib.sha256(last.public_bytes(serialization.Encoding.DER)).digest()
        cn = _common_name(last.subject)
        is_sim = self_signed and (
            cn == SIMULATED_ROOT_CN
            or (self._sim_root_sha is not None and last_sha == self._sim_root_sha)
        )
        if policy.trust_root is TrustRoot.INTEL:
            if not self_signed or last_sha == INTEL_SGX_ROOT_CA_SHA256:
                return INTEL_SGX_ROOT_CA_DER, False
            if is_sim:
                raise _Refusal(
                    "simulation_not_allowed",
                    f"the quote chains to the development root {cn!r} (SHA-256 {last_sha.hex()}),"
                    " a simulated TEE; this policy trusts only Intel's SGX Root CA and does "
                    "not allow simulation",
                )
            raise _Refusal(
                "untrusted_root",
                f"the quote's PCK chain ends in {cn!r} (SHA-256 {last_sha.hex()}), not Intel's "
                f"SGX Root CA (SHA-256 {INTEL_SGX_ROOT_CA_SHA256.hex()})",
            )
        pin = policy.simulation_root_sha256
        sim_root = self._sim_root_der
        if sim_root is None or pin is None:  # __init__ refuses such a verifier
            raise _Refusal("untrusted_root", "no simulation root is configured")
        if not self_signed or last_sha == pin:
            return sim_root, True
        raise _Refusal(
            "untrusted_root",
            f"the quote's PCK chain ends in {cn!r} (SHA-256 {last_sha.hex()}), not the "
            f"simulation root the policy pins (SHA-256 {pin.hex()})",
        )

    def _verify(self, raw: bytes, role: str, report_data_prefix: bytes | None, now: int) -> Verdict:
        try:
            quote = parse_quote(raw)
        except EvidenceError as exc:
            return Verdict(False, exc.reason_code, str(exc), role)
        m = Measurements.of(quote)
        tcb_status = ""
        advisories: tuple[str, ...] = ()
        simulated = False
        root_sha = b""

        def refuse(code: str, reason: str) -> Verdict:
            return Verdict(
                False, code, reason, role, tcb_status, advisories, m, simulated, root_sha
            )

        try:
            root_der, simulated = self._trusted_root(quote)
            root_sha = hashlib.sha256(root_der).digest()
        except _Refusal as r:
            return refuse(r.code, r.reason)

        try:
            collateral = self.collateral.get(raw, now)
        except EvidenceError as exc:
            code = (
                exc.reason_code
                if exc.reason_code != "evidence_invalid"
                else "collateral_unavailable"
            )
            return refuse(code, str(exc))
        try:
            report = dcap_qvl.verify_with_root_ca(raw, collateral, root_der, now)
        except (ValueError, TypeError) as exc:
            code, reason = classify_dcap_error(str(exc))
            return refuse(code, reason)
        tcb_status = str(report.status)
        advisories = tuple(str(a) for a in report.advisory_ids)

        policy = self.policy
        if tcb_status not in policy.accepted_tcb_statuses:
            return refuse(
                "tcb_status_not_accepted",
                f"platform TCB status {tcb_status} is not accepted by the policy "
                f"(accepted: {', '.join(sorted(policy.accepted_tcb_statuses))})"
                + (f"; advisories {', '.join(advisories)}" if advisories else ""),
            )
        rejected = sorted(set(advisories) & policy.rejected_advisories)
        if rejected:
            return refuse(
                "advisory_rejected",
                f"platform is affected by advisory {', '.join(rejected)}, which the policy rejects",
            )
        if m.debug and not policy.allow_debug:
            return refuse(
                "debug_enclave",
                "the quote is from a debug enclave; the policy forbids debug enclaves",
            )
        flags = m.attributes_flags
        missing = [
            n for bit, n in ((ATTR_INIT, "INIT"), (ATTR_MODE64BIT, "MODE64BIT")) if not flags & bit
        ]
        forbidden = [
            n
            for bit, n in (
                (ATTR_PROVISIONKEY, "PROVISIONKEY"),
                (ATTR_EINITTOKEN_KEY, "EINITTOKEN_KEY"),
            )
            if flags & bit
        ]
        if missing or forbidden:
            what = []
            if missing:
                what.append(f"{' and '.join(missing)} not set")
            if forbidden:
                what.append(f"{' and '.join(forbidden)} set")
            return refuse(
                "attributes_invalid",
                f"enclave attributes 0x{flags:016x} are invalid: {'; '.join(what)}",
            )

        rp = policy.roles.get(role)
        if rp is None:
            return refuse(
                "role_not_in_policy",
                f"role {role!r} is not in the policy (roles: {', '.join(sorted(policy.roles))})",
            )
        if rp.mrenclave and m.mrenclave not in rp.mrenclave:
            return refuse(
                "mrenclave_mismatch",
                f"quote MRENCLAVE {m.mrenclave.hex()} is not one the policy accepts for role "
                f"{role} ({', '.join(v.hex() for v in rp.mrenclave)})",
            )
        if rp.mrsigner and m.mrsigner not in rp.mrsigner:
            return refuse(
                "mrsigner_mismatch",
                f"quote MRSIGNER {m.mrsigner.hex()} is not one the policy accepts for role "
                f"{role} ({', '.join(v.hex() for v in rp.mrsigner)})",
            )
        if rp.isv_prod_id is not None and m.isv_prod_id != rp.isv_prod_id:
            return refuse(
                "isv_prod_id_mismatch",
                f"quote ISVPRODID {m.isv_prod_id} is not the policy's {rp.isv_prod_id} "
                f"for role {role}",
            )
        if m.isv_svn < rp.min_isv_svn:
            return refuse(
                "isv_svn_too_low",
                f"quote ISVSVN {m.isv_svn} is below the policy minimum {rp.min_isv_svn} "
                f"for role {role}",
            )
        if report_data_prefix is not None and not m.report_data.startswith(report_data_prefix):
            n = len(report_data_prefix)
            return refuse(
                "report_data_mismatch",
                f"quote report_data[0:{n}] is {m.report_data[:n].hex()}, expected "
                f"{report_data_prefix.hex()} (the evidence is not bound to this key/plan)",
            )
        return Verdict(True, "ok", "accepted", role, tcb_status, advisories, m, simulated, root_sha)
