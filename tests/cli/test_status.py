"""`hfl status`: the aggregator's Status, asked as the operator over mutual RA-TLS."""

from __future__ import annotations

import json

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
    assert lines[0].startswith("!! SIMULATED TEE: the aggregator runs on the simulated")
    assert lines[2].startswith(f"federation {expected.federation_id}: ")
    assert f"round 0/{expected.total_rounds}" in lines[2]
    assert f"plan sha256 {expected.plan_sha256}" in lines
    assert lines[2].endswith(", mode sync"), lines[2]
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
    assert status.label == "trainer-1"
    assert status.state != aggregator_pb2.TRAINER_PHASE_UNSPECIFIED
