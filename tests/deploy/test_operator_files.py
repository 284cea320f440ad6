"""What `make operator` copies out is enough for the operator, and holds no platform key.

`make operator` (deploy/compose.sh) copies the operator's key, the policy and
the simulated platform's root certificate and collateral out of the volumes,
never the platform's private keys. `hfl operator-cert` / `hfl status` build
their quote verifier from exactly that (hfl_cli.operator.make_verifier).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hfl_cli.local import policy_toml, write_operator_key
from hfl_cli.operator import make_verifier, simulation_root_der
from hfl_common.errors import ConfigError
from hfl_common.tee import SimulatedPlatform
from hfl_common.tee.identities import service_identity


def _operator_copy(platform: SimulatedPlatform, dest: Path) -> Path:
    """The files `make operator` copies: root_ca.pem and collateral/ only."""
    out = dest / "platform"
    out.mkdir(parents=True)
    shutil.copy(platform.directory / "root_ca.pem", out / "root_ca.pem")
    shutil.copytree(platform.collateral_dir, out / "collateral")
    return out


def test_the_operators_copy_verifies_a_services_quote_without_platform_keys(
    tmp_path: Path,
) -> None:
    platform = SimulatedPlatform.create(tmp_path / "machine")
    spki = write_operator_key(tmp_path / "operator")
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(platform, spki))
    copy = _operator_copy(platform, tmp_path / "operator-files")
    assert sorted(p.name for p in copy.iterdir()) == ["collateral", "root_ca.pem"]
    assert not list(copy.rglob("*.key.pem"))

    verifier = make_verifier(policy, copy, None)
    identity = service_identity("aggregator", platform)
    quote = platform.quote(identity, bytes(64))

    verdict = verifier.verify_quote(quote, "aggregator")
    assert verdict.accepted, verdict.reason
    assert verdict.simulated
    assert verdict.root_sha256 == platform.root_sha256
    # ...and a quote from another (unpinned) platform is still refused.
    other = SimulatedPlatform.create(tmp_path / "other")
    refused = verifier.verify_quote(other.quote(identity, bytes(64)), "aggregator")
    assert not refused.accepted


def test_a_platform_copy_without_its_root_says_which_file(tmp_path: Path) -> None:
    (tmp_path / "platform").mkdir()
    with pytest.raises(ConfigError, match=r"platform/root_ca.pem: cannot read the simulated"):
        simulation_root_der(tmp_path / "platform")
