"""A Strategy wrapper that makes a federation differentially private, and says how much.

`PrivateStrategy(inner, plan)` drives any mean-type strategy (FedAvg, FedProx,
FedAvgM, FedAdam, FedYogi, FedAdagrad, FedSGD; the plan refuses the others at
load) through the ordinary Strategy interface:

* **central DP** (`[privacy.central]`): it asks for every update
  (``needs_all_updates``: the engine spills them, encrypted, instead of folding
  a weighted mean), reads them back one at a time, clips each to the current C,
  sums them with equal weight in float64, adds N(0, (z C)^2) from the OS CSPRNG
  and gives the inner strategy one "update", the noised sum divided by the
  number of sampled trainers. Adaptive clipping then moves C (Andrew et al. 2021).
* **client-side DP** (`[privacy] noise_multiplier`): the trainers add the noise;
  the wrapper only keeps the ledger (each party's local guarantee, Gaussian(z)
  per round it takes part in, at most one per round).

Either way it keeps the `PrivacyLedger`, sealed in the checkpoint with the inner
strategy's state, and offers the round engine four hooks (`select`,
`stop_reason`, `round_record`, `status`), which the engine calls only when its
strategy is a PrivateStrategy.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from hfl_aggregator import privacy as dp
from hfl_aggregator.accumulate import Array, TensorLayout, UpdateSource, Weights
from hfl_aggregator.strategies.strategy import RoundConfig, Strategy
from hfl_common.config import FederationPlan
from hfl_common.errors import FailedPreconditionError, InvalidArgumentError

log = logging.getLogger(__name__)

_STATE_PREFIX = "central_dp/"
_LEDGER = _STATE_PREFIX + "ledger"
_CLIP = _STATE_PREFIX + "clip_norm"
_DP_ACCOUNTING_VERSION = importlib.metadata.version("dp-accounting")


class _NoisedMean:
    """The UpdateSource the inner strategy sees: one privatised mean of `count` updates."""

    def __init__(self, mean: Weights, layout: list[TensorLayout], count: int) -> None:
        self._mean = mean
        self._layout = layout
        self._count = count

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return float(self._count)

    def layout(self) -> list[TensorLayout]:
        return list(self._layout)

    def mean(self) -> Weights:
        return dict(self._mean)

    def _only_mean(self) -> FailedPreconditionError:
        return FailedPreconditionError(
            "under central DP a strategy sees only the noised mean of the round's updates"
        )

    def weights(self) -> list[float]:
        raise self._only_mean()

    def stacked(self, name: str) -> Array:
        raise self._only_mean()

    def updates(self) -> Iterator[tuple[Weights, float]]:
        raise self._only_mean()


class PrivateStrategy:
    """`inner` with the plan's differential privacy (see the module docstring)."""

    def __init__(self, inner: Strategy, plan: FederationPlan) -> None:
        privacy = plan.privacy
        if privacy.mode == "none":
            raise InvalidArgumentError("the plan sets no differential privacy to wrap")
        if inner.needs_all_updates:
            raise InvalidArgumentError(
                f"strategy {inner.name!r} needs every update; central DP only wraps "
                "mean-type strategies"
            )
        self.inner = inner
        self.name = inner.name
        self.mode = privacy.mode
        self.central = privacy.central
        self._fraction = plan.fraction
        self._min_updates = plan.min_updates
        self._population = privacy.population
        if self.central is not None:
            self.needs_all_updates = True
            self.clip_norm = self.central.clip_norm
            z_eff = dp.effective_noise_multiplier(
                self.central.noise_multiplier, self.central.clipped_count_stddev
            )
        else:
            self.needs_all_updates = False
            self.clip_norm = privacy.clip_norm
            z_eff = privacy.noise_multiplier
        self.ledger = dp.PrivacyLedger(z_eff, privacy.delta, privacy.max_epsilon)
        self._pending: dp.Sampling | None = None
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------ Strategy

    def configure_round(self, round: int) -> RoundConfig:
        return self.inner.configure_round(round)

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        if updates.count == 0:
            raise InvalidArgumentError("no updates to aggregate: the round received none")
        sampling = self._pending or dp.Sampling(updates.count, updates.count)
        if self.central is None:
            new = self.inner.aggregate(global_weights, updates)
            self._record(self._client_sampling(), {})
            return new
        c = self.central
        clip = self.clip_norm
        layout = updates.layout()
        total: Weights = {t.name: np.zeros(t.shape, np.float64) for t in layout}
        unclipped = 0
        for update, _weight in updates.updates():
            clipped, norm = dp.clip_update(update, clip)
            unclipped += int(norm <= clip)
            for name, value in clipped.items():
                total[name] += value
        stddev = c.noise_multiplier * clip
        noised = dp.add_gaussian_noise(total, stddev)
        # Divide by the number of trainers sampled (public), not by the number that
        # answered: a dropout shrinks the round's step rather than moving the scale.
        denominator = float(max(sampling.sample_size, updates.count))
        mean = {t.name: (noised[t.name] / denominator).astype(t.dtype) for t in layout}
        new = self.inner.aggregate(global_weights, _NoisedMean(mean, layout, updates.count))
        record: dict[str, float] = {"dp_clip_norm": clip, "dp_noise_stddev": stddev}
        if c.adaptive_clipping:
            count = unclipped + c.clipped_count_stddev * float(dp.secure_normal(1)[0])
            self.clip_norm = dp.adaptive_clip_norm(
                clip, count, int(denominator), c.target_quantile, c.clip_learning_rate
            )
            record["dp_next_clip_norm"] = self.clip_norm
            log.info("adaptive clipping: C %.4g -> %.4g", clip, self.clip_norm)
        self._record(sampling, record)
        return new

    def _client_sampling(self) -> dp.Sampling:
        # Client-side DP: each party's own release, no amplification claimed (the
        # aggregator sees who took part); at most one release per party per round.
        return dp.Sampling(1, 1)

    def _record(self, sampling: dp.Sampling, record: dict[str, float]) -> None:
        eps = self.ledger.record(sampling)
        self._pending = None
        self._last = {**record, "dp_epsilon": eps.epsilon, "dp_delta": eps.delta}
        log.info(
            "privacy after %d rounds: epsilon %.4f at delta %.3g (RDP %.4f, PLD %.4f)",
            eps.rounds,
            eps.epsilon,
            eps.delta,
            eps.rdp,
            eps.pld,
        )

    def state(self) -> dict[str, Array]:
        out = dict(self.inner.state())
        out[_LEDGER] = self.ledger.state()
        out[_CLIP] = np.array(self.clip_norm, dtype=np.float64)
        return out

    def load_state(self, state: Mapping[str, Array]) -> None:
        mine = {k: v for k, v in state.items() if k.startswith(_STATE_PREFIX)}
        self.inner.load_state({k: v for k, v in state.items() if not k.startswith(_STATE_PREFIX)})
        if _LEDGER not in mine:
            if state:
                raise InvalidArgumentError(
                    "the checkpoint has no privacy ledger, but the plan sets differential "
                    "privacy: it was not made under this plan"
                )
            return
        self.ledger.load_state(mine[_LEDGER])
        clip = float(np.asarray(mine.get(_CLIP, self.clip_norm)))
        if not clip > 0 or not math.isfinite(clip):
            raise InvalidArgumentError(f"the checkpoint's clip norm {clip} is not positive")
        self.clip_norm = clip

    # ------------------------------------------------------- engine hooks

    def sample_size(self, active: int) -> int:
        """How many of `active` trainers a round samples (the engine's rule)."""
        return min(active, max(self._min_updates, math.ceil(self._fraction * active)))

    def _sampling_for(self, active: int) -> dp.Sampling:
        if self.central is None:
            return self._client_sampling()
        return dp.Sampling(active, self.sample_size(active))

    def select(self, parties: Mapping[str, Sequence[str]]) -> list[str]:
        """The trainers of the next round: `sample_size` of the active `parties` (party ->
        its live trainers), uniformly at random from the OS CSPRNG, one trainer each (the
        party is the unit DP protects). The plan's seed is public; amplification by
        sampling needs a sample nobody can predict. Remembers the sampling for the ledger."""
        count = self.sample_size(len(parties))
        self._pending = self._sampling_for(len(parties))
        rng = secrets.SystemRandom()
        chosen = rng.sample(sorted(parties), count)
        return sorted(rng.choice(sorted(parties[p])) for p in chosen)

    def stop_reason(self, active: int | None = None) -> str:
        """Why the federation must stop before its next round ("" when it may go on).

        `active` is the number of trainers the round would sample from; None (at start-up,
        before anyone joined) projects the plan's population.
        """
        n = self._population if active is None else max(1, active)
        return self.ledger.stop_reason(self._sampling_for(n))

    def round_record(self) -> dict[str, float]:
        """Privacy fields for the round just aggregated (its history record)."""
        return dict(self._last)

    def status(self) -> dict[str, Any]:
        """The privacy part of the engine's status."""
        eps = self.ledger.epsilon()
        return {
            "mode": self.mode,
            **eps.as_dict(),
            "max_epsilon": self.ledger.max_epsilon,
            "noise_multiplier": self.ledger.noise_multiplier,
            "clip_norm": self.clip_norm,
        }


def private_strategy(inner: Strategy, plan: FederationPlan) -> Strategy:
    """`inner` wrapped in PrivateStrategy when the plan sets differential privacy."""
    if plan.privacy.mode == "none":
        return inner
    if plan.mode != "sync":
        # Central DP is refused at plan load in asynchronous mode; client-side DP there
        # is accounted by each trainer for its own releases (see docs/privacy.md).
        return inner
    return PrivateStrategy(inner, plan)


def privacy_provenance(strategy: Strategy) -> dict[str, Any]:
    """What an exported model's provenance should say about differential privacy.

    {"mode": "none"} without DP; otherwise the mode, epsilon at delta (and the RDP and
    PLD bounds, the neighbouring relation, the rounds accounted), the plan's budget,
    the accounted noise multiplier, the clip norm in force, and the accountant used.
    """
    if not isinstance(strategy, PrivateStrategy):
        return {"mode": "none"}
    return {**strategy.status(), "accountant": f"dp-accounting {_DP_ACCOUNTING_VERSION}"}
