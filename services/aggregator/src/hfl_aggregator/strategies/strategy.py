"""Strategies: what trainers are asked to send, and how a round's updates
become the next global model.

Updates are deltas (local weights - global weights) for the FedAvg family and
the robust rules, and gradients for FedSGD. Every strategy returns new global
weights and never modifies the arrays it is given; its optimizer state
(`state()`) is a flat dict of arrays, for sealed checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from hfl_aggregator.accumulate import Array, UpdateSource, Weights
from hfl_aggregator.strategies import aggregate as agg
from hfl_common.errors import InvalidArgumentError
from hfl_common.strategy_registry import STRATEGY_NAMES, ParamValue, resolve_params

logger = logging.getLogger(__name__)

UpdateKind = Literal["gradient", "delta"]


@dataclass(frozen=True)
class RoundConfig:
    """What a strategy decides about one round's training tasks."""

    update_kind: UpdateKind
    # FedProx's proximal coefficient mu for the trainers' local objective (0: none).
    proximal_mu: float = 0.0


class Strategy(Protocol):
    """The interface the round engine drives."""

    name: str
    # False: the round may fold updates into a running mean (MeanAccumulator).
    # True: the strategy needs every update (give it a SpillStore).
    needs_all_updates: bool

    def configure_round(self, round: int) -> RoundConfig:
        """The training parameters the strategy sets for `round`."""
        ...

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        """The new global weights after a round with these updates."""
        ...

    def state(self) -> dict[str, Array]:
        """Optimizer state to checkpoint; the arrays are never modified in place."""
        ...

    def load_state(self, state: Mapping[str, Array]) -> None:
        """Restore what `state()` returned."""
        ...


def _check_same_model(global_weights: Weights, updates: UpdateSource) -> None:
    if updates.count == 0:
        raise InvalidArgumentError("no updates to aggregate: the round received none")
    layout = updates.layout()
    names = [t.name for t in layout]
    if set(global_weights) != set(names):
        raise InvalidArgumentError(
            f"updates have tensors {sorted(names)}, the global model has {sorted(global_weights)}"
        )
    for t in layout:
        shape = tuple(global_weights[t.name].shape)
        if shape != t.shape:
            raise InvalidArgumentError(
                f"updates' tensor {t.name!r} has shape {t.shape}, the global model's is {shape}"
            )


def _apply_delta(
    global_weights: Weights, delta: Weights, server_lr: float, reuse_delta: bool = False
) -> Weights:
    """w + server_lr * delta, in each tensor's dtype.

    ``reuse_delta=True`` writes the result into `delta`'s arrays where the
    dtypes allow (saving one model copy); only for a delta the caller owns.
    """
    new: Weights = {}
    for name, w in global_weights.items():
        d = delta[name]
        if reuse_delta and d.dtype == w.dtype and d.flags.writeable:
            if server_lr != 1.0:
                np.multiply(d, server_lr, out=d)
            new[name] = np.add(w, d, out=d)
            continue
        step = d if server_lr == 1.0 else server_lr * d
        new[name] = (w + step).astype(w.dtype, copy=False)
    return new


class _Moments:
    """Named optimizer buffers, one per model tensor, created at the first round."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.buffers: dict[str, dict[str, Array]] = {p: {} for p in prefixes}
        self.step = 0

    def ensure(self, global_weights: Weights, init: Mapping[str, Callable[[Array], Array]]) -> None:
        for prefix in self.prefixes:
            buf = self.buffers[prefix]
            if not buf:
                self.buffers[prefix] = {n: init[prefix](w) for n, w in global_weights.items()}
                continue
            if list(buf) != list(global_weights):
                raise InvalidArgumentError(
                    f"optimizer state {prefix!r} covers tensors {list(buf)}, the model has "
                    f"{list(global_weights)}"
                )
            for n, w in global_weights.items():
                if buf[n].shape != w.shape:
                    raise InvalidArgumentError(
                        f"optimizer state {prefix}/{n} has shape {buf[n].shape}, the model "
                        f"tensor has {w.shape}"
                    )

    def state(self) -> dict[str, Array]:
        out: dict[str, Array] = {"step": np.array(self.step, dtype=np.int64)}
        for prefix, buf in self.buffers.items():
            out.update({f"{prefix}/{n}": a for n, a in buf.items()})
        return out

    def load(self, state: Mapping[str, Array]) -> None:
        buffers: dict[str, dict[str, Array]] = {p: {} for p in self.prefixes}
        step = 0
        for key, value in state.items():
            if key == "step":
                step = int(np.asarray(value))
                if step < 0:
                    raise InvalidArgumentError(f"optimizer state step must be >= 0, got {step}")
                continue
            prefix, sep, name = key.partition("/")
            if not sep or prefix not in buffers or not name:
                raise InvalidArgumentError(
                    f"optimizer state key {key!r} is not 'step' or '<buffer>/<tensor>' with "
                    f"buffer in {list(self.prefixes)}"
                )
            buffers[prefix][name] = np.asarray(value)
        filled = [p for p in self.prefixes if buffers[p]]
        if filled and len(filled) != len(self.prefixes):
            missing = [p for p in self.prefixes if not buffers[p]]
            raise InvalidArgumentError(f"optimizer state lacks the buffers {missing}")
        self.buffers = buffers
        self.step = step


# ------------------------------------------------------------------ FedAvg family


class _DeltaRule:
    """Stateless rules of the form w + server_lr * combine(deltas)."""

    name: str = "delta-rule"
    needs_all_updates: bool = False
    # Whether the combined delta is a fresh array the update may be applied into.
    _fresh_delta: bool = False

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def configure_round(self, round: int) -> RoundConfig:
        return RoundConfig(update_kind="delta")

    def combine(self, updates: UpdateSource) -> Weights:
        raise NotImplementedError

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        _check_same_model(global_weights, updates)
        return _apply_delta(
            global_weights, self.combine(updates), self.server_lr, reuse_delta=self._fresh_delta
        )

    def state(self) -> dict[str, Array]:
        return {}

    def load_state(self, state: Mapping[str, Array]) -> None:
        if state:
            raise InvalidArgumentError(
                f"strategy {self.name!r} keeps no state, was given {sorted(state)}"
            )


class FedAvg(_DeltaRule):
    """McMahan et al. 2017: w + server_lr * weighted_mean(delta)."""

    name: str = "fedavg"

    def combine(self, updates: UpdateSource) -> Weights:
        return updates.mean()


class FedProx(FedAvg):
    """Li et al. 2020 ("Federated Optimization in Heterogeneous Networks"):
    FedAvg's aggregation; trainers add (mu / 2) * ||w - w_global||**2 to their loss."""

    name: str = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.proximal_mu = proximal_mu

    def configure_round(self, round: int) -> RoundConfig:
        return RoundConfig(update_kind="delta", proximal_mu=self.proximal_mu)


def _zeros(w: Array) -> Array:
    return np.zeros(w.shape, dtype=np.result_type(w.dtype, np.float32))


class _WithMoments:
    """Strategies whose state is their server optimizer's moments (sealed in checkpoints)."""

    _moments: _Moments

    def state(self) -> dict[str, Array]:
        return self._moments.state()

    def load_state(self, state: Mapping[str, Array]) -> None:
        self._moments.load(state)


class FedAvgM(_WithMoments):
    """FedAvg with server momentum (Hsu et al. 2019) on the pseudo-gradient -mean(delta)."""

    name: str = "fedavgm"
    needs_all_updates: bool = False

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self._moments = _Moments(("velocity",))

    def configure_round(self, round: int) -> RoundConfig:
        return RoundConfig(update_kind="delta")

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        _check_same_model(global_weights, updates)
        mean = updates.mean()
        self._moments.ensure(global_weights, {"velocity": _zeros})
        velocity = self._moments.buffers["velocity"]
        new: Weights = {}
        new_velocity: dict[str, Array] = {}
        for name, w in global_weights.items():
            new[name], new_velocity[name] = agg.sgd_momentum_step(
                w, -mean[name], velocity[name], self.server_lr, self.momentum
            )
        self._moments.buffers["velocity"] = new_velocity
        self._moments.step += 1
        return new


AdaptiveRule = Literal["adam", "yogi", "adagrad"]


class _FedAdaptive(_WithMoments):
    """Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021),
    Algorithm 2, on the pseudo-gradient -mean(delta); server_lr is its eta."""

    name: str = "fedadaptive"
    needs_all_updates: bool = False
    rule: AdaptiveRule = "adam"

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._moments = _Moments(("m", "v"))

    def configure_round(self, round: int) -> RoundConfig:
        return RoundConfig(update_kind="delta")

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        _check_same_model(global_weights, updates)
        mean = updates.mean()
        self._moments.ensure(
            global_weights,
            {"m": _zeros, "v": lambda w: agg.initial_second_moment(w, self.tau)},
        )
        ms, vs = self._moments.buffers["m"], self._moments.buffers["v"]
        new: Weights = {}
        new_m: dict[str, Array] = {}
        new_v: dict[str, Array] = {}
        for name, w in global_weights.items():
            grad = -mean[name]
            if self.rule == "adam":
                step = agg.adam_step(
                    w, grad, ms[name], vs[name], self.server_lr, self.beta1, self.beta2, self.tau
                )
            elif self.rule == "yogi":
                step = agg.yogi_step(
                    w, grad, ms[name], vs[name], self.server_lr, self.beta1, self.beta2, self.tau
                )
            else:
                step = agg.adagrad_step(
                    w, grad, ms[name], vs[name], self.server_lr, self.beta1, self.tau
                )
            new[name], new_m[name], new_v[name] = step
        self._moments.buffers = {"m": new_m, "v": new_v}
        self._moments.step += 1
        return new


class FedAdam(_FedAdaptive):
    """FedAdam: v' = beta2 * v + (1 - beta2) * g**2."""

    name: str = "fedadam"
    rule: AdaptiveRule = "adam"


class FedYogi(_FedAdaptive):
    """FedYogi: v' = v - (1 - beta2) * g**2 * sign(v - g**2)."""

    name: str = "fedyogi"
    rule: AdaptiveRule = "yogi"


class FedAdagrad(_FedAdaptive):
    """FedAdagrad: v' = v + g**2 (beta2 unused)."""

    name: str = "fedadagrad"
    rule: AdaptiveRule = "adagrad"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, beta2=0.0, tau=tau)


ServerOptimizer = Literal["sgd", "adam"]


class FedSGD(_WithMoments):
    """The parameter-server workflow: trainers send gradients; the server
    averages them (weighted by examples) and takes one optimizer step.

    Variables named in `non_trainable` (BatchNorm moving statistics) carry their
    new values, not gradients, in the update: their new global value is the
    weighted mean, and the optimizer does not step them."""

    name: str = "fedsgd"
    needs_all_updates: bool = False

    def __init__(
        self,
        optimizer: ServerOptimizer = "sgd",
        server_lr: float = 0.01,
        momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-7,
        non_trainable: Sequence[str] = (),
    ) -> None:
        self.non_trainable = frozenset(non_trainable)
        self.optimizer = optimizer
        self.server_lr = server_lr
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        prefixes = ("velocity",) if optimizer == "sgd" else ("m", "v")
        self._moments = _Moments(prefixes)

    def configure_round(self, round: int) -> RoundConfig:
        return RoundConfig(update_kind="gradient")

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        _check_same_model(global_weights, updates)
        grads = updates.mean()
        missing = sorted(self.non_trainable - set(global_weights))
        if missing:
            raise InvalidArgumentError(f"non-trainable variables {missing} are not in the model")
        new: Weights = {}
        if self.optimizer == "sgd":
            self._moments.ensure(global_weights, {"velocity": _zeros})
            velocity = self._moments.buffers["velocity"]
            new_velocity: dict[str, Array] = {}
            for name, w in global_weights.items():
                if name in self.non_trainable:
                    new[name] = grads[name].astype(w.dtype)
                    new_velocity[name] = velocity[name]
                    continue
                new[name], new_velocity[name] = agg.sgd_momentum_step(
                    w, grads[name], velocity[name], self.server_lr, self.momentum
                )
            self._moments.buffers["velocity"] = new_velocity
        else:
            self._moments.ensure(global_weights, {"m": _zeros, "v": _zeros})
            ms, vs = self._moments.buffers["m"], self._moments.buffers["v"]
            new_m: dict[str, Array] = {}
            new_v: dict[str, Array] = {}
            step = self._moments.step + 1
            for name, w in global_weights.items():
                if name in self.non_trainable:
                    new[name] = grads[name].astype(w.dtype)
                    new_m[name], new_v[name] = ms[name], vs[name]
                    continue
                new[name], new_m[name], new_v[name] = agg.bias_corrected_adam_step(
                    w,
                    grads[name],
                    ms[name],
                    vs[name],
                    step,
                    self.server_lr,
                    self.beta1,
                    self.beta2,
                    self.epsilon,
                )
            self._moments.buffers = {"m": new_m, "v": new_v}
        self._moments.step += 1
        return new


# ------------------------------------------------------------------ robust rules


class _Robust(_DeltaRule):
    """w + server_lr * robust_combination(deltas), one tensor at a time."""

    name: str = "robust"
    needs_all_updates: bool = True
    _fresh_delta: bool = True


class Median(_Robust):
    """Coordinate-wise median of the deltas (Yin et al. 2018)."""

    name: str = "median"

    def combine(self, updates: UpdateSource) -> Weights:
        return {
            t.name: agg.median_tensor(updates.stacked(t.name), overwrite=True)
            for t in updates.layout()
        }


class TrimmedMean(_Robust):
    """Coordinate-wise beta-trimmed mean of the deltas (Yin et al. 2018)."""

    name: str = "trimmed_mean"

    def __init__(self, beta: float = 0.1, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.beta = beta

    def combine(self, updates: UpdateSource) -> Weights:
        agg.trim_count(updates.count, self.beta)  # refuse before reading anything
        return {
            t.name: agg.trimmed_mean_tensor(updates.stacked(t.name), self.beta, overwrite=True)
            for t in updates.layout()
        }


class MultiKrum(_Robust):
    """Unweighted mean of the m deltas with the best Krum scores (Blanchard et
    al. 2017); m = 0 means n - f."""

    name: str = "multikrum"

    def __init__(self, f: int = 1, m: int = 0, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.f = f
        self.m = m

    def combine(self, updates: UpdateSource) -> Weights:
        n = updates.count
        agg.check_krum_count(n, self.f)  # refuse n <= 2f + 2 before reading anything
        layout = updates.layout()
        distances = np.zeros((n, n), dtype=np.float64)
        for t in layout:
            distances += agg.pairwise_sq_distances(updates.stacked(t.name))
        m = self.m if self.m > 0 else n - self.f
        selected = agg.krum_select(distances, self.f, m)
        logger.info("%s kept updates %s of %d (f=%d)", self.name, selected, n, self.f)
        combined: Weights = {}
        for t in layout:
            chosen = updates.stacked(t.name)[selected]
            combined[t.name] = np.asarray(np.mean(chosen, axis=0, dtype=np.float64), dtype=t.dtype)
        return combined


class Krum(MultiKrum):
    """The one delta with the best Krum score (Blanchard et al. 2017)."""

    name: str = "krum"

    def __init__(self, f: int = 1, server_lr: float = 1.0) -> None:
        super().__init__(f=f, m=1, server_lr=server_lr)


# ---------------------------------------------------------------------- factory


# Names, parameters, defaults and modes live in hfl_common.strategy_registry (the plan
# resolves them too); this maps each name to the class that runs it.
_CLASSES: dict[str, Callable[..., Strategy]] = {
    "fedsgd": FedSGD,
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multikrum": MultiKrum,
}
if set(_CLASSES) != set(STRATEGY_NAMES):  # pragma: no cover (a programming error)
    raise ImportError(
        f"strategy classes {sorted(_CLASSES)} do not match the registry {sorted(STRATEGY_NAMES)}"
    )


def make_strategy(
    name: str, params: Mapping[str, ParamValue], non_trainable: Sequence[str] = ()
) -> Strategy:
    """Build strategy `name` (one of STRATEGY_NAMES) from its parameters.

    `non_trainable` names the model's non-trainable variables (the plan's
    model.non_trainable); only strategies fed gradients (FedSGD) treat them apart.
    """
    resolved = resolve_params(name, params)
    factory = _CLASSES[name]
    extra: dict[str, Sequence[str]] = (
        {"non_trainable": tuple(non_trainable)} if name == "fedsgd" else {}
    )
    strategy = factory(**resolved, **extra)
    logger.debug("strategy %s with %s", name, resolved)
    return strategy
