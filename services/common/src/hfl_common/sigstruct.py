"""Enclave identities from SGX SIGSTRUCTs, and the policy's [roles] tables built from them.

`gramine-sgx-sign` writes the enclave's SIGSTRUCT to a `.sig` file (1808 bytes).
It holds everything a verifier pins: MRENCLAVE (ENCLAVEHASH), the signer's RSA
modulus (MRSIGNER is SHA-256 of it), ISVPRODID and ISVSVN, and the ATTRIBUTES
whose DEBUG bit says whether the enclave can be debugged. This module parses
that file (or the JSON of `gramine-sgx-sigstruct-view --output-format json`)
and writes the `[roles.<role>]` tables of the attestation policy:

    python -m hfl_common.sigstruct --role aggregator=build/gramine/hfl-aggregator.sig \\
        --role trainer=build/gramine/hfl-trainer.sig --out policy-roles.toml

and, for the trainers' policy, pins the central services by MRENCLAVE:

    python -m hfl_common.sigstruct --pin-into deploy/config/policy.toml \\
        --role attestation=build/gramine/hfl-attestation.sig \\
        --role aggregator=build/gramine/hfl-aggregator.sig --out deploy/config/policy.trainer.toml

The layout is the table "Layout of Enclave Signature Structure (SIGSTRUCT)" in
Intel SDM Vol. 3D, section "Enclave Signature Structure (SIGSTRUCT)" (its table
number moves between editions); offsets below are byte offsets from the start
of the structure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import struct
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hfl_common.config import ROLES
from hfl_common.errors import ConfigError, HflError

logger = logging.getLogger(__name__)

# --- SIGSTRUCT layout (Intel SDM Vol. 3D, "Enclave Signature Structure (SIGSTRUCT)") ---
SIGSTRUCT_SIZE = 1808
HEADER_OFFSET, HEADER = 0, bytes.fromhex("06000000E10000000000010000000000")
VENDOR_OFFSET = 16  # 4 bytes: 0x0000 or 0x8086 (Intel)
DATE_OFFSET = 20  # 4 bytes, BCD build date; not interpreted here
HEADER2_OFFSET, HEADER2 = 24, bytes.fromhex("01010000600000006000000001000000")
MODULUS_OFFSET, MODULUS_SIZE = 128, 384  # RSA-3072 modulus, little-endian
EXPONENT_OFFSET = 512  # 4 bytes; the SDM requires 3
SIGNATURE_OFFSET, SIGNATURE_SIZE = 516, 384  # RSA signature, little-endian
MISCSELECT_OFFSET = 900
MISCMASK_OFFSET = 904
ATTRIBUTES_OFFSET = 928  # 8 bytes FLAGS, then 8 bytes XFRM
ATTRIBUTEMASK_OFFSET = 944
ENCLAVEHASH_OFFSET, ENCLAVEHASH_SIZE = 960, 32  # MRENCLAVE
ISVPRODID_OFFSET = 1024  # 2 bytes
ISVSVN_OFFSET = 1026  # 2 bytes
SGX_RSA_EXPONENT = 3
# The signed bytes: the first 128 bytes and the 128 bytes from MISCSELECT on
# (SDM: "the 128 bytes of the header ... and the 128 bytes of the body").
SIGNED_BODY_SIZE = 128
# ATTRIBUTES.FLAGS bit 1 is DEBUG (Intel SDM Vol. 3D, "ATTRIBUTES" table).
SGX_FLAGS_DEBUG = 0x2

# sgx.isvprodid per role, as set in gramine/<role>.manifest.template.
EXPECTED_ISV_PROD_ID: Mapping[str, int] = {
    "attestation": 1,
    "aggregator": 2,
    "trainer": 3,
    "relay": 4,
}


@dataclass(frozen=True)
class SigStruct:
    """The identity-relevant fields of one enclave's SIGSTRUCT.

    Fields the sigstruct-view JSON may omit (without --verbose) are None.
    """

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    attribute_flags: int | None = None
    attribute_xfrm: int | None = None
    misc_select: int | None = None
    source: str = ""


def parse_sigstruct(data: bytes, source: str = "SIGSTRUCT") -> SigStruct:
    """Parse a binary SIGSTRUCT and check its headers and RSA signature.

    Raises ConfigError naming `source` and what is wrong.
    """
    if len(data) != SIGSTRUCT_SIZE:
        raise ConfigError(
            f"{source}: a SIGSTRUCT is {SIGSTRUCT_SIZE} bytes, this one is {len(data)}; "
            "pass the .sig file written by gramine-sgx-sign"
        )
    if data[HEADER_OFFSET : HEADER_OFFSET + 16] != HEADER:
        raise ConfigError(
            f"{source}: HEADER at offset 0 is {data[0:16].hex()}, expected {HEADER.hex()}; "
            "this is not a SIGSTRUCT"
        )
    if data[HEADER2_OFFSET : HEADER2_OFFSET + 16] != HEADER2:
        raise ConfigError(
            f"{source}: HEADER2 at offset {HEADER2_OFFSET} is "
            f"{data[HEADER2_OFFSET : HEADER2_OFFSET + 16].hex()}, expected {HEADER2.hex()}"
        )
    (exponent,) = struct.unpack_from("<I", data, EXPONENT_OFFSET)
    if exponent != SGX_RSA_EXPONENT:
        raise ConfigError(
            f"{source}: EXPONENT is {exponent}; SGX requires the RSA exponent {SGX_RSA_EXPONENT}"
        )
    modulus = data[MODULUS_OFFSET : MODULUS_OFFSET + MODULUS_SIZE]
    _verify_signature(data, modulus, source)
    (misc_select,) = struct.unpack_from("<I", data, MISCSELECT_OFFSET)
    flags, xfrm = struct.unpack_from("<QQ", data, ATTRIBUTES_OFFSET)
    isv_prod_id, isv_svn = struct.unpack_from("<HH", data, ISVPRODID_OFFSET)
    return SigStruct(
        mrenclave=bytes(data[ENCLAVEHASH_OFFSET : ENCLAVEHASH_OFFSET + ENCLAVEHASH_SIZE]),
        # MRSIGNER is SHA-256 of the modulus as stored (little-endian), SDM "EINIT".
        mrsigner=hashlib.sha256(modulus).digest(),
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        debug=bool(flags & SGX_FLAGS_DEBUG),
        attribute_flags=flags,
        attribute_xfrm=xfrm,
        misc_select=misc_select,
        source=source,
    )


def _verify_signature(data: bytes, modulus_le: bytes, source: str) -> None:
    """Check SIGNATURE (RSASSA-PKCS1-v1_5 over SHA-256, as EINIT does) against MODULUS."""
    n = int.from_bytes(modulus_le, "little")
    if n.bit_length() != MODULUS_SIZE * 8:
        raise ConfigError(f"{source}: MODULUS is not a 3072-bit RSA modulus")
    signature = int.from_bytes(
        data[SIGNATURE_OFFSET : SIGNATURE_OFFSET + SIGNATURE_SIZE], "little"
    ).to_bytes(SIGNATURE_SIZE, "big")
    signed = (
        data[:SIGNED_BODY_SIZE] + data[MISCSELECT_OFFSET : MISCSELECT_OFFSET + SIGNED_BODY_SIZE]
    )
    key = rsa.RSAPublicNumbers(SGX_RSA_EXPONENT, n).public_key()
    try:
        key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ConfigError(
            f"{source}: SIGNATURE does not verify under the SIGSTRUCT's own MODULUS; "
            "the file is corrupted or was altered after signing"
        ) from None


def parse_sigstruct_json(text: str, source: str = "sigstruct JSON") -> SigStruct:
    """Parse the output of `gramine-sgx-sigstruct-view --output-format json`."""
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    mrenclave = _json_hash(doc, "mr_enclave", source)
    mrsigner = _json_hash(doc, "mr_signer", source)
    isv_prod_id = _json_u16(doc, "isv_prod_id", source)
    isv_svn = _json_u16(doc, "isv_svn", source)
    flags = _json_hex_int(doc, "attribute_flags", source)
    debug_value = doc.get("debug_enclave")
    if debug_value is None and flags is None:
        raise ConfigError(
            f"{source}: needs debug_enclave or attribute_flags to tell a debug enclave apart"
        )
    if debug_value is not None and not isinstance(debug_value, bool):
        raise ConfigError(f"{source}: debug_enclave must be true or false, got {debug_value!r}")
    debug = bool(debug_value) if debug_value is not None else bool((flags or 0) & SGX_FLAGS_DEBUG)
    return SigStruct(
        mrenclave=mrenclave,
        mrsigner=mrsigner,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        debug=debug,
        attribute_flags=flags,
        attribute_xfrm=_json_hex_int(doc, "attribute_xfrms", source),
        misc_select=_json_hex_int(doc, "misc_select", source),
        source=source,
    )


def _json_hash(doc: Mapping[str, Any], key: str, source: str) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a hex string, got {value!r}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{source}: {key} is not hex: {value!r}") from None
    if len(raw) != 32:
        raise ConfigError(f"{source}: {key} must be 32 bytes (64 hex digits), got {len(raw)}")
    return raw


def _json_u16(doc: Mapping[str, Any], key: str, source: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{source}: {key} must be an integer in [0, 65535], got {value!r}")
    return value


def _json_hex_int(doc: Mapping[str, Any], key: str, source: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a hex string like '0x4', got {value!r}")
    try:
        return int(value, 16)
    except ValueError:
        raise ConfigError(f"{source}: {key} is not a hex number: {value!r}") from None


def load_sigstruct(path: Path) -> SigStruct:
    """Load a binary .sig file, or a .json file from gramine-sgx-sigstruct-view."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if path.suffix == ".json" or data[:1] == b"{":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: a .json SIGSTRUCT view must be UTF-8") from None
        return parse_sigstruct_json(text, str(path))
    return parse_sigstruct(data, str(path))


def policy_roles_toml(
    sigstructs: Mapping[str, SigStruct],
    *,
    include_mrenclave: bool = True,
    allow_debug: bool = False,
) -> str:
    """The `[roles.<role>]` tables of the attestation policy for these enclaves.

    `include_mrenclave=False` pins only MRSIGNER, ISVPRODID and the minimum ISVSVN
    (for enclaves that must embed the policy themselves, see docs/deployment.md).
    Raises ConfigError for an unknown role, an ISVPRODID that is not the role's,
    or a debug enclave (unless `allow_debug`).
    """
    if not sigstructs:
        raise ConfigError("no SIGSTRUCT given; pass at least one --role ROLE=FILE")
    lines = [
        "# Expected enclave identities, generated by `python -m hfl_common.sigstruct`",
        "# from the SIGSTRUCTs written by gramine-sgx-sign. Review before agreeing.",
    ]
    order = [r for r in ROLES if r in sigstructs] + sorted(set(sigstructs) - set(ROLES))
    for role in order:
        sig = sigstructs[role]
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not a role; roles are {', '.join(ROLES)}")
        expected = EXPECTED_ISV_PROD_ID[role]
        if sig.isv_prod_id != expected:
            raise ConfigError(
                f"{sig.source or role}: ISVPRODID is {sig.isv_prod_id} but role {role} uses "
                f"{expected} (sgx.isvprodid in gramine/{role}.manifest.template); "
                "is this another role's .sig file?"
            )
        if sig.debug and not allow_debug:
            raise ConfigError(
                f"{sig.source or role}: the SIGSTRUCT for role {role} has the DEBUG attribute "
                "set (sgx.debug = true); a production policy must not trust a debug enclave"
            )
        lines.append("")
        lines.append(f"[roles.{role}]")
        if include_mrenclave:
            lines.append(f'mrenclave = ["{sig.mrenclave.hex()}"]')
        lines.append(f'mrsigner = ["{sig.mrsigner.hex()}"]')
        lines.append(f"isv_prod_id = {sig.isv_prod_id}")
        lines.append(f"min_isv_svn = {sig.isv_svn}")
    return "\n".join(lines) + "\n"


def pin_mrenclaves(policy_text: str, sigstructs: Mapping[str, SigStruct], source: str) -> str:
    """`policy_text` with each given role's table pinned to its SIGSTRUCT's MRENCLAVE.

    The second stage of the SGX build (docs/deployment.md): the attestation
    service and the aggregator are built and signed first with the agreed
    policy, which pins roles by MRSIGNER; their MRENCLAVEs then go into the
    policy baked into the trainers, so a trainer accepts exactly that code,
    not anything the signing key signs. Each role's table must already exist
    and list the SIGSTRUCT's MRSIGNER and ISVPRODID (so this can only narrow
    what the reviewed policy accepts); any earlier mrenclave line is replaced.
    """
    try:
        doc = tomllib.loads(policy_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    roles = doc.get("roles", {})
    lines = policy_text.splitlines()
    for role, sig in sigstructs.items():
        table = roles.get(role)
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: has no [roles.{role}] table to pin")
        if sig.mrsigner.hex() not in [str(v).lower() for v in table.get("mrsigner", [])]:
            raise ConfigError(
                f"{sig.source or role}: MRSIGNER {sig.mrsigner.hex()[:16]}... is not in "
                f"[roles.{role}] of {source}; was it signed with the agreed key?"
            )
        if table.get("isv_prod_id") != sig.isv_prod_id:
            raise ConfigError(
                f"{sig.source or role}: ISVPRODID {sig.isv_prod_id} is not the "
                f"isv_prod_id of [roles.{role}] in {source}"
            )
        if sig.debug:
            raise ConfigError(f"{sig.source or role}: a debug enclave cannot be pinned")
        header = lines.index(f"[roles.{role}]") if f"[roles.{role}]" in lines else -1
        if header < 0:
            raise ConfigError(f"{source}: write [roles.{role}] as a table header of its own")
        end = header + 1
        while end < len(lines) and not lines[end].lstrip().startswith("["):
            end += 1
        body = [ln for ln in lines[header + 1 : end] if not ln.lstrip().startswith("mrenclave")]
        pinned = f'mrenclave = ["{sig.mrenclave.hex()}"]  # pinned by hfl_common.sigstruct'
        lines[header + 1 : end] = [pinned, *body]
    return "\n".join(lines) + "\n"


def _parse_role_args(values: Sequence[str]) -> dict[str, Path]:
    roles: dict[str, Path] = {}
    for value in values:
        role, sep, path = value.partition("=")
        if not sep or not role or not path:
            raise ConfigError(f"--role {value!r}: expected ROLE=PATH, e.g. trainer=hfl-trainer.sig")
        if role in roles:
            raise ConfigError(f"--role {role} given twice; pass one SIGSTRUCT per role")
        roles[role] = Path(path)
    return roles


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print (or write) the policy's [roles] tables; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m hfl_common.sigstruct",
        description="Turn gramine-sgx-sign SIGSTRUCTs into the policy's [roles.<role>] tables.",
    )
    parser.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE=PATH",
        help="a role and its .sig file (or sigstruct-view .json); repeat per role",
    )
    parser.add_argument("--out", type=Path, help="write here instead of standard output")
    parser.add_argument(
        "--mrsigner-only",
        action="store_true",
        help="pin MRSIGNER, ISVPRODID and min ISVSVN only (no MRENCLAVE)",
    )
    parser.add_argument(
        "--allow-debug", action="store_true", help="accept debug enclaves (development only)"
    )
    parser.add_argument(
        "--pin-into",
        type=Path,
        metavar="POLICY",
        help="write POLICY with the given roles pinned to these MRENCLAVEs (the trainers' policy)",
    )
    args = parser.parse_args(argv)
    try:
        paths = _parse_role_args(args.role)
        sigs = {role: load_sigstruct(path) for role, path in paths.items()}
        if args.pin_into is not None:
            try:
                base = args.pin_into.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{args.pin_into}: cannot read: {exc.strerror}") from None
            text = pin_mrenclaves(base, sigs, str(args.pin_into))
        else:
            text = policy_roles_toml(
                sigs, include_mrenclave=not args.mrsigner_only, allow_debug=args.allow_debug
            )
        if args.out is None:
            sys.stdout.write(text)
        else:
            try:
                args.out.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{args.out}: cannot write: {exc.strerror}") from None
            logger.info("wrote the [roles] tables of %d role(s) to %s", len(sigs), args.out)
    except HflError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
