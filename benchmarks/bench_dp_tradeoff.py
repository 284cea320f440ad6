"""Test accuracy against epsilon on digits: no DP, client-side DP and central DP.

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
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from hfl_trainer.data import load_digits, partition
from hfl_trainer.privacy import add_gaussian_noise, clip_update, local_epsilon
from hfl_trainer.training import LocalTrainer

RESULTS = Path(__file__).resolve().parent / "results"


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
    return parse_plan(
        f"""
[federation]
rounds = {args.rounds}
min_trainers = {args.parties}
[model]
name = "small_cnn"
input_shape = [8, 8, 1]
num_classes = 10
initial_weights = "w.npz"
initial_weights_sha256 = "{"00" * 32}"
[strategy]
name = "{args.strategy}"
{_strategy_params(args)}
{privacy}
"""
    )


def _strategy_params(args: argparse.Namespace) -> str:
    params = strategy_params(args)
    return "\n".join(f"{k} = {v!r}" for k, v in params.items())


def strategy_params(args: argparse.Namespace) -> dict[str, float]:
    params = {"server_lr": args.server_lr}
    if args.strategy == "fedavgm":
        params["momentum"] = args.momentum
    return params


def federate(
    run: Run, trainers: list[LocalTrainer], initial: dict[str, np.ndarray], args: argparse.Namespace
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
    accuracy = trainers[0].evaluate(weights).accuracy
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
        "accuracy": float(accuracy),
        "median_update_norm": float(np.median(norms)),
        "seconds": time.perf_counter() - started,
    }
    print(
        f"{run.mode:8s} z={run.noise_multiplier:<5g} eps={eps:8.3f} "
        f"accuracy={accuracy:.4f} median update norm {out['median_update_norm']:.3f} "
        f"({out['seconds']:.0f} s)",
        flush=True,
    )
    return out


def plot(
    results: list[dict[str, Any]], baseline: float, path: Path, args: argparse.Namespace
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (("central", "o"), ("client", "s")):
        points = sorted((r["epsilon"], r["accuracy"]) for r in results if r["mode"] == mode)
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=f"{mode} DP")
    ax.axhline(baseline, color="gray", linestyle="--", label="no DP")
    ax.axhline(baseline - 0.03, color="gray", linestyle=":", label="no DP - 3 points")
    ax.axvline(8.0, color="red", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {results[0]['delta']:.3g})")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_title(
        f"{args.parties} parties, {args.rounds} rounds, small_cnn, {args.strategy}, "
        f"C = {args.clip_norm}"
    )
    ax.legend(loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parties", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--strategy", choices=("fedavg", "fedavgm"), default="fedavg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9, help="fedavgm's server momentum")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--central", type=float, nargs="*", default=[0.52, 0.8, 1.27, 2.07, 3.41])
    p.add_argument("--client", type=float, nargs="*", default=[0.52, 0.8, 1.27, 2.07, 3.41])
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--out", type=Path, default=RESULTS / "dp_tradeoff")
    args = p.parse_args()
    if args.quick:
        args.parties, args.rounds, args.central, args.client = 4, 2, [1.0], [1.0]

    data = load_digits()
    initial = models.get_weights(models.build_model("small_cnn", (8, 8, 1), 10, seed=0))
    trainers = []
    for i in range(args.parties):
        share = data.with_train_indices(partition(data.y_train, args.parties, i, seed=0))
        model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)
        trainers.append(LocalTrainer(model, share, args.batch_size, args.learning_rate, seed=i))

    runs = [Run("none")]
    runs += [Run("central", z) for z in args.central]
    runs += [Run("client", z) for z in args.client]
    results = [federate(run, trainers, initial, args) for run in runs]
    baseline = results[0]["accuracy"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "setup": {
            k: v for k, v in vars(args).items() if k not in ("out", "central", "client", "quick")
        },
        "dataset": "digits (1347 train / 450 test), IID shares",
        "model": "small_cnn",
        "strategy": f"{args.strategy} {strategy_params(args)}, every party every round",
        "results": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, baseline, args.out.with_suffix(".png"), args)
    print(f"\n| mode | z | epsilon (delta {results[0]['delta']:.3g}) | accuracy |")
    print("| --- | --- | --- | --- |")
    for r in results:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        print(f"| {r['mode']} | {r['noise_multiplier']:g} | {eps} | {r['accuracy']:.4f} |")
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
