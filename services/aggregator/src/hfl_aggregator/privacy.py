"""Central differential privacy: the pure parts (clip, noise, adaptive clip) and the accountant.

The aggregator's central DP (strategies/central_dp.py) is DP-FedAvg (McMahan et
al. 2018, "Learning Differentially Private Recurrent Language Models") at the
level of whole parties: each round every sampled party's update is clipped to
L2 norm C, the clipped updates are summed with equal weight, Gaussian noise
N(0, (z C)^2) is added to every coordinate of the sum, and the noised sum is
divided by the number of sampled parties. Adding or removing one party changes
the sum by at most C, so the round is the Gaussian mechanism with noise
multiplier z on that sum (Dwork & Roth 2014, appendix A).

Accounting is Google's dp-accounting (`dp_accounting`): the round is a
`GaussianDpEvent(z)` when every party takes part, and a
`SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))` when m of n
active parties are sampled (fixed-size sampling is analysed under the
replace-one relation, where the sum's sensitivity is 2C, hence z / 2; Wang,
Balle & Kasiviswanathan 2019). Rounds compose. Epsilon at delta comes from the
RDP accountant and, where dp-accounting's PLD accountant supports the events
(no sampling, or Poisson sampling), from PLD too; the smaller (both are valid
upper bounds) is reported.

Noise comes from the operating system's CSPRNG (`os.urandom`, which Gramine
serves inside the enclave from RDRAND, never from the host), turned into
Gaussians by the Box-Muller transform in float64. The floating-point caveat
(Mironov 2012, "On significance of the least significant bits for differential
privacy") applies: a float64 Gaussian sample is not exactly Gaussian, its low
bits can leak, and the noised sum is then rounded to the model's dtype; the
guarantee stated is the textbook one for real-valued noise, not a certified
floating-point implementation (see docs/privacy.md).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting import pld, rdp

from hfl_common.errors import InvalidArgumentError

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Weights = dict[str, Array]

# Elements of noise drawn per step: bounds the scratch memory (16 MiB of float64).
_NOISE_BLOCK = 1 << 20
# PLD discretisation: 1e-3 gives the same epsilon as 1e-4 to 1e-6 relative here
# (pessimistic estimates, so still an upper bound) at a tenth of the time.
_PLD_DISCRETIZATION = 1e-3
_PLD_MIN_NOISE = 0.1


# ------------------------------------------------------------------ clipping


def global_norm(update: Mapping[str, Array]) -> float:
    """L2 norm of all tensors of `update` taken together, in float64."""
    total = 0.0
    for value in update.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """The factor min(1, C / norm) that brings an update of L2 norm `norm` within C."""
    if not clip_norm > 0.0 or not math.isfinite(clip_norm):
        raise InvalidArgumentError(f"clip_norm {clip_norm} must be positive and finite")
    if not math.isfinite(norm):
        raise InvalidArgumentError(f"update has a non-finite L2 norm ({norm}); refusing to clip it")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_update(update: Mapping[str, Array], clip_norm: float) -> tuple[Weights, float]:
    """`update` scaled to L2 norm at most `clip_norm`, in float64, and its original norm.

    One factor for the whole update (its direction is kept). Integer tensors are
    refused: they would escape the noise.
    """
    for name, value in update.items():
        if np.asarray(value).dtype.kind != "f":
            raise InvalidArgumentError(
                f"central DP needs floating-point updates; tensor {name!r} is "
                f"{np.asarray(value).dtype}"
            )
    norm = global_norm(update)
    factor = clip_factor(norm, clip_norm)
    return {n: np.asarray(v, dtype=np.float64) * factor for n, v in update.items()}, norm


# --------------------------------------------------------------------- noise


def secure_uniform(size: int) -> Array:
    """`size` float64 uniforms in the open interval (0, 1) from os.urandom.

    53 random bits per value, offset by half a step so neither 0 nor 1 occurs.
    """
    raw = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)


def secure_normal(size: int) -> Array:
    """`size` independent standard normal float64 samples from os.urandom (Box-Muller)."""
    pairs = (size + 1) // 2
    u1 = secure_uniform(pairs)
    u2 = secure_uniform(pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def add_gaussian_noise(total: Mapping[str, Array], stddev: float) -> Weights:
    """`total` (float64 arrays) + N(0, stddev^2) on every coordinate, from os.urandom.

    Noise is drawn in blocks, so the scratch memory is bounded whatever the
    size of a tensor. The result is float64; the caller casts it.
    """
    if stddev < 0.0 or not math.isfinite(stddev):
        raise InvalidArgumentError(f"noise stddev {stddev} must be finite and non-negative")
    noised: Weights = {}
    for name, value in total.items():
        out = np.array(value, dtype=np.float64, copy=True)
        flat = out.reshape(-1)
        for start in range(0, flat.size, _NOISE_BLOCK):
            stop = min(flat.size, start + _NOISE_BLOCK)
            flat[start:stop] += stddev * secure_normal(stop - start)
        noised[name] = out
    return noised


# ------------------------------------------------------------ adaptive clipping


def adaptive_clip_norm(
    clip_norm: float,
    noised_unclipped_count: float,
    participants: int,
    target_quantile: float,
    learning_rate: float,
) -> float:
    """The next clip norm under Andrew et al. 2021 (geometric update, their Algorithm 1).

    `noised_unclipped_count` is sum_i [norm_i <= C] + N(0, sigma_b^2): the number of
    updates the current C did not clip, noised. With b = that count / participants
    (the noised fraction unclipped), C' = C * exp(-learning_rate * (b - target_quantile)):
    C shrinks when more than the target fraction fit under it, and grows otherwise.
    """
    if participants < 1:
        raise InvalidArgumentError(f"participants {participants} must be at least 1")
    fraction = noised_unclipped_count / participants
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile))


def effective_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The one Gaussian noise multiplier that the noised sum and the noised count make together.

    Andrew et al. 2021, Theorem 1: releasing the sum with multiplier z and the
    unclipped count (each party's bit has sensitivity 1, but centred bits b - 1/2
    have 1/2, so the count's multiplier is 2 sigma_b) is the Gaussian mechanism with
    z_eff = (z^-2 + (2 sigma_b)^-2)^(-1/2). sigma_b = 0 means no count is released.
    """
    if not noise_multiplier > 0.0:
        raise InvalidArgumentError(f"noise_multiplier {noise_multiplier} must be above 0")
    if clipped_count_stddev <= 0.0:
        return noise_multiplier
    return float((noise_multiplier**-2 + (2.0 * clipped_count_stddev) ** -2) ** -0.5)


# ------------------------------------------------------------------ accounting


@dataclass(frozen=True)
class Sampling:
    """How the parties of one round were chosen: `sample_size` of `population`, uniformly
    without replacement (fixed size) or, with `poisson`, each with probability
    `sample_size / population` independently."""

    population: int
    sample_size: int
    poisson: bool = False

    def __post_init__(self) -> None:
        if self.population < 1 or not 1 <= self.sample_size <= self.population:
            raise InvalidArgumentError(
                f"a round samples between 1 and population ({self.population}) parties, "
                f"got {self.sample_size}"
            )

    @property
    def full(self) -> bool:
        return self.sample_size == self.population and not self.poisson


@dataclass(frozen=True)
class Epsilon:
    """epsilon at `delta`: the smaller of the RDP and PLD bounds (NaN where not computed)."""

    epsilon: float
    delta: float
    rdp: float
    pld: float
    rounds: int
    # The neighbouring relation epsilon is stated under: "add_or_remove_one" (a
    # party's whole contribution present or absent) or "replace_one".
    relation: str = "add_or_remove_one"

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "epsilon_rdp": self.rdp,
            "epsilon_pld": self.pld,
            "rounds": self.rounds,
            "relation": self.relation,
        }


def dp_event(
    noise_multiplier: float, rounds: Iterable[tuple[Sampling, int]]
) -> tuple[dp_accounting.DpEvent, dp_accounting.NeighboringRelation]:
    """The dp-accounting event of these rounds ((sampling, number of rounds) pairs), and the
    neighbouring relation it is stated under.

    Every party in every round (the default plan): T x Gaussian(z), add-or-remove-one.
    Poisson sampling with rate q: T x PoissonSampled(q, Gaussian(z)), add-or-remove-one.
    Fixed-size sampling: replace-one, where the sum of clipped updates moves by up to 2C,
    so each round is SampledWithoutReplacement(n, m, Gaussian(z / 2)) (a full round is
    Gaussian(z / 2)).
    """
    groups = [(s, k) for s, k in rounds if k > 0]
    relation = dp_accounting.NeighboringRelation
    fixed_sampled = any(not s.full and not s.poisson for s, _ in groups)
    if fixed_sampled and any(s.poisson for s, _ in groups):
        raise InvalidArgumentError("cannot compose Poisson and fixed-size sampled rounds")
    events: list[dp_accounting.DpEvent] = []
    for s, k in groups:
        if fixed_sampled:
            gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)
            event: dp_accounting.DpEvent = (
                gaussian
                if s.full
                else dp_accounting.SampledWithoutReplacementDpEvent(
                    s.population, s.sample_size, gaussian
                )
            )
        elif s.poisson:
            event = dp_accounting.PoissonSampledDpEvent(
                s.sample_size / s.population, dp_accounting.GaussianDpEvent(noise_multiplier)
            )
        else:
            event = dp_accounting.GaussianDpEvent(noise_multiplier)
        events.append(dp_accounting.SelfComposedDpEvent(event, k))
    rel = relation.REPLACE_ONE if fixed_sampled else relation.ADD_OR_REMOVE_ONE
    return dp_accounting.ComposedDpEvent(events), rel


def compute_epsilon(
    noise_multiplier: float, rounds: Sequence[tuple[Sampling, int]], delta: float
) -> Epsilon:
    """(epsilon, delta) of these rounds, RDP and PLD where dp-accounting supports both."""
    if not 0.0 < delta < 1.0:
        raise InvalidArgumentError(f"delta {delta} must lie strictly between 0 and 1")
    total = sum(k for _, k in rounds)
    if total == 0:
        return Epsilon(0.0, delta, 0.0, 0.0, 0)
    event, relation = dp_event(noise_multiplier, rounds)
    rdp_accountant = rdp.RdpAccountant(neighboring_relation=relation)
    rdp_accountant.compose(event)
    eps_rdp = float(rdp_accountant.get_epsilon(delta))
    eps_pld = math.nan
    pld_accountant = pld.PLDAccountant(
        neighboring_relation=relation, value_discretization_interval=_PLD_DISCRETIZATION
    )
    # Below this noise multiplier the privacy loss distribution is too wide to
    # discretise in reasonable time (seconds growing as 1/z), and epsilon is in the
    # hundreds anyway: RDP alone is reported.
    if noise_multiplier >= _PLD_MIN_NOISE and pld_accountant.supports(event):
        try:
            pld_accountant.compose(event)
            eps_pld = float(pld_accountant.get_epsilon(delta))
        except (ValueError, OverflowError, MemoryError) as exc:
            # Tiny noise makes the privacy loss distribution too wide to discretise;
            # RDP still gives a (large) bound.
            log.warning("PLD accounting failed (%s); reporting the RDP bound", exc)
    best = min(eps_rdp, eps_pld) if math.isfinite(eps_pld) else eps_rdp
    name = "replace_one" if relation is dp_accounting.NeighboringRelation.REPLACE_ONE else ""
    return Epsilon(best, delta, eps_rdp, eps_pld, total, name or "add_or_remove_one")


class PrivacyLedger:
    """The rounds released so far and their epsilon; state for sealed checkpoints.

    Rounds are kept run-length encoded as (population, sample size, count), so the
    state stays small over thousands of rounds; epsilon is cached between records.
    """

    def __init__(self, noise_multiplier: float, delta: float, max_epsilon: float = 0.0) -> None:
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.max_epsilon = max_epsilon
        self._runs: list[list[int]] = []
        self._cached: Epsilon | None = None

    @property
    def rounds(self) -> int:
        return sum(r[2] for r in self._runs)

    def _grouped(self, extra: Sampling | None = None) -> list[tuple[Sampling, int]]:
        counts: dict[Sampling, int] = {}
        for n, m, k in self._runs:
            s = Sampling(n, m)
            counts[s] = counts.get(s, 0) + k
        if extra is not None:
            counts[extra] = counts.get(extra, 0) + 1
        return list(counts.items())

    def epsilon(self) -> Epsilon:
        if self._cached is None:
            self._cached = compute_epsilon(self.noise_multiplier, self._grouped(), self.delta)
        return self._cached

    def epsilon_after(self, sampling: Sampling) -> Epsilon:
        """What epsilon would be after one more round sampled as `sampling`."""
        return compute_epsilon(self.noise_multiplier, self._grouped(sampling), self.delta)

    def record(self, sampling: Sampling) -> Epsilon:
        if self._runs and self._runs[-1][:2] == [sampling.population, sampling.sample_size]:
            self._runs[-1][2] += 1
        else:
            self._runs.append([sampling.population, sampling.sample_size, 1])
        self._cached = None
        return self.epsilon()

    def stop_reason(self, sampling: Sampling) -> str:
        """Why the next round, sampled as `sampling`, must not run ("" when it may)."""
        if self.max_epsilon <= 0:
            return ""
        after = self.epsilon_after(sampling)
        if after.epsilon <= self.max_epsilon:
            return ""
        return (
            f"privacy budget reached: after {self.rounds} rounds epsilon is "
            f"{self.epsilon().epsilon:.3f} (delta {self.delta:.3g}); one more round would "
            f"make it {after.epsilon:.3f}, above the plan's max_epsilon {self.max_epsilon:g}"
        )

    def state(self) -> Array:
        return np.array(self._runs, dtype=np.int64).reshape(-1, 3)

    def load_state(self, runs: Array) -> None:
        table = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
        for n, m, k in table.tolist():
            Sampling(n, m)  # refuses an impossible row
            if k < 1:
                raise InvalidArgumentError(f"privacy ledger row ({n}, {m}, {k}) has no rounds")
        self._runs = [list(map(int, row)) for row in table.tolist()]
        self._cached = None
