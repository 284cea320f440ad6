"""SIGSTRUCT parsing and the policy [roles] tables built from it.

The SIGSTRUCTs are built here byte by byte after the Intel SDM layout and signed
with a real RSA-3072 key (exponent 3) the way gramine-sgx-sign signs them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hfl_common.config import parse_policy
from hfl_common.errors import ConfigError
from hfl_common.sigstruct import (
    SigStruct,
    load_sigstruct,
    main,
    parse_sigstruct,
    parse_sigstruct_json,
    pin_mrenclaves,
    policy_roles_toml,
)

HEADER = bytes.fromhex("06000000E10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=3, key_size=3072)


def build_sigstruct(
    key: rsa.RSAPrivateKey,
    *,
    mrenclave: bytes,
    isv_prod_id: int,
    isv_svn: int,
    debug: bool = False,
) -> bytes:
    buf = bytearray(1808)
    buf[0:16] = HEADER
    struct.pack_into("<I", buf, 16, 0)  # VENDOR
    struct.pack_into("<I", buf, 20, 0x20250101)  # DATE
    buf[24:40] = HEADER2
    struct.pack_into("<I", buf, 900, 0)  # MISCSELECT
    struct.pack_into("<I", buf, 904, 0xFFFFFFFF)  # MISCMASK
    flags = 0x4 | (0x2 if debug else 0)  # MODE64BIT, DEBUG
    struct.pack_into("<QQ", buf, 928, flags, 0x3)  # ATTRIBUTES
    struct.pack_into("<QQ", buf, 944, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFF9FF1B)  # ATTRIBUTEMASK
    buf[960:992] = mrenclave
    struct.pack_into("<HH", buf, 1024, isv_prod_id, isv_svn)
    signed = bytes(buf[:128] + buf[900:1028])
    signature = key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    n = key.public_key().public_numbers().n
    buf[128:512] = n.to_bytes(384, "little")
    struct.pack_into("<I", buf, 512, 3)
    buf[516:900] = int.from_bytes(signature, "big").to_bytes(384, "little")
    return bytes(buf)


def expected_mrsigner(key: rsa.RSAPrivateKey) -> bytes:
    return hashlib.sha256(key.public_key().public_numbers().n.to_bytes(384, "little")).digest()


def test_sigstruct_fields_are_read_at_their_sdm_offsets(signing_key: rsa.RSAPrivateKey) -> None:
    mrenclave = bytes(range(32))
    raw = build_sigstruct(signing_key, mrenclave=mrenclave, isv_prod_id=2, isv_svn=7)
    sig = parse_sigstruct(raw, "agg.sig")
    assert sig.mrenclave == mrenclave
    assert sig.mrsigner == expected_mrsigner(signing_key)
    assert (sig.isv_prod_id, sig.isv_svn) == (2, 7)
    assert sig.debug is False
    assert sig.attribute_flags == 0x4
    assert sig.attribute_xfrm == 0x3


def test_debug_attribute_is_detected(signing_key: rsa.RSAPrivateKey) -> None:
    raw = build_sigstruct(signing_key, mrenclave=b"\1" * 32, isv_prod_id=3, isv_svn=1, debug=True)
    assert parse_sigstruct(raw).debug is True


def test_truncated_sigstruct_is_refused_with_its_length() -> None:
    with pytest.raises(ConfigError, match=r"t\.sig: a SIGSTRUCT is 1808 bytes, this one is 100"):
        parse_sigstruct(b"\0" * 100, "t.sig")


def test_wrong_header_is_refused(signing_key: rsa.RSAPrivateKey) -> None:
    raw = bytearray(build_sigstruct(signing_key, mrenclave=b"\2" * 32, isv_prod_id=2, isv_svn=1))
    raw[0] = 0x07
    with pytest.raises(ConfigError, match=r"HEADER at offset 0 is 07.*this is not a SIGSTRUCT"):
        parse_sigstruct(bytes(raw))


def test_wrong_exponent_is_refused(signing_key: rsa.RSAPrivateKey) -> None:
    raw = bytearray(build_sigstruct(signing_key, mrenclave=b"\2" * 32, isv_prod_id=2, isv_svn=1))
    struct.pack_into("<I", raw, 512, 65537)
    with pytest.raises(ConfigError, match="EXPONENT is 65537; SGX requires the RSA exponent 3"):
        parse_sigstruct(bytes(raw))


def test_mrenclave_altered_after_signing_is_refused(signing_key: rsa.RSAPrivateKey) -> None:
    raw = bytearray(build_sigstruct(signing_key, mrenclave=b"\3" * 32, isv_prod_id=2, isv_svn=1))
    raw[960] ^= 0xFF
    with pytest.raises(ConfigError, match="SIGNATURE does not verify under the SIGSTRUCT's own"):
        parse_sigstruct(bytes(raw), "x.sig")


def test_sigstruct_view_json_is_accepted(signing_key: rsa.RSAPrivateKey) -> None:
    doc = {
        "mr_signer": "ab" * 32,
        "mr_enclave": "cd" * 32,
        "isv_prod_id": 1,
        "isv_svn": 4,
        "debug_enclave": False,
    }
    sig = parse_sigstruct_json(json.dumps(doc), "a.json")
    assert sig == SigStruct(
        mrenclave=b"\xcd" * 32,
        mrsigner=b"\xab" * 32,
        isv_prod_id=1,
        isv_svn=4,
        debug=False,
        source="a.json",
    )


def test_sigstruct_view_json_with_short_hash_is_refused() -> None:
    doc = {"mr_signer": "ab", "mr_enclave": "cd" * 32, "isv_prod_id": 1, "isv_svn": 4}
    with pytest.raises(ConfigError, match=r"a\.json: mr_signer must be 32 bytes"):
        parse_sigstruct_json(json.dumps(doc), "a.json")


def test_roles_toml_parses_as_the_policy_roles(signing_key: rsa.RSAPrivateKey) -> None:
    agg = parse_sigstruct(
        build_sigstruct(signing_key, mrenclave=b"\x11" * 32, isv_prod_id=2, isv_svn=3), "a"
    )
    tr = parse_sigstruct(
        build_sigstruct(signing_key, mrenclave=b"\x22" * 32, isv_prod_id=3, isv_svn=1), "t"
    )
    text = policy_roles_toml({"trainer": tr, "aggregator": agg})
    assert text.index("[roles.aggregator]") < text.index("[roles.trainer]")
    roles = tomllib.loads(text)["roles"]
    assert roles["aggregator"] == {
        "mrenclave": ["11" * 32],
        "mrsigner": [expected_mrsigner(signing_key).hex()],
        "isv_prod_id": 2,
        "min_isv_svn": 3,
    }
    policy = parse_policy('[trust]\nroot = "intel"\n\n' + text, "generated")
    assert policy.roles["trainer"].mrenclave == (b"\x22" * 32,)
    assert policy.roles["trainer"].min_isv_svn == 1


def test_mrsigner_only_tables_omit_mrenclave(signing_key: rsa.RSAPrivateKey) -> None:
    agg = parse_sigstruct(
        build_sigstruct(signing_key, mrenclave=b"\x11" * 32, isv_prod_id=2, isv_svn=3)
    )
    roles = tomllib.loads(policy_roles_toml({"aggregator": agg}, include_mrenclave=False))
    assert "mrenclave" not in roles["roles"]["aggregator"]
    assert roles["roles"]["aggregator"]["isv_prod_id"] == 2


def test_debug_enclave_is_refused_for_a_policy() -> None:
    sig = SigStruct(b"\0" * 32, b"\1" * 32, isv_prod_id=3, isv_svn=1, debug=True, source="t.sig")
    with pytest.raises(ConfigError, match=r"t\.sig: the SIGSTRUCT for role trainer has the DEBUG"):
        policy_roles_toml({"trainer": sig})
    assert "[roles.trainer]" in policy_roles_toml({"trainer": sig}, allow_debug=True)


def test_swapped_sig_files_are_caught_by_isv_prod_id() -> None:
    sig = SigStruct(b"\0" * 32, b"\1" * 32, isv_prod_id=3, isv_svn=1, debug=False, source="t.sig")
    with pytest.raises(
        ConfigError, match=r"t\.sig: ISVPRODID is 3 but role aggregator uses 2.*another role"
    ):
        policy_roles_toml({"aggregator": sig})


def test_unknown_role_is_refused() -> None:
    sig = SigStruct(b"\0" * 32, b"\1" * 32, isv_prod_id=3, isv_svn=1, debug=False)
    with pytest.raises(ConfigError, match="role 'worker' is not a role; roles are attestation"):
        policy_roles_toml({"worker": sig})


def test_cli_writes_roles_file(signing_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    sig_path = tmp_path / "hfl-aggregator.sig"
    sig_path.write_bytes(
        build_sigstruct(signing_key, mrenclave=b"\x33" * 32, isv_prod_id=2, isv_svn=1)
    )
    json_path = tmp_path / "hfl-attestation.json"
    json_path.write_text(
        json.dumps(
            {"mr_signer": "ab" * 32, "mr_enclave": "cd" * 32, "isv_prod_id": 1, "isv_svn": 2}
            | {"debug_enclave": False}
        )
    )
    out = tmp_path / "roles.toml"
    args = ["--role", f"aggregator={sig_path}", "--role", f"attestation={json_path}"]
    rc = main([*args, "--out", str(out)])
    assert rc == 0
    roles = tomllib.loads(out.read_text())["roles"]
    assert roles["aggregator"]["mrenclave"] == ["33" * 32]
    assert roles["attestation"]["min_isv_svn"] == 2
    assert load_sigstruct(sig_path).mrsigner == expected_mrsigner(signing_key)


def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sig"
    bad.write_bytes(b"\0" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "hfl_common.sigstruct", "--role", f"trainer={bad}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {bad}: a SIGSTRUCT is 1808 bytes, this one is 10; " + (
        "pass the .sig file written by gramine-sgx-sign\n"
    )


def test_cli_missing_file_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.sig"
    rc = main(["--role", f"trainer={missing}"])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}: cannot read: ")


def test_cli_role_without_path_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--role", "trainer"]) == 2
    assert capsys.readouterr().err == (
        "error: --role 'trainer': expected ROLE=PATH, e.g. trainer=hfl-trainer.sig\n"
    )


# --- the trainers' policy: central services pinned by MRENCLAVE ---------------


def _agreed_policy(key: rsa.RSAPrivateKey) -> str:
    sigs = {
        role: parse_sigstruct(
            build_sigstruct(key, mrenclave=bytes([n]) * 32, isv_prod_id=n, isv_svn=1)
        )
        for n, role in ((1, "attestation"), (2, "aggregator"), (3, "trainer"))
    }
    roles = policy_roles_toml(sigs, include_mrenclave=False)
    return '[trust]\nroot = "intel"\n\n' + roles


def test_pinning_adds_the_signed_mrenclaves_and_keeps_the_rest(
    signing_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    base = tmp_path / "policy.toml"
    base.write_text(_agreed_policy(signing_key))
    att = tmp_path / "att.sig"
    att.write_bytes(build_sigstruct(signing_key, mrenclave=b"\xaa" * 32, isv_prod_id=1, isv_svn=1))
    agg = tmp_path / "agg.sig"
    agg.write_bytes(build_sigstruct(signing_key, mrenclave=b"\xbb" * 32, isv_prod_id=2, isv_svn=1))
    out = tmp_path / "policy.trainer.toml"

    rc = main(
        ["--pin-into", str(base), "--role", f"attestation={att}", "--role", f"aggregator={agg}",
         "--out", str(out)]
    )  # fmt: skip

    assert rc == 0
    policy = tomllib.loads(out.read_text())
    assert policy["trust"] == {"root": "intel"}
    assert policy["roles"]["attestation"]["mrenclave"] == ["aa" * 32]
    assert policy["roles"]["aggregator"]["mrenclave"] == ["bb" * 32]
    # The trainer role stays pinned by signer: trainers are not built yet.
    assert "mrenclave" not in policy["roles"]["trainer"]
    assert policy["roles"]["trainer"]["mrsigner"] == [expected_mrsigner(signing_key).hex()]


def test_pinning_refuses_an_enclave_signed_with_another_key(
    signing_key: rsa.RSAPrivateKey,
) -> None:
    other = rsa.generate_private_key(public_exponent=3, key_size=3072)
    sig = parse_sigstruct(build_sigstruct(other, mrenclave=b"\xaa" * 32, isv_prod_id=2, isv_svn=1))
    with pytest.raises(ConfigError, match=r"MRSIGNER .* is not in \[roles.aggregator\]"):
        pin_mrenclaves(_agreed_policy(signing_key), {"aggregator": sig}, "policy.toml")


def test_pinning_refuses_another_roles_enclave_and_a_missing_table(
    signing_key: rsa.RSAPrivateKey,
) -> None:
    trainer_sig = parse_sigstruct(
        build_sigstruct(signing_key, mrenclave=b"\xcc" * 32, isv_prod_id=3, isv_svn=1)
    )
    with pytest.raises(ConfigError, match="ISVPRODID 3 is not the isv_prod_id"):
        pin_mrenclaves(_agreed_policy(signing_key), {"aggregator": trainer_sig}, "p.toml")
    with pytest.raises(ConfigError, match=r"has no \[roles.aggregator\] table"):
        pin_mrenclaves('[trust]\nroot = "intel"\n', {"aggregator": trainer_sig}, "p.toml")


def test_pinning_replaces_an_earlier_pin(signing_key: rsa.RSAPrivateKey) -> None:
    first = parse_sigstruct(
        build_sigstruct(signing_key, mrenclave=b"\x01" * 32, isv_prod_id=2, isv_svn=1)
    )
    second = parse_sigstruct(
        build_sigstruct(signing_key, mrenclave=b"\x02" * 32, isv_prod_id=2, isv_svn=1)
    )
    once = pin_mrenclaves(_agreed_policy(signing_key), {"aggregator": first}, "p.toml")
    twice = pin_mrenclaves(once, {"aggregator": second}, "p.toml")
    assert tomllib.loads(twice)["roles"]["aggregator"]["mrenclave"] == ["02" * 32]
