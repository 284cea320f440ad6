"""Reading a server certificate with a bare TLS handshake, and checking RA-TLS evidence."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hfl_common.attest_client.names import DEFAULT_TIMEOUT_SECONDS
from hfl_common.errors import (
    EvidenceError,
    PermissionDeniedError,
    UnavailableError,
)
from hfl_common.ratls import (
    LEGACY_QUOTE_OID,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    QuoteSource,
    RaTlsCertificate,
    TcgDiceEvidence,
    check_key_binding,
    check_validity,
    decode_tcg_dice_evidence,
    parse_ra_tls_certificate,
    report_data_unverified,
)
from hfl_common.tee.verify import QuoteVerifier, Verdict

logger = logging.getLogger("hfl_common.attest_client")


# --- raw TLS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _in_memory_pem(data: bytes) -> Iterator[str | None]:
    """A path to `data` held in anonymous memory (memfd), never on disk; None if unsupported.

    Python's ssl module loads certificate chains and keys only from paths; a memfd's
    /proc/self/fd path gives it the bytes without writing the private key to a file.
    """
    create = getattr(os, "memfd_create", None)
    if create is None:
        yield None
        return
    try:
        fd = create("hfl-tls-client", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        yield None
        return
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def fetch_server_certificate(
    host: str,
    port: int,
    *,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> bytes:
    """Read a TLS server's leaf certificate (DER) with a bare handshake, verifying NOTHING.

    The caller verifies the certificate next, by attestation (its quote, bound to its
    key), and then pins it; that is why no chain or name check happens here. Presenting
    a client certificate (peers that require mTLS) is optional: with TLS 1.3 the server's
    certificate arrives before ours is looked at. The client key is handed to OpenSSL
    through an in-memory file (memfd), never written to disk.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified by attestation afterwards; see above
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with contextlib.ExitStack() as stack:
        if client_cert_pem is not None and client_key_pem is not None:
            path = stack.enter_context(_in_memory_pem(client_cert_pem + b"\n" + client_key_pem))
            if path is not None:
                try:
                    context.load_cert_chain(path)
                except (ssl.SSLError, OSError) as exc:
                    logger.warning("cannot present the client certificate: %s", exc)
        try:
            with (
                socket.create_connection((host, port), timeout=timeout) as sock,
                context.wrap_socket(sock, server_hostname=None) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError) as exc:
            raise UnavailableError(
                f"cannot read the TLS certificate of {host}:{port}: {exc}", "tls_unreachable"
            ) from None
    if not der:
        raise UnavailableError(f"{host}:{port} presented no TLS certificate", "tls_no_certificate")
    return bytes(der)


# --- evidence checks ----------------------------------------------------------------------------


def verify_ra_tls_certificate(
    cert: RaTlsCertificate,
    verifier: QuoteVerifier,
    role: str,
    *,
    at: int | None = None,
) -> Verdict:
    """Verify a parsed RA-TLS certificate's quote for `role` and its binding to the key.

    Returns the verifier's Verdict; a quote that does not bind the certificate's key
    comes back as a refusal with reason code "report_data_mismatch".
    """
    verdict = verifier.verify_quote(
        cert.quote, role, report_data_prefix=cert.expected_key_binding, at=at
    )
    if not verdict.accepted or verdict.measurements is None:
        return verdict
    try:
        check_key_binding(cert, verdict.measurements.report_data)
    except EvidenceError as exc:
        return Verdict(
            False,
            exc.reason_code,
            str(exc),
            role,
            verdict.tcb_status,
            verdict.advisory_ids,
            verdict.measurements,
            verdict.simulated,
        )
    return verdict


def embedded_evidence(
    certificate: x509.Certificate, issuer: x509.Certificate | None
) -> RaTlsCertificate:
    """The evidence the federation CA copied into a leaf it issued, as a RaTlsCertificate.

    `parse_ra_tls_certificate` expects self-signed RA-TLS certificates; a federation leaf
    is signed by the CA instead. With `issuer` given its signature is checked here;
    without, the caller vouches that TLS already verified the chain (a server reading
    its peer's certificate from the auth context). The CA copies exactly one evidence
    extension (the one whose quote it verified); two are refused.
    """
    if issuer is not None:
        try:
            certificate.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise EvidenceError(
                f"the certificate is not issued by the federation CA: {exc or 'bad signature'}",
                "certificate_signature_invalid",
            ) from None
    try:
        extensions = list(certificate.extensions)
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, x509.DuplicateExtension) as exc:
        raise EvidenceError(
            f"the certificate cannot be read: {exc}", "certificate_malformed"
        ) from None
    legacy: bytes | None = None
    dice: TcgDiceEvidence | None = None
    for extension in extensions:
        value = extension.value
        if not isinstance(value, x509.UnrecognizedExtension):
            continue
        if extension.oid == LEGACY_QUOTE_OID:
            legacy = bytes(value.value)
            report_data_unverified(legacy)  # size check: EvidenceError("quote_malformed")
        elif extension.oid == TCG_DICE_TAGGED_EVIDENCE_OID:
            dice = decode_tcg_dice_evidence(bytes(value.value))
    if legacy is not None and dice is not None:
        raise EvidenceError(
            "the certificate carries two evidence extensions; a federation certificate "
            "carries the one quote the CA verified",
            "quote_extensions_disagree",
        )
    if dice is not None:
        quote, source = dice.quote, QuoteSource.TCG_DICE
    elif legacy is not None:
        quote, source = legacy, QuoteSource.LEGACY
    else:
        raise EvidenceError(
            "the certificate carries no SGX quote (neither Gramine's legacy nor its TCG DICE "
            "evidence extension)",
            "no_quote_extension",
        )
    return RaTlsCertificate(
        certificate=certificate,
        der=certificate.public_bytes(serialization.Encoding.DER),
        quote=quote,
        quote_source=source,
        legacy_quote=legacy,
        dice_evidence=dice,
        spki_der=spki,
        spki_sha256=hashlib.sha256(spki).digest(),
    )


def _refused(who: str, verdict: Verdict) -> PermissionDeniedError:
    return EvidenceError(
        f"{who} refused: {verdict.reason_code}: {verdict.reason}", verdict.reason_code
    )


def _parse_or_refuse(der: bytes, who: str, issuer: x509.Certificate | None) -> RaTlsCertificate:
    """Self-signed RA-TLS (issuer None) or a federation leaf (issuer = the CA); valid now."""
    try:
        if issuer is None:
            cert = parse_ra_tls_certificate(der)
        else:
            try:
                leaf = x509.load_der_x509_certificate(der)
            except ValueError as exc:
                raise EvidenceError(
                    f"not a DER X.509 certificate: {exc}", "certificate_malformed"
                ) from None
            cert = embedded_evidence(leaf, issuer)
        check_validity(cert, dt.datetime.now(dt.UTC))
    except EvidenceError as exc:
        raise EvidenceError(f"{who} refused: {exc.reason_code}: {exc}", exc.reason_code) from None
    return cert
