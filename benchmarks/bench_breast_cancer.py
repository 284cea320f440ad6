"""The value of federation on the breast-cancer example: alone, federated, pooled.

Three "hospitals" (examples/breast_cancer/make_hospitals.py: 220, 150 and 85
patients with 85%, 54% and 20% benign cases) and 114 held-out patients no
hospital sees. For each seed, on the same held-out patients:

- **alone**: each hospital trains the project's model on its own table only,
  for as many epochs as a federation trainer runs in all (rounds x local epochs);
- **federation**: `hfl run --project examples/breast_cancer --party-data ...`, the
  whole system as processes (simulated SGX, mutual RA-TLS), and the final model
  the first hospital takes home (model.keras) evaluated on the held-out patients;
- **pooled**: the three tables pooled in one place and trained the same way
  (the upper bound a federation tries to reach without pooling).

The local training is hfl's own (hfl_trainer.training.LocalTrainer, the same
code a trainer runs) with the project's model and data functions and the
plan's optimizer, batch size and learning rate. Writes a JSON of every number
and a PNG:

    .venv/bin/python benchmarks/bench_breast_cancer.py              # 3 seeds, ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_breast_cancer.py --seeds 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from hfl_common.config import load_plan
from hfl_trainer import project as project_lib
from hfl_trainer.data import Dataset
from hfl_trainer.export import load_exported
from hfl_trainer.models import get_weights
from hfl_trainer.training import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "examples" / "breast_cancer"
RESULTS = ROOT / "benchmarks" / "results" / "breast_cancer.json"
FIGURE = ROOT / "docs" / "images" / "breast_cancer.png"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")


def _pooled(datasets: list[Dataset]) -> Dataset:
    first = datasets[0]
    return Dataset(
        x_train=np.concatenate([d.x_train for d in datasets]),
        y_train=np.concatenate([d.y_train for d in datasets]),
        x_test=np.concatenate([d.x_test for d in datasets]),
        y_test=np.concatenate([d.y_test for d in datasets]),
        num_classes=first.num_classes,
        input_shape=first.input_shape,
        name="pooled",
    )


def _on_held_out(train: Dataset, held_out: Dataset) -> Dataset:
    """Train on all of a hospital's records (its own eval share too); test on held-out."""
    return Dataset(
        x_train=np.concatenate([train.x_train, train.x_test]),
        y_train=np.concatenate([train.y_train, train.y_test]),
        x_test=held_out.x_test,
        y_test=held_out.y_test,
        num_classes=train.num_classes,
        input_shape=train.input_shape,
        name=train.name,
    )


def train_locally(plan_path: Path, data: Dataset, seed: int) -> dict[str, float]:
    """The plan's model trained on `data` alone, for rounds x local epochs; held-out scores."""
    plan = load_plan(plan_path)
    model = project_lib.build(plan.model, plan.seed)
    initial = get_weights(model)
    trainer = LocalTrainer(
        model,
        data,
        plan.training.batch_size,
        plan.training.learning_rate,
        optimizer="adam" if plan.training.optimizer == "adam" else "sgd",
        seed=seed,
    )
    result = trainer.train_delta(initial, epochs=plan.rounds * plan.training.local_epochs)
    final = {k: initial[k] + result.delta[k] for k in initial}
    ev = trainer.evaluate(final)
    return {"accuracy": ev.accuracy, "loss": ev.loss, "train_examples": trainer.num_examples}


def federate(copy: Path, dirs: dict[str, Path], held_out: Dataset, workdir: Path) -> dict[str, Any]:
    args = [sys.executable, "-m", "hfl_cli.main", "run", "--project", str(copy), "--no-plot"]
    for name in HOSPITALS:
        args += ["--party-data", str(dirs[name])]
    args += ["--workdir", str(workdir)]
    started = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise SystemExit(f"hfl run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    match = re.search(r"final test accuracy ([0-9.]+)", out.stdout)
    model = load_exported(workdir / "models" / "trainer-1")
    logits = np.asarray(model.predict(held_out.x_test, verbose=0), dtype=np.float64)
    y = held_out.y_test
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    provenance = json.loads((workdir / "models" / "trainer-1" / "provenance.json").read_text())
    return {
        "accuracy": float((logits.argmax(axis=1) == y).mean()),
        "loss": float(-log_probs[np.arange(len(y)), y].mean()),
        "federated_eval_accuracy": float(match.group(1)) if match else None,
        "seconds": time.monotonic() - started,
        "weights_sha256": provenance["weights_sha256"],
    }


def run_seed(seed: int, base: Path) -> dict[str, Any]:
    # The example project's own script (main() made the project importable).
    write = importlib.import_module("breast_cancer.make_hospitals").write

    # A copy of the project whose plan differs only in [federation] seed (the code is
    # the same, so this process keeps importing the original).
    copy = base / f"seed{seed}" / "breast_cancer"
    shutil.copytree(PROJECT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    plan_text = (copy / "plan.toml").read_text()
    (copy / "plan.toml").write_text(re.sub(r"(?m)^seed = \d+$", f"seed = {seed}", plan_text))
    dirs = write(base / f"seed{seed}" / "data", seed=0)
    workdir = base / f"seed{seed}" / "run"
    held_out = _held_out(copy, dirs["held_out"])
    federation = federate(copy, dirs, held_out, workdir)
    plan = load_plan(workdir / "plan.toml")  # the plan the federation ran, weights included
    hospitals = {name: project_lib.load_data(plan, dirs[name]) for name in HOSPITALS}
    alone = {
        name: train_locally(workdir / "plan.toml", _on_held_out(data, held_out), seed)
        for name, data in hospitals.items()
    }
    pooled = train_locally(
        workdir / "plan.toml", _on_held_out(_pooled(list(hospitals.values())), held_out), seed
    )
    return {"seed": seed, "alone": alone, "federation": federation, "pooled": pooled}


def _held_out(project: Path, directory: Path) -> Dataset:
    """The held-out patients through the project's data function, all as the test split."""
    import tomllib

    raw = tomllib.loads((project / "plan.toml").read_text())
    held = project_lib.load_entry_data(
        raw["data"]["entry"],
        raw["data"].get("params", {}),
        directory,
        input_shape=tuple(raw["model"]["input_shape"]),
        num_classes=int(raw["model"]["num_classes"]),
    )
    return Dataset(
        x_train=held.x_train[:1],
        y_train=held.y_train[:1],
        x_test=np.concatenate([held.x_train, held.x_test]),
        y_test=np.concatenate([held.y_train, held.y_test]),
        num_classes=held.num_classes,
        input_shape=held.input_shape,
        name="held_out",
    )


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    rows: dict[str, list[float]] = {f"{h} alone": [] for h in HOSPITALS}
    rows["federation (hfl run)"] = []
    rows["pooled (upper bound)"] = []
    for r in runs:
        for h in HOSPITALS:
            rows[f"{h} alone"].append(r["alone"][h]["accuracy"])
        rows["federation (hfl run)"].append(r["federation"]["accuracy"])
        rows["pooled (upper bound)"].append(r["pooled"]["accuracy"])
    return {
        k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": len(v)}
        for k, v in rows.items()
    }


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[n]["mean"] for n in names]
    stds = [summary[n]["std"] for n in names]
    colors = ["tab:gray"] * len(HOSPITALS) + ["tab:green", "tab:blue"]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=4)
    for bar, mean in zip(bars, means, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, mean + 0.012, f"{mean:.3f}", ha="center")
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("accuracy on 114 held-out patients")
    ax.set_title("Breast cancer: each hospital alone, the federation, pooled data")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="model seeds 0..N-1 (default 3)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--figure", type=Path, default=FIGURE)
    ns = p.parse_args()
    project_lib.use_project(PROJECT)
    with tempfile.TemporaryDirectory(prefix="hfl-breast-cancer-") as tmp:
        runs = []
        for seed in range(ns.seeds):
            runs.append(run_seed(seed, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs)
    ns.results.parent.mkdir(parents=True, exist_ok=True)
    ns.results.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    plot(summary, ns.figure)
    print("\n| model | accuracy on the held-out patients (mean ± std) |\n| --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['mean']:.3f} ± {s['std']:.3f} |")
    print(f"\nwrote {ns.results} and {ns.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
