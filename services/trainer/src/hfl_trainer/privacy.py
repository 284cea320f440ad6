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
  apart: pass ``z / 2`` to :func:`local_epsilon` for that notion.
- Composition over rounds is accounted by :func:`local_epsilon` with Google's
  dp-accounting (RDP and PLD, the tighter reported): one Gaussian mechanism
  per round the trainer took part in. No amplification by sampling is claimed:
  the aggregator sees which trainers sent an update. Nothing here does
  per-example DP (DP-SGD). Central DP (noise added once, to the sum, in the
  aggregator's enclave) is in hfl_aggregator.privacy.
- The noise comes from numpy's PCG64, a statistical (not cryptographic)
  generator, in floating point; Mironov 2012 ("On significance of the least
  significant bits for differential privacy") shows naive floating-point
  noise can leak. Seed the generator from the operating system
  (``np.random.default_rng()``) and treat the guarantee as the textbook one,
  not a certified implementation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from hfl_common.errors import InvalidArgumentError

# PLD discretisation: pessimistic, so an upper bound; 1e-3 is ten times faster than the
# default 1e-4 for the same epsilon to about 1e-6 relative.
_PLD_DISCRETIZATION = 1e-3


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


@dataclass(frozen=True)
class LocalEpsilon:
    """epsilon at delta of a trainer's own releases: the smaller of the RDP and PLD bounds."""

    epsilon: float
    delta: float
    rdp: float
    pld: float
    releases: int


def local_epsilon(noise_multiplier: float, releases: int, delta: float) -> LocalEpsilon:
    """(epsilon, delta)-DP of ``releases`` clipped, noised updates of one trainer.

    The event is dp-accounting's ``SelfComposedDpEvent(GaussianDpEvent(z), releases)``
    under add-or-remove-one (the trainer's whole contribution present or absent),
    evaluated by both the RDP and the PLD accountant; both are upper bounds, the
    smaller is ``epsilon``.
    """
    if not noise_multiplier > 0.0 or not math.isfinite(noise_multiplier):
        raise InvalidArgumentError(
            f"noise_multiplier {noise_multiplier} must be positive for a finite epsilon"
        )
    if releases < 0:
        raise InvalidArgumentError(f"releases is {releases}; it must be non-negative")
    if not 0.0 < delta < 1.0:
        raise InvalidArgumentError(f"delta {delta} must lie strictly between 0 and 1")
    if releases == 0:
        return LocalEpsilon(0.0, delta, 0.0, 0.0, 0)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), releases
    )
    rdp_accountant = rdp.RdpAccountant()
    rdp_accountant.compose(event)
    eps_rdp = float(rdp_accountant.get_epsilon(delta))
    pld_accountant = pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    pld_accountant.compose(event)
    eps_pld = float(pld_accountant.get_epsilon(delta))
    return LocalEpsilon(min(eps_rdp, eps_pld), delta, eps_rdp, eps_pld, releases)
