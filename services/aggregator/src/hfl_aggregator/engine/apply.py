"""Strategy application: turn collected updates into the next global model, or refuse.

The strategy owns everything about its output (FedSGD sets its non-trainable
variables itself); this module only times the call and refuses an aggregate
that is not finite or moves the model further than the plan allows, restoring
the strategy's optimizer state so a refused attempt leaves no trace (except the
privacy ledger's record of a noised aggregate that was computed, then refused).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hfl_aggregator.accumulate import UpdateSource
from hfl_aggregator.engine.admission import check_aggregate
from hfl_aggregator.engine.records import FailureReason
from hfl_aggregator.strategies import Strategy
from hfl_aggregator.strategies.central_dp import PrivateStrategy

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Applied:
    weights: Weights
    seconds: float


class AggregationFailedError(Exception):
    """The attempt could not produce a usable model; `reason` says which way it failed."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def apply_strategy(
    strategy: Strategy, weights: Weights, source: UpdateSource, max_aggregate_norm: float
) -> Applied:
    """Run the strategy; raise AggregationFailedError (strategy state restored) on any failure."""
    started = time.perf_counter()
    before = strategy.state()
    try:
        new = strategy.aggregate(weights, source)
    except Exception as exc:
        strategy.load_state(before)
        raise AggregationFailedError(
            FailureReason.AGGREGATION_FAILED, f"aggregation failed: {exc}"
        ) from exc
    try:
        check_aggregate(weights, new, max_aggregate_norm)
    except Exception as exc:
        # Under differential privacy the noised aggregate was computed and judged: the
        # refusal is a function of it, so its privacy is spent even though the model
        # is not installed. The ledger keeps the round; the rest is rolled back.
        spent = strategy.ledger.state() if isinstance(strategy, PrivateStrategy) else None
        strategy.load_state(before)
        if isinstance(strategy, PrivateStrategy) and spent is not None:
            strategy.ledger.load_state(spent)
        raise AggregationFailedError(
            FailureReason.AGGREGATE_REFUSED, f"aggregate refused: {exc}"
        ) from exc
    return Applied(new, time.perf_counter() - started)
