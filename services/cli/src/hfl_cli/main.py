"""The `hfl` command: one entry point for every service and tool.

    hfl run            a whole local federation (simulated TEE), the first thing to try
    hfl new            write a federation project you own (model.py, data.py, plan.toml)
    hfl evaluate       evaluate a model a federation exported, on local data
    hfl verify-export  check an exported model's signature, certificate chain and hashes
    hfl attestation    the attestation service (federation CA)
    hfl aggregator     the aggregator (parameter server)
    hfl trainer        a trainer
    hfl verify         verify a quote or an RA-TLS certificate under a policy
    hfl status         the aggregator's Status, as an operator
    hfl operator-cert  get an operator certificate (for grpcurl)
    hfl init           write platform, policy, plan and operator key for a deployment

Each service's code is imported only when its command runs, so `hfl aggregator`
never loads TensorFlow.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hfl_common.config import DATASETS, MODELS, STRATEGIES
from hfl_common.runtime import run_main

COMMANDS = (
    "run", "new", "evaluate", "verify-export", "attestation", "aggregator", "trainer", "verify",
    "status", "operator-cert", "init",
)  # fmt: skip


def _run_main(argv: Sequence[str] | None) -> int:
    from hfl_cli.local import PlanOptions
    from hfl_cli.run import RunOptions, run

    p = argparse.ArgumentParser(
        prog="hfl run",
        description="Run a whole federation on this machine: attestation service, aggregator "
        "and trainers as separate processes on loopback, simulated SGX, mutual RA-TLS.",
    )
    p.add_argument(
        "--project", type=Path,
        help="a federation project (hfl new): its plan.toml, model and data functions",
    )  # fmt: skip
    p.add_argument(
        "--party-data", type=Path, action="append", default=[], metavar="DIR",
        help="one trainer per directory, each training on its own data (repeat)",
    )  # fmt: skip
    p.add_argument("--trainers", type=int, help="default 2, or one per --party-data")
    p.add_argument("--rounds", type=int, help="default 10, or the project plan's")
    p.add_argument("--model", default="small_cnn", choices=MODELS)
    p.add_argument(
        "--dataset", default="digits", choices=DATASETS[:3],
        help="digits (bundled with scikit-learn), cifar10 (from --data-dir), synthetic; "
        "your own data: --project",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", type=Path,
        help="one data directory the simulated trainers share and partition (CIFAR-10 "
        "batches, or what the project's data function reads)",
    )  # fmt: skip
    p.add_argument("--strategy", default="fedavg", choices=STRATEGIES)
    p.add_argument(
        "--strategy-param", action="append", default=[], metavar="NAME=VALUE",
        help="a strategy parameter, e.g. server_lr=0.1 (repeatable)",
    )  # fmt: skip
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=0.05)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--encoding", choices=("raw", "float16", "bfloat16", "int8"), default="raw")
    p.add_argument("--clip-norm", type=float, default=0.0, help="client DP: L2 clip bound")
    p.add_argument("--noise-multiplier", type=float, default=0.0, help="client DP: noise")
    p.add_argument(
        "--central-noise-multiplier",
        type=float,
        default=0.0,
        help="central DP in the aggregator: noise multiplier z (0: off)",
    )
    p.add_argument("--central-clip-norm", type=float, default=1.0, help="central DP: clip C")
    p.add_argument("--max-epsilon", type=float, default=0.0, help="DP budget (0: none)")
    p.add_argument(
        "--dp-delta",
        type=float,
        default=0.0,
        help="DP: the delta epsilon is stated at (0: 1 / parties^1.1)",
    )
    p.add_argument("--synthetic-examples", type=int, default=256)
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="sync: rounds with a barrier; async: no barrier, a buffer of staleness-weighted "
        "updates (--buffer-size; 1 = apply each update as it arrives, K > 1 = FedBuff)",
    )
    p.add_argument("--buffer-size", type=int, default=1, help="async: updates per new model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="default: runs/<timestamp>")
    p.add_argument("--expect-accuracy", type=float, help="exit 1 below this final accuracy")
    p.add_argument("--no-plot", action="store_true")
    ns = p.parse_args(argv)
    params = []
    for item in ns.strategy_param:
        name, sep, value = item.partition("=")
        try:
            number = float(value) if sep and name else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            p.error(f"--strategy-param {item!r} must look like NAME=NUMBER")
        params.append((name, number))
    if ns.dataset == "cifar10" and ns.data_dir is None:
        p.error("--dataset cifar10 needs --data-dir (nothing is downloaded at run time)")
    if ns.party_data and ns.trainers is not None and ns.trainers != len(ns.party_data):
        p.error(f"--trainers {ns.trainers} but {len(ns.party_data)} --party-data directories")
    trainers = len(ns.party_data) or (2 if ns.trainers is None else ns.trainers)
    if trainers < 1:
        p.error("--trainers must be at least 1")
    if ns.rounds is not None and ns.rounds < 1:
        p.error("--rounds must be at least 1")
    if ns.buffer_size < 1:
        p.error("--buffer-size must be at least 1")
    if ns.buffer_size != 1 and ns.mode != "async":
        p.error("--buffer-size applies only with --mode async")
    if ns.project is not None:
        flags = (
            "--model",
            "--dataset",
            "--central-noise-multiplier",
            "--central-clip-norm",
            "--max-epsilon",
            "--dp-delta",
        )
        given = [f for f in flags if any(a.split("=")[0] == f for a in (argv or []))]
        if given:
            p.error(f"{given[0]} does not go with --project: the project's plan.toml names it")
    elif ns.party_data:
        p.error("--party-data needs --project (the project's data function reads each one)")
    plan = PlanOptions(
        trainers=trainers,
        rounds=10 if ns.rounds is None else ns.rounds,
        project=ns.project,
        project_rounds=ns.rounds,
        model=ns.model,
        dataset=ns.dataset,
        strategy=ns.strategy,
        partition=ns.partition,
        alpha=ns.alpha,
        local_epochs=ns.local_epochs,
        batch_size=ns.batch_size,
        learning_rate=ns.learning_rate,
        optimizer=ns.optimizer,
        encoding=ns.encoding,
        seed=ns.seed,
        round_timeout=ns.round_timeout,
        clip_norm=ns.clip_norm,
        noise_multiplier=ns.noise_multiplier,
        central_noise_multiplier=ns.central_noise_multiplier,
        central_clip_norm=ns.central_clip_norm,
        max_epsilon=ns.max_epsilon,
        dp_delta=ns.dp_delta,
        synthetic_examples=ns.synthetic_examples,
        strategy_params=tuple(params),
        mode=ns.mode,
        buffer_size=ns.buffer_size,
        # async: evaluate about once per trainer-round of updates, not every version
        evaluate_every=max(1, ns.trainers // ns.buffer_size) if ns.mode == "async" else 1,
    )
    return run(
        RunOptions(
            plan=plan,
            workdir=ns.workdir,
            data_dir=ns.data_dir,
            expect_accuracy=ns.expect_accuracy,
            plot=not ns.no_plot,
            party_data=tuple(ns.party_data),
        )
    )


def _init_main(argv: Sequence[str] | None) -> int:
    from hfl_cli.local import PlanOptions, prepare

    p = argparse.ArgumentParser(
        prog="hfl init",
        description="Write a simulated platform, policy, plan and operator key into DIR "
        "(what `make up` mounts into the simulated containers).",
    )
    p.add_argument("directory", type=Path)
    p.add_argument("--trainers", type=int, default=2)
    p.add_argument("--rounds", type=int, help="default 10, or the project plan's")
    p.add_argument(
        "--project", type=Path,
        help="a federation project (hfl new): its plan, and the trainer identity with its code",
    )  # fmt: skip
    ns = p.parse_args(argv)
    if (ns.directory / "policy.toml").exists():
        # Re-running must not change identities or keys: the services' state depends on them.
        print(f"{ns.directory} is already initialised; leaving it as it is")
        return 0
    options = PlanOptions(
        trainers=ns.trainers,
        rounds=10 if ns.rounds is None else ns.rounds,
        project=ns.project,
        project_rounds=ns.rounds,
    )
    prepared = prepare(ns.directory, options)
    print(
        f"wrote {prepared.policy}, {prepared.plan}, {prepared.platform}/, "
        f"{prepared.operator_dir}/, {prepared.directory / 'parties'}/"
    )
    return 0


def _lazy(module: str, function: str) -> Callable[[Sequence[str] | None], int]:
    def call(argv: Sequence[str] | None) -> int:
        import importlib

        fn: Callable[[Sequence[str] | None], int] = getattr(
            importlib.import_module(module), function
        )
        return fn(argv)

    return call


_DISPATCH: dict[str, Callable[[Sequence[str] | None], int]] = {
    "run": lambda argv: run_main(_run_main, argv),
    "init": lambda argv: run_main(_init_main, argv),
    "new": lambda argv: run_main(_lazy("hfl_cli.project", "new_main"), argv),
    "evaluate": lambda argv: run_main(_lazy("hfl_cli.project", "evaluate_main"), argv),
    "attestation": _lazy("hfl_attestation.main", "main"),
    "aggregator": _lazy("hfl_aggregator.main", "main"),
    "trainer": _lazy("hfl_trainer.main", "main"),
    "verify": _lazy("hfl_common.verify_cli", "verify_main"),
    "verify-export": _lazy("hfl_common.export_signature", "verify_main"),
    "status": lambda argv: run_main(_lazy("hfl_cli.operator", "status_main"), argv),
    "operator-cert": lambda argv: run_main(_lazy("hfl_cli.operator", "operator_cert_main"), argv),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    # TensorFlow's C++ start-up chatter is not for the person at the terminal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    handler = _DISPATCH.get(command)
    if handler is None:
        print(
            f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    return handler(rest)


if __name__ == "__main__":
    raise SystemExit(main())
