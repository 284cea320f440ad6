"""`hfl status`: the aggregator's Status, asked as the operator over mutual RA-TLS."""

from __future__ import annotations

import json

from hfl_cli.operator import format_status
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc
from hfl_common.attest_client import connect_verified
from hfl_common.tee.identities import service_identity
from tests.cli import clikit


def test_status_prints_round_trainers_and_plan_hash(live: clikit.LocalFederation) -> None:
    result = clikit.run_hfl("status", "--run", str(live.prepared.directory), timeout=60)

    assert result.returncode == 0, result.stderr
    expected = live.status()
    lines = result.stdout.splitlines()
    # a local federation is simulated, and says so first
    assert lines[0].startswith("!! SIMULATED TEE: the aggregator, trainer-1 runs on the simulated")
    assert lines[2].startswith(f"federation {expected.federation_id}: ")
    assert f"round 0/{expected.total_rounds}" in lines[2]
    assert f"plan sha256 {expected.plan_sha256}" in lines
    assert lines[4].endswith(", mode sync"), lines[4]
    trainer_lines = [line for line in lines if line.strip().startswith("trainer-1 ")]
    assert len(trainer_lines) == 1, result.stdout
    assert expected.trainers[0].trainer_id in trainer_lines[0]


def test_status_json_is_the_status_message(live: clikit.LocalFederation) -> None:
    result = clikit.run_hfl("status", "--run", str(live.prepared.directory), "--json", timeout=60)

    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["planSha256"] == live.status().plan_sha256
    assert status["totalRounds"] == 3
    assert [t["label"] for t in status["trainers"]] == ["trainer-1"]
    # simulation is visible in the status itself, not only in hfl status's banner
    assert status["teeSimulated"] is True
    assert [t.get("simulated") for t in status["trainers"]] == [True]


def test_status_banner_names_every_simulated_party(live: clikit.LocalFederation) -> None:
    result = clikit.run_hfl("status", "--run", str(live.prepared.directory), timeout=60)

    assert result.returncode == 0, result.stderr
    banner = result.stdout.splitlines()[0]
    assert banner.startswith("!! SIMULATED TEE: the aggregator, trainer-1 runs on the simulated")
    trainer_lines = [line for line in result.stdout.splitlines() if "trainer-1 " in line]
    assert trainer_lines[-1].endswith("(simulated TEE)"), trainer_lines


def test_status_of_a_directory_without_a_run_says_so(live: clikit.LocalFederation) -> None:
    empty = live.prepared.directory / "not-a-run"
    empty.mkdir()

    result = clikit.run_hfl("status", "--run", str(empty), timeout=60)

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert line == f"error: {empty} is not a running `hfl run` directory (no endpoints.json)"


def test_trainer_status_names_the_aggregator_it_verified(live: clikit.LocalFederation) -> None:
    trainer = live.trainers[0]
    operator = live.operator()
    channel = connect_verified(
        f"127.0.0.1:{trainer.grpc_port}", operator.credentials, operator.verifier, "trainer"
    )
    try:
        status = aggregator_pb2_grpc.TrainerServiceStub(channel).GetStatus(
            aggregator_pb2.TrainerServiceGetStatusRequest(), timeout=10
        )
    finally:
        channel.close()
    expected = service_identity("aggregator", live.prepared.platform).mrenclave.hex()
    assert status.aggregator_mrenclave == expected
    assert status.tee_simulated is True
    assert status.label == "trainer-1"
    assert status.state != aggregator_pb2.TRAINER_PHASE_UNSPECIFIED


def test_status_text_shows_epsilon_the_budget_and_why_the_federation_stopped() -> None:
    reason = "privacy budget reached: after 2 rounds epsilon is 2.943 (delta 1e-05); ..."
    status = aggregator_pb2.GetStatusResponse(
        federation_id="f",
        state=aggregator_pb2.FEDERATION_STATE_DONE,
        round=2,
        total_rounds=5,
        stop_reason=reason,
        privacy=aggregator_pb2.PrivacyStatus(
            mode="central",
            epsilon=2.9432,
            delta=1e-5,
            epsilon_rdp=3.1,
            epsilon_pld=2.9432,
            rounds_accounted=2,
            max_epsilon=3.3,
            clip_norm=1.0,
            noise_multiplier=2.0,
            stop_reason=reason,
        ),
        rounds=[
            aggregator_pb2.RoundSummary(
                round=1, state=aggregator_pb2.ROUND_STATE_COMPLETED, dp_epsilon=1.9931
            )
        ],
    )

    lines = format_status(status).splitlines()

    assert (
        "privacy: central DP, epsilon 2.943 of max 3.3 at delta 1e-05 after 2 rounds "
        "(RDP 3.1000, PLD 2.9432; noise multiplier 2, clip norm 1)"
    ) in lines
    assert f"stopped: {reason}" in lines
    assert any(
        line.strip().startswith("1 completed") and "epsilon 1.9931" in line for line in lines
    )
    # Without differential privacy, nothing about it is shown.
    plain = format_status(aggregator_pb2.GetStatusResponse(federation_id="f"))
    assert "privacy" not in plain
    assert "epsilon" not in plain
