"""Issue 11's poisoning attack, replayed against a real aggregator over mutual RA-TLS.

One trainer sends a finite update with every value 3e38 and num_examples=1 under FedAvg.
Before the magnitude defence the aggregate reached 2.2e35, was sealed into the checkpoint
and made the honest trainer's evaluation NaN. Now the update is refused (per-update norm
bound) or, with no per-update bound, the aggregate is refused before it is installed: the
model is unchanged, nothing is checkpointed, and the federation goes on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from hfl_aggregator.main import RunningAggregator
from hfl_common.api import aggregator_pb2
from hfl_common.errors import error_info
from tests import fedkit

from .conftest import AggregatorFactory, Trainers

TRAIN = aggregator_pb2.TASK_KIND_TRAIN
Weights = dict[str, npt.NDArray[Any]]
CHECKPOINT = "checkpoint.sealed"


def poison(template: Weights) -> Weights:
    return {
        n: np.full(a.shape, 3e38, a.dtype) if a.dtype.kind == "f" else a.copy()
        for n, a in template.items()
    }


def small(template: Weights) -> Weights:
    return {
        n: np.full(a.shape, 0.01, a.dtype) if a.dtype.kind == "f" else np.zeros_like(a)
        for n, a in template.items()
    }


def model_of(aggregator: RunningAggregator) -> tuple[int, Weights]:
    _, version, weights = aggregator.engine.model()
    return version, {k: v.copy() for k, v in weights.items()}


def assert_finite(weights: Weights) -> None:
    for name, array in weights.items():
        assert np.all(np.isfinite(array)), f"{name} is not finite"


def test_a_3e38_update_is_refused_by_the_norm_bound_and_the_federation_goes_on(
    start_aggregator: AggregatorFactory, trainers: Trainers, tmp_path: Path
) -> None:
    state = tmp_path / "aggregator"
    spec = fedkit.PlanSpec(rounds=2, evaluate_every=100, max_norm=50.0, max_aggregate_norm=500.0)
    aggregator = start_aggregator(spec, state_dir=state)
    attacker, honest = trainers.t2, trainers.t1
    for t in (attacker, honest):
        t.connect(aggregator.target, aggregator.plan)
        t.join()
    task_a, task_h = attacker.wait_for_task(TRAIN), honest.wait_for_task(TRAIN)
    _, start = honest.download()
    before = model_of(aggregator)

    with fedkit.rpc_error() as caught:
        attacker.upload(poison(start), task_a, num_examples=1)
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "exceeds the plan's bound" in details
    info = error_info(caught[0])
    assert info is not None
    assert info.reason == "NORM"
    after = model_of(aggregator)
    assert after[0] == before[0] == 0
    for name, array in before[1].items():
        np.testing.assert_array_equal(after[1][name], array)
    assert not (state / CHECKPOINT).exists()

    # The attacker may still send an honest update; the round completes on sane values.
    attacker.upload(small(start), task_a)
    honest.upload(small(start), task_h)
    fedkit.wait_until(lambda: model_of(aggregator)[0] == 1, "model version 1")
    assert_finite(model_of(aggregator)[1])
    assert (state / CHECKPOINT).exists()


def test_without_a_per_update_bound_the_poisoned_aggregate_is_refused_before_install(
    start_aggregator: AggregatorFactory, trainers: Trainers, tmp_path: Path
) -> None:
    state = tmp_path / "aggregator"
    spec = fedkit.PlanSpec(rounds=2, evaluate_every=1, max_norm=0.0, max_aggregate_norm=500.0)
    aggregator = start_aggregator(spec, state_dir=state)
    attacker, honest = trainers.t2, trainers.t1
    for t in (attacker, honest):
        t.connect(aggregator.target, aggregator.plan)
        t.join()
    task_a, task_h = attacker.wait_for_task(TRAIN), honest.wait_for_task(TRAIN)
    _, start = honest.download()
    before = model_of(aggregator)

    # Finite, so each update passes its own checks; the aggregate is refused.
    attacker.upload(poison(start), task_a, num_examples=1)
    honest.upload(small(start), task_h)
    retry_a = attacker.wait_for_task(TRAIN)
    retry_h = honest.wait_for_task(TRAIN)
    assert (retry_h.round, retry_h.model_version) == (1, 0)
    assert retry_h.task_id != task_h.task_id, "the refused attempt is retried"
    after = model_of(aggregator)
    assert after[0] == before[0] == 0
    for name, array in before[1].items():
        np.testing.assert_array_equal(after[1][name], array)
    assert not (state / CHECKPOINT).exists(), "a refused aggregate was checkpointed"
    rounds = aggregator.engine.snapshot().rounds
    assert any("aggregate" in r.failure_message for r in rounds), rounds

    # The retry on honest values installs a finite model, which evaluates to finite numbers.
    attacker.upload(small(start), retry_a)
    honest.upload(small(start), retry_h)
    evaluate = honest.wait_for_task(aggregator_pb2.TASK_KIND_EVALUATE)
    assert evaluate.model_version == 1
    _, model = honest.download(1)
    assert_finite(model)
    assert all(math.isfinite(float(np.sum(a, dtype=np.float64))) for a in model.values())
    assert (state / CHECKPOINT).exists()
