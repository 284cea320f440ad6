"""The trainer as a process in a real federation: whom it refuses, what it survives.

Every service is its own process (tests.cli.clikit.LocalFederation: the Supervisor that
`hfl run` uses), with the simulated TEE, real dcap-qvl verification, mutual RA-TLS on
127.0.0.1 and real TensorFlow training.
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl_cli.local import PlanOptions
from hfl_cli.run import service_args
from hfl_common.api import aggregator_pb2
from hfl_common.config import load_plan
from tests.cli import clikit

RECEIVED = ("hfl_aggregator_updates_received_total", ())


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[clikit.LocalFederation]:
    """Attestation service and aggregator that no trainer ever reaches."""
    yield from clikit.federation(
        tmp_path_factory.mktemp("quiet"), PlanOptions(trainers=1, rounds=2)
    )


def _assert_nothing_reached_the_aggregator(fed: clikit.LocalFederation) -> None:
    samples = clikit.scrape_metrics(fed.aggregator_metrics_url)
    assert samples[RECEIVED] == 0.0
    status = fed.status()
    assert list(status.trainers) == []
    assert status.round == 0


def test_trainer_refuses_an_aggregator_with_another_measurement_before_sending_anything(
    quiet: clikit.LocalFederation, tmp_path: Path
) -> None:
    # The trainer's copy of the policy expects another aggregator MRENCLAVE; the
    # attestation service and the aggregator use the agreed one.
    text = quiet.prepared.policy.read_text()
    section = re.search(r'\[roles\.aggregator\]\nmrenclave = \["([0-9a-f]{64})"\]', text)
    assert section is not None, text
    measured = section.group(1)
    other = "ab" * 32
    policy = tmp_path / "trainer-policy.toml"
    policy.write_text(text.replace(measured, other))

    result = clikit.run_hfl("trainer", *quiet.trainer_args(0, policy=policy, num_partitions=1))

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert f"aggregator at {quiet.aggregator_target} refused" in line, line
    assert "mrenclave" in line.lower(), line
    assert measured in line, line  # names the measurement it refused
    _assert_nothing_reached_the_aggregator(quiet)


def test_trainer_refuses_an_aggregator_attesting_another_plan_before_sending_anything(
    quiet: clikit.LocalFederation,
) -> None:
    agreed = quiet.prepared.plan
    other = agreed.with_name("plan-other-rounds.toml")  # beside the initial weights
    text = agreed.read_text()
    assert "rounds = 2\n" in text
    other.write_text(text.replace("rounds = 2\n", "rounds = 3\n"))

    result = clikit.run_hfl("trainer", *quiet.trainer_args(0, plan=other, num_partitions=1))

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert "plan hash" in line, line
    assert load_plan(agreed).sha256.hex() in line, line  # what the aggregator attested
    assert load_plan(other).sha256.hex() in line, line  # what this trainer agreed to
    _assert_nothing_reached_the_aggregator(quiet)


@pytest.mark.slow
def test_trainers_survive_an_aggregator_restart_and_finish(tmp_path: Path) -> None:
    rounds = 12
    port = clikit.free_port()  # the restarted aggregator must come back at the same address
    with clikit.LocalFederation.start(
        tmp_path / "fed",
        PlanOptions(trainers=2, rounds=rounds),
        aggregator_listen=f"127.0.0.1:{port}",
    ) as fed:
        first = fed.aggregator
        assert first is not None
        t1 = fed.start_trainer(0, wait=False)
        t2 = fed.start_trainer(1, wait=False)
        clikit.wait_until(
            lambda: any(
                r.state == aggregator_pb2.ROUND_STATE_COMPLETED for r in fed.status().rounds
            ),
            "round 1 to complete",
            timeout=240,
            interval=0.1,
        )
        before = fed.status()
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=30) == 0
        done_before = sum(r.state == aggregator_pb2.ROUND_STATE_COMPLETED for r in before.rounds)
        assert done_before < rounds, "the federation ended before the restart"

        fed.start_aggregator(listen=f"127.0.0.1:{port}")

        assert t1.process.wait(timeout=300) == 0, fed.log_text(t1)[-3000:]
        assert t2.process.wait(timeout=60) == 0, fed.log_text(t2)[-3000:]
        status = fed.status()
        assert status.state == aggregator_pb2.FEDERATION_STATE_DONE
        completed = [
            r.round for r in status.rounds if r.state == aggregator_pb2.ROUND_STATE_COMPLETED
        ]
        assert completed == list(range(1, rounds + 1))
        assert status.model_version == rounds
        assert sorted(t.label for t in status.trainers) == ["trainer-1", "trainer-2"]
        accuracy = [r.eval_accuracy for r in status.rounds if r.eval_examples > 0]
        assert accuracy
        assert accuracy[-1] > 0.5
        for trainer in (t1, t2):
            log = fed.log_text(trainer)
            # It verified the new aggregator instance (a new enclave key, a new quote)
            # before it joined again.
            assert log.count('"msg": "accepted aggregator quote (MRENCLAVE') >= 2, log[-3000:]
            assert log.count('"msg": "joined as ') == 2, log[-3000:]
            assert "federation done" in log


@pytest.mark.slow
def test_resnet50_takes_a_real_step_through_the_whole_path(tmp_path: Path) -> None:
    workdir = tmp_path / "run"

    result = clikit.run_hfl(
        "run",
        "--model", "resnet50",
        "--dataset", "synthetic",
        "--synthetic-examples", "16",
        "--batch-size", "8",
        "--rounds", "1",
        "--trainers", "1",
        "--workdir", str(workdir),
        "--no-plot",
        timeout=540,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    rounds = json.loads((workdir / "rounds.json").read_text())
    assert len(rounds) == 1
    assert rounds[0]["updates"] == 1
    assert math.isfinite(rounds[0]["train_loss"])
    assert rounds[0]["train_loss"] > 0
    plan = load_plan(workdir / "plan.toml")
    assert plan.model.name == "resnet50"
    assert clikit.processes_mentioning(str(workdir)) == []


@pytest.mark.slow
def test_real_trainers_train_through_a_relay_process_they_verify_like_the_aggregator(
    tmp_path: Path,
) -> None:
    # One relay between two real (TensorFlow) trainers and the root, each its own process.
    with clikit.LocalFederation.start(
        tmp_path / "fed", PlanOptions(trainers=2, rounds=2), aggregator=False
    ) as fed:
        plan = fed.prepared.plan
        text = plan.read_text()
        assert "min_trainers = 2\n" in text
        assert "min_updates = 2\n" in text
        # The root's participant is the relay; the relay's group is the two trainers.
        plan.write_text(
            text.replace("min_trainers = 2\n", "min_trainers = 1\n").replace(
                "min_updates = 2\n", "min_updates = 1\n"
            )
            + "\n[relays]\ngroup_min_trainers = 2\nmax_group_size = 2\n"
            "max_examples_per_trainer = 100000\n"
        )
        fed.start_aggregator()
        relay_args = [
            *service_args(fed.prepared, "relay"),
            "--plan", str(plan),
            "--attestation", fed.attestation_target,
            "--relay-upstream", fed.aggregator_target,
            "--label", "relay-1",
        ]  # fmt: skip
        relay = fed.supervisor.start("relay", "hfl_aggregator.main", relay_args)
        fed.supervisor.wait_ready(relay, clikit.START_TIMEOUT_SECONDS)
        relay_target = f"127.0.0.1:{relay.grpc_port}"
        trainers = [
            fed.start_trainer(i, wait=False, extra=["--aggregator", relay_target]) for i in range(2)
        ]
        for trainer in trainers:
            assert trainer.process.wait(timeout=300) == 0, fed.log_text(trainer)[-3000:]
        status = fed.status()
        assert status.state == aggregator_pb2.FEDERATION_STATE_DONE
        assert status.model_version == 2
        # The root saw one participant, the relay, carrying both trainers' examples.
        assert [t.label for t in status.trainers] == ["relay-1"]
        assert [r.updates for r in status.rounds] == [1, 1]
        assert status.rounds[-1].eval_examples > 0
        for trainer in trainers:
            log = fed.log_text(trainer)
            assert '"msg": "accepted relay quote (MRENCLAVE' in log, log[-3000:]
            assert "federation done" in log
        assert "relay joined the root" in fed.log_text(relay)
