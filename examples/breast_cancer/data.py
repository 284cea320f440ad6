"""One hospital's records: a CSV table in its own data directory.

hfl's table loader checks the table against the plan (every column of
[data.params] features present and numeric, the label column present, labels
among [data.params] classes) and holds out a stratified share for the
federation's per-round evaluation. The measurements are log-transformed (a
fixed transform, the same at every hospital: the areas run to thousands, the
smoothness values to tenths).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hfl_trainer.loaders import table


def load(
    data_dir: Path | None,
    *,
    label: str,
    features: Sequence[str],
    classes: Sequence[str],
    eval_fraction: float = 0.2,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    if data_dir is None:
        raise ValueError(
            "each hospital trains on its own table: give the trainer --data-dir "
            "(hfl run --party-data DIR, once per hospital)"
        )
    data = table(
        data_dir,
        label=label,
        features=features,
        classes=classes,
        eval_fraction=eval_fraction,
        num_classes=num_classes,
        input_shape=input_shape,
    )
    return (np.log1p(data.x_train), data.y_train), (np.log1p(data.x_test), data.y_test)
