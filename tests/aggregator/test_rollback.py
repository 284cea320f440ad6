"""Freshness at trainers: an aggregator restarted from an older sealed checkpoint (one the
host copied aside and put back) is refused by a trainer that was already served a newer
model. The aggregator is a real subprocess; the trainer runs the real client
(`hfl_trainer.client.FederationClient`, over mutual RA-TLS) with a constant-delta stand-in
for its TensorFlow model; the second trainer is driven by hand.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from hfl_aggregator.checkpoint import CheckpointStore
from hfl_attestation.service import RunningAttestationService
from hfl_common.api import aggregator_pb2
from hfl_common.attest_client.peers import connect_verified
from hfl_common.config import load_plan
from hfl_common.errors import ConfigError, PermissionDeniedError
from hfl_common.runtime import simulated_sealing_secret
from hfl_common.sealing import SimulatedSealingKeys
from hfl_common.tee.identities import service_identity
from hfl_trainer.client import Backoff, FederationClient
from hfl_trainer.freshness import FILE_NAME, ModelVersionMemory
from hfl_trainer.training import LocalTrainer
from tests import fedkit

from .conftest import Trainers

Weights = dict[str, npt.NDArray[Any]]
TRAIN = aggregator_pb2.TASK_KIND_TRAIN
PLAN = fedkit.PlanSpec(rounds=5, evaluate_every=100, round_timeout_seconds=60)


@dataclass(frozen=True)
class _Trained:
    delta: Weights
    num_examples: int
    loss: float
    accuracy: float
    examples_per_second: float
    steps: int


class ConstantTrainer:
    """Stands in for LocalTrainer's training (the client's protocol is what is tested)."""

    num_examples = 16

    def train_delta(self, weights: Weights, **_: Any) -> _Trained:
        delta = {k: np.full(v.shape, 0.25, v.dtype) for k, v in weights.items()}
        return _Trained(delta, self.num_examples, 0.5, 0.5, 0.0, 1)


def small(template: Mapping[str, npt.NDArray[Any]]) -> Weights:
    return {k: np.full(v.shape, 0.25, v.dtype) for k, v in template.items()}


@pytest.mark.slow
def test_a_trainer_refuses_an_aggregator_restarted_from_an_older_checkpoint(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: Trainers,
    tmp_path: Path,
) -> None:
    plan_path = files.write_plan(PLAN)
    plan = load_plan(plan_path)
    state = tmp_path / "aggregator"
    keys = SimulatedSealingKeys(
        simulated_sealing_secret(files.platform_dir),
        service_identity("aggregator", files.platform()).mrenclave,
    )
    store = CheckpointStore(state, keys)

    def checkpoint_version() -> int:
        ckpt = store.load(plan.sha256_hex) if store.path.exists() else None
        return -1 if ckpt is None else ckpt.model_version

    target = ["", ""]  # the aggregator's current address
    victim = trainers.t1
    memory = ModelVersionMemory(tmp_path / "trainer-state" / FILE_NAME)
    client = FederationClient(
        plan,
        cast("LocalTrainer", ConstantTrainer()),
        lambda: dict(files.weights),
        lambda: connect_verified(
            target[0],
            victim.credentials,
            victim.verifier,
            "aggregator",
            expected_user_data=plan.sha256,
        ),
        label="victim",
        backoff=Backoff(base=0.1, cap=0.5, give_up_after=60),
        versions=memory,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.run()
        except BaseException as exc:  # the thread's outcome, checked below
            errors.append(exc)

    first = fedkit.AggregatorProcess.start(
        files, plan_path, state, attestation.target, log_path=tmp_path / "aggregator-1.log"
    )
    other = trainers.t2
    thread = threading.Thread(target=run, daemon=True)
    try:
        target[0] = first.target
        thread.start()
        other.connect(first.target, plan_path).join()
        other.upload(small(files.weights), other.wait_for_task(TRAIN))
        fedkit.wait_until(lambda: checkpoint_version() == 1, "the checkpoint of version 1", 30)
        older = tmp_path / "checkpoint-v1.sealed"
        shutil.copyfile(store.path, older)  # what the host keeps aside
        other.upload(small(files.weights), other.wait_for_task(TRAIN))
        fedkit.wait_until(lambda: checkpoint_version() == 2, "the checkpoint of version 2", 30)
        fedkit.wait_until(lambda: memory.seen(plan.sha256_hex) == 2, "the victim to see v2", 30)
    finally:
        first.kill()
    assert not errors, errors

    shutil.copyfile(older, store.path)  # the host puts the older checkpoint back
    second = fedkit.AggregatorProcess.start(
        files, plan_path, state, attestation.target, log_path=tmp_path / "aggregator-2.log"
    )
    try:
        target[0] = second.target
        other.connect(second.target, plan_path).join()
        task = other.wait_for_task(TRAIN, timeout=60)
        assert (task.round, task.model_version) == (2, 1), "the aggregator resumed the old model"
        thread.join(timeout=90)
        assert not thread.is_alive(), "the victim kept going with a rolled-back aggregator"
    finally:
        client.stop()
        second.kill()
    assert len(errors) == 1, errors
    refusal = errors[0]
    assert isinstance(refusal, PermissionDeniedError), repr(refusal)
    assert refusal.reason == "aggregator_rollback"
    assert "serves model version 1" in str(refusal)
    assert "already served version 2" in str(refusal)
    # the memory still holds the newest version seen
    assert memory.seen(plan.sha256_hex) == 2


def test_the_memory_keeps_the_highest_version_per_plan(tmp_path: Path) -> None:
    memory = ModelVersionMemory(tmp_path / FILE_NAME)
    memory.check("aa" * 32, "fed-a", 3)
    memory.check("aa" * 32, "fed-a", 3)  # the same version again is fine (a retry)
    memory.check("bb" * 32, "fed-b", 1)  # another plan is another federation
    assert ModelVersionMemory(tmp_path / FILE_NAME).seen("aa" * 32) == 3
    with pytest.raises(PermissionDeniedError, match="serves model version 2"):
        memory.check("aa" * 32, "fed-a", 2)
    memory.check("aa" * 32, "fed-a", 4)
    assert memory.seen("aa" * 32) == 4
    assert memory.seen("bb" * 32) == 1
    assert memory.seen("cc" * 32) == 0


def test_an_unreadable_memory_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=FILE_NAME):
        ModelVersionMemory(path).seen("aa" * 32)
