"""Synchronous rounds against asynchronous aggregation, with one slow trainer.

Four trainers on scikit-learn's digits (small CNN, IID partitions, FedAvg,
one local epoch per task), each a real process of a local simulated-SGX
federation (attestation service, aggregator, trainers, mutual RA-TLS), as
`hfl run` starts it. The last trainer sleeps `--step-delay` seconds after every
local batch: a machine several times slower than the others (the measured
slowdown is reported, from the update counts of the asynchronous runs).

Three configurations, each run for the same wall-time budget after every
trainer is up:

- sync:    synchronous FedAvg rounds (every round waits for all four);
- async1:  asynchronous, buffer 1 (the reference's async parameter server);
- fedbuff: asynchronous, buffer 3 (FedBuff), polynomial staleness weights.

The benchmark polls the aggregator's Status (as an operator would) and notes
when each model version first appears; the time to target is when the first
version whose federated evaluation reaches `--target` (0.95) appeared. It
also reports the final evaluated accuracy at the end of the budget and the
staleness distribution of the asynchronous runs. Results: JSON and markdown
in benchmarks/results/, a figure (accuracy against wall time).

    .venv/bin/python benchmarks/bench_async.py                # ~10 minutes
    .venv/bin/python benchmarks/bench_async.py --budget 60    # shorter

Timings move with the machine's load; the ratios to the synchronous run of
the same invocation are what matter.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_cli.local import PlanOptions, prepare
from hfl_cli.operator import aggregator_channel, obtain_operator_certificate
from hfl_cli.run import Supervisor, service_args, trainer_args
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    name: str
    mode: str
    buffer_size: int
    rounds: int
    evaluate_every: int
    label: str
    # FedAvg's server learning rate (the step a buffer's mean delta is applied with)
    server_lr: float = 1.0


@dataclass
class Outcome:
    config: Config
    # (seconds since start, model version, eval accuracy or nan) per version seen
    versions: list[tuple[float, int, float]] = field(default_factory=list)
    time_to_target: float | None = None
    final_accuracy: float = math.nan
    final_version: int = 0
    staleness: list[int] = field(default_factory=list)
    updates_per_trainer: dict[str, int] = field(default_factory=dict)


def run_config(
    config: Config, trainers: int, step_delay: float, budget: float, target: float, seed: int
) -> Outcome:
    workdir = Path(tempfile.mkdtemp(prefix=f"hfl-bench-{config.name}-"))
    plan = PlanOptions(
        trainers=trainers,
        rounds=config.rounds,
        dataset="digits",
        strategy="fedavg",
        strategy_params=(("server_lr", config.server_lr),),
        local_epochs=1,
        seed=seed,
        round_timeout=600.0,
        mode=config.mode,
        buffer_size=config.buffer_size,
        # the slow trainer's updates come many versions late with a buffer of 1
        max_staleness=30,
        evaluate_every=config.evaluate_every,
    )
    prepared = prepare(workdir, plan)
    supervisor = Supervisor(workdir)
    outcome = Outcome(config)
    try:
        att = supervisor.start(
            "attestation", "hfl_attestation.main", service_args(prepared, "attestation")
        )
        supervisor.wait_ready(att)
        attestation = f"127.0.0.1:{att.grpc_port}"
        agg = supervisor.start(
            "aggregator",
            "hfl_aggregator.main",
            [*service_args(prepared, "aggregator"), "--plan", str(prepared.plan),
             "--attestation", attestation],
        )  # fmt: skip
        supervisor.wait_ready(agg)
        aggregator = f"127.0.0.1:{agg.grpc_port}"
        started = []
        for i in range(trainers):
            args = trainer_args(prepared, i, trainers, attestation, aggregator)
            if i == trainers - 1 and step_delay > 0:
                args += ["--step-delay", str(step_delay)]
            started.append(supervisor.start(f"trainer-{i + 1}", "hfl_trainer.main", args))
        operator = obtain_operator_certificate(
            prepared.operator_dir, attestation, prepared.policy, prepared.platform
        )
        for t in started:
            supervisor.wait_ready(t)
        channel = aggregator_channel(aggregator, operator)
        stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
        start = time.monotonic()
        seen: dict[int, float] = {}
        status = aggregator_pb2.GetStatusResponse()
        while time.monotonic() - start < budget:
            supervisor.check_alive(["attestation", "aggregator"])
            status = stub.GetStatus(aggregator_pb2.GetStatusRequest(), timeout=10)
            now = time.monotonic() - start
            for r in status.rounds:
                if r.state == aggregator_pb2.ROUND_STATE_COMPLETED:
                    seen.setdefault(r.model_version, now)
            if status.state in (
                aggregator_pb2.FEDERATION_STATE_DONE,
                aggregator_pb2.FEDERATION_STATE_FAILED,
            ):
                break
            time.sleep(0.25)
        channel.close()
    finally:
        supervisor.stop_all()
    completed = [r for r in status.rounds if r.state == aggregator_pb2.ROUND_STATE_COMPLETED]
    for r in completed:
        acc = r.eval_accuracy if r.eval_examples > 0 else math.nan
        outcome.versions.append((seen.get(r.model_version, math.nan), r.model_version, acc))
        outcome.staleness += list(r.staleness)
    reached = [t for t, _, acc in outcome.versions if acc >= target]
    outcome.time_to_target = min(reached) if reached else None
    evaluated = [(v, acc) for _, v, acc in outcome.versions if not math.isnan(acc)]
    if evaluated:
        outcome.final_version, outcome.final_accuracy = evaluated[-1]
    outcome.updates_per_trainer = {t.label: t.updates_accepted for t in status.trainers}
    return outcome


def summarize(outcomes: list[Outcome], args: argparse.Namespace) -> dict[str, Any]:
    sync = next(o for o in outcomes if o.config.mode == "sync")
    rows = []
    for o in outcomes:
        ratio = (
            o.time_to_target / sync.time_to_target
            if o.time_to_target is not None and sync.time_to_target
            else None
        )
        counts = Counter(o.staleness)
        rows.append(
            {
                "config": o.config.name,
                "label": o.config.label,
                "server_lr": o.config.server_lr,
                "time_to_target_s": o.time_to_target,
                "ratio_to_sync": ratio,
                "final_accuracy": o.final_accuracy,
                "final_version": o.final_version,
                "versions": len(o.versions),
                "staleness_histogram": {str(k): counts[k] for k in sorted(counts)},
                "mean_staleness": (sum(o.staleness) / len(o.staleness)) if o.staleness else 0.0,
                "updates_per_trainer": o.updates_per_trainer,
                "curve": [
                    {"seconds": t, "version": v, "accuracy": None if math.isnan(a) else a}
                    for t, v, a in o.versions
                ],
            }
        )
    slowdowns = []
    for o in outcomes:
        per_trainer = sorted(o.updates_per_trainer.items())
        if o.config.mode == "async" and len(per_trainer) >= 2 and per_trainer[-1][1] > 0:
            fast = [n for _, n in per_trainer[:-1]]
            slowdowns.append(sum(fast) / len(fast) / per_trainer[-1][1])
    return {
        "benchmark": "bench_async",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}; shared host",
        "trainers": args.trainers,
        "step_delay_s": args.step_delay,
        "measured_slowdown_of_slow_trainer": (
            sum(slowdowns) / len(slowdowns) if slowdowns else None
        ),
        "budget_s": args.budget,
        "target_accuracy": args.target,
        "results": rows,
        "command": "benchmarks/bench_async.py " + " ".join(args.argv),
    }


def markdown(summary: dict[str, Any]) -> str:
    slow = summary["measured_slowdown_of_slow_trainer"]
    lines = [
        "# Asynchronous aggregation with one slow trainer (benchmarks/bench_async.py)",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"{summary['trainers']} trainers on digits (small CNN, IID, FedAvg, 1 local epoch); "
        f"the last sleeps {summary['step_delay_s']} s after each batch "
        f"(measured: {slow:.1f}x slower than the others)."
        if slow
        else "",
        f"Each configuration ran for {summary['budget_s']:.0f} s of wall time; target "
        f"accuracy {summary['target_accuracy']}. Machine: {summary['machine']}.",
        "",
        "| configuration | server lr | time to target (s) | vs sync | final accuracy (version) | "
        "mean staleness | staleness histogram |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in summary["results"]:
        ttt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "not reached"
        ratio = f"{r['ratio_to_sync']:.2f}x" if r["ratio_to_sync"] is not None else "-"
        hist = ", ".join(f"{k}: {v}" for k, v in r["staleness_histogram"].items()) or "-"
        lines.append(
            f"| {r['label']} | {r['server_lr']} | {ttt} | {ratio} | {r['final_accuracy']:.4f} "
            f"({r['final_version']}) | {r['mean_staleness']:.2f} | {hist} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in summary["results"]:
        points = [(c["seconds"], c["accuracy"]) for c in r["curve"] if c["accuracy"] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", label=r["label"])
    ax.axhline(summary["target_accuracy"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("wall time (s) since all trainers were up")
    ax.set_ylabel("federated test accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("4 trainers on digits, one of them slow")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--step-delay", type=float, default=0.04, help="the slow trainer's s/batch")
    p.add_argument(
        "--async-server-lr",
        type=float,
        default=1.0,
        help="FedAvg server_lr of the buffer-1 run (1.0 as in the others by default)",
    )
    p.add_argument("--budget", type=float, default=150.0, help="wall seconds per configuration")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="run only these configurations")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    n = args.trainers
    configs = [
        Config("sync", "sync", 1, 200, 1, "sync FedAvg"),
        Config("async1", "async", 1, 800, n, "async, buffer 1", args.async_server_lr),
        Config("fedbuff", "async", 3, 400, 1, "FedBuff, buffer 3"),
    ]
    if args.only:
        configs = [c for c in configs if c.name in args.only or c.mode == "sync"]
    outcomes = []
    for config in configs:
        print(f"running {config.label} for {args.budget:.0f} s ...", flush=True)
        o = run_config(config, n, args.step_delay, args.budget, args.target, args.seed)
        print(
            f"  versions {len(o.versions)}, time to {args.target}: {o.time_to_target}, "
            f"final accuracy {o.final_accuracy:.4f}",
            flush=True,
        )
        outcomes.append(o)
    summary = summarize(outcomes, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_async.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (RESULTS / "bench_async.md").write_text(text)
    plot(summary, RESULTS / "bench_async.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
