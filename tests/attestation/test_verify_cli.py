"""`hfl verify` on the real DCAP sample and on simulated RA-TLS certificates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hfl_common.ratls import EnclaveKey, certificate_pem, make_ra_tls_certificate
from hfl_common.tee import EnclaveIdentity, SimulatedPlatform, SimulatedProvider
from hfl_common.verify_cli import verify_main

from .conftest import DCAP_DATA, REAL_QUOTE_TIME, Identities, policy_toml

REAL_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
REAL_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
Providers = Callable[[EnclaveIdentity], SimulatedProvider]


def _intel_policy(tmp_path: Path, statuses: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[trust]\n"
        'root = "intel"\n'
        f"accepted_tcb_statuses = [{statuses}]\n"
        "[roles.trainer]\n"
        f'mrenclave = ["{REAL_MRENCLAVE}"]\n'
        "isv_prod_id = 0\n"
    )
    return path


def _real_args(policy: Path) -> list[str]:
    return [
        str(DCAP_DATA / "sgx_quote"),
        "--policy",
        str(policy),
        "--role",
        "trainer",
        "--collateral",
        str(DCAP_DATA / "sgx_quote_collateral.json"),
        "--at",
        str(REAL_QUOTE_TIME),
    ]


def test_real_quote_is_accepted_and_reported_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _intel_policy(tmp_path, '"UpToDate", "ConfigurationAndSWHardeningNeeded"')
    assert verify_main(_real_args(policy)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accepted"] is True
    assert out["reason_code"] == "ok"
    assert out["evidence"] == "sgx_quote"
    assert out["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert out["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert out["simulated"] is False
    m = out["measurements"]
    assert m["mrenclave"] == REAL_MRENCLAVE
    assert m["mrsigner"] == REAL_MRSIGNER
    assert (m["isv_prod_id"], m["isv_svn"], m["debug"], m["tee_type"]) == (0, 0, False, "SGX")
    assert bytes.fromhex(m["report_data"]).startswith(b"Hello, world!")


def test_real_quote_is_refused_by_a_strict_policy_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _intel_policy(tmp_path, '"UpToDate"')
    assert verify_main(_real_args(policy)) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["accepted"] is False
    assert out["reason_code"] == "tcb_status_not_accepted"
    assert "ConfigurationAndSWHardeningNeeded is not accepted" in out["reason"]


def test_missing_evidence_file_is_unusable_input_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _intel_policy(tmp_path, '"UpToDate"')
    args = _real_args(policy)
    args[0] = str(tmp_path / "no-such-quote")
    assert verify_main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines == [
        f"error: cannot read the evidence {tmp_path / 'no-such-quote'}: No such file or directory"
    ]


def test_garbage_evidence_and_bad_flags_are_unusable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _intel_policy(tmp_path, '"UpToDate"')
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x03\x00" + b"\x00" * 10)
    args = _real_args(policy)
    args[0] = str(garbage)
    assert verify_main(args) == 2
    assert "quote_malformed" in capsys.readouterr().err
    assert verify_main([str(garbage), "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hfl verify: the following arguments are required: --role")


def test_simulated_ra_tls_certificate_is_verified_with_its_key_binding(
    tmp_path: Path,
    platform: SimulatedPlatform,
    identities: Identities,
    provider_for: Providers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(platform, identities, b"\x00" * 32))
    der = make_ra_tls_certificate(
        EnclaveKey.generate(), provider_for(identities.aggregator), user_data=b"\x42" * 32
    )
    for name, data in (("cert.der", der), ("cert.pem", certificate_pem(der))):
        path = tmp_path / name
        path.write_bytes(data)
        base = [str(path), "--policy", str(policy), "--collateral", str(platform.collateral_dir)]
        base += ["--sim-platform", str(platform.directory)]
        assert verify_main([*base, "--role", "aggregator"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["evidence"] == "ra_tls_certificate"
        assert out["simulated"] is True
        assert out["tcb_status"] == "UpToDate"
        assert out["measurements"]["mrenclave"] == identities.aggregator.mrenclave.hex()
        assert out["measurements"]["report_data"].endswith("42" * 32)
        # the same certificate is not a trainer's
        assert verify_main([*base, "--role", "trainer"]) == 1
        assert json.loads(capsys.readouterr().out)["reason_code"] == "mrenclave_mismatch"


def test_simulation_policy_without_a_root_is_unusable_input(
    tmp_path: Path,
    platform: SimulatedPlatform,
    identities: Identities,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(platform, identities, b"\x00" * 32))
    code = verify_main(
        [
            str(DCAP_DATA / "sgx_quote"),
            "--policy",
            str(policy),
            "--role",
            "trainer",
            "--collateral",
            str(platform.collateral_dir),
        ]
    )
    assert code == 2
    assert "trusts the simulation root: give --simulation-root" in capsys.readouterr().err
