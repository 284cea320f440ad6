"""The SGX quote v3 parser: fields of a real quote, and clear errors for what is not one."""

from __future__ import annotations

import struct

import dcap_qvl
import pytest

from hfl_common.errors import EvidenceError
from hfl_common.tee import sgx
from hfl_common.tee.sgx import (
    ATTR_INIT,
    ATTR_MODE64BIT,
    INTEL_QE_VENDOR_ID,
    ReportBody,
    encode_report_body,
    parse_quote,
    parse_report_body,
)


def test_real_quote_fields_are_read_from_the_v3_layout(real_quote: bytes) -> None:
    q = parse_quote(real_quote)
    assert q.header.version == 3
    assert q.header.att_key_type == 2
    assert q.header.tee_type == 0
    assert q.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert (q.header.qe_svn, q.header.pce_svn) == (10, 15)
    assert q.body.mrenclave.hex() == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert q.body.mrsigner.hex() == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    )
    assert (q.body.isv_prod_id, q.body.isv_svn) == (0, 0)
    assert q.body.attributes_flags == ATTR_INIT | ATTR_MODE64BIT
    assert not q.body.debug
    assert q.body.report_data.startswith(b"Hello, world!")
    assert len(q.qe_auth_data) == 32
    assert q.cert_data_type == 5
    assert [c.subject.rfc4514_string().split(",")[-1] for c in q.pck_chain] == [
        "CN=Intel SGX PCK Certificate",
        "CN=Intel SGX PCK Processor CA",
        "CN=Intel SGX Root CA",
    ]


def test_parser_agrees_with_dcap_qvl_on_the_report_body(real_quote: bytes) -> None:
    ours = parse_quote(real_quote).body
    theirs = dcap_qvl.parse_quote(real_quote).report
    assert ours.mrenclave == theirs.mr_enclave
    assert ours.mrsigner == theirs.mr_signer
    assert ours.report_data == theirs.report_data
    assert ours.cpusvn == theirs.cpu_svn
    assert struct.pack("<QQ", ours.attributes_flags, ours.xfrm) == theirs.attributes


def test_report_body_encoding_round_trips() -> None:
    body = ReportBody(
        cpusvn=bytes(range(16)),
        miscselect=7,
        attributes_flags=0x07,
        xfrm=0xE7,
        mrenclave=b"\x01" * 32,
        mrsigner=b"\x02" * 32,
        isv_prod_id=0x1234,
        isv_svn=0xBEEF,
        report_data=bytes(range(64)),
    )
    raw = encode_report_body(body)
    assert len(raw) == 384
    assert raw[64:96] == b"\x01" * 32  # MRENCLAVE at offset 64
    assert raw[256:260] == bytes.fromhex("3412efbe")  # ISVPRODID, ISVSVN little-endian
    assert parse_report_body(raw) == body


def test_tdx_quote_is_refused_as_not_sgx(tdx_quote: bytes) -> None:
    with pytest.raises(EvidenceError, match=r"TDX quote \(version 4, TEE type 0x00000081\)") as e:
        parse_quote(tdx_quote)
    assert e.value.reason_code == "not_sgx"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q: q[:40], "40 bytes is shorter than the 48-byte header"),
        (lambda q: q[:400], "400 bytes is shorter than header, report body and signature"),
        (lambda q: struct.pack("<H", 5) + q[2:], "quote version 5 is not supported"),
        (lambda q: q[:2] + struct.pack("<H", 3) + q[4:], "attestation key type 3 is not supported"),
        (lambda q: q[:4] + b"\x01\x00\x00\x00" + q[8:], "reserved header bytes 4..8"),
        (lambda q: q + b"\x00", "signature data length 4164 says the quote is 4600 bytes"),
        (lambda q: q[:-10], "signature data length 4164 says the quote is 4600 bytes"),
    ],
)
def test_malformed_quotes_raise_evidence_error_naming_the_problem(
    real_quote: bytes, mutate: object, message: str
) -> None:
    assert callable(mutate)
    with pytest.raises(EvidenceError, match=message) as e:
        parse_quote(mutate(real_quote))
    assert e.value.reason_code == "quote_malformed"


def test_unsupported_certification_data_type_is_refused(real_quote: bytes) -> None:
    q = parse_quote(real_quote)
    offset = len(real_quote) - len(q.cert_data) - 6
    bad = real_quote[:offset] + struct.pack("<H", 3) + real_quote[offset + 2 :]
    with pytest.raises(EvidenceError, match="certification data type 3 is not supported"):
        parse_quote(bad)


def test_garbage_pem_in_certification_data_is_refused(real_quote: bytes) -> None:
    q = parse_quote(real_quote)
    bad = real_quote[: -len(q.cert_data)] + b"x" * len(q.cert_data)
    with pytest.raises(EvidenceError, match="PCK certificate chain") as e:
        parse_quote(bad)
    assert e.value.reason_code == "quote_malformed"


def test_qe_auth_data_size_past_the_end_is_refused(real_quote: bytes) -> None:
    off = sgx.OFF_SIG_DATA + 64 + 64 + 384 + 64
    bad = real_quote[:off] + struct.pack("<H", 0xFFFF) + real_quote[off + 2 :]
    with pytest.raises(EvidenceError, match="QE authentication data needs 65535 bytes"):
        parse_quote(bad)


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(EvidenceError, match="expected bytes, got str"):
        parse_quote("not a quote")  # type: ignore[arg-type]
