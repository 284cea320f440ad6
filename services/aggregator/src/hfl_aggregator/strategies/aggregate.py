"""Aggregation rules and server optimizers as pure numpy functions.

Two levels, after Flower's ``aggregate.py``:

- Tensor level: one tensor of every update stacked along axis 0, shape
  ``(n, *shape)``. This is what a `SpillStore` hands out one tensor at a time,
  so robust rules run in n x (largest tensor) memory, not n x (model).
- Model level: a sequence of updates (``Weights``), for tests and small models.

Robust rules (median, trimmed mean, Krum) are unweighted on purpose: the
number of examples is a trainer's own unverifiable claim, and weighting by it
would let one Byzantine trainer outvote everyone.

Server optimizers take a gradient (or a pseudo-gradient, ``-mean(delta)``)
and return the new parameter with the new optimizer state; they never modify
their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hfl_aggregator.accumulate import Array, Weights, check_matches_layout, model_layout
from hfl_common.errors import InvalidArgumentError

# ---------------------------------------------------------------- tensor level


def _check_stack(stack: Array, what: str) -> int:
    if stack.ndim < 1 or stack.shape[0] == 0:
        raise InvalidArgumentError(f"{what} needs at least one update, got none")
    return int(stack.shape[0])


def weighted_mean_tensor(stack: Array, weights: Sequence[float]) -> Array:
    """Sum_i w_i x_i / sum_i w_i over axis 0, in float64, returned in the stack's dtype."""
    n = _check_stack(stack, "a weighted mean")
    if len(weights) != n:
        raise InvalidArgumentError(
            f"a weighted mean of {n} updates was given {len(weights)} weights"
        )
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise InvalidArgumentError(f"update weights must be finite and > 0, got {list(weights)}")
    total = np.tensordot(w, stack.astype(np.float64, copy=False), axes=1) / w.sum()
    return np.asarray(total, dtype=stack.dtype)


def median_tensor(stack: Array, overwrite: bool = False) -> Array:
    """Coordinate-wise median over axis 0 (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates"). For an even
    count, the mean of the two middle values. ``overwrite=True`` lets it
    partition `stack` in place instead of copying it.
    """
    _check_stack(stack, "a median")
    return np.asarray(np.median(stack, axis=0, overwrite_input=overwrite), dtype=stack.dtype)


def trim_count(n: int, beta: float) -> int:
    """Updates dropped from each side by a beta-trimmed mean of n updates: floor(beta * n)."""
    if not 0.0 <= beta < 0.5:
        raise InvalidArgumentError(f"trimmed mean fraction beta must be in [0, 0.5), got {beta}")
    # The epsilon keeps e.g. 0.3 * 10 = 2.9999... from flooring to 2.
    k = math.floor(beta * n + 1e-9)
    if n - 2 * k < 1:
        raise InvalidArgumentError(
            f"a trimmed mean with beta {beta} drops {k} updates per side and keeps none of {n}"
        )
    return k


def trimmed_mean_tensor(stack: Array, beta: float, overwrite: bool = False) -> Array:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): per coordinate, drop
    the floor(beta * n) largest and smallest values, average the rest.
    ``overwrite=True`` sorts `stack` in place instead of copying it.
    """
    n = _check_stack(stack, "a trimmed mean")
    k = trim_count(n, beta)
    ordered = stack if overwrite else stack.copy()
    ordered.sort(axis=0)
    kept = ordered[k : n - k]
    return np.asarray(np.mean(kept, axis=0, dtype=np.float64), dtype=stack.dtype)


def pairwise_sq_distances(stack: Array) -> Array:
    """Squared Euclidean distances between the n updates of `stack`: an (n, n) float64 matrix.

    Distances of a whole model are the sum of this over its tensors.
    """
    n = _check_stack(stack, "a distance matrix")
    flat = stack.reshape(n, -1)
    out = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = flat[i].astype(np.float64) - flat[j]
            out[i, j] = out[j, i] = float(np.dot(diff, diff))
    return out


def check_krum_count(n: int, f: int) -> None:
    """Raise InvalidArgumentError unless Krum with f Byzantine updates can run on n."""
    if f < 0:
        raise InvalidArgumentError(f"Krum's number of Byzantine updates f must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise InvalidArgumentError(f"Krum needs more than 2f+2 = {2 * f + 2} updates, got {n}")


def krum_scores(sq_distances: Array, f: int) -> Array:
    """Krum scores (Blanchard et al. 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent"): for each update, the sum of its
    squared distances to its n - f - 2 nearest other updates.
    """
    n = int(sq_distances.shape[0])
    if sq_distances.shape != (n, n):
        raise InvalidArgumentError(f"distance matrix must be square, got {sq_distances.shape}")
    check_krum_count(n, f)
    k = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(sq_distances[i], i)
        scores[i] = float(np.sort(others)[:k].sum())
    return scores


def krum_select(sq_distances: Array, f: int, m: int) -> list[int]:
    """Indices of the m updates with the lowest Krum scores, best first (ties: lower index).

    m = 1 is Krum; m > 1 is Multi-Krum (Blanchard et al. 2017),
    which needs m <= n - f.
    """
    n = int(sq_distances.shape[0])
    scores = krum_scores(sq_distances, f)
    if not 1 <= m <= n - f:
        raise InvalidArgumentError(
            f"Multi-Krum selects m in [1, n - f] = [1, {n - f}] updates, got m = {m}"
        )
    order = np.argsort(scores, kind="stable")
    return [int(i) for i in order[:m]]


# ----------------------------------------------------------------- model level


def _stack_updates(updates: Sequence[Weights], what: str) -> dict[str, Array]:
    if not updates:
        raise InvalidArgumentError(f"{what} needs at least one update, got none")
    layout = model_layout(updates[0])
    for update in updates[1:]:
        check_matches_layout(update, layout)
    return {t.name: np.stack([u[t.name] for u in updates]) for t in layout}


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> Weights:
    """FedAvg's combination: the mean of the updates weighted by num_examples
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
    from Decentralized Data")."""
    stacks = _stack_updates(updates, "a weighted mean")
    return {name: weighted_mean_tensor(s, weights) for name, s in stacks.items()}


def median(updates: Sequence[Weights]) -> Weights:
    """Coordinate-wise median of the updates."""
    stacks = _stack_updates(updates, "a median")
    return {name: median_tensor(s, overwrite=True) for name, s in stacks.items()}


def trimmed_mean(updates: Sequence[Weights], beta: float) -> Weights:
    """Coordinate-wise beta-trimmed mean of the updates."""
    stacks = _stack_updates(updates, "a trimmed mean")
    return {name: trimmed_mean_tensor(s, beta, overwrite=True) for name, s in stacks.items()}


def model_sq_distances(updates: Sequence[Weights]) -> Array:
    """Squared distances between whole updates, summed over their tensors."""
    stacks = _stack_updates(updates, "a distance matrix")
    n = len(updates)
    total = np.zeros((n, n), dtype=np.float64)
    for s in stacks.values():
        total += pairwise_sq_distances(s)
    return total


def multi_krum(updates: Sequence[Weights], f: int, m: int) -> Weights:
    """Unweighted mean of the m updates Krum scores best (m = 1: Krum itself)."""
    selected = krum_select(model_sq_distances(updates), f, m)
    return {
        name: np.asarray(np.mean(s[selected], axis=0, dtype=np.float64), dtype=s.dtype)
        for name, s in _stack_updates(updates, "Krum").items()
    }


def krum(updates: Sequence[Weights], f: int) -> Weights:
    """The single update with the lowest Krum score."""
    return multi_krum(updates, f, 1)


# ----------------------------------------------------------- server optimizers
#
# Gradient convention: `grad` is what descent subtracts. For the FedAvg family
# it is the pseudo-gradient -mean(delta) of Reddi et al. 2021 ("Adaptive
# Federated Optimization", ICLR 2021, Algorithm 2, which writes the same steps
# with Delta_t = mean(delta) = -grad and adds instead of subtracting).


def sgd_momentum_step(
    param: Array, grad: Array, velocity: Array, lr: float, momentum: float
) -> tuple[Array, Array]:
    """Heavy-ball SGD: v' = momentum * v + g, x' = x - lr * v'.

    FedAvgM's server step (Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification");
    with momentum 0 and lr 1 on -mean(delta) it is plain FedAvg.
    Returns (new param, new velocity).
    """
    v = momentum * velocity + grad
    return (param - lr * v).astype(param.dtype, copy=False), v.astype(velocity.dtype, copy=False)


def _adaptive_update(
    param: Array, m: Array, v: Array, lr: float, tau: float
) -> tuple[Array, Array, Array]:
    # Reddi et al. 2021, Algorithm 2: x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau).
    new_param = param - lr * m / (np.sqrt(v) + tau)
    return new_param.astype(param.dtype, copy=False), m, v


def _first_moment(grad: Array, m: Array, beta1: float) -> Array:
    # Reddi et al. 2021, Algorithm 2: m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t.
    return (beta1 * m + (1.0 - beta1) * grad).astype(m.dtype, copy=False)


def initial_second_moment(param: Array, tau: float) -> Array:
    """v_{-1} = tau**2: Reddi et al. 2021, Algorithm 2 initializes v_{-1} >= tau**2."""
    return np.full(param.shape, tau * tau, dtype=np.result_type(param.dtype, np.float32))


def adam_step(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Array, Array, Array]:
    """FedAdam's server step (Reddi et al. 2021, Algorithm 2, no bias correction):
    v' = beta2 * v + (1 - beta2) * g**2. Returns (new param, new m, new v)."""
    m_new = _first_moment(grad, m, beta1)
    v_new = (beta2 * v + (1.0 - beta2) * np.square(grad)).astype(v.dtype, copy=False)
    return _adaptive_update(param, m_new, v_new, lr, tau)


def yogi_step(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Array, Array, Array]:
    """FedYogi's server step (Reddi et al. 2021, Algorithm 2):
    v' = v - (1 - beta2) * g**2 * sign(v - g**2). Returns (new param, new m, new v)."""
    m_new = _first_moment(grad, m, beta1)
    g2 = np.square(grad)
    v_new = (v - (1.0 - beta2) * g2 * np.sign(v - g2)).astype(v.dtype, copy=False)
    return _adaptive_update(param, m_new, v_new, lr, tau)


def adagrad_step(
    param: Array, grad: Array, m: Array, v: Array, lr: float, beta1: float, tau: float
) -> tuple[Array, Array, Array]:
    """FedAdagrad's server step (Reddi et al. 2021, Algorithm 2): v' = v + g**2.
    Returns (new param, new m, new v)."""
    m_new = _first_moment(grad, m, beta1)
    v_new = (v + np.square(grad)).astype(v.dtype, copy=False)
    return _adaptive_update(param, m_new, v_new, lr, tau)


def bias_corrected_adam_step(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    epsilon: float,
) -> tuple[Array, Array, Array]:
    """Adam as in Kingma and Ba 2015 ("Adam: A Method for Stochastic
    Optimization", Algorithm 1), for FedSGD's per-step gradients: moments start
    at 0 and are bias-corrected; `step` counts from 1.
    Returns (new param, new m, new v)."""
    if step < 1:
        raise InvalidArgumentError(f"Adam's step counts from 1, got {step}")
    m_new = _first_moment(grad, m, beta1)
    v_new = (beta2 * v + (1.0 - beta2) * np.square(grad)).astype(v.dtype, copy=False)
    m_hat = m_new / (1.0 - beta1**step)
    v_hat = v_new / (1.0 - beta2**step)
    new_param = param - lr * m_hat / (np.sqrt(v_hat) + epsilon)
    return new_param.astype(param.dtype, copy=False), m_new, v_new
