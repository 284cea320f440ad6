"""Aggregation strategies: pure numpy rules (`aggregate`) behind a small interface (`strategy`)."""

from hfl_aggregator.strategies.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedSGD,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    RoundConfig,
    Strategy,
    TrimmedMean,
    UpdateKind,
    make_strategy,
)
from hfl_common.strategy_registry import STRATEGY_NAMES, resolve_params

__all__ = [
    "STRATEGY_NAMES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedSGD",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "RoundConfig",
    "Strategy",
    "TrimmedMean",
    "UpdateKind",
    "make_strategy",
    "resolve_params",
]
