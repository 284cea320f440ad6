"""Service settings come from flags, then HFL_* environment variables, then a TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hfl_common.errors import ConfigError
from hfl_common.runtime import add_enclave_flags, parse_service_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfl aggregator")
    add_enclave_flags(p, listen="127.0.0.1:7401", metrics_listen="127.0.0.1:9401")
    p.add_argument("--upload-slots", type=int, default=1)
    return p


@pytest.fixture(autouse=True)
def _no_hfl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("HFL_"):
            monkeypatch.delenv(key)


def test_flags_beat_environment_beat_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text(
        'policy = "/etc/hfl/policy.toml"\nlisten = "0.0.0.0:1"\ntee = "simulated"\n'
        "upload-slots = 3\nlog_json = true\n"
    )
    ns = parse_service_args(parser(), ["--config", str(config)])
    assert ns.policy == Path("/etc/hfl/policy.toml")
    assert (ns.listen, ns.tee, ns.upload_slots, ns.log_json) == ("0.0.0.0:1", "simulated", 3, True)

    monkeypatch.setenv("HFL_LISTEN", "0.0.0.0:2")
    ns = parse_service_args(parser(), ["--config", str(config)])
    assert ns.listen == "0.0.0.0:2"

    ns = parse_service_args(parser(), ["--config", str(config), "--listen", "0.0.0.0:3"])
    assert ns.listen == "0.0.0.0:3"
    assert ns.metrics_listen == "127.0.0.1:9401"


def test_config_file_can_be_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('policy = "p.toml"\n')
    monkeypatch.setenv("HFL_CONFIG", str(config))
    assert parse_service_args(parser(), []).policy == Path("p.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('polcy = "x"\n', "polcy is not a setting of hfl aggregator"),
        ('policy = "x"\ntee = "sgx"\n', "tee must be one of gramine, simulated; got 'sgx'"),
        ('policy = "x"\nupload-slots = "many"\n', "upload-slots: 'many' is not a valid value"),
        ('policy = "x"\nlog_json = "perhaps"\n', "log_json must be true or false"),
        ("policy = \n", "not valid TOML"),
    ],
)
def test_invalid_config_file_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_service_args(parser(), ["--config", str(config)])
    assert message in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        parse_service_args(parser(), ["--config", str(tmp_path / "nope.toml")])
