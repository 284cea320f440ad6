"""The simulated SGX machine: development root CA, PCK chain, quoting, collateral."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from hfl_common.errors import ConfigError, InvalidArgumentError
from hfl_common.tee import der
from hfl_common.tee.sgx import (
    ATTR_DEBUG,
    ATTR_INIT,
    ATTR_MODE64BIT,
    ATTR_PROVISIONKEY,
    REPORT_DATA_SIZE,
    ReportBody,
    encode_header,
    encode_report_body,
    encode_signature_data,
)
from hfl_common.tee.simulation.measure import EnclaveIdentity

logger = logging.getLogger(__name__)

SIMULATED_ROOT_CN = "hfl simulated SGX root"
SIMULATION_ORG = "hfl development (simulation only, not Intel)"

# Intel SGX PCK Certificate and CRL Profile, section "Intel SGX PCK Certificate"
# (SGX Extensions): the extension OID and its members.
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_PPID = SGX_EXTENSION_OID + ".1"
_TCB = SGX_EXTENSION_OID + ".2"  # .2.1 .. .2.16 sgxtcbcompNNsvn, .2.17 pcesvn, .2.18 cpusvn
_PCEID = SGX_EXTENSION_OID + ".3"
_FMSPC = SGX_EXTENSION_OID + ".4"
_SGX_TYPE = SGX_EXTENSION_OID + ".5"  # ENUMERATED: 0 Standard, 1 Scalable

# The QE identity attributes of Intel's QE3 (from Intel's QE identity collateral):
# INIT | PROVISIONKEY, compared under the mask below.
_QE_ATTRIBUTES_FLAGS = ATTR_INIT | ATTR_PROVISIONKEY
_QE_ATTRIBUTES_MASK = "FBFFFFFFFFFFFFFF0000000000000000"
_QE_ISV_PROD_ID = 1
_QE_ISV_SVN = 8
_QE_AUTH_DATA = bytes(range(32))

DEFAULT_COLLATERAL_VALIDITY_SECONDS = 30 * 24 * 3600  # Intel issues 30-day collateral
_REFRESH_MARGIN_SECONDS = 7 * 24 * 3600
_BACKDATE_SECONDS = 3600  # tolerate clock skew between processes of one federation

_PLATFORM_FILE = "platform.json"
_ROOT_KEY = "root_ca.key.pem"
_PCK_CA_KEY = "pck_ca.key.pem"
_PCK_KEY = "pck.key.pem"
_TCB_KEY = "tcb_signing.key.pem"
_ATT_KEY = "attestation.key.pem"
_SIGNING_KEY = "enclave_signing.key.pem"


def mrsigner_of(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the modulus, little-endian, as SGX derives MRSIGNER from SIGSTRUCT."""
    n = public_key.public_numbers().n
    return hashlib.sha256(n.to_bytes((public_key.key_size + 7) // 8, "little")).digest()


def load_or_create_signing_key(path: Path) -> rsa.RSAPrivateKey:
    """The development enclave-signing key (RSA-3072, e=3 like SGX), made once per file."""
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=3, key_size=3072)
        try:
            _write_private(path, key, exclusive=True)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            return key
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ConfigError(f"{path} does not hold an RSA private key")
    return loaded


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _write_private(path: Path, key: Any, *, exclusive: bool = False) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"simulated platform key {path} is unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"simulated platform key {path} is not an EC key")
    return key


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as the 64-byte r || s the quote and the collateral carry."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]  # x || y without the 0x04 prefix


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIMULATION_ORG),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "ZZ"),
        ]
    )


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def sgx_extension_value(
    *, ppid: bytes, components: Sequence[int], pce_svn: int, pce_id: bytes, fmspc: bytes
) -> bytes:
    """The DER of Intel's SGX extension, shaped like a real PCK Processor certificate's."""
    tcb = [
        der.sequence(der.oid(f"{_TCB}.{i + 1}"), der.integer(svn))
        for i, svn in enumerate(components)
    ]
    tcb.append(der.sequence(der.oid(f"{_TCB}.17"), der.integer(pce_svn)))
    tcb.append(der.sequence(der.oid(f"{_TCB}.18"), der.octet_string(bytes(components))))
    return der.sequence(
        der.sequence(der.oid(_PPID), der.octet_string(ppid)),
        der.sequence(der.oid(_TCB), der.sequence(*tcb)),
        der.sequence(der.oid(_PCEID), der.octet_string(pce_id)),
        der.sequence(der.oid(_FMSPC), der.octet_string(fmspc)),
        der.sequence(der.oid(_SGX_TYPE), der.enumerated(0)),
    )


@dataclass(frozen=True)
class _Keys:
    root: ec.EllipticCurvePrivateKey
    pck_ca: ec.EllipticCurvePrivateKey
    pck: ec.EllipticCurvePrivateKey
    tcb: ec.EllipticCurvePrivateKey
    attestation: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class _Certs:
    root: x509.Certificate
    pck_ca: x509.Certificate
    pck: x509.Certificate
    tcb: x509.Certificate


def _ca_extensions(
    builder: x509.CertificateBuilder,
    subject_key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePublicKey,
    *,
    ca: bool,
    path_length: int | None,
) -> x509.CertificateBuilder:
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
    ).add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=not ca,
            content_commitment=not ca,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    return builder.add_extension(
        x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
    )


def _issue(
    subject: x509.Name,
    subject_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: int,
    lifetime_days: int,
    *,
    ca: bool,
    path_length: int | None = None,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_before) + dt.timedelta(days=lifetime_days))
    )
    builder = _ca_extensions(
        builder, subject_key, issuer_key.public_key(), ca=ca, path_length=path_length
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


# --------------------------------------------------------------------------
# The platform
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformFacts:
    """The public, persisted facts of a simulated machine (platform.json)."""

    fmspc: bytes
    ppid: bytes
    pce_id: bytes
    qe_id: bytes
    components: tuple[int, ...]
    pce_svn: int
    qe_svn: int
    qe_mrsigner: bytes
    created: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "hfl-simulated-sgx-platform/1",
                "fmspc": self.fmspc.hex().upper(),
                "ppid": self.ppid.hex(),
                "pce_id": self.pce_id.hex(),
                "qe_id": self.qe_id.hex(),
                "components": list(self.components),
                "pce_svn": self.pce_svn,
                "qe_svn": self.qe_svn,
                "qe_mrsigner": self.qe_mrsigner.hex(),
                "created": self.created,
            },
            indent=2,
        )

    @staticmethod
    def from_json(text: str, source: str) -> PlatformFacts:
        try:
            d = json.loads(text)
            facts = PlatformFacts(
                fmspc=bytes.fromhex(d["fmspc"]),
                ppid=bytes.fromhex(d["ppid"]),
                pce_id=bytes.fromhex(d["pce_id"]),
                qe_id=bytes.fromhex(d["qe_id"]),
                components=tuple(int(c) for c in d["components"]),
                pce_svn=int(d["pce_svn"]),
                qe_svn=int(d["qe_svn"]),
                qe_mrsigner=bytes.fromhex(d["qe_mrsigner"]),
                created=int(d["created"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{source} is not a simulated platform description: {exc}") from None
        if len(facts.fmspc) != 6 or len(facts.components) != 16:
            raise ConfigError(f"{source}: fmspc must be 6 bytes and components 16 values")
        return facts


class SimulatedPlatform:
    """One simulated SGX machine with its own development root; see the module docstring."""

    def __init__(self, directory: Path, facts: PlatformFacts, keys: _Keys, certs: _Certs) -> None:
        self.directory = directory
        self.facts = facts
        self._keys = keys
        self._certs = certs
        self._mrsigner: bytes | None = None
        self._chain_pem = b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (certs.pck, certs.pck_ca, certs.root)
        )
        # The QE's part of every quote is fixed for a machine: compute it once.
        att_pub = _raw_public_key(keys.attestation.public_key())
        qe_report = encode_report_body(
            ReportBody(
                cpusvn=bytes(facts.components),
                miscselect=0,
                attributes_flags=_QE_ATTRIBUTES_FLAGS,
                xfrm=0,
                mrenclave=hashlib.sha256(b"hfl simulated QE" + facts.qe_mrsigner).digest(),
                mrsigner=facts.qe_mrsigner,
                isv_prod_id=_QE_ISV_PROD_ID,
                isv_svn=facts.qe_svn,
                report_data=hashlib.sha256(att_pub + _QE_AUTH_DATA).digest() + bytes(32),
            )
        )
        self._att_pub = att_pub
        self._qe_report = qe_report
        self._qe_report_signature = _raw_signature(keys.pck, qe_report)

    # -- creation and persistence -----------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        components: Sequence[int] = (5, 5, 2, 2, 4, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn: int = 13,
        now: int | None = None,
    ) -> SimulatedPlatform:
        """Generate a new platform (keys, certificates, collateral) into `directory`.

        `directory` must not exist or be empty. The directory appears whole or not
        at all (built beside it, then renamed), so concurrent creators are safe.
        """
        directory = Path(directory)
        if (directory / _PLATFORM_FILE).exists():
            raise ConfigError(f"{directory} already holds a simulated platform; load it instead")
        if len(components) != 16 or not all(0 <= c <= 255 for c in components):
            raise InvalidArgumentError("components must be 16 SVNs in [0, 255]")
        now = int(time.time()) if now is None else now
        start = now - 24 * 3600
        facts = PlatformFacts(
            fmspc=b"\x00\x90\x6e\xd5" + secrets.token_bytes(2),
            ppid=secrets.token_bytes(16),
            pce_id=b"\x00\x00",
            qe_id=secrets.token_bytes(16),
            components=tuple(components),
            pce_svn=pce_svn,
            qe_svn=_QE_ISV_SVN,
            qe_mrsigner=secrets.token_bytes(32),
            created=now,
        )
        keys = _Keys(*(ec.generate_private_key(ec.SECP256R1()) for _ in range(5)))
        root_name = _name(SIMULATED_ROOT_CN)
        root = _issue(
            root_name,
            keys.root.public_key(),
            root_name,
            keys.root,
            start,
            365 * 30,
            ca=True,
            path_length=1,
        )
        pck_ca_name = _name("hfl simulated SGX PCK Processor CA")
        pck_ca = _issue(
            pck_ca_name,
            keys.pck_ca.public_key(),
            root_name,
            keys.root,
            start,
            365 * 15,
            ca=True,
            path_length=0,
        )
        sgx_ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXTENSION_OID),
            sgx_extension_value(
                ppid=facts.ppid,
                components=facts.components,
                pce_svn=facts.pce_svn,
                pce_id=facts.pce_id,
                fmspc=facts.fmspc,
            ),
        )
        pck = _issue(
            _name("hfl simulated SGX PCK Certificate"),
            keys.pck.public_key(),
            pck_ca_name,
            keys.pck_ca,
            start,
            365 * 7,
            ca=False,
            extra=(sgx_ext,),
        )
        tcb = _issue(
            _name("hfl simulated SGX TCB Signing"),
            keys.tcb.public_key(),
            root_name,
            keys.root,
            start,
            365 * 7,
            ca=False,
        )
        certs = _Certs(root=root, pck_ca=pck_ca, pck=pck, tcb=tcb)

        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            for fname, key in zip(
                (_ROOT_KEY, _PCK_CA_KEY, _PCK_KEY, _TCB_KEY, _ATT_KEY),
                (keys.root, keys.pck_ca, keys.pck, keys.tcb, keys.attestation),
                strict=True,
            ):
                _write_private(staging / fname, key)
            for fname, cert in (
                ("root_ca.pem", root),
                ("pck_ca.pem", pck_ca),
                ("pck.pem", pck),
                ("tcb_signing.pem", tcb),
            ):
                (staging / fname).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (staging / _PLATFORM_FILE).write_text(facts.to_json())
            platform = cls(directory, facts, keys, certs)
            (staging / "collateral").mkdir()
            (staging / "collateral" / f"{facts.fmspc.hex().upper()}.json").write_text(
                platform.collateral_json(now=now)
            )
            os.chmod(staging, 0o700)
            try:
                os.rename(staging, directory)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the simulated platform at {directory}: {exc.strerror or exc}"
                ) from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info(
            "created simulated SGX platform %s (FMSPC %s, root SHA-256 %s)",
            directory,
            facts.fmspc.hex().upper(),
            platform.root_sha256.hex(),
        )
        return platform

    @classmethod
    def load(cls, directory: Path, *, refresh_collateral: bool = True) -> SimulatedPlatform:
        """Load a platform made by `create`; renew its collateral when near expiry."""
        directory = Path(directory)
        info = directory / _PLATFORM_FILE
        try:
            facts = PlatformFacts.from_json(info.read_text(), str(info))
        except OSError as exc:
            raise ConfigError(
                f"{directory} is not a simulated platform ({info}: {exc.strerror or exc}); "
                "create one with SimulatedPlatform.create"
            ) from None
        keys = _Keys(
            *(
                _load_ec_key(directory / f)
                for f in (_ROOT_KEY, _PCK_CA_KEY, _PCK_KEY, _TCB_KEY, _ATT_KEY)
            )
        )
        certs = []
        for fname in ("root_ca.pem", "pck_ca.pem", "pck.pem", "tcb_signing.pem"):
            try:
                certs.append(x509.load_pem_x509_certificate((directory / fname).read_bytes()))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"simulated platform certificate {directory / fname}: {exc}"
                ) from None
        platform = cls(directory, facts, keys, _Certs(*certs))
        if refresh_collateral:
            platform._refresh_collateral()
        return platform

    @classmethod
    def load_or_create(cls, directory: Path) -> SimulatedPlatform:
        directory = Path(directory)
        if (directory / _PLATFORM_FILE).exists():
            return cls.load(directory)
        try:
            return cls.create(directory)
        except ConfigError:
            if (directory / _PLATFORM_FILE).exists():  # lost a race with another process
                return cls.load(directory)
            raise

    def _refresh_collateral(self) -> None:
        now = int(time.time())
        path = self.collateral_path
        try:
            tcb_info = json.loads(json.loads(path.read_text())["tcb_info"])
            next_update = dt.datetime.strptime(tcb_info["nextUpdate"], "%Y-%m-%dT%H:%M:%SZ")
            expires = int(next_update.replace(tzinfo=dt.UTC).timestamp())
        except (OSError, ValueError, KeyError, TypeError):
            expires = 0
        if expires - now < _REFRESH_MARGIN_SECONDS:
            logger.info("renewing the simulated collateral %s", path)
            path.parent.mkdir(exist_ok=True)
            _atomic_write(path, self.collateral_json(now=now).encode())

    # -- public facts -----------------------------------------------------

    @property
    def fmspc(self) -> bytes:
        return self.facts.fmspc

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._certs.root

    @property
    def root_der(self) -> bytes:
        return self._certs.root.public_bytes(serialization.Encoding.DER)

    @property
    def root_sha256(self) -> bytes:
        return hashlib.sha256(self.root_der).digest()

    @property
    def pck_certificate(self) -> x509.Certificate:
        return self._certs.pck

    @property
    def collateral_dir(self) -> Path:
        return self.directory / "collateral"

    @property
    def collateral_path(self) -> Path:
        return self.collateral_dir / f"{self.facts.fmspc.hex().upper()}.json"

    @property
    def mrsigner(self) -> bytes:
        """MRSIGNER of enclaves signed with this platform's development signing key."""
        if self._mrsigner is None:
            key = load_or_create_signing_key(self.directory / _SIGNING_KEY)
            self._mrsigner = mrsigner_of(key.public_key())
        return self._mrsigner

    # -- quoting ----------------------------------------------------------

    def quote(
        self,
        identity: EnclaveIdentity,
        report_data: bytes,
        *,
        debug: bool = False,
        attributes_flags: int | None = None,
    ) -> bytes:
        """A byte-exact SGX ECDSA quote v3 of an enclave with `identity`.

        Attributes are INIT | MODE64BIT, plus DEBUG when `debug`;
        `attributes_flags` overrides them (tests of the attribute checks).
        """
        if len(report_data) != REPORT_DATA_SIZE:
            raise InvalidArgumentError(
                f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
            )
        flags = ATTR_INIT | ATTR_MODE64BIT | (ATTR_DEBUG if debug else 0)
        if attributes_flags is not None:
            flags = attributes_flags
        header = encode_header(
            qe_svn=self.facts.qe_svn,
            pce_svn=self.facts.pce_svn,
            user_data=self.facts.qe_id + bytes(4),
        )
        body = encode_report_body(
            ReportBody(
                cpusvn=bytes(self.facts.components),
                miscselect=0,
                attributes_flags=flags,
                xfrm=0x03,  # x87 | SSE, the minimum legal XFRM
                mrenclave=identity.mrenclave,
                mrsigner=identity.mrsigner,
                isv_prod_id=identity.isv_prod_id,
                isv_svn=identity.isv_svn,
                report_data=bytes(report_data),
            )
        )
        signed = header + body
        return signed + encode_signature_data(
            signature=_raw_signature(self._keys.attestation, signed),
            attestation_key=self._att_pub,
            qe_report=self._qe_report,
            qe_report_signature=self._qe_report_signature,
            qe_auth_data=_QE_AUTH_DATA,
            cert_data=self._chain_pem,
        )

    # -- collateral -------------------------------------------------------

    def collateral_json(
        self,
        *,
        now: int | None = None,
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
        revoke_pck: bool = False,
        validity_seconds: int = DEFAULT_COLLATERAL_VALIDITY_SECONDS,
    ) -> str:
        """Complete collateral in dcap-qvl's QuoteCollateralV3 JSON form.

        Issued at `now` (minus an hour, for clock skew) and valid for
        `validity_seconds`. `tcb_status` is the status this machine's TCB level
        gets ("UpToDate" by default; "OutOfDate", "SWHardeningNeeded"... for
        tests), with `advisory_ids`. `revoke_pck` lists the PCK leaf in the PCK CRL.
        """
        now = int(time.time()) if now is None else now
        issued = now - _BACKDATE_SECONDS
        next_update = issued + validity_seconds
        f = self.facts

        def level(
            comps: Sequence[int], pce_svn: int, status: str, advisories: Sequence[str]
        ) -> dict[str, Any]:
            entry: dict[str, Any] = {
                "tcb": {"sgxtcbcomponents": [{"svn": c} for c in comps], "pcesvn": pce_svn},
                "tcbDate": _iso(f.created - 24 * 3600),
                "tcbStatus": status,
            }
            if advisories:
                entry["advisoryIDs"] = list(advisories)
            return entry

        older = [max(c - 1, 0) for c in f.components]
        old_level = level(older, max(f.pce_svn - 1, 0), "OutOfDate", ["HFL-SIM-SA-00001"])
        if tcb_status == "UpToDate":
            levels = [level(f.components, f.pce_svn, "UpToDate", advisory_ids), old_level]
        else:
            newer = [min(f.components[0] + 1, 255), *f.components[1:]]
            levels = [
                level(newer, f.pce_svn, "UpToDate", ()),
                level(f.components, f.pce_svn, tcb_status, advisory_ids),
                old_level,
            ]
        tcb_info = json.dumps(
            {
                "id": "SGX",
                "version": 3,
                "issueDate": _iso(issued),
                "nextUpdate": _iso(next_update),
                "fmspc": f.fmspc.hex().upper(),
                "pceId": f.pce_id.hex().upper(),
                "tcbType": 0,
                "tcbEvaluationDataNumber": 17,
                "tcbLevels": levels,
            },
            separators=(",", ":"),
        )
        qe_identity = json.dumps(
            {
                "id": "QE",
                "version": 2,
                "issueDate": _iso(issued),
                "nextUpdate": _iso(next_update),
                "tcbEvaluationDataNumber": 17,
                "miscselect": "00000000",
                "miscselectMask": "FFFFFFFF",
                "attributes": f"{_QE_ATTRIBUTES_FLAGS:02X}" + "00" * 15,
                "attributesMask": _QE_ATTRIBUTES_MASK,
                "mrsigner": f.qe_mrsigner.hex().upper(),
                "isvprodid": _QE_ISV_PROD_ID,
                "tcbLevels": [
                    {
                        "tcb": {"isvsvn": f.qe_svn},
                        "tcbDate": _iso(f.created),
                        "tcbStatus": "UpToDate",
                    },
                    {
                        "tcb": {"isvsvn": max(f.qe_svn - 2, 0)},
                        "tcbDate": _iso(f.created - 365 * 24 * 3600),
                        "tcbStatus": "OutOfDate",
                        "advisoryIDs": ["HFL-SIM-SA-00002"],
                    },
                ],
            },
            separators=(",", ":"),
        )
        c = self._certs
        pem = serialization.Encoding.PEM
        root_pem = c.root.public_bytes(pem).decode()
        signing_chain = c.tcb.public_bytes(pem).decode() + root_pem
        return json.dumps(
            {
                "pck_crl_issuer_chain": c.pck_ca.public_bytes(pem).decode() + root_pem,
                "root_ca_crl": self._crl(self._keys.root, c.root, (), issued, next_update).hex(),
                "pck_crl": self._crl(
                    self._keys.pck_ca,
                    c.pck_ca,
                    (c.pck.serial_number,) if revoke_pck else (),
                    issued,
                    next_update,
                ).hex(),
                "tcb_info_issuer_chain": signing_chain,
                "tcb_info": tcb_info,
                "tcb_info_signature": _raw_signature(self._keys.tcb, tcb_info.encode()).hex(),
                "qe_identity_issuer_chain": signing_chain,
                "qe_identity": qe_identity,
                "qe_identity_signature": _raw_signature(self._keys.tcb, qe_identity.encode()).hex(),
            }
        )

    @staticmethod
    def _crl(
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate,
        revoked: Iterable[int],
        issued: int,
        next_update: int,
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(_utc(issued))
            .next_update(_utc(next_update))
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(_utc(issued))
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.DER)
