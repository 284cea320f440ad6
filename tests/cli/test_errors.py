"""What a user sees when something is wrong: an exit code and one line on stderr that
says what, never a traceback. Every command runs as a real subprocess."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cli import clikit


def _plan_variant(fed: clikit.LocalFederation, name: str, *replacements: tuple[str, str]) -> Path:
    """A copy of the live plan with `replacements` applied, beside its initial weights."""
    text = fed.prepared.plan.read_text()
    for old, new in replacements:
        assert old in text, f"{old!r} not in the plan"
        text = text.replace(old, new)
    path = fed.prepared.directory / name
    path.write_text(text)
    return path


def _cifar_plan(fed: clikit.LocalFederation) -> Path:
    return _plan_variant(
        fed,
        "plan-cifar10.toml",
        ('dataset = "digits"', 'dataset = "cifar10"'),
        ("input_shape = [8, 8, 1]", "input_shape = [32, 32, 3]"),
    )


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds open (listening) for its duration."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_in_use_is_one_line_and_exit_2(live: clikit.LocalFederation, held_port: int) -> None:
    p = live.prepared
    result = clikit.run_hfl(
        "attestation",
        "--listen", f"127.0.0.1:{held_port}",
        "--metrics-listen", "127.0.0.1:0",
        "--policy", str(p.policy),
        "--tee", "simulated",
        "--sim-platform", str(p.platform),
        "--state-dir", str(p.directory / "state" / "attestation-port-test"),
        timeout=60,
    )  # fmt: skip

    assert result.returncode == 2
    assert clikit.one_error_line(result).startswith(
        f"error: attestation: cannot bind 127.0.0.1:{held_port}: "
    )


def test_run_with_a_missing_data_directory_stops_before_starting_anything(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "run"
    missing = tmp_path / "nonexistent"

    result = clikit.run_hfl(
        "run", "--dataset", "cifar10", "--data-dir", str(missing), "--workdir", str(workdir)
    )

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: {missing}: CIFAR-10 data directory does not exist"
    )
    assert not workdir.exists()
    assert clikit.processes_mentioning(str(workdir)) == []


def test_run_with_a_malformed_cifar_batch_names_the_file(tmp_path: Path) -> None:
    data = tmp_path / "cifar"
    data.mkdir()
    (data / "data_batch_1.bin").write_bytes(bytes(1000))  # not a multiple of 3073 bytes

    result = clikit.run_hfl(
        "run", "--dataset", "cifar10", "--data-dir", str(data), "--workdir", str(tmp_path / "r")
    )

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: {data / 'data_batch_1.bin'}: size 1000 is not a multiple of the 3073-byte record"
    )


def test_trainer_with_a_missing_data_directory_says_so(
    live: clikit.LocalFederation, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    args = live.trainer_args(1, plan=_cifar_plan(live), extra=["--data-dir", str(missing)])

    result = clikit.run_hfl("trainer", *args)

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: {missing}: CIFAR-10 data directory does not exist"
    )


def test_trainer_stops_naming_the_first_tensor_where_plan_model_and_weights_differ(
    live: clikit.LocalFederation,
) -> None:
    # The plan names resnet20, but its initial weights are the small CNN's.
    plan = _plan_variant(live, "plan-resnet20.toml", ('name = "small_cnn"', 'name = "resnet20"'))
    with np.load(live.prepared.directory / "initial_weights.npz") as npz:
        first_weight = npz.files[0]

    result = clikit.run_hfl("trainer", *live.trainer_args(1, plan=plan))

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert line.startswith(
        "error: the plan's model resnet20 does not match its initial weights initial_weights.npz: "
    ), line
    assert f"(expected {first_weight!r})" in line, line


def test_trainer_below_the_policy_minimum_isv_svn_is_refused(
    live: clikit.LocalFederation,
) -> None:
    result = clikit.run_hfl("trainer", *live.trainer_args(1, extra=["--isv-svn", "0"]))

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert "quote ISVSVN 0 is below the policy minimum 1 for role trainer" in line, line


@pytest.mark.slow  # waits out --give-up-after, after TensorFlow's start-up: about 10 s
def test_trainer_gives_up_on_an_unreachable_aggregator(live: clikit.LocalFederation) -> None:
    closed = clikit.free_port()
    args = live.trainer_args(1, extra=["--give-up-after", "3"])
    args[args.index("--aggregator") + 1] = f"127.0.0.1:{closed}"

    result = clikit.run_hfl("trainer", *args)

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert line.startswith("error: aggregator unreachable for "), line
    assert f"127.0.0.1:{closed}" in line, line


def test_invalid_plan_names_the_key(live: clikit.LocalFederation) -> None:
    plan = _plan_variant(
        live, "plan-bad-lr.toml", ("learning_rate = 0.05", 'learning_rate = "fast"')
    )
    p = live.prepared

    result = clikit.run_hfl(
        "aggregator",
        "--plan", str(plan),
        "--policy", str(p.policy),
        "--tee", "simulated",
        "--sim-platform", str(p.platform),
        "--state-dir", str(p.directory / "state" / "aggregator-bad-plan"),
        "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0",
        "--attestation", live.attestation_target,
        timeout=60,
    )  # fmt: skip

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: {plan}: [training] learning_rate must be a number, got 'fast'"
    )


def test_run_refuses_a_workdir_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")

    result = clikit.run_hfl("run", "--workdir", str(tmp_path))

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: --workdir {tmp_path} is not empty; give a new directory"
    )


def test_run_rejects_a_strategy_parameter_that_is_not_a_number(tmp_path: Path) -> None:
    result = clikit.run_hfl(
        "run", "--strategy-param", "server_lr=fast", "--workdir", str(tmp_path / "r")
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--strategy-param 'server_lr=fast' must look like NAME=NUMBER" in result.stderr
    assert not (tmp_path / "r").exists()
