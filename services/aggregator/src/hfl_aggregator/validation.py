"""Value checks of a decoded update, in one bounded pass over each tensor.

`update_norm` replaces the per-tensor `np.isfinite(arr).all()` plus
`np.dot(arr.ravel().astype(np.float64), arr.ravel())` of the round engine's
validate_values: that made a float64 copy of every tensor (twice the tensor's memory,
the whole update at once for concurrent uploads), a boolean array of its size, and a
float64 dot that let OpenBLAS start its threads in every concurrent upload handler.

Here each float tensor is read in blocks of BLOCK_ELEMENTS: the block's squares are
summed in float64 (the same precision as before), so the temporary memory is one block
(8 MB) whatever the model. A non-finite value makes the sum non-finite, so the NaN/inf
check costs nothing extra; only then is the tensor scanned again to count them (a float64
value above ~1e154 also overflows its square, so a finite-but-huge tensor is not called
NaN: its norm is reported as infinite and the norm bound refuses it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_common.errors import InvalidArgumentError

BLOCK_ELEMENTS = 1 << 20


def _sum_of_squares(flat: npt.NDArray[Any]) -> float:
    total = 0.0
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        block = flat[start : start + BLOCK_ELEMENTS].astype(np.float64)
        total += float(np.einsum("i,i->", block, block))
    return total


def update_norm(arrays: Mapping[str, npt.NDArray[Any]], what: str = "") -> float:
    """The L2 norm of all float tensors together; InvalidArgumentError (reason "nan")
    naming the first tensor that holds a NaN or an infinity (`what` names the whole:
    "update", "aggregate", ...)."""
    prefix = f"{what} " if what else ""
    total = 0.0
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            continue
        flat = arr.reshape(-1)
        part = _sum_of_squares(flat)
        if not math.isfinite(part):
            bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
            if bad:
                raise InvalidArgumentError(
                    f"{prefix}tensor {name!r} contains {bad} NaN or infinite values", "nan"
                )
        total += part
    return math.sqrt(total)


def difference_norm(
    new: Mapping[str, npt.NDArray[Any]], old: Mapping[str, npt.NDArray[Any]], what: str = ""
) -> float:
    """The L2 norm of `new - old` over the float tensors of `new`, a block at a time in
    float64: no model-sized difference is made (before, `check_aggregate` built the whole
    float64 difference, twice the model, at the peak of the round). InvalidArgumentError
    (reason "nan") when the difference of a tensor is not finite."""
    prefix = f"{what} " if what else ""
    total = 0.0
    for name, arr in new.items():
        if arr.dtype.kind != "f":
            continue
        a = arr.reshape(-1)
        b = np.asarray(old[name]).reshape(-1)
        part = 0.0
        for start in range(0, a.size, BLOCK_ELEMENTS):
            block = a[start : start + BLOCK_ELEMENTS].astype(np.float64)
            block -= b[start : start + BLOCK_ELEMENTS]
            part += float(np.einsum("i,i->", block, block))
        if not math.isfinite(part):
            raise InvalidArgumentError(
                f"{prefix}tensor {name!r} is not finite (NaN or infinite values)", "nan"
            )
        total += part
    return math.sqrt(total)
