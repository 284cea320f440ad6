"""The simulated TEE: byte-exact quotes, collateral dcap-qvl accepts, identities, providers."""

from __future__ import annotations

import hashlib
import shutil
import stat
import struct
import time
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hfl_common.errors import ConfigError, EvidenceError, InvalidArgumentError
from hfl_common.tee.providers import EvidenceProvider, GramineProvider, SimulatedProvider
from hfl_common.tee.sgx import INTEL_QE_VENDOR_ID, parse_quote
from hfl_common.tee.simulation import (
    SGX_EXTENSION_OID,
    SIMULATED_ROOT_CN,
    EnclaveIdentity,
    SimulatedPlatform,
    measure_code,
    mrsigner_of,
    simulated_identity_for,
)

REPORT_DATA = bytes(range(64))


def _verify(platform: SimulatedPlatform, quote: bytes, collateral_json: str, now: int) -> str:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    report = dcap_qvl.verify_with_root_ca(quote, collateral, platform.root_der, now)
    return str(report.status)


def test_simulated_quote_verifies_up_to_date_in_dcap_qvl(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    status = _verify(
        sim_platform, quote, sim_platform.collateral_path.read_text(), int(time.time())
    )
    assert status == "UpToDate"


def test_simulated_quote_has_the_v3_layout(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", quote)
    assert (version, key_type, tee_type) == (3, 2, 0)
    assert (qe_svn, pce_svn) == (sim_platform.facts.qe_svn, sim_platform.facts.pce_svn)
    assert quote[12:28] == INTEL_QE_VENDOR_ID
    assert quote[48 + 48 : 48 + 56] == bytes([0x05, 0, 0, 0, 0, 0, 0, 0])  # INIT | MODE64BIT
    assert quote[48 + 64 : 48 + 96] == trainer_identity.mrenclave
    assert quote[48 + 128 : 48 + 160] == trainer_identity.mrsigner
    assert struct.unpack_from("<HH", quote, 48 + 256) == (3, 2)
    assert quote[48 + 320 : 48 + 384] == REPORT_DATA
    (sig_len,) = struct.unpack_from("<I", quote, 432)
    assert len(quote) == 436 + sig_len
    parsed = parse_quote(quote)
    # QE report_data[0:32] = SHA-256(attestation key || QE auth data)
    assert (
        parsed.qe_report.report_data[:32]
        == hashlib.sha256(parsed.attestation_key + parsed.qe_auth_data).digest()
    )
    assert parsed.cert_data_type == 5
    assert [c.subject for c in parsed.pck_chain][-1] == sim_platform.root_certificate.subject


def test_debug_quote_sets_the_debug_attribute(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA, debug=True)
    assert parse_quote(quote).body.attributes_flags == 0x07


def test_quote_refuses_report_data_of_the_wrong_size(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> None:
    with pytest.raises(InvalidArgumentError, match="exactly 64 bytes, got 32"):
        sim_platform.quote(trainer_identity, bytes(32))


def test_pck_leaf_carries_the_sgx_extension_like_a_real_pck_certificate(
    sim_platform: SimulatedPlatform, real_quote: bytes
) -> None:
    sim_pem = sim_platform.pck_certificate.public_bytes(serialization.Encoding.PEM)
    sim = dcap_qvl.parse_pck_extension_from_pem(sim_pem)
    real_chain = dcap_qvl.parse_quote(real_quote).cert_chain_pem_bytes()
    real = dcap_qvl.parse_pck_extension_from_pem(real_chain)
    facts = sim_platform.facts
    assert sim.fmspc == facts.fmspc
    assert sim.ppid == facts.ppid
    assert sim.pce_svn == facts.pce_svn
    assert sim.cpu_svn == bytes(facts.components)
    assert sim.pce_id == facts.pce_id
    assert sim.sgx_type == real.sgx_type == 0
    members = [f"{SGX_EXTENSION_OID}.{i}" for i in (1, 3, 4, 5)]
    members += [f"{SGX_EXTENSION_OID}.2.{i}" for i in range(1, 19)]
    for oid in members:
        assert (sim.get_value(oid) is None) == (real.get_value(oid) is None), oid
        assert sim.get_value(oid) is not None, oid


def test_root_certificate_follows_intel_root_ca_profile(sim_platform: SimulatedPlatform) -> None:
    root = sim_platform.root_certificate
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        SIMULATED_ROOT_CN
    )
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_platform_persists_and_loads_with_the_same_root(
    tmp_path: Path, trainer_identity: EnclaveIdentity
) -> None:
    created = SimulatedPlatform.create(tmp_path / "machine")
    loaded = SimulatedPlatform.load(tmp_path / "machine")
    assert loaded.root_der == created.root_der
    assert loaded.fmspc == created.fmspc
    pem = (tmp_path / "machine" / "root_ca.pem").read_bytes()
    assert x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER) == (
        created.root_der
    )
    collateral = tmp_path / "machine" / "collateral" / f"{created.fmspc.hex().upper()}.json"
    assert collateral.is_file()
    quote = loaded.quote(trainer_identity, REPORT_DATA)
    assert _verify(created, quote, collateral.read_text(), int(time.time())) == "UpToDate"
    for key_file in (tmp_path / "machine").glob("*.key.pem"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file


def test_create_refuses_an_existing_platform_and_load_or_create_reuses_it(
    tmp_path: Path,
) -> None:
    first = SimulatedPlatform.create(tmp_path / "m")
    with pytest.raises(ConfigError, match="already holds a simulated platform"):
        SimulatedPlatform.create(tmp_path / "m")
    assert SimulatedPlatform.load_or_create(tmp_path / "m").root_der == first.root_der
    assert SimulatedPlatform.load_or_create(tmp_path / "n").root_der != first.root_der


def test_load_of_a_missing_platform_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"is not a simulated platform .*SimulatedPlatform\.create"
    ):
        SimulatedPlatform.load(tmp_path / "nothing")


def test_load_renews_expired_collateral(tmp_path: Path, trainer_identity: EnclaveIdentity) -> None:
    platform = SimulatedPlatform.create(tmp_path / "m", now=int(time.time()) - 60 * 24 * 3600)
    before = platform.collateral_path.read_text()
    loaded = SimulatedPlatform.load(tmp_path / "m")
    after = loaded.collateral_path.read_text()
    assert after != before
    quote = loaded.quote(trainer_identity, REPORT_DATA)
    assert _verify(loaded, quote, after, int(time.time())) == "UpToDate"


def test_outdated_variant_collateral_gives_out_of_date(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> None:
    quote = sim_platform.quote(trainer_identity, REPORT_DATA)
    collateral = sim_platform.collateral_json(tcb_status="OutOfDate")
    assert _verify(sim_platform, quote, collateral, int(time.time())) == "OutOfDate"


def test_mrsigner_is_sha256_of_the_little_endian_modulus(tmp_path: Path) -> None:
    platform = SimulatedPlatform.create(tmp_path / "m")
    assert not (tmp_path / "m" / "enclave_signing.key.pem").exists()  # made on first use
    mrsigner = platform.mrsigner
    key = serialization.load_pem_private_key(
        (tmp_path / "m" / "enclave_signing.key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072
    assert key.public_key().public_numbers().e == 3
    modulus = key.public_key().public_numbers().n.to_bytes(384, "little")
    assert mrsigner == hashlib.sha256(modulus).digest() == mrsigner_of(key.public_key())
    assert SimulatedPlatform.load(tmp_path / "m").mrsigner == mrsigner


def _tree(root: Path) -> list[Path]:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "train.py").write_text("def train(): return 1\n")
    return [root / "pkg" / "__init__.py", root / "pkg" / "sub" / "train.py"]


def test_measure_code_changes_when_code_changes(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    before = measure_code(files, base=tmp_path)
    files[1].write_text("def train(): return 2\n")
    assert measure_code(files, base=tmp_path) != before


def test_measure_code_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    before = measure_code(files, base=tmp_path)
    renamed = files[1].with_name("train2.py")
    files[1].rename(renamed)
    assert measure_code([files[0], renamed], base=tmp_path) != before


def test_measure_code_ignores_order_and_location(tmp_path: Path) -> None:
    files = _tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = [tmp_path / "b" / p.relative_to(tmp_path / "a") for p in reversed(files)]
    assert measure_code(files) == measure_code(copy)
    assert len(measure_code(files)) == 32


def test_measure_code_refuses_nothing_to_measure() -> None:
    with pytest.raises(InvalidArgumentError, match="at least one file"):
        measure_code([])


def test_simulated_identity_for_a_package_uses_the_role_convention(
    tmp_path: Path, sim_platform: SimulatedPlatform
) -> None:
    _tree(tmp_path)
    ident = simulated_identity_for(tmp_path / "pkg", "trainer", 4, sim_platform)
    assert ident.isv_prod_id == 3
    assert ident.isv_svn == 4
    assert ident.mrsigner == sim_platform.mrsigner
    agg = simulated_identity_for(tmp_path / "pkg", "aggregator", 4, sim_platform)
    assert (agg.isv_prod_id, agg.mrenclave) == (2, ident.mrenclave)
    (tmp_path / "pkg" / "sub" / "train.py").write_text("def train(): return 3\n")
    changed = simulated_identity_for(tmp_path / "pkg", "trainer", 4, sim_platform)
    assert changed.mrenclave != ident.mrenclave


def test_simulated_identity_for_an_importable_package(sim_platform: SimulatedPlatform) -> None:
    ident = simulated_identity_for("hfl_common", "attestation", 1, sim_platform)
    assert ident.isv_prod_id == 1
    assert len(ident.mrenclave) == 32


def test_simulated_identity_refuses_unknown_role(
    tmp_path: Path, sim_platform: SimulatedPlatform
) -> None:
    _tree(tmp_path)
    with pytest.raises(InvalidArgumentError, match="unknown role 'worker'"):
        simulated_identity_for(tmp_path / "pkg", "worker", 1, sim_platform)


def test_enclave_identity_validates_sizes() -> None:
    with pytest.raises(InvalidArgumentError, match="must be 32 bytes, got 31 and 32"):
        EnclaveIdentity(bytes(31), bytes(32), 1, 1)
    with pytest.raises(InvalidArgumentError, match="ISV_SVN must be in"):
        EnclaveIdentity(bytes(32), bytes(32), 1, 70000)


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def test_simulated_provider_quotes_over_the_report_data(
    sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity
) -> None:
    provider = SimulatedProvider(sim_platform, trainer_identity)
    assert isinstance(provider, EvidenceProvider)
    assert provider.kind == "simulated"
    quote = provider.quote(REPORT_DATA)
    assert parse_quote(quote).body.report_data == REPORT_DATA
    with pytest.raises(InvalidArgumentError, match="exactly 64 bytes, got 65"):
        provider.quote(bytes(65))


def _gramine_tree(root: Path, attestation_type: str = "dcap") -> Path:
    root.mkdir()
    (root / "attestation_type").write_text(attestation_type)
    (root / "user_report_data").write_bytes(b"")
    return root


def test_gramine_provider_writes_report_data_and_reads_the_quote(
    tmp_path: Path, real_quote: bytes
) -> None:
    root = _gramine_tree(tmp_path / "attestation")
    (root / "quote").write_bytes(real_quote)
    provider = GramineProvider(root)
    assert isinstance(provider, EvidenceProvider)
    assert provider.quote(REPORT_DATA) == real_quote
    assert (root / "user_report_data").read_bytes() == REPORT_DATA


def test_gramine_provider_outside_an_enclave_says_so(tmp_path: Path) -> None:
    provider = GramineProvider(tmp_path / "missing")
    with pytest.raises(
        EvidenceError, match=r"not inside an SGX enclave with DCAP attestation: .* does not exist"
    ) as e:
        provider.quote(REPORT_DATA)
    assert e.value.reason_code == "no_tee"


def test_gramine_provider_refuses_non_dcap_attestation(tmp_path: Path) -> None:
    provider = GramineProvider(_gramine_tree(tmp_path / "att", attestation_type="none"))
    with pytest.raises(
        EvidenceError,
        match=r"not inside an SGX enclave with DCAP attestation: .* says 'none', expected 'dcap'",
    ):
        provider.quote(REPORT_DATA)


def test_gramine_provider_refuses_wrong_report_data_size(tmp_path: Path) -> None:
    provider = GramineProvider(_gramine_tree(tmp_path / "att"))
    with pytest.raises(InvalidArgumentError, match="exactly 64 bytes, got 10"):
        provider.quote(bytes(10))


def test_gramine_provider_reports_a_missing_quote_file(tmp_path: Path) -> None:
    provider = GramineProvider(_gramine_tree(tmp_path / "att"))
    with pytest.raises(EvidenceError, match="Gramine could not produce a quote") as e:
        provider.quote(REPORT_DATA)
    assert e.value.reason_code == "quote_failed"
