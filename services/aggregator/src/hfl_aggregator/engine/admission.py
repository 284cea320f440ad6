"""Admission of updates: pure checks of a header or a payload against the state,
and `Refusals`, the one place a refusal is counted with its reason.

Nothing here changes the federation: each check either returns or raises an
`HflError` whose `reason` is the stable refusal reason (also the metric label
and the ErrorInfo reason the trainer sees): stale, too_stale, wrong_task,
not_selected, replayed, duplicate, wrong_kind, no_examples, nan, norm, ended.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hfl_aggregator.engine.registry import TrainerRecord
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.validation import difference_norm, update_norm
from hfl_common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    HflError,
    InvalidArgumentError,
)

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class UpdateMeta:
    """What the header of an uploaded update says about it."""

    session_id: str
    task_id: str
    round: int
    base_model_version: int
    kind: str
    num_examples: int
    nonce: bytes
    train_loss: float = math.nan
    train_accuracy: float = math.nan


@dataclass(frozen=True)
class Ticket:
    """An update header that passed admission; its payload may now be read."""

    trainer_id: str
    meta: UpdateMeta


@dataclass(frozen=True)
class SyncRoundView:
    """The parts of a synchronous round that admission looks at."""

    round: int
    attempt: int
    base_version: int
    task_id: str
    selected: frozenset[str]
    received: frozenset[str]
    nonces: frozenset[bytes]


def check_common(meta: UpdateMeta, update_kind: str, strategy: str) -> None:
    """Checks that hold in every mode."""
    if meta.kind != update_kind:
        raise InvalidArgumentError(
            f"update kind {meta.kind!r} does not match the plan's {update_kind!r} "
            f"(strategy {strategy})",
            "wrong_kind",
        )
    if meta.num_examples <= 0:
        raise InvalidArgumentError("update must report num_examples > 0", "no_examples")
    if not meta.nonce:
        raise FailedPreconditionError(
            "update carries no nonce: every upload needs a fresh one", "replayed"
        )


def ended(meta: UpdateMeta) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"update for round {meta.round} refused: the federation has ended", "ended"
    )


def check_sync_header(
    meta: UpdateMeta,
    trainer_id: str,
    r: SyncRoundView | None,
    *,
    training: bool,
    phase: str,
    completed: int,
    version: int,
) -> None:
    """A synchronous update: for the running round, its task, from a sampled trainer, once."""
    current = r.round if r is not None else completed + 1
    if r is None or not training or meta.round != r.round:
        raise FailedPreconditionError(
            f"update for round {meta.round} (model version {meta.base_model_version}) "
            f"is stale: the federation is at round {current} "
            f"(model version {version}, {phase})",
            "stale",
        )
    if meta.base_model_version != r.base_version:
        raise FailedPreconditionError(
            f"update for round {meta.round} was computed from model version "
            f"{meta.base_model_version}, but this round trains version {r.base_version}",
            "stale",
        )
    if meta.task_id != r.task_id:
        raise FailedPreconditionError(
            f"update names task {meta.task_id!r}, which is not the current task of round "
            f"{r.round} (attempt {r.attempt})",
            "wrong_task",
        )
    if trainer_id not in r.selected:
        raise FailedPreconditionError(
            f"trainer {trainer_id} was not selected for round {r.round}", "not_selected"
        )
    if meta.nonce in r.nonces:
        raise FailedPreconditionError("replayed update: its nonce was already used", "replayed")
    if trainer_id in r.received:
        raise AlreadyExistsError(
            f"duplicate update: trainer {trainer_id} already sent its update for round {r.round}",
            "duplicate",
        )


def check_async_header(
    meta: UpdateMeta,
    trainer_id: str,
    *,
    outstanding: tuple[str, int] | None,
    last_accepted: str | None,
    nonces: Mapping[bytes, int],
    version: int,
    max_staleness: int,
) -> int:
    """An asynchronous update: for the trainer's current task, not too stale; its staleness."""
    if meta.nonce in nonces:
        raise FailedPreconditionError("replayed update: its nonce was already used", "replayed")
    if last_accepted is not None and meta.task_id == last_accepted:
        raise AlreadyExistsError(
            f"duplicate update: trainer {trainer_id} already sent its update for task "
            f"{meta.task_id!r}",
            "duplicate",
        )
    if outstanding is None or meta.task_id != outstanding[0]:
        current = outstanding[0] if outstanding is not None else "none"
        raise FailedPreconditionError(
            f"update names task {meta.task_id!r}, which is not trainer {trainer_id}'s current "
            f"task ({current}); ask for a new task",
            "wrong_task",
        )
    base = meta.base_model_version
    if base < outstanding[1] or base > version:
        raise FailedPreconditionError(
            f"update was computed from model version {base}, which its task (version "
            f"{outstanding[1]}) and the current model (version {version}) rule out",
            "stale",
        )
    tau = version - base
    if tau > max_staleness:
        raise FailedPreconditionError(
            f"update computed from model version {base} is {tau} versions stale; the plan "
            f"allows {max_staleness} (async.max_staleness): train on the current model",
            "too_stale",
            {"staleness": str(tau), "model_version": str(version)},
        )
    return tau


def check_values(arrays: Mapping[str, np.ndarray], max_norm: float, clip: bool) -> Weights:
    """NaN/Inf and L2-norm checks on a decoded update; returns it (clipped if the plan says).
    Makes a clipped copy: the engine uses `value_scale` and folds with the scale instead."""
    scale = value_scale(arrays, max_norm, clip)
    if scale != 1.0:
        return {
            n: (a * scale).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in arrays.items()
        }
    return dict(arrays)


def value_scale(arrays: Mapping[str, np.ndarray], max_norm: float, clip: bool) -> float:
    """NaN/Inf and L2-norm checks on a decoded update, in one blockwise pass: the factor
    its float values must be multiplied by (1.0, or the plan's clip max_norm / norm),
    or InvalidArgumentError ("nan", "norm")."""
    norm = finite_norm(arrays, "update")
    if max_norm > 0 and norm > max_norm:
        if not clip:
            raise InvalidArgumentError(
                f"update L2 norm {norm:.4g} exceeds the plan's bound {max_norm:.4g}", "norm"
            )
        return max_norm / norm
    return 1.0


def finite_norm(arrays: Mapping[str, np.ndarray], what: str) -> float:
    """The L2 norm over every float tensor; InvalidArgumentError at the first NaN/Inf.
    (One blockwise float64 pass per tensor: `hfl_aggregator.validation.update_norm`.)"""
    return update_norm(arrays, what)


def check_aggregate(
    old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], bound: float
) -> None:
    """The aggregate must be finite, and move the model by at most `bound` (0: unchecked)."""
    finite_norm(new, "aggregate")
    if bound > 0:
        norm = difference_norm(new, old, "aggregate change")
        if norm > bound:
            raise InvalidArgumentError(
                f"the aggregate moves the model by L2 norm {norm:.4g}, over the plan's "
                f"update.max_aggregate_norm {bound:.4g}",
                "aggregate_norm",
            )


class Refusals:
    """Counts refused updates: per trainer, and in the metric by reason. The only counter."""

    def __init__(self, metrics: AggregatorMetrics) -> None:
        self._metrics = metrics

    def count(self, record: TrainerRecord | None, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, HflError) else "internal"
        self._metrics.updates_refused.labels(reason=reason).inc()
        if record is not None:
            record.updates_refused += 1
        log.warning(
            "update from %s refused (%s): %s",
            record.trainer_id if record is not None else "an unknown session",
            reason,
            exc,
        )
