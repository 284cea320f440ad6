"""A verifiable exported model: a manifest of the exported files, signed in the enclave.

When a trainer writes the final model into its output directory (hfl_trainer.export),
it adds three files beside ``model.keras`` and ``provenance.json``:

``export-manifest.json``
    the SHA-256 of every exported file, the plan's SHA-256, the model version and
    rounds completed, the trainer's label and party, the aggregator's MRENCLAVE as
    the trainer verified it, the SHA-256 of the federation CA's certificate (which
    names the federation) and of the signing key, and the time of signing;
``export-manifest.sig``
    an ECDSA P-384 / SHA-384 signature (DER) over the manifest's exact bytes, made
    with the trainer's enclave key: the RA-TLS key that never leaves the enclave and
    whose certificate the federation CA issued after verifying the trainer's quote;
``signer.pem``
    that certificate (it carries the trainer's quote), then the CA's certificate.

`verify_export` (``hfl verify-export DIR --ca CA.pem``) checks that the certificate is
the federation CA's, for a trainer, valid when it signed; the signature; and every
file's hash, with no file in the directory left out. With ``--policy`` it also verifies
the quote inside the certificate under the agreed policy (the trainer's MRENCLAVE,
which covers hfl's code and the project's), and with ``--plan`` that the model comes
from that plan. Whoever holds the directory can then show that the model is what an
attested trainer of this federation received, byte for byte: the host that wrote it to
disk could not have changed a byte or signed a model of its own.

The CA file a verifier passes is its own trust anchor: a party takes it from its own
trainer's first export (or its operator's ``ca.pem``), never from the directory it is
checking; ``signer.pem``'s copy only shows what the signer used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_common.errors import HflError, InvalidArgumentError, PermissionDeniedError
from hfl_common.identity import SanNames

MANIFEST_FILE = "export-manifest.json"
SIGNATURE_FILE = "export-manifest.sig"
SIGNER_FILE = "signer.pem"
MANIFEST_FORMAT = "hfl-export-manifest/1"
SIGNATURE_FILES = frozenset({MANIFEST_FILE, SIGNATURE_FILE, SIGNER_FILE})

EXIT_VERIFIED = 0
EXIT_REFUSED = 1
EXIT_UNUSABLE = 2


class ExportRefusedError(PermissionDeniedError):
    """The export does not verify: tampered, wrongly signed, or not this federation's."""


class Signer(Protocol):
    """The enclave key (hfl_common.ratls.EnclaveKey) as the exporter needs it."""

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class ExportSigner:
    """Who signs an export: the enclave key and its current federation certificate."""

    key: Signer
    certificate_pem: bytes
    ca_pem: bytes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InvalidArgumentError(f"{what} is not PEM certificates: {exc}") from None
    if not certs:
        raise InvalidArgumentError(f"{what} holds no certificate")
    return certs[0]


def _spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _cert_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def sign_export(
    directory: Path,
    files: Sequence[str],
    signer: ExportSigner,
    *,
    plan_sha256: str,
    model_version: int,
    rounds_completed: int,
    trainer: str,
    aggregator_mrenclave: str,
    now: dt.datetime | None = None,
) -> Path:
    """Write the signed manifest of `files` (names in `directory`); returns its path.

    Written in the order signer, signature, manifest, each renamed into place, so a
    reader that finds the manifest finds its signature too.
    """
    leaf = _first_certificate(signer.certificate_pem, "the trainer's certificate")
    ca = _first_certificate(signer.ca_pem, "the federation CA certificate")
    _role, _id, party = SanNames.of(leaf).single()
    signed_at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "files": {name: sha256_file(directory / name) for name in sorted(files)},
        "plan_sha256": plan_sha256,
        "model_version": model_version,
        "rounds_completed": rounds_completed,
        "trainer": trainer,
        "party": party,
        "aggregator_mrenclave": aggregator_mrenclave,
        "federation_ca_sha256": _cert_sha256(ca),
        "signer_spki_sha256": _spki_sha256(leaf),
        "signed_at": signed_at.isoformat(timespec="seconds"),
    }
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    chain = signer.certificate_pem.rstrip(b"\n") + b"\n" + signer.ca_pem.rstrip(b"\n") + b"\n"
    _write(directory / SIGNER_FILE, chain)
    _write(directory / SIGNATURE_FILE, signer.key.sign(body))
    _write(directory / MANIFEST_FILE, body)
    return directory / MANIFEST_FILE


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@dataclass(frozen=True)
class VerifiedExport:
    """What a verified export says (`verify_export`)."""

    manifest: Mapping[str, Any]
    signer_party: str | None
    trainer_mrenclave: str | None = None
    checks: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        return {
            "verified": True,
            "checks": list(self.checks),
            "trainer_mrenclave": self.trainer_mrenclave,
            **{k: self.manifest[k] for k in sorted(self.manifest)},
        }


class QuoteCheck(Protocol):
    """Verifies the trainer quote a federation certificate carries (see `verify_main`)."""

    def __call__(self, leaf: x509.Certificate, ca: x509.Certificate, at: int) -> str: ...


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgumentError(
            f"{path}: no {what}; the directory was not exported by a signing trainer "
            "(or the file was removed)"
        ) from None
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc.strerror or exc}") from None


def verify_export(
    directory: Path,
    ca_pem: bytes,
    *,
    plan_sha256: str | None = None,
    quote_check: QuoteCheck | None = None,
) -> VerifiedExport:
    """Check an exported directory; ExportRefusedError says what does not hold.

    InvalidArgumentError for input that cannot be judged (a missing or unreadable file).
    """
    if not directory.is_dir():
        raise InvalidArgumentError(f"{directory} is not a directory (give the export directory)")
    ca = _first_certificate(ca_pem, "the --ca file")
    body = _read(directory / MANIFEST_FILE, MANIFEST_FILE)
    signature = _read(directory / SIGNATURE_FILE, SIGNATURE_FILE)
    leaf = _first_certificate(_read(directory / SIGNER_FILE, SIGNER_FILE), SIGNER_FILE)
    checks: list[str] = []

    try:
        leaf.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        raise ExportRefusedError(
            f"{SIGNER_FILE}: the signer's certificate is not issued by the federation CA you "
            f"gave (CA {_cert_sha256(ca)[:16]}...): another federation's, or forged"
        ) from None
    checks.append("certificate issued by the federation CA")
    try:
        role, _id, party = SanNames.of(leaf).single()
    except HflError as exc:
        raise ExportRefusedError(f"{SIGNER_FILE}: {exc}") from None
    if role != "trainer":
        raise ExportRefusedError(f"{SIGNER_FILE}: the signer is a {role}, not a trainer")

    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ExportRefusedError(f"{SIGNER_FILE}: the signer's key is not an EC key")
    try:
        public_key.verify(signature, body, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise ExportRefusedError(
            f"{SIGNATURE_FILE}: the signature does not verify with the trainer's enclave key: "
            f"{MANIFEST_FILE} was changed after signing, or signed by another key"
        ) from None
    checks.append("manifest signed by the trainer's enclave key")

    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise ExportRefusedError(f"{MANIFEST_FILE} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportRefusedError(f"{MANIFEST_FILE}: not a {MANIFEST_FORMAT} manifest")
    if manifest.get("signer_spki_sha256") != _spki_sha256(leaf):
        raise ExportRefusedError(f"{MANIFEST_FILE}: names another signing key than {SIGNER_FILE}'s")
    if manifest.get("federation_ca_sha256") != _cert_sha256(ca):
        raise ExportRefusedError(f"{MANIFEST_FILE}: signed under another federation CA")
    try:
        signed_at = dt.datetime.fromisoformat(str(manifest["signed_at"]))
    except (KeyError, ValueError):
        raise ExportRefusedError(f"{MANIFEST_FILE}: no valid signed_at time") from None
    if not leaf.not_valid_before_utc <= signed_at <= leaf.not_valid_after_utc:
        raise ExportRefusedError(
            f"{SIGNER_FILE}: the certificate was not valid at signing time {signed_at.isoformat()}"
            f" (valid {leaf.not_valid_before_utc.isoformat()} to "
            f"{leaf.not_valid_after_utc.isoformat()})"
        )
    checks.append("certificate valid when it signed")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportRefusedError(f"{MANIFEST_FILE}: lists no files")
    for name, digest in sorted(files.items()):
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise ExportRefusedError(
                f"{name}: listed in {MANIFEST_FILE} but missing from {directory}"
            )
        if sha256_file(path) != digest:
            raise ExportRefusedError(
                f"{name}: its SHA-256 is not the one the trainer signed: changed after export"
            )
    unlisted = sorted(
        p.name
        for p in directory.iterdir()
        if p.name not in files and p.name not in SIGNATURE_FILES and not p.name.startswith(".")
    )
    if unlisted:
        raise ExportRefusedError(
            f"{', '.join(unlisted)}: in {directory} but not signed by the trainer; remove "
            "what you added, or it cannot be told apart from the export"
        )
    checks.append(f"{len(files)} files match their signed SHA-256")

    if plan_sha256 is not None:
        if manifest.get("plan_sha256") != plan_sha256:
            raise ExportRefusedError(
                f"{MANIFEST_FILE}: trained under plan {str(manifest.get('plan_sha256'))[:16]}..., "
                f"not the plan you gave ({plan_sha256[:16]}...)"
            )
        checks.append("trained under the given plan")

    mrenclave: str | None = None
    if quote_check is not None:
        mrenclave = quote_check(leaf, ca, int(signed_at.timestamp()))
        checks.append("the signer's quote verifies under the policy (role trainer)")
    return VerifiedExport(manifest, party, mrenclave, tuple(checks))


# --- hfl verify-export -------------------------------------------------------------------------


class _UsageError(HflError):
    """Input the command cannot use; one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hfl verify-export",
        description="Verify a model a trainer exported: its signature by the trainer's "
        "enclave key, the certificate chain to the federation CA, every file's hash.",
    )
    p.add_argument("directory", type=Path, help="the export directory (model.keras, ...)")
    p.add_argument("--ca", type=Path, required=True, help="the federation CA certificate (PEM)")
    p.add_argument("--plan", type=Path, help="the agreed plan: the model must come from it")
    p.add_argument(
        "--policy", type=Path, help="the agreed policy: verify the trainer's quote under it"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--collateral", type=Path, help="collateral file or directory")
    source.add_argument("--pccs-url", help="fetch collateral from this PCCS")
    p.add_argument("--sim-platform", type=Path, help="simulated platform directory (simulation)")
    return p


def _policy_check(ns: argparse.Namespace) -> QuoteCheck:
    from prometheus_client import CollectorRegistry

    from hfl_common.attest_client import embedded_evidence, verify_ra_tls_certificate
    from hfl_common.config import TrustRoot, load_policy
    from hfl_common.tee.collateral import CollateralSource, DirectoryCollateral, PccsCollateral
    from hfl_common.tee.verify import QuoteVerifier

    policy = load_policy(ns.policy)
    sim_root: bytes | None = None
    if policy.trust_root is TrustRoot.SIMULATION:
        if ns.sim_platform is None:
            raise _UsageError(f"{ns.policy} trusts the simulation root: give --sim-platform DIR")
        root = _first_certificate(
            _read(ns.sim_platform / "root_ca.pem", "simulated platform root"), "root_ca.pem"
        )
        sim_root = root.public_bytes(serialization.Encoding.DER)
    collateral: CollateralSource
    if ns.collateral is not None:
        collateral = DirectoryCollateral(ns.collateral)
    elif ns.pccs_url:
        collateral = PccsCollateral(ns.pccs_url)
    elif ns.sim_platform is not None:
        collateral = DirectoryCollateral(ns.sim_platform / "collateral")
    else:
        raise _UsageError("--policy needs --collateral DIR or --pccs-url URL to verify the quote")
    verifier = QuoteVerifier(
        policy, collateral, simulation_root_der=sim_root, registry=CollectorRegistry()
    )

    def check(leaf: x509.Certificate, ca: x509.Certificate, at: int) -> str:
        try:
            evidence = embedded_evidence(leaf, ca)
        except HflError as exc:
            raise ExportRefusedError(f"{SIGNER_FILE}: {exc}") from None
        verdict = verify_ra_tls_certificate(evidence, verifier, "trainer", at=at)
        if not verdict.accepted or verdict.measurements is None:
            raise ExportRefusedError(
                f"{SIGNER_FILE}: the trainer's quote is refused under {ns.policy}: "
                f"{verdict.reason_code}: {verdict.reason}"
            )
        return verdict.measurements.mrenclave.hex()

    return check


def verify_main(argv: Sequence[str] | None = None) -> int:
    """`hfl verify-export`: 0 verified, 1 refused, 2 unusable input (one line on stderr)."""
    try:
        ns = build_parser().parse_args(argv)
        ca_pem = _read(ns.ca, "federation CA certificate")
        plan_sha: str | None = None
        if ns.plan is not None:
            from hfl_common.config import load_plan

            plan_sha = load_plan(ns.plan).sha256_hex
        check = _policy_check(ns) if ns.policy is not None else None
        result = verify_export(ns.directory, ca_pem, plan_sha256=plan_sha, quote_check=check)
    except ExportRefusedError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except HflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    json.dump(result.as_json(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return EXIT_VERIFIED
