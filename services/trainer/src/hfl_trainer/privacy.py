"""Client-side differential privacy of a trainer's update: clipping, Gaussian noise, accounting.

What this gives, precisely. A trainer that releases
``add_gaussian_noise(clip_update(u, C)[0], z, C, rng)`` each round applies the
Gaussian mechanism (Dwork & Roth 2014, appendix A) to its update with L2
sensitivity ``C``: changing the trainer's whole local dataset changes its
clipped update by at most ``C`` in the add/remove sense used by DP-FedAvg
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models": a user's contribution to the sum is present or absent). That is
**user-level** (whole-client) DP for **one round's release**, from the
trainer's point of view: it holds whatever the aggregator does with the
update, and needs no trust in the aggregator.

Caveats, stated plainly:

- If the threat model compares two *different* datasets of the same client
  (replace-one rather than add/remove), two clipped updates can be ``2C``
  apart: pass ``z / 2`` to :func:`gaussian_epsilon` for that notion.
- Composition over rounds is accounted by :func:`gaussian_epsilon`, a Rényi-DP
  accountant for the plain (non-subsampled) Gaussian mechanism: it assumes
  the client takes part in every counted round and claims no amplification
  by client sampling. Nothing here does per-example DP (DP-SGD).
- The noise comes from numpy's PCG64, a statistical (not cryptographic)
  generator, in floating point; Mironov 2012 ("On significance of the least
  significant bits for differential privacy") shows naive floating-point
  noise can leak. Seed the generator from the operating system
  (``np.random.default_rng()``) and treat the guarantee as the textbook one,
  not a certified implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from hfl_common.errors import InvalidArgumentError

# Rényi orders searched by the accountant (the usual grid of Abadi et al. 2016
# and TensorFlow Privacy, extended to large orders for small epsilons).
DEFAULT_RDP_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    12.0,
    16.0,
    20.0,
    24.0,
    32.0,
    48.0,
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
)


def global_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of ``update`` taken together, computed in float64."""
    total = 0.0
    for value in update.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(
    update: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` so its global L2 norm is at most ``clip_norm``.

    Returns ``(clipped, original_norm)``. An update already within the bound is
    returned unchanged (copied); otherwise every tensor is multiplied by
    ``clip_norm / norm`` (one factor for the whole update, so its direction is
    kept). Dtypes are preserved.
    """
    if not clip_norm > 0.0 or not math.isfinite(clip_norm):
        raise InvalidArgumentError(f"clip_norm {clip_norm} must be positive and finite")
    norm = global_norm(update)
    if not math.isfinite(norm):
        raise InvalidArgumentError(f"update has a non-finite L2 norm ({norm}); refusing to clip it")
    if norm <= clip_norm:
        return {name: np.array(value, copy=True) for name, value in update.items()}, norm
    # Shrink the factor by a few ulps so rounding to float32 cannot land above clip_norm.
    scale = (clip_norm / norm) * (1.0 - 4 * np.finfo(np.float32).eps)
    clipped = {
        name: (np.asarray(value, dtype=np.float64) * scale).astype(np.asarray(value).dtype)
        for name, value in update.items()
    }
    return clipped, norm


def add_gaussian_noise(
    update: Mapping[str, np.ndarray],
    noise_multiplier: float,
    clip_norm: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Add N(0, (noise_multiplier * clip_norm)^2) independently to every coordinate.

    ``update`` must already be clipped to ``clip_norm`` (see :func:`clip_update`)
    for the guarantee in the module docstring to hold.
    """
    if noise_multiplier < 0.0 or not math.isfinite(noise_multiplier):
        raise InvalidArgumentError(
            f"noise_multiplier {noise_multiplier} must be finite and non-negative"
        )
    if not clip_norm > 0.0 or not math.isfinite(clip_norm):
        raise InvalidArgumentError(f"clip_norm {clip_norm} must be positive and finite")
    std = noise_multiplier * clip_norm
    noisy: dict[str, np.ndarray] = {}
    for name, value in update.items():
        array = np.asarray(value)
        noise = rng.normal(0.0, std, size=array.shape)
        noisy[name] = (array.astype(np.float64) + noise).astype(array.dtype)
    return noisy


def gaussian_rdp(noise_multiplier: float, order: float) -> float:
    """RDP of the Gaussian mechanism at ``order``: alpha / (2 z^2).

    Mironov 2017, "Rényi Differential Privacy", Table II (Gaussian mechanism
    with sensitivity 1 and noise std z).
    """
    return order / (2.0 * noise_multiplier**2)


def gaussian_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    orders: Iterable[float] = DEFAULT_RDP_ORDERS,
) -> float:
    """(epsilon, delta)-DP after ``rounds`` releases of the Gaussian mechanism.

    RDP composes additively (Mironov 2017, Proposition 1): T rounds give
    T * alpha / (2 z^2); the conversion epsilon = RDP + log(1/delta) / (alpha - 1)
    is Mironov 2017, Proposition 3, minimised over ``orders``. No subsampling
    amplification is claimed.
    """
    if not noise_multiplier > 0.0 or not math.isfinite(noise_multiplier):
        raise InvalidArgumentError(
            f"noise_multiplier {noise_multiplier} must be positive for a finite epsilon"
        )
    if rounds < 0:
        raise InvalidArgumentError(f"rounds is {rounds}; it must be non-negative")
    if not 0.0 < delta < 1.0:
        raise InvalidArgumentError(f"delta {delta} must lie strictly between 0 and 1")
    if rounds == 0:
        return 0.0
    candidates = [
        rounds * gaussian_rdp(noise_multiplier, alpha) + math.log(1.0 / delta) / (alpha - 1.0)
        for alpha in orders
        if alpha > 1.0
    ]
    if not candidates:
        raise InvalidArgumentError("the RDP accountant needs at least one order above 1")
    return min(candidates)
