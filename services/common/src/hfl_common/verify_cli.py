"""`hfl verify`: verify an SGX quote or an RA-TLS certificate under a policy, offline.

    hfl verify EVIDENCE --policy policy.toml --role trainer \\
        (--collateral FILE|DIR | --pccs-url URL) [--at UNIX_SECONDS] \\
        [--simulation-root root_ca.pem | --sim-platform DIR]

EVIDENCE is a raw SGX DCAP quote or an RA-TLS certificate (PEM or DER), detected from
its bytes. For a certificate the quote in its Gramine extension is verified AND must
bind the certificate's key. The verdict (accepted, reason code and reason, TCB status,
advisories, measurements in hex) is printed as one JSON object on stdout.

Exit status: 0 accepted, 1 refused, 2 unusable input (unreadable file, not a quote or
certificate, invalid policy, no collateral), with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry

from hfl_common.attest_client import verify_ra_tls_certificate
from hfl_common.config import ROLES, TrustRoot, load_policy
from hfl_common.errors import ConfigError, EvidenceError, HflError
from hfl_common.ratls import parse_ra_tls_certificate
from hfl_common.tee.collateral import CollateralSource, DirectoryCollateral, PccsCollateral
from hfl_common.tee.verify import QuoteVerifier, Verdict

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1
EXIT_UNUSABLE = 2

# Refusals that mean "this input cannot be judged at all", not "judged and refused".
_UNUSABLE_CODES = frozenset({"quote_malformed", "collateral_unavailable", "internal_error"})


class _UsageError(HflError):
    """Input the command cannot use; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hfl verify",
        description="Verify an SGX quote or RA-TLS certificate under a policy.",
    )
    p.add_argument("evidence", type=Path, help="a raw SGX quote or an RA-TLS certificate")
    p.add_argument("--policy", type=Path, required=True, help="the agreed policy (TOML)")
    p.add_argument("--role", required=True, choices=ROLES, help="the role to verify for")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--collateral", type=Path, help="collateral JSON file, or directory of <FMSPC>.json"
    )
    source.add_argument("--pccs-url", help="fetch collateral from this PCCS")
    p.add_argument("--at", type=int, help="verify as of this Unix time (default: now)")
    root = p.add_mutually_exclusive_group()
    root.add_argument(
        "--simulation-root", type=Path, help="the development root certificate (PEM or DER)"
    )
    root.add_argument("--sim-platform", type=Path, help="simulated platform directory")
    return p


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _load_root_der(path: Path) -> bytes:
    data = _read(path, "simulation root certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise _UsageError(f"{path} is not an X.509 certificate: {exc}") from None
    return cert.public_bytes(Encoding.DER)


def _is_certificate(data: bytes) -> bool:
    """PEM, or DER starting with a SEQUENCE (a v3/v4 quote starts with 03 00 / 04 00)."""
    return data.lstrip().startswith(b"-----BEGIN") or data[:1] == b"\x30"


def verdict_json(verdict: Verdict, evidence_kind: str) -> dict[str, Any]:
    m = verdict.measurements
    return {
        "accepted": verdict.accepted,
        "reason_code": verdict.reason_code,
        "reason": verdict.reason,
        "role": verdict.role,
        "evidence": evidence_kind,
        "tcb_status": verdict.tcb_status,
        "advisory_ids": list(verdict.advisory_ids),
        "simulated": verdict.simulated,
        "measurements": None
        if m is None
        else {
            "mrenclave": m.mrenclave.hex(),
            "mrsigner": m.mrsigner.hex(),
            "isv_prod_id": m.isv_prod_id,
            "isv_svn": m.isv_svn,
            "debug": m.debug,
            "report_data": m.report_data.hex(),
            "tee_type": m.tee_type,
        },
    }


def _verify(ns: argparse.Namespace) -> tuple[Verdict, str]:
    policy = load_policy(ns.policy)
    sim_root: bytes | None = None
    if ns.simulation_root is not None:
        sim_root = _load_root_der(ns.simulation_root)
    elif ns.sim_platform is not None:
        sim_root = _load_root_der(ns.sim_platform / "root_ca.pem")
    if policy.trust_root is TrustRoot.SIMULATION and sim_root is None:
        raise _UsageError(
            f"{ns.policy} trusts the simulation root: give --simulation-root FILE "
            "or --sim-platform DIR"
        )
    collateral: CollateralSource
    if ns.collateral is not None:
        if not ns.collateral.exists():
            raise _UsageError(f"the collateral {ns.collateral} does not exist")
        collateral = DirectoryCollateral(ns.collateral)
    else:
        collateral = PccsCollateral(ns.pccs_url)
    verifier = QuoteVerifier(
        policy,
        collateral,
        simulation_root_der=sim_root if policy.trust_root is TrustRoot.SIMULATION else None,
        registry=CollectorRegistry(),
    )
    data = _read(ns.evidence, "evidence")
    if not data:
        raise _UsageError(f"the evidence file {ns.evidence} is empty")
    if _is_certificate(data):
        try:
            cert = parse_ra_tls_certificate(data)
        except EvidenceError as exc:
            raise _UsageError(f"{ns.evidence}: {exc.reason_code}: {exc}") from None
        return verify_ra_tls_certificate(cert, verifier, ns.role, at=ns.at), "ra_tls_certificate"
    return verifier.verify_quote(data, ns.role, at=ns.at), "sgx_quote"


def verify_main(argv: Sequence[str] | None = None) -> int:
    """Run `hfl verify`; returns 0 accepted, 1 refused, 2 unusable input."""
    try:
        ns = build_parser().parse_args(argv)
        verdict, kind = _verify(ns)
    except (HflError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if verdict.reason_code in _UNUSABLE_CODES:
        print(f"error: {ns.evidence}: {verdict.reason_code}: {verdict.reason}", file=sys.stderr)
        return EXIT_UNUSABLE
    json.dump(verdict_json(verdict, kind), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_ACCEPTED if verdict.accepted else EXIT_REFUSED
