"""Test accuracy against epsilon: no DP, client-side DP and central DP.

Every run is the same federation: `--parties` simulated parties, each a real
`LocalTrainer` (TensorFlow, small_cnn) on its IID share of scikit-learn's digits,
`--rounds` rounds in which every party takes part (fraction 1), one local epoch,
FedAvg. Only the privacy differs:

- no DP: the aggregator's FedAvg on the raw updates (weighted by examples);
- client-side DP: each party clips its update to C and adds N(0, (z C)^2) itself
  (hfl_trainer.privacy, as the trainer does), then FedAvg; epsilon is each party's
  local guarantee (dp-accounting, Gaussian(z) composed over the rounds);
- central DP: the aggregator's PrivateStrategy (clip each update to C, sum with equal
  weights, N(0, (z C)^2) on the sum from os.urandom, divide by the parties) wrapping
  FedAvg; epsilon from its ledger (dp-accounting, RDP and PLD).

The aggregation is the aggregator's own code (make_strategy, private_strategy) and
the training the trainer's own code, called in-process: no gRPC or attestation,
which change nothing about accuracy or epsilon. Accuracy is the global model's on
the digits held-out split (450 images). delta is 1 / parties^1.1 (the plan default).
Results go to benchmarks/results/dp_tradeoff.{json,png}. Client-side and central runs
use the same noise multipliers, hence the same epsilons: the comparison is at equal
privacy. One run per point; the noise is fresh (os.urandom) every time, so a rerun moves
each accuracy by a point or so.

    .venv/bin/python benchmarks/bench_dp_tradeoff.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_dp_tradeoff.py --quick    # a smoke run

`--dataset breast_cancer` runs the same comparison on the breast-cancer example
(examples/breast_cancer): its own model and data functions (through
hfl_trainer.project), its plan's rounds, local epochs, optimizer, batch size and
learning rate, the 455 patients of its make_hospitals.py and the 114 held-out
patients no party sees as the test set. Two configurations: the three hospitals
of the example (220, 150 and 85 patients, label-skewed), and the same 455
patients in `--simulated` IID simulated parties (30 by default). Results go to
benchmarks/results/dp_tradeoff_breast_cancer.{json,png}:

    .venv/bin/python benchmarks/bench_dp_tradeoff.py --dataset breast_cancer  # ~5 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from hfl_aggregator.accumulate import InMemoryUpdates
from hfl_aggregator.strategies import make_strategy
from hfl_aggregator.strategies.central_dp import private_strategy
from hfl_common.config import FederationPlan, parse_plan
from hfl_trainer import models
from hfl_trainer import project as project_lib
from hfl_trainer.data import Dataset, load_digits, partition
from hfl_trainer.privacy import add_gaussian_noise, clip_update, local_epsilon
from hfl_trainer.training import LocalTrainer, OptimizerName

RESULTS = Path(__file__).resolve().parent / "results"
BREAST_CANCER = Path(__file__).resolve().parents[1] / "examples" / "breast_cancer"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")
NO_WEIGHTS = f'initial_weights = "w.npz"\ninitial_weights_sha256 = "{"00" * 32}"\n'


@dataclass(frozen=True)
class Run:
    mode: str  # "none", "client", "central"
    noise_multiplier: float = 0.0


def plan_for(run: Run, args: argparse.Namespace) -> FederationPlan:
    privacy = ""
    if run.mode == "central":
        privacy = (
            f"[privacy]\npopulation = {args.parties}\n[privacy.central]\n"
            f"noise_multiplier = {run.noise_multiplier}\nclip_norm = {args.clip_norm}\n"
        )
    elif run.mode == "client":
        privacy = (
            f"[privacy]\npopulation = {args.parties}\nclip_norm = {args.clip_norm}\n"
            f"noise_multiplier = {run.noise_multiplier}\n"
        )
    strategy = f'[strategy]\nname = "{args.strategy}"\n{_strategy_params(args)}\n'
    return parse_plan(base_plan(args) + strategy + privacy)


def base_plan(args: argparse.Namespace) -> str:
    """The plan up to its [strategy] table: digits' small CNN, or the example's own plan."""
    if args.dataset == "digits":
        return f"""
[federation]
rounds = {args.rounds}
min_trainers = {args.parties}
[model]
name = "small_cnn"
input_shape = [8, 8, 1]
num_classes = 10
{NO_WEIGHTS}
"""
    text = (BREAST_CANCER / "plan.toml").read_text()
    head, found, _ = text.partition("\n[strategy]")
    if not found or "[federation]\n" not in head or "\n[model]\n" not in head:
        raise SystemExit(
            f"{BREAST_CANCER / 'plan.toml'}: expected [federation], [model], [strategy]"
        )
    head = head.replace("[federation]\n", f"[federation]\nmin_trainers = {args.parties}\n", 1)
    head = re.sub(r"(?m)^rounds = \d+$", f"rounds = {args.rounds}", head)
    return head.replace("\n[model]\n", "\n[model]\n" + NO_WEIGHTS, 1) + "\n"


def _strategy_params(args: argparse.Namespace) -> str:
    params = strategy_params(args)
    return "\n".join(f"{k} = {v!r}" for k, v in params.items())


def strategy_params(args: argparse.Namespace) -> dict[str, float]:
    params = {"server_lr": args.server_lr}
    if args.strategy == "fedavgm":
        params["momentum"] = args.momentum
    return params


def federate(
    run: Run,
    trainers: list[LocalTrainer],
    initial: dict[str, np.ndarray],
    args: argparse.Namespace,
    pooled_statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    plan = plan_for(run, args)
    strategy = private_strategy(make_strategy(args.strategy, strategy_params(args)), plan)
    weights = {k: v.copy() for k, v in initial.items()}
    rng = np.random.default_rng(secrets.randbits(128))
    norms: list[float] = []
    started = time.perf_counter()
    for _ in range(args.rounds):
        updates = []
        for trainer in trainers:
            result = trainer.train_delta(weights, epochs=args.local_epochs)
            delta = result.delta
            if run.mode == "client":
                clipped, norm = clip_update(delta, args.clip_norm)
                delta = add_gaussian_noise(clipped, run.noise_multiplier, args.clip_norm, rng)
            else:
                norm = float(math.sqrt(sum(float(np.sum(np.square(v))) for v in delta.values())))
            norms.append(norm)
            updates.append((delta, float(result.num_examples)))
        weights = strategy.aggregate(weights, InMemoryUpdates(updates))
    evaluation = trainers[0].evaluate(weights)
    accuracy = evaluation.accuracy
    delta_dp = plan.privacy.delta
    if run.mode == "central":
        eps = strategy.status()["epsilon"]  # type: ignore[attr-defined]
    elif run.mode == "client":
        eps = local_epsilon(run.noise_multiplier, args.rounds, delta_dp).epsilon
    else:
        eps = math.inf
    out = {
        "mode": run.mode,
        "noise_multiplier": run.noise_multiplier,
        "epsilon": eps,
        "delta": delta_dp,
        # Every party in every round: central DP is the same composed Gaussian as
        # client-side DP, so the party-level epsilon at a small fixed delta is this.
        "epsilon_at_delta_1e-5": (
            local_epsilon(run.noise_multiplier, args.rounds, 1e-5).epsilon
            if run.mode != "none"
            else math.inf
        ),
        "accuracy": float(accuracy),
        # A model that answers one class for everyone still scores that class's share
        # of the test set (0.368 / 0.632 on breast cancer): the loss tells it apart.
        "test_loss": float(evaluation.loss),
        "median_update_norm": float(np.median(norms)),
        "seconds": time.perf_counter() - started,
    }
    if pooled_statistics is not None:
        # Diagnostic, not a private model: the same weights with the BatchNormalization
        # moving statistics replaced by the pooled training data's mean and variance.
        mean, variance = pooled_statistics
        fixed = dict(weights)
        for key, value in weights.items():
            if key.endswith("moving_mean"):
                fixed[key] = mean.astype(value.dtype)
            elif key.endswith("moving_variance"):
                fixed[key] = variance.astype(value.dtype)
        out["accuracy_with_pooled_bn_statistics"] = float(trainers[0].evaluate(fixed).accuracy)
        out["min_moving_variance"] = float(
            min(float(np.min(v)) for k, v in weights.items() if k.endswith("moving_variance"))
        )
    print(
        f"{run.mode:8s} z={run.noise_multiplier:<5g} eps={eps:8.3f} "
        f"accuracy={accuracy:.4f} loss={evaluation.loss:.3f} "
        f"median update norm {out['median_update_norm']:.3f} ({out['seconds']:.0f} s)",
        flush=True,
    )
    return out


def plot_panel(ax: Any, results: list[dict[str, Any]], title: str, ylabel: str) -> None:
    baseline = results[0]["accuracy"]
    for mode, marker in (("central", "o"), ("client", "s")):
        points = sorted((r["epsilon"], r["accuracy"]) for r in results if r["mode"] == mode)
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=f"{mode} DP")
    ax.axhline(baseline, color="gray", linestyle="--", label="no DP")
    ax.axhline(baseline - 0.03, color="gray", linestyle=":", label="no DP - 3 points")
    ax.axvline(8.0, color="red", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {results[0]['delta']:.3g})")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def plot(panels: list[tuple[str, list[dict[str, Any]]]], path: Path, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels, strict=True):
        plot_panel(ax, results, title, ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def digits_trainers(
    args: argparse.Namespace,
) -> tuple[list[LocalTrainer], dict[str, np.ndarray]]:
    """`--parties` IID shares of digits' training split; the held-out split tests."""
    data = load_digits()
    initial = models.get_weights(models.build_model("small_cnn", (8, 8, 1), 10, seed=0))
    trainers = []
    for i in range(args.parties):
        share = data.with_train_indices(partition(data.y_train, args.parties, i, seed=0))
        model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)
        trainers.append(LocalTrainer(model, share, args.batch_size, args.learning_rate, seed=i))
    return trainers, initial


def breast_cancer_tables(directory: Path) -> tuple[dict[str, Dataset], Dataset]:
    """The example's hospitals (all of each one's records to train) and held-out patients.

    make_hospitals.write is the example's own script; every table is read by the
    project's data function (log1p of the 30 measurements), through hfl_trainer.project.
    """
    import importlib

    write = importlib.import_module(f"{BREAST_CANCER.name}.make_hospitals").write
    dirs = write(directory, seed=0)
    plan = parse_plan(
        base_plan(argparse.Namespace(dataset="breast_cancer", parties=3, rounds=1)) + "[strategy]\n"
    )

    def read(name: str) -> Dataset:
        d = project_lib.load_data(plan, dirs[name])
        return Dataset(
            x_train=np.concatenate([d.x_train, d.x_test]),
            y_train=np.concatenate([d.y_train, d.y_test]),
            x_test=d.x_test[:0],
            y_test=d.y_test[:0],
            num_classes=d.num_classes,
            input_shape=d.input_shape,
            name=name,
        )

    held = read("held_out")
    held_out = Dataset(
        x_train=held.x_train[:1],
        y_train=held.y_train[:1],
        x_test=held.x_train,
        y_test=held.y_train,
        num_classes=held.num_classes,
        input_shape=held.input_shape,
        name="held_out",
    )
    return {name: read(name) for name in HOSPITALS}, held_out


def breast_cancer_trainers(
    args: argparse.Namespace, shares: list[Dataset], held_out: Dataset
) -> tuple[list[LocalTrainer], dict[str, np.ndarray]]:
    plan = parse_plan(base_plan(args) + "[strategy]\n")
    optimizer: OptimizerName = "adam" if plan.training.optimizer == "adam" else "sgd"
    initial = models.get_weights(project_lib.build(plan.model, plan.seed))
    trainers = []
    for i, share in enumerate(shares):
        data = Dataset(
            x_train=share.x_train,
            y_train=share.y_train,
            x_test=held_out.x_test,
            y_test=held_out.y_test,
            num_classes=share.num_classes,
            input_shape=share.input_shape,
            name=share.name,
        )
        model = project_lib.build(plan.model, plan.seed)
        trainers.append(
            LocalTrainer(model, data, args.batch_size, args.learning_rate, optimizer, seed=i)
        )
    return trainers, initial


def sweep(
    trainers: list[LocalTrainer],
    initial: dict[str, np.ndarray],
    args: argparse.Namespace,
    pooled_statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    runs = [Run("none")]
    runs += [Run("central", z) for z in args.central]
    runs += [Run("client", z) for z in args.client]
    return [federate(run, trainers, initial, args, pooled_statistics) for run in runs]


def table(results: list[dict[str, Any]]) -> None:
    extra = "accuracy_with_pooled_bn_statistics" in results[0]
    head = f"| mode | z | epsilon (delta {results[0]['delta']:.3g}) | epsilon (1e-5) | accuracy |"
    print("\n" + head + (" with pooled BN statistics |" if extra else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- |" if extra else ""))
    for r in results:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        eps5 = r["epsilon_at_delta_1e-5"]
        eps5_text = "inf" if math.isinf(eps5) else f"{eps5:.2f}"
        row = f"| {r['mode']} | {r['noise_multiplier']:g} | {eps} | {eps5_text} | "
        row += f"{r['accuracy']:.4f} |"
        if extra:
            row += f" {r['accuracy_with_pooled_bn_statistics']:.4f} |"
        print(row)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("out", "quick")}


def run_digits(args: argparse.Namespace) -> None:
    trainers, initial = digits_trainers(args)
    results = sweep(trainers, initial, args)
    summary = {
        "setup": setup(args),
        "dataset": "digits (1347 train / 450 test), IID shares",
        "model": "small_cnn",
        "strategy": f"{args.strategy} {strategy_params(args)}, every party every round",
        "results": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (
        f"{args.parties} parties, {args.rounds} rounds, small_cnn, {args.strategy}, "
        f"C = {args.clip_norm}"
    )
    plot([(title, results)], args.out.with_suffix(".png"), "test accuracy (digits)")
    table(results)


def run_breast_cancer(args: argparse.Namespace) -> None:
    import tempfile

    project_lib.use_project(BREAST_CANCER)
    with tempfile.TemporaryDirectory(prefix="hfl-dp-breast-cancer-") as tmp:
        hospitals, held_out = breast_cancer_tables(Path(tmp))
    pooled = np.concatenate([h.x_train for h in hospitals.values()])
    pooled_y = np.concatenate([h.y_train for h in hospitals.values()])
    first = hospitals[HOSPITALS[0]]
    configurations: list[tuple[str, list[Dataset]]] = [
        ("the example's 3 hospitals (220/150/85 patients, label-skewed)", list(hospitals.values()))
    ]
    if args.simulated:
        sims = []
        for i in range(args.simulated):
            index = partition(pooled_y, args.simulated, i, seed=0)
            sims.append(
                Dataset(
                    x_train=pooled[index],
                    y_train=pooled_y[index],
                    x_test=first.x_test,
                    y_test=first.y_test,
                    num_classes=first.num_classes,
                    input_shape=first.input_shape,
                    name=f"party{i}",
                )
            )
        configurations.append(
            (f"the same {len(pooled_y)} patients in {args.simulated} IID simulated parties", sims)
        )
    panels = []
    out: list[dict[str, Any]] = []
    for title, shares in configurations:
        args.parties = len(shares)
        print(f"\n== {title}", flush=True)
        trainers, initial = breast_cancer_trainers(args, shares, held_out)
        results = sweep(trainers, initial, args, (pooled.mean(axis=0), pooled.var(axis=0)))
        table(results)
        out.append(
            {
                "configuration": title,
                "parties": len(shares),
                "setup": setup(args),
                "results": results,
            }
        )
        panels.append(
            (f"{title}\n{args.rounds} rounds, {args.strategy}, C = {args.clip_norm}", results)
        )
    summary = {
        "dataset": (
            f"breast cancer (examples/breast_cancer): {len(pooled_y)} patients to train, "
            f"{len(held_out.y_test)} held-out patients to test"
        ),
        "model": "examples/breast_cancer/model.py (MLP 30-16-16-2 with a BatchNormalization input)",
        "strategy": f"{args.strategy} {strategy_params(args)}, every party every round",
        "configurations": out,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(panels, args.out.with_suffix(".png"), "accuracy on 114 held-out patients")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("digits", "breast_cancer"), default="digits")
    p.add_argument("--parties", type=int, default=50, help="digits: simulated parties")
    p.add_argument(
        "--simulated", type=int, default=30, help="breast_cancer: parties of the second setup"
    )
    p.add_argument("--rounds", type=int, help="default: digits 10, breast_cancer the plan's")
    p.add_argument("--local-epochs", type=int, help="default: digits 3, breast_cancer the plan's")
    p.add_argument("--batch-size", type=int, help="default: digits 16, breast_cancer the plan's")
    p.add_argument("--learning-rate", type=float, help="default: digits 0.1, the plan's")
    p.add_argument("--strategy", choices=("fedavg", "fedavgm"), default="fedavg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9, help="fedavgm's server momentum")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--central", type=float, nargs="*")
    p.add_argument("--client", type=float, nargs="*")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.dataset == "digits":
        defaults: dict[str, Any] = {
            "rounds": 10,
            "local_epochs": 3,
            "batch_size": 16,
            "learning_rate": 0.1,
            "central": [0.52, 0.8, 1.27, 2.07, 3.41],
            "client": [0.52, 0.8, 1.27, 2.07, 3.41],
            "out": RESULTS / "dp_tradeoff",
        }
    else:
        project_lib.use_project(BREAST_CANCER)
        example = parse_plan(
            base_plan(argparse.Namespace(dataset="breast_cancer", parties=3, rounds=1))
            + "[strategy]\n"
        )
        import tomllib

        rounds = int(
            tomllib.loads((BREAST_CANCER / "plan.toml").read_text())["federation"]["rounds"]
        )
        defaults = {
            "rounds": rounds,
            "local_epochs": example.training.local_epochs,
            "batch_size": example.training.batch_size,
            "learning_rate": example.training.learning_rate,
            "central": [0.8, 1.27, 2.07],
            "client": [0.8, 1.27, 2.07],
            "out": RESULTS / "dp_tradeoff_breast_cancer",
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.parties, args.simulated, args.rounds, args.central, args.client = 4, 4, 2, [1.0], [1.0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.dataset == "digits":
        run_digits(args)
    else:
        run_breast_cancer(args)
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
