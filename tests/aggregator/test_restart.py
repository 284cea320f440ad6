"""A crashed aggregator resumes from its sealed checkpoint and loses no completed round.

The aggregator runs as a real subprocess (`python -m hfl_aggregator.main`, simulated TEE);
two attested trainers send deterministic updates (multiples of 1/4, so every float32 sum is
exact). After round 2 completes and one update of round 3 is in, the process is SIGKILLed
and restarted on the same state directory (new port, new key): the trainers must verify it
again and re-join. The final model must be bit-identical to an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from hfl_aggregator.checkpoint import CheckpointStore
from hfl_attestation.service import RunningAttestationService
from hfl_common.api import aggregator_pb2
from hfl_common.config import load_plan
from hfl_common.runtime import simulated_sealing_secret
from hfl_common.sealing import SimulatedSealingKeys
from hfl_common.tee.identities import service_identity
from tests import fedkit

from .conftest import T1_EXAMPLES, T2_EXAMPLES, AggregatorFactory, Trainers

Weights = dict[str, npt.NDArray[Any]]

TRAIN = aggregator_pb2.TASK_KIND_TRAIN
PLAN = fedkit.PlanSpec(rounds=3, evaluate_every=100, round_timeout_seconds=60)


def round_update(template: Weights, round_number: int, trainer: int) -> Weights:
    """Trainer `trainer`'s delta in round `round_number`: multiples of 1/4 in [-1, 1]."""
    return {
        name: (((np.arange(a.size) * (trainer + 2) + round_number) % 9 - 4) / 4)
        .reshape(a.shape)
        .astype(a.dtype)
        for name, a in template.items()
    }


def by_hand(initial: Weights, rounds: int) -> Weights:
    """FedAvg of the deterministic updates, round after round, in float32."""
    weights = {k: v.copy() for k, v in initial.items()}
    total = np.float32(T1_EXAMPLES + T2_EXAMPLES)
    for r in range(1, rounds + 1):
        d1, d2 = round_update(initial, r, 1), round_update(initial, r, 2)
        weights = {
            k: (w + (T1_EXAMPLES * d1[k] + T2_EXAMPLES * d2[k]) / total).astype(w.dtype)
            for k, w in weights.items()
        }
    return weights


def train_round(trainers: Trainers, initial: Weights, round_number: int) -> None:
    for index, t in ((1, trainers.t1), (2, trainers.t2)):
        task = t.wait_for_task(TRAIN)
        assert task.round == round_number
        t.upload(round_update(initial, round_number, index), task)


def finish(trainers: Trainers) -> Weights:
    """Evaluate the last round's model, wait for DONE, return the final global model."""
    for t in (trainers.t1, trainers.t2):
        t.report_eval(t.wait_for_task(aggregator_pb2.TASK_KIND_EVALUATE))
    trainers.t1.wait_for_task(aggregator_pb2.TASK_KIND_DONE)
    header, model = trainers.t1.download()
    assert header.model_version == PLAN.rounds
    return model


def join(trainers: Trainers, target: str, plan: Path) -> None:
    for t in (trainers.t1, trainers.t2):
        t.connect(target, plan)
        t.join()


@pytest.mark.slow
def test_killed_aggregator_resumes_from_its_sealed_checkpoint_without_losing_a_round(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: Trainers,
    operator: fedkit.OperatorClient,
    start_aggregator: AggregatorFactory,
    tmp_path: Path,
) -> None:
    initial = dict(files.weights)
    plan = files.write_plan(PLAN)
    state = tmp_path / "state"
    first = fedkit.AggregatorProcess.start(
        files, plan, state, attestation.target, log_path=tmp_path / "aggregator-1.log"
    )
    try:
        join(trainers, first.target, plan)
        train_round(trainers, initial, 1)
        train_round(trainers, initial, 2)
        _, after_two = trainers.t1.download()
        task = trainers.t1.wait_for_task(TRAIN)
        assert task.round == 3
        trainers.t1.upload(round_update(initial, 3, 1), task)
    finally:
        first.kill()
    assert first.process.returncode == -9

    # The checkpoint on disk is sealed: none of the model's tensors appears in clear ...
    sealed = (state / "checkpoint.sealed").read_bytes()
    for name, array in after_two.items():
        assert array.tobytes() not in sealed, f"{name} is in the checkpoint in clear"
    # ... yet the aggregator's enclave identity unseals exactly that model.
    keys = SimulatedSealingKeys(
        simulated_sealing_secret(files.platform_dir),
        service_identity("aggregator", files.platform()).mrenclave,
    )
    checkpoint = CheckpointStore(state, keys).load(load_plan(plan).sha256_hex)
    assert checkpoint is not None
    assert (checkpoint.completed_rounds, checkpoint.model_version) == (2, 2)
    for name, array in after_two.items():
        np.testing.assert_array_equal(checkpoint.weights[name], array)

    second = fedkit.AggregatorProcess.start(
        files, plan, state, attestation.target, log_path=tmp_path / "aggregator-2.log"
    )
    try:
        assert second.port != first.port
        status = operator.connect(second.target).status()
        assert (status.state, status.model_version) == (
            aggregator_pb2.FEDERATION_STATE_WAITING_FOR_TRAINERS,
            2,
        )
        assert [(r.round, r.state, r.model_version) for r in status.rounds] == [
            (1, aggregator_pb2.ROUND_STATE_COMPLETED, 1),
            (2, aggregator_pb2.ROUND_STATE_COMPLETED, 2),
        ]
        # sessions died with the process: the old session is unknown, so re-verify and join
        old_session = trainers.t1.session_id
        with fedkit.rpc_error() as caught:
            trainers.t1.connect(second.target, plan).get_task(session_id=old_session)
        code, details = fedkit.code_and_details(caught)
        assert code == grpc.StatusCode.NOT_FOUND
        assert "the aggregator may have restarted; join again" in details
        join(trainers, second.target, plan)
        resumed_task = trainers.t1.wait_for_task(TRAIN)
        assert (resumed_task.round, resumed_task.model_version) == (3, 2)
        _, model_two = trainers.t1.download()
        for name, array in after_two.items():
            np.testing.assert_array_equal(model_two[name], array)
        train_round(trainers, initial, 3)
        resumed = finish(trainers)
        assert second.terminate() == 0
    finally:
        second.kill()

    # The same updates without a crash, in-process, in a fresh state directory.
    uninterrupted = start_aggregator(PLAN, state_dir=tmp_path / "uninterrupted")
    join(trainers, uninterrupted.target, plan)
    for r in (1, 2, 3):
        train_round(trainers, initial, r)
    straight = finish(trainers)

    expected = by_hand(initial, PLAN.rounds)
    for name in initial:
        assert resumed[name].tobytes() == straight[name].tobytes()
        np.testing.assert_array_equal(resumed[name], expected[name])


ASYNC_PLAN = fedkit.PlanSpec(
    rounds=3, evaluate_every=100, mode="async", buffer_size=2, staleness="constant"
)


def upload_async(t: fedkit.TestTrainer, initial: Weights, version: int, index: int) -> int:
    """Upload trainer `index`'s update meant for model `version`; return its disposition."""
    task = t.wait_for_task(TRAIN)
    response = t.upload(round_update(initial, version, index), task)
    return response.disposition


@pytest.mark.slow
def test_killed_async_aggregator_loses_no_buffered_update_and_applies_none_twice(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: Trainers,
    tmp_path: Path,
) -> None:
    initial = dict(files.weights)
    plan = files.write_plan(ASYNC_PLAN)
    state = tmp_path / "state"
    first = fedkit.AggregatorProcess.start(
        files, plan, state, attestation.target, log_path=tmp_path / "aggregator-1.log"
    )
    try:
        join(trainers, first.target, plan)
        assert (
            upload_async(trainers.t1, initial, 1, 1) == aggregator_pb2.UPDATE_DISPOSITION_BUFFERED
        )
        assert upload_async(trainers.t2, initial, 1, 2) == aggregator_pb2.UPDATE_DISPOSITION_APPLIED
        # trainer-a's update for version 2 is acknowledged as journaled, then the crash
        assert (
            upload_async(trainers.t1, initial, 2, 1) == aggregator_pb2.UPDATE_DISPOSITION_BUFFERED
        )
    finally:
        first.kill()
    assert first.process.returncode == -9
    journal = sorted((state / "journal").iterdir())
    assert len(journal) == 1, journal

    second = fedkit.AggregatorProcess.start(
        files, plan, state, attestation.target, log_path=tmp_path / "aggregator-2.log"
    )
    try:
        join(trainers, second.target, plan)
        # the buffered update came back: trainer-b's update completes version 2 with it
        assert upload_async(trainers.t2, initial, 2, 2) == aggregator_pb2.UPDATE_DISPOSITION_APPLIED
        assert (
            upload_async(trainers.t1, initial, 3, 1) == aggregator_pb2.UPDATE_DISPOSITION_BUFFERED
        )
        assert upload_async(trainers.t2, initial, 3, 2) == aggregator_pb2.UPDATE_DISPOSITION_APPLIED
        resumed = finish(trainers)
        assert second.terminate() == 0
    finally:
        second.kill()
    expected = by_hand(initial, ASYNC_PLAN.rounds)
    for name in initial:
        np.testing.assert_array_equal(resumed[name], expected[name])
