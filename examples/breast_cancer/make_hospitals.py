"""Write the example's hospital tables from scikit-learn's bundled breast-cancer data.

    python examples/breast_cancer/make_hospitals.py DIR

writes DIR/hospital_a/records.csv, DIR/hospital_b/records.csv,
DIR/hospital_c/records.csv and DIR/held_out/records.csv. First 20% of the 569
patients (stratified, seed 0) are held out: no hospital sees them, and every
model of the comparison is measured on them. The other 455 go to three
hospitals of different sizes and case mixes (label skew):

    hospital_a  220 patients, 85% benign   (a general hospital's screening)
    hospital_b  150 patients, the rest      (a university hospital)
    hospital_c   85 patients, 80% malignant (an oncology referral centre)

Nothing is downloaded: the table ships with scikit-learn (UCI, Wolberg et al. 1995).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

HOSPITALS = {"hospital_a": (220, 0.85), "hospital_c": (85, 0.20)}  # size, benign share
REST = "hospital_b"
HELD_OUT = "held_out"
HELD_OUT_FRACTION = 0.2
LABEL = "diagnosis"


def column_names() -> list[str]:
    names = load_breast_cancer().feature_names
    return [str(n).replace(" ", "_") for n in names]


def split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (features, labels)} of the hospitals and the held-out patients."""
    bunch = load_breast_cancer()
    x, y = np.asarray(bunch.data), np.asarray(bunch.target)
    x_pool, x_out, y_pool, y_out = train_test_split(
        x, y, test_size=HELD_OUT_FRACTION, stratify=y, random_state=seed
    )
    rng = np.random.default_rng(seed)
    benign = list(rng.permutation(np.flatnonzero(y_pool == 1)))
    malignant = list(rng.permutation(np.flatnonzero(y_pool == 0)))
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (size, benign_share) in HOSPITALS.items():
        n_benign = round(size * benign_share)
        take = [benign.pop() for _ in range(n_benign)]
        take += [malignant.pop() for _ in range(size - n_benign)]
        index = np.sort(np.asarray(take))
        parts[name] = (x_pool[index], y_pool[index])
    rest = np.sort(np.asarray(benign + malignant))
    parts[REST] = (x_pool[rest], y_pool[rest])
    parts[HELD_OUT] = (x_out, y_out)
    return dict(sorted(parts.items()))


def write(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Write one records.csv per hospital (and the held-out patients); return the dirs."""
    names = column_names()
    classes = [str(c) for c in load_breast_cancer().target_names]  # malignant, benign
    out: dict[str, Path] = {}
    for name, (x, y) in split(seed).items():
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "records.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*names, LABEL])
            for row, label in zip(x, y, strict=True):
                writer.writerow([*(f"{v:.6g}" for v in row), classes[int(label)]])
        out[name] = folder
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_hospitals.py DIR")
    for name, folder in write(Path(sys.argv[1])).items():
        print(f"{name}: {folder / 'records.csv'}")
