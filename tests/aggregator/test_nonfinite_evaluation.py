"""A trainer whose evaluation of the global model is not finite reports it instead of dying:
the aggregator refuses the report with its reason (`bad_evaluation`), stops waiting for that
evaluation, and the federation ends normally. The trainer runs the real client over mutual
RA-TLS, with a stand-in for its TensorFlow model that evaluates to NaN."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from hfl_common.api import aggregator_pb2
from hfl_common.attest_client import connect_verified
from hfl_common.config import load_plan
from hfl_trainer.client import Backoff, FederationClient
from hfl_trainer.training import LocalTrainer
from tests import fedkit

from .conftest import AggregatorFactory, Trainers
from .test_rollback import ConstantTrainer, small

Weights = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class _Evaluated:
    loss: float
    accuracy: float
    num_examples: int


class DivergedTrainer(ConstantTrainer):
    def evaluate(self, weights: Weights) -> _Evaluated:
        return _Evaluated(float("nan"), 0.1, 20)


def test_a_nan_evaluation_is_reported_refused_and_the_federation_ends(
    start_aggregator: AggregatorFactory,
    trainers: Trainers,
    files: fedkit.FederationFiles,
) -> None:
    spec = fedkit.PlanSpec(rounds=1, evaluate_every=1, round_timeout_seconds=120)
    aggregator = start_aggregator(spec)
    plan = load_plan(files.write_plan(spec))
    victim, other = trainers.t1, trainers.t2
    client = FederationClient(
        plan,
        cast("LocalTrainer", DivergedTrainer()),
        lambda: dict(files.weights),
        lambda: connect_verified(
            aggregator.target,
            victim.credentials,
            victim.verifier,
            "aggregator",
            expected_user_data=plan.sha256,
        ),
        label="diverged",
        backoff=Backoff(base=0.1, cap=0.5, give_up_after=30),
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.run()
        except BaseException as exc:  # the thread's outcome, checked below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        other.connect(aggregator.target, aggregator.plan).join()
        other.upload(small(files.weights), other.wait_for_task(aggregator_pb2.TASK_KIND_TRAIN))
        evaluate = other.wait_for_task(aggregator_pb2.TASK_KIND_EVALUATE)
        other.report_eval(evaluate, loss=0.25, accuracy=0.75, num_examples=30)
        # The round deadline is 120 s: the federation ends because the refused evaluation
        # is not waited for.
        assert aggregator.engine.wait_done(timeout=60)
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        client.stop()
    assert not errors, errors
    assert client.state.state == "done"
    last = aggregator.engine.snapshot().rounds[-1]
    assert last.eval_examples == 30, "only the finite evaluation is counted"
    assert last.eval_accuracy == np.float64(0.75)
