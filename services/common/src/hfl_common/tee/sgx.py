"""The SGX ECDSA quote, version 3: layout constants, a strict parser and encoders.

Layout from Intel, "Intel(R) Software Guard Extensions (Intel(R) SGX) Data Center
Attestation Primitives: ECDSA Quote Library API", Appendix A "ECDSA Quote Format"
(Quote Format v3): a 48-byte Quote Header, a 384-byte ISV Enclave Report Body, a
4-byte signature data length, then the ECDSA Quote Signature Data Structure (the
quote signature, the attestation public key, the QE report and its signature, the
QE authentication data and the certification data).

The parser only reads; it never checks a signature or a certificate (dcap-qvl does
that, see hfl_common.tee.verify). It never raises anything but EvidenceError with
reason code "quote_malformed" (or "not_sgx" for a TDX quote), whatever the input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from hfl_common.errors import EvidenceError

# --- Quote header (ECDSA Quote Library API, Appendix A, Table "Quote Header") ---
HEADER_SIZE = 48
QUOTE_VERSION_3 = 3
# Attestation key type 2: ECDSA-256-with-P-256 curve.
ATT_KEY_TYPE_ECDSA_P256 = 2
# Bytes 4..8 of the header: reserved (zero) in v3; the TEE type from v4 on
# (0x00000000 = SGX, 0x00000081 = TDX), per the v4 layout in the same document.
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
# Intel's QE vendor ID, 939A7233-F79C-4CA9-940A-0DB3957F0607.
INTEL_QE_VENDOR_ID = bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
USER_DATA_SIZE = 20

# --- Report body (ECDSA Quote Library API, Appendix A, "Enclave Report Body";
# the same layout as the first 384 bytes of the SGX REPORT, Intel SDM Vol. 3D) ---
REPORT_BODY_SIZE = 384
OFF_CPUSVN = 0  # 16 bytes
OFF_MISCSELECT = 16  # u32
OFF_ATTRIBUTES = 48  # 16 bytes: flags u64, xfrm u64
OFF_MRENCLAVE = 64  # 32 bytes
OFF_MRSIGNER = 128  # 32 bytes
OFF_ISV_PROD_ID = 256  # u16
OFF_ISV_SVN = 258  # u16
OFF_REPORT_DATA = 320  # 64 bytes
REPORT_DATA_SIZE = 64

# SECS.ATTRIBUTES.FLAGS bits (Intel SDM Vol. 3D, "Layout of ATTRIBUTES Structure").
ATTR_INIT = 0x01
ATTR_DEBUG = 0x02
ATTR_MODE64BIT = 0x04
ATTR_PROVISIONKEY = 0x10
ATTR_EINITTOKEN_KEY = 0x20
ATTR_KSS = 0x80

# --- Signature data (ECDSA Quote Library API, Appendix A, "Quote Signature Data
# Structure" and "ECDSA 256-bit Quote Signature Data Structure") ---
SIGNED_SIZE = HEADER_SIZE + REPORT_BODY_SIZE  # header + report body: what the quote signs
OFF_SIG_DATA_LEN = SIGNED_SIZE  # u32
OFF_SIG_DATA = SIGNED_SIZE + 4
ECDSA_SIG_SIZE = 64  # r || s, big-endian, 32 bytes each
ATT_PUBKEY_SIZE = 64  # x || y of the P-256 attestation key
QE_REPORT_SIZE = REPORT_BODY_SIZE
# Certification data type 5: the PCK certificate chain, PEM, leaf first.
CERT_DATA_PCK_CHAIN = 5


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class ReportBody:
    """The 384-byte SGX report body (of the application enclave, or of the QE)."""

    cpusvn: bytes
    miscselect: int
    attributes_flags: int
    xfrm: int
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(self.attributes_flags & ATTR_DEBUG)


@dataclass(frozen=True)
class SgxQuote:
    """A structurally valid SGX ECDSA quote v3 (nothing verified)."""

    raw: bytes
    header: QuoteHeader
    body: ReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_raw: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes
    pck_chain: tuple[x509.Certificate, ...]

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]


def _malformed(what: str) -> EvidenceError:
    return EvidenceError(f"malformed SGX quote: {what}", "quote_malformed")


def parse_header(data: bytes) -> QuoteHeader:
    """Parse the 48-byte quote header (any version); EvidenceError when too short."""
    if len(data) < HEADER_SIZE:
        raise _malformed(f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data, 0)
    return QuoteHeader(
        version=version,
        att_key_type=key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=bytes(data[12:28]),
        user_data=bytes(data[28:HEADER_SIZE]),
    )


def parse_report_body(data: bytes) -> ReportBody:
    """Parse a 384-byte report body."""
    if len(data) != REPORT_BODY_SIZE:
        raise _malformed(f"report body is {len(data)} bytes, expected {REPORT_BODY_SIZE}")
    flags, xfrm = struct.unpack_from("<QQ", data, OFF_ATTRIBUTES)
    (miscselect,) = struct.unpack_from("<I", data, OFF_MISCSELECT)
    prod_id, svn = struct.unpack_from("<HH", data, OFF_ISV_PROD_ID)
    return ReportBody(
        cpusvn=bytes(data[OFF_CPUSVN : OFF_CPUSVN + 16]),
        miscselect=miscselect,
        attributes_flags=flags,
        xfrm=xfrm,
        mrenclave=bytes(data[OFF_MRENCLAVE : OFF_MRENCLAVE + 32]),
        mrsigner=bytes(data[OFF_MRSIGNER : OFF_MRSIGNER + 32]),
        isv_prod_id=prod_id,
        isv_svn=svn,
        report_data=bytes(data[OFF_REPORT_DATA : OFF_REPORT_DATA + REPORT_DATA_SIZE]),
    )


def tee_type_name(tee_type: int) -> str:
    if tee_type == TEE_TYPE_SGX:
        return "SGX"
    if tee_type == TEE_TYPE_TDX:
        return "TDX"
    return f"unknown (0x{tee_type:08x})"


class _Reader:
    def __init__(self, data: bytes, offset: int, end: int) -> None:
        self.data = data
        self.pos = offset
        self.end = end

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise _malformed(
                f"{what} needs {size} bytes at offset {self.pos}, "
                f"but the signature data ends at {self.end}"
            )
        out = bytes(self.data[self.pos : self.pos + size])
        self.pos += size
        return out

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value


def _load_pck_chain(cert_data: bytes) -> tuple[x509.Certificate, ...]:
    """The PEM chain, every field the verifier reads parsed now: `cryptography` parses
    certificates lazily and raises its own errors (ValueError, InvalidVersion,
    UnsupportedAlgorithm) on first access, which must surface here as quote_malformed."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_data))
        for cert in chain:
            _ = (cert.version, cert.issuer, cert.subject, cert.serial_number)
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.extensions)
            _ = (cert.public_key(), cert.signature_hash_algorithm, cert.signature)
            _ = cert.tbs_certificate_bytes
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        raise _malformed(f"the PCK certificate chain is not a valid PEM chain: {exc}") from None
    return chain


def parse_quote(data: bytes) -> SgxQuote:
    """Parse an SGX ECDSA quote v3 with PCK chain certification data (type 5).

    Raises EvidenceError("not_sgx") for a quote whose TEE type is not SGX (TDX),
    EvidenceError("quote_malformed") for anything else that is not such a quote.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    header = parse_header(data)
    if header.version >= 4 and header.tee_type != TEE_TYPE_SGX:
        raise EvidenceError(
            f"quote is a {tee_type_name(header.tee_type)} quote (version {header.version}, "
            f"TEE type 0x{header.tee_type:08x}), not an SGX enclave quote",
            "not_sgx",
        )
    if header.version != QUOTE_VERSION_3:
        raise _malformed(f"quote version {header.version} is not supported (only SGX v3)")
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise _malformed(
            f"attestation key type {header.att_key_type} is not supported "
            f"(only {ATT_KEY_TYPE_ECDSA_P256}, ECDSA-256-with-P-256)"
        )
    if header.tee_type != TEE_TYPE_SGX:
        raise _malformed(f"reserved header bytes 4..8 are 0x{header.tee_type:08x}, not zero")
    if len(data) < OFF_SIG_DATA:
        raise _malformed(
            f"{len(data)} bytes is shorter than header, report body and signature length "
            f"({OFF_SIG_DATA} bytes)"
        )
    body = parse_report_body(data[HEADER_SIZE:SIGNED_SIZE])
    (sig_len,) = struct.unpack_from("<I", data, OFF_SIG_DATA_LEN)
    end = OFF_SIG_DATA + sig_len
    if end != len(data):
        raise _malformed(
            f"signature data length {sig_len} says the quote is {end} bytes, "
            f"but it is {len(data)} bytes"
        )
    r = _Reader(data, OFF_SIG_DATA, end)
    signature = r.take(ECDSA_SIG_SIZE, "quote signature")
    att_key = r.take(ATT_PUBKEY_SIZE, "attestation key")
    qe_report_raw = r.take(QE_REPORT_SIZE, "QE report")
    qe_sig = r.take(ECDSA_SIG_SIZE, "QE report signature")
    auth_len = r.u16("QE authentication data size")
    auth = r.take(auth_len, "QE authentication data")
    cert_type = r.u16("certification data type")
    cert_len = r.u32("certification data size")
    cert_data = r.take(cert_len, "certification data")
    if r.pos != end:
        raise _malformed(f"{end - r.pos} unexpected bytes after the certification data")
    if cert_type != CERT_DATA_PCK_CHAIN:
        raise _malformed(
            f"certification data type {cert_type} is not supported "
            f"(only {CERT_DATA_PCK_CHAIN}, a PEM PCK certificate chain)"
        )
    chain = _load_pck_chain(cert_data)
    if len(chain) < 2:
        raise _malformed(f"the PCK certificate chain has {len(chain)} certificate(s), expected 3")
    return SgxQuote(
        raw=data,
        header=header,
        body=body,
        signature=signature,
        attestation_key=att_key,
        qe_report=parse_report_body(qe_report_raw),
        qe_report_raw=qe_report_raw,
        qe_report_signature=qe_sig,
        qe_auth_data=auth,
        cert_data_type=cert_type,
        cert_data=cert_data,
        pck_chain=chain,
    )


def encode_header(
    *,
    qe_svn: int,
    pce_svn: int,
    user_data: bytes,
    version: int = QUOTE_VERSION_3,
    att_key_type: int = ATT_KEY_TYPE_ECDSA_P256,
    tee_type: int = TEE_TYPE_SGX,
    qe_vendor_id: bytes = INTEL_QE_VENDOR_ID,
) -> bytes:
    if len(user_data) != USER_DATA_SIZE or len(qe_vendor_id) != 16:
        raise ValueError("user_data must be 20 bytes and qe_vendor_id 16 bytes")
    out = struct.pack("<HHIHH", version, att_key_type, tee_type, qe_svn, pce_svn)
    return out + qe_vendor_id + user_data


def encode_report_body(body: ReportBody) -> bytes:
    """The 384-byte report body, reserved fields zero."""
    if len(body.cpusvn) != 16 or len(body.mrenclave) != 32 or len(body.mrsigner) != 32:
        raise ValueError("cpusvn must be 16 bytes, mrenclave and mrsigner 32 bytes")
    if len(body.report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes")
    out = bytearray(REPORT_BODY_SIZE)
    out[OFF_CPUSVN : OFF_CPUSVN + 16] = body.cpusvn
    struct.pack_into("<I", out, OFF_MISCSELECT, body.miscselect)
    struct.pack_into("<QQ", out, OFF_ATTRIBUTES, body.attributes_flags, body.xfrm)
    out[OFF_MRENCLAVE : OFF_MRENCLAVE + 32] = body.mrenclave
    out[OFF_MRSIGNER : OFF_MRSIGNER + 32] = body.mrsigner
    struct.pack_into("<HH", out, OFF_ISV_PROD_ID, body.isv_prod_id, body.isv_svn)
    out[OFF_REPORT_DATA : OFF_REPORT_DATA + REPORT_DATA_SIZE] = body.report_data
    return bytes(out)


def encode_signature_data(
    *,
    signature: bytes,
    attestation_key: bytes,
    qe_report: bytes,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    cert_data: bytes,
    cert_data_type: int = CERT_DATA_PCK_CHAIN,
) -> bytes:
    """The signature data length (u32) followed by the ECDSA signature data structure."""
    parts = (
        signature
        + attestation_key
        + qe_report
        + qe_report_signature
        + struct.pack("<H", len(qe_auth_data))
        + qe_auth_data
        + struct.pack("<HI", cert_data_type, len(cert_data))
        + cert_data
    )
    return struct.pack("<I", len(parts)) + parts
