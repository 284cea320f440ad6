"""The strategy registry: every aggregation strategy's name, parameters, defaults,
update kind and the aggregation modes it supports. The one source of truth.

The federation plan resolves `[strategy]` through `resolve_params` when it is
parsed, so the plan's canonical form (and its SHA-256, which every enclave
binds into its evidence) covers the values the aggregator will actually run
with, defaults included. The aggregator's factory (`hfl_aggregator.strategies.
make_strategy`) maps the same names to classes and checks it covers them all.
Pure data and checks: no numpy, so the CLI and the trainer can read it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hfl_common.errors import ConfigError

ParamValue = float | int | str


@dataclass(frozen=True)
class Param:
    kind: type[float] | type[int] | type[str]
    default: ParamValue
    rule: str
    ok: Callable[[ParamValue], bool]


@dataclass(frozen=True)
class StrategySpec:
    params: Mapping[str, Param]
    # "gradient" (FedSGD) or "delta" (everything else).
    update_kind: str = "delta"
    # Aggregation modes (federation.mode) the strategy supports, and why not the others.
    modes: tuple[str, ...] = ("sync", "async")
    mode_note: str = ""
    # Whether central DP can account it: the strategy combines the round's updates by
    # their (weighted) mean, so the aggregator can clip each, noise the sum and hand
    # it the noised mean. Robust rules (median, trimmed mean, Krum) cannot.
    central_dp: bool = True


def _positive(default: float) -> Param:
    return Param(float, default, "must be > 0", lambda v: float(v) > 0.0)


def _unit(default: float) -> Param:
    return Param(float, default, "must be in [0, 1)", lambda v: 0.0 <= float(v) < 1.0)


_SERVER_LR_1 = _positive(1.0)
_ROBUST_NOTE = (
    "it needs every update of a synchronous round (a coordinate-wise or distance rule over "
    "a small asynchronous buffer of stale updates is not the robust rule it claims to be)"
)

STRATEGY_SPECS: dict[str, StrategySpec] = {
    "fedsgd": StrategySpec(
        {
            "optimizer": Param(
                str, "sgd", "must be 'sgd' or 'adam'", lambda v: v in ("sgd", "adam")
            ),
            "server_lr": _positive(0.01),
            "momentum": _unit(0.0),
            "beta1": _unit(0.9),
            "beta2": _unit(0.999),
            "epsilon": _positive(1e-7),
        },
        update_kind="gradient",
    ),
    "fedavg": StrategySpec({"server_lr": _SERVER_LR_1}),
    "fedprox": StrategySpec(
        {
            "proximal_mu": Param(float, 0.01, "must be >= 0", lambda v: float(v) >= 0.0),
            "server_lr": _SERVER_LR_1,
        }
    ),
    "fedavgm": StrategySpec({"server_lr": _SERVER_LR_1, "momentum": _unit(0.9)}),
    "fedadam": StrategySpec(
        {
            "server_lr": _positive(0.01),
            "beta1": _unit(0.9),
            "beta2": _unit(0.99),
            "tau": _positive(1e-3),
        }
    ),
    "fedyogi": StrategySpec(
        {
            "server_lr": _positive(0.01),
            "beta1": _unit(0.9),
            "beta2": _unit(0.99),
            "tau": _positive(1e-3),
        }
    ),
    "fedadagrad": StrategySpec(
        {"server_lr": _positive(0.01), "beta1": _unit(0.9), "tau": _positive(1e-3)}
    ),
    "median": StrategySpec(
        {"server_lr": _SERVER_LR_1}, modes=("sync",), mode_note=_ROBUST_NOTE, central_dp=False
    ),
    "trimmed_mean": StrategySpec(
        {
            "beta": Param(float, 0.1, "must be in [0, 0.5)", lambda v: 0.0 <= float(v) < 0.5),
            "server_lr": _SERVER_LR_1,
        },
        modes=("sync",),
        mode_note=_ROBUST_NOTE,
        central_dp=False,
    ),
    "krum": StrategySpec(
        {"f": Param(int, 1, "must be >= 0", lambda v: int(v) >= 0), "server_lr": _SERVER_LR_1},
        modes=("sync",),
        mode_note=_ROBUST_NOTE,
        central_dp=False,
    ),
    "multikrum": StrategySpec(
        {
            "f": Param(int, 1, "must be >= 0", lambda v: int(v) >= 0),
            "m": Param(int, 0, "must be >= 0 (0 = n - f)", lambda v: int(v) >= 0),
            "server_lr": _SERVER_LR_1,
        },
        modes=("sync",),
        mode_note=_ROBUST_NOTE,
        central_dp=False,
    ),
}

STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGY_SPECS)


def strategy_spec(name: str) -> StrategySpec:
    spec = STRATEGY_SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")
    return spec


def _coerce(strategy: str, key: str, spec: Param, value: object) -> ParamValue:
    where = f"strategy {strategy!r} parameter {key!r}"
    if spec.kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    if spec.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def resolve_params(name: str, params: Mapping[str, object]) -> dict[str, ParamValue]:
    """Every parameter of strategy `name`, checked, with defaults filled in.

    The result is what the strategy runs with, and what the plan hash covers.
    Raises ConfigError naming the strategy and parameter at fault.
    """
    specs = strategy_spec(name).params
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ConfigError(
            f"strategy {name!r} has no parameter {unknown[0]!r}; its parameters are "
            f"{', '.join(sorted(specs))}"
        )
    resolved: dict[str, ParamValue] = {}
    for key, spec in specs.items():
        value = _coerce(name, key, spec, params[key]) if key in params else spec.default
        if not spec.ok(value):
            raise ConfigError(f"strategy {name!r} parameter {key!r} {spec.rule}, got {value!r}")
        resolved[key] = value
    return resolved


def check_mode(name: str, mode: str) -> None:
    """Refuse a strategy in an aggregation mode it does not support, saying why."""
    spec = strategy_spec(name)
    if mode not in spec.modes:
        raise ConfigError(
            f"strategy {name!r} supports federation.mode = {' or '.join(spec.modes)}, not "
            f"{mode!r}: {spec.mode_note}. Use fedavg, fedavgm, fedadam, fedyogi, fedadagrad, "
            "fedprox or fedsgd for asynchronous aggregation"
        )


# Why central DP runs only in synchronous mode (docs/privacy.md).
CENTRAL_DP_ASYNC_NOTE = (
    "central DP is accounted as one sampled Gaussian mechanism per round: a uniformly "
    "random sample of the active trainers, each contributing one clipped update of the "
    "same model; an asynchronous buffer holds the first K updates to arrive, computed on "
    "stale models, possibly several from one fast trainer, which is not that mechanism, "
    "so no epsilon could be stated"
)


def central_dp_strategies() -> tuple[str, ...]:
    """The strategies central DP can account (mean-type), in registry order."""
    return tuple(n for n, spec in STRATEGY_SPECS.items() if spec.central_dp)


def check_central_dp(name: str, mode: str) -> None:
    """Refuse central DP with a strategy or aggregation mode it cannot account, saying why."""
    if not strategy_spec(name).central_dp:
        raise ConfigError(
            f"central DP cannot be accounted with strategy {name!r}: it adds noise calibrated "
            "to one trainer's clipped share of the SUM of the updates, and robust rules "
            "(median, trimmed mean, Krum) do not aggregate by a sum, so that noise bounds "
            "nothing they release; use one of " + ", ".join(central_dp_strategies())
        )
    if mode != "sync":
        raise ConfigError(
            f'central DP needs federation.mode = "sync", not {mode!r}: {CENTRAL_DP_ASYNC_NOTE}'
        )
