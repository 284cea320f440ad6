"""Byzantine trainers against the aggregation rules: how far does each rule fall?

Eight trainers train small_cnn on an IID split of the digits data set; two of them are
Byzantine and send their honest delta sign-flipped (-1 x) or scaled (x10). For each rule
(FedAvg, coordinate-wise median, trimmed mean with beta 0.25, Krum with f = 2, Multi-Krum
with f = 2 averaging the m = n - f best) the final test accuracy under attack is compared
with the honest run of the same rule, and FedAvg's damage is written down.

Why a rule falls short is measured too: every round, the rule's combined delta is
compared with the mean of the eight honest deltas (what the Byzantine trainers would
have sent had they been honest): `shrink` is its projection onto that mean over the
mean's squared norm (1: a full honest step; 0.5: half a step), `error` the norm of the
difference over the mean's norm. Both are averaged over the rounds.

What runs: the trainers' real local training (hfl_trainer.training.LocalTrainer,
TensorFlow) and the aggregator's own rule functions (hfl_aggregator.strategies.aggregate)
over the deltas, in one process. The wire (RA-TLS, codec, round engine) is not in the loop:
this measures the rules, the chaos suite tests the path.

    .venv/bin/python benchmarks/bench_byzantine.py [--rounds 5] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

Weights = dict[str, npt.NDArray[Any]]
Rule = Callable[[Sequence[Weights], Sequence[float]], Weights]

TRAINERS = 8
BYZANTINE = 2
ATTACKS: dict[str, Callable[[Weights], Weights]] = {
    "none": lambda d: d,
    "sign_flip": lambda d: {k: -v for k, v in d.items()},
    "scale_x10": lambda d: {k: 10 * v for k, v in d.items()},
}


def rules() -> dict[str, Rule]:
    from hfl_aggregator.strategies import aggregate as agg

    return {
        "fedavg": agg.weighted_mean,
        "median": lambda ups, _: agg.median(ups),
        "trimmed_mean": lambda ups, _: agg.trimmed_mean(ups, 0.25),
        "krum": lambda ups, _: agg.krum(ups, BYZANTINE),
        "multikrum": lambda ups, _: agg.multi_krum(ups, BYZANTINE, TRAINERS - BYZANTINE),
    }


def _flat(w: Weights) -> npt.NDArray[np.float64]:
    return np.concatenate([np.ravel(w[k]).astype(np.float64) for k in sorted(w)])


def run(
    rule: Rule, attack: Callable[[Weights], Weights], rounds: int, seed: int
) -> dict[str, float]:
    """Final accuracy, and the mean per-round shrink and error against the honest mean."""
    from hfl_aggregator.strategies import aggregate as agg
    from hfl_trainer import data as data_lib
    from hfl_trainer.models import build_model, get_weights
    from hfl_trainer.training import LocalTrainer

    full = data_lib.load_digits()
    model = build_model("small_cnn", (8, 8, 1), 10, seed)
    weights: Weights = get_weights(model)
    trainers = []
    for i in range(TRAINERS):
        idx = data_lib.partition(full.y_train, TRAINERS, i, scheme="iid", seed=seed)
        trainers.append(LocalTrainer(model, full.with_train_indices(idx), 32, 0.05, seed=i))
    shrinks: list[float] = []
    errors: list[float] = []
    for _ in range(rounds):
        honest: list[Weights] = []
        deltas: list[Weights] = []
        counts: list[float] = []
        for i, trainer in enumerate(trainers):
            result = trainer.train_delta(weights, epochs=1)
            delta = {k: np.asarray(v) for k, v in result.delta.items()}
            honest.append(delta)
            deltas.append(attack(delta) if i < BYZANTINE else delta)
            counts.append(float(result.num_examples))
        step = rule(deltas, counts)
        reference = _flat(agg.weighted_mean(honest, [1.0] * TRAINERS))
        combined = _flat(step)
        ref_sq = float(reference @ reference)
        shrinks.append(float(combined @ reference) / ref_sq)
        errors.append(float(np.linalg.norm(combined - reference)) / ref_sq**0.5)
        weights = {k: (w + step[k]).astype(w.dtype) for k, w in weights.items()}
    return {
        "accuracy": float(trainers[-1].evaluate(weights).accuracy),
        "shrink": float(np.mean(shrinks)),
        "error": float(np.mean(errors)),
    }


def measure(rounds: int, seeds: Sequence[int]) -> dict[str, Any]:
    """Every rule under every attack, once per seed (model init and data split); the
    figures are means over the seeds, with each seed's accuracy kept."""
    per_seed: dict[str, dict[str, list[float]]] = {}
    fidelity: dict[str, dict[str, dict[str, float]]] = {}
    for name, rule in rules().items():
        per_seed[name] = {}
        fidelity[name] = {}
        for attack_name, attack in ATTACKS.items():
            outcomes = []
            for seed in seeds:
                started = time.perf_counter()
                outcome = run(rule, attack, rounds, seed)
                outcomes.append(outcome)
                print(
                    f"{name:13s} {attack_name:10s} seed {seed} accuracy "
                    f"{outcome['accuracy']:.4f} shrink {outcome['shrink']:.3f} "
                    f"error {outcome['error']:.3f} ({time.perf_counter() - started:.1f} s)",
                    file=sys.stderr,
                )
            per_seed[name][attack_name] = [round(o["accuracy"], 4) for o in outcomes]
            fidelity[name][attack_name] = {
                k: round(float(np.mean([o[k] for o in outcomes])), 4) for k in ("shrink", "error")
            }
    results = {
        name: {a: float(np.mean(accs)) for a, accs in by.items()} for name, by in per_seed.items()
    }
    honest = results["fedavg"]["none"]
    return {
        "setup": {
            "model": "small_cnn",
            "dataset": "digits (IID)",
            "trainers": TRAINERS,
            "byzantine": BYZANTINE,
            "rounds": rounds,
            "local_epochs": 1,
            "learning_rate": 0.05,
            "seeds": list(seeds),
            "trimmed_mean_beta": 0.25,
            "krum_f": BYZANTINE,
            "multikrum_f": BYZANTINE,
            "multikrum_m": TRAINERS - BYZANTINE,
        },
        # mean final test accuracy over the seeds, and each seed's
        "accuracy": results,
        "accuracy_per_seed": per_seed,
        # per round, against the mean of the 8 honest deltas (module docstring), mean over seeds
        "step_vs_honest_mean": fidelity,
        "honest_fedavg": honest,
        # points of (mean) accuracy lost against the honest run of the same rule
        "drop_points": {
            name: {a: round(100 * (by["none"] - acc), 2) for a, acc in by.items() if a != "none"}
            for name, by in results.items()
        },
        # the same per seed: how much a single run's drop varies
        "drop_points_per_seed": {
            name: {
                a: [round(100 * (h - x), 2) for h, x in zip(by["none"], accs, strict=True)]
                for a, accs in by.items()
                if a != "none"
            }
            for name, by in per_seed.items()
        },
        "drop_vs_honest_fedavg_points": {
            name: {a: round(100 * (honest - acc), 2) for a, acc in by.items() if a != "none"}
            for name, by in results.items()
        },
    }


def markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "# Byzantine trainers: accuracy per aggregation rule",
        "",
        f"small_cnn on digits (IID), {TRAINERS} trainers of which {BYZANTINE} Byzantine, "
        f"{report['setup']['rounds']} rounds, seeds {report['setup']['seeds']}",
        "(`benchmarks/bench_byzantine.py`). Final test accuracy, mean over the seeds; drops",
        "in points against the honest run of the same rule, from the means and per seed:",
        "",
        "| rule | honest | sign flip | x10 scaling | drop: sign flip | drop: x10 "
        "| drop per seed: sign flip | drop per seed: x10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, by in report["accuracy"].items():
        drop = report["drop_points"][name]
        each = report["drop_points_per_seed"][name]
        lines.append(
            f"| {name} | {by['none']:.4f} | {by['sign_flip']:.4f} | {by['scale_x10']:.4f} "
            f"| {drop['sign_flip']:.1f} | {drop['scale_x10']:.1f} "
            f"| {' / '.join(f'{x:.1f}' for x in each['sign_flip'])} "
            f"| {' / '.join(f'{x:.1f}' for x in each['scale_x10'])} |"
        )
    lines += [
        "",
        "Each round's combined delta against the mean of the 8 honest deltas (shrink: its",
        "projection on that mean over the mean's squared norm, 1 = a full honest step; error:",
        "distance over norm; both averaged over the rounds and seeds):",
        "",
        "| rule | shrink: honest | shrink: sign flip | shrink: x10 "
        "| error: honest | error: sign flip | error: x10 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, by in report["step_vs_honest_mean"].items():
        lines.append(
            f"| {name} | {by['none']['shrink']:.2f} | {by['sign_flip']['shrink']:.2f} "
            f"| {by['scale_x10']['shrink']:.2f} | {by['none']['error']:.2f} "
            f"| {by['sign_flip']['error']:.2f} | {by['scale_x10']['error']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ns = p.parse_args(argv)
    report = measure(ns.rounds, ns.seeds)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "byzantine.json").write_text(json.dumps(report, indent=2) + "\n")
    (ns.out / "byzantine.md").write_text(markdown(report))
    print(json.dumps(report["drop_points"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
