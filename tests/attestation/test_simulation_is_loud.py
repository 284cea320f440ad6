"""Simulation is loud and never mixed with production (issue 11): a simulated service
refuses an Intel policy and injected code, and says it is simulated in its metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig
import time
import types
import urllib.request
from pathlib import Path

import pytest

from hfl_common.errors import ConfigError
from hfl_common.ratls import EnclaveKey
from hfl_common.tee import SimulatedPlatform
from hfl_common.tee.identities import service_identity
from hfl_common.tee.simulation import check_no_code_injection

from .conftest import Identities, policy_toml

MAIN = "import sys; from hfl_attestation.main import main; sys.exit(main())"


def _attestation_main(
    tmp_path: Path, policy: Path, platform: SimulatedPlatform, **env: str
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "PYTHON"))}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            MAIN,
            "--policy",
            str(policy),
            "--tee",
            "simulated",
            "--sim-platform",
            str(platform.directory),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_simulated_service_refuses_to_start_under_an_intel_policy(
    platform: SimulatedPlatform, identities: Identities, operator_key: EnclaveKey, tmp_path: Path
) -> None:
    text = policy_toml(platform, identities, operator_key.spki_sha256)
    intel = text.replace('root = "simulation"', 'root = "intel"')
    policy = tmp_path / "intel-policy.toml"
    policy.write_text(intel)
    line = _one_error_line(_attestation_main(tmp_path, policy, platform))
    assert line.startswith("error: --tee simulated refused: ")
    assert 'trusts Intel\'s root (root = "intel")' in line


def test_a_simulated_service_refuses_to_start_with_pythonpath_set(
    platform: SimulatedPlatform, identities: Identities, operator_key: EnclaveKey, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(platform, identities, operator_key.spki_sha256))
    patches = tmp_path / "patches"
    patches.mkdir()
    line = _one_error_line(_attestation_main(tmp_path, policy, platform, PYTHONPATH=str(patches)))
    assert line.startswith("error: PYTHONPATH is set: it runs or finds code the simulated")


def test_a_sitecustomize_outside_the_standard_library_is_refused(tmp_path: Path) -> None:
    planted = types.ModuleType("sitecustomize")
    planted.__file__ = str(tmp_path / "sitecustomize.py")
    with pytest.raises(ConfigError, match=r"a sitecustomize module \(.*\) was loaded at start"):
        check_no_code_injection(environ={}, modules={"sitecustomize": planted})
    check_no_code_injection(environ={}, modules={})  # a clean start passes


def test_the_distributions_sitecustomize_symlinked_from_the_standard_library_is_accepted(
    tmp_path: Path,
) -> None:
    # Debian's python3.11 ships /usr/lib/python3.11/sitecustomize.py as a symlink to
    # /etc/python3.11/sitecustomize.py: loaded from the standard library, so accepted;
    # the same file loaded from elsewhere is still refused.
    target = tmp_path / "etc" / "sitecustomize.py"
    target.parent.mkdir()
    target.write_text("# distribution default\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shipped = types.ModuleType("sitecustomize")
    shipped.__file__ = str(stdlib / "sitecustomize.py")
    check_no_code_injection(environ={}, modules={"sitecustomize": shipped})
    elsewhere = types.ModuleType("sitecustomize")
    elsewhere.__file__ = str(target)
    with pytest.raises(ConfigError, match=r"a sitecustomize module"):
        check_no_code_injection(environ={}, modules={"sitecustomize": elsewhere})


@pytest.mark.slow
def test_a_simulated_service_says_so_in_its_metrics(
    platform: SimulatedPlatform, identities: Identities, operator_key: EnclaveKey, tmp_path: Path
) -> None:
    real = service_identity("attestation", platform, 1)
    ids = dataclasses.replace(identities, attestation=real)
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(platform, ids, operator_key.spki_sha256))
    port_file = tmp_path / "ports.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HFL_", "PYTHON"))}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            MAIN,
            "--policy",
            str(policy),
            "--tee",
            "simulated",
            "--sim-platform",
            str(platform.directory),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
        ],
        env=clean,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ports = json.loads(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics") as r:
            text = r.read().decode()
        assert "\nhfl_tee_simulated 1.0\n" in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
