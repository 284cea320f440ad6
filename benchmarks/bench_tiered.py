"""Tiered vs flat: N no-op trainers over K relays and one root, against the same N flat.

What it covers: the framework's cost of a round at scale, per tier. Every process is real:
the root aggregator and each relay run as their own process (`python -m
hfl_aggregator.main`, relays with `--relay-upstream`, simulated TEE, sealed checkpoints);
the trainers are bench_e2e.py's no-op trainers (the real `FederationClient` over mutual
RA-TLS, each with its own enclave key and certificate, a fixed delta returned at once,
no TensorFlow) as threads in a few worker processes; the attestation service runs in
this process. The same trainers, the same model and the same number of rounds run twice:

- flat: every trainer reports to one aggregator (plan min_trainers = N);
- tiered: trainer i reports to relay i mod K; the root's participants are the K relays
  (plan min_trainers = K, `[relays]` group_min_trainers = N / K).

Reported per run: round time as the trainers see it (first TRAIN task of round r to the
first task after it, as bench_e2e.py measures it; p50 over rounds 2..R and each round),
CPU seconds (utime + stime of /proc/<pid>/stat) of each tier during the rounds (root,
relays summed and per relay, trainer workers summed), and peak RSS (VmHWM of
/proc/<pid>/status) of each real process. What it does not cover: training (no-op), a
network (loopback), SGX (simulated quotes: attestation cost is dcap-qvl verification in
software), and several machines: every tier shares this machine's cores, so the tiered
round time is NOT the time of relays on their own hosts (see docs/performance.md).

    .venv/bin/python benchmarks/bench_tiered.py                      # 1000 trainers, 4 relays
    .venv/bin/python benchmarks/bench_tiered.py --trainers 200 --relays 4 --label n200
    .venv/bin/python benchmarks/bench_tiered.py --quick --out /tmp/x   # smoke (~1 min)

Results: benchmarks/results/tiered[-<label>].json and .md. No figure is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_PARAMS = 100_000

log = logging.getLogger("bench_tiered")


def _load_e2e() -> ModuleType:
    """bench_e2e.py (its no-op trainer workers, federation files, /proc readings)."""
    spec = importlib.util.spec_from_file_location("bench_e2e", HERE / "bench_e2e.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


e2e = _load_e2e()


def write_plan(fed: Any, name: str, trainers: int, relays: int, rounds: int) -> Path:
    """flat (relays = 0): min_trainers = N; tiered: min_trainers = K and a [relays] table."""
    participants = relays or trainers
    text = (
        "[federation]\n"
        f'name = "{name}"\n'
        f"rounds = {rounds}\n"
        f"min_trainers = {participants}\n"
        f"min_updates = {participants}\n"
        "fraction = 1.0\n"
        "round_timeout_seconds = 1200.0\n"
        "max_round_retries = 0\n"
        "liveness_seconds = 300.0\n"
        "seed = 0\n\n"
        "[model]\n"
        'name = "small_cnn"\n'
        "input_shape = [8, 8, 1]\n"
        "num_classes = 10\n"
        f'initial_weights = "{fed.model_path.name}"\n'
        f'initial_weights_sha256 = "{fed.weights_sha256}"\n\n'
        "[data]\n"
        'dataset = "synthetic"\n\n'
        "[training]\n"
        f"evaluate_every = {rounds}\n\n"
        "[strategy]\n"
        'name = "fedavg"\n'
    )
    if relays:
        group = math.ceil(trainers / relays)
        text += (
            "\n[relays]\n"
            f"group_min_trainers = {trainers // relays}\n"
            f"max_group_size = {group}\n"
            "max_examples_per_trainer = 100000\n"
        )
    path: Path = fed.directory / f"plan-{name}.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def server_process(
    fed: Any,
    plan: Path,
    attestation: str,
    log_path: Path,
    participants: int,
    upstream: str | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """An aggregator (or, with `upstream`, a relay) process; yields it and its target."""
    state = log_path.with_suffix(".state")
    shutil.rmtree(state, ignore_errors=True)
    port_file = log_path.with_suffix(".ports.json")
    port_file.unlink(missing_ok=True)
    args = [
        sys.executable, "-m", "hfl_aggregator.main",
        "--plan", str(plan), "--policy", str(fed.policy), "--tee", "simulated",
        "--sim-platform", str(fed.platform), "--state-dir", str(state),
        "--attestation", attestation, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file), "--log-json",
        "--label", log_path.stem,
        "--max-workers", str(max(64, 2 * participants + 8)),
    ]  # fmt: skip
    if upstream is not None:
        args += ["--relay-upstream", upstream]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HFL_") and k not in e2e._STRIPPED_ENV
    }
    env.update(e2e.launcher_env())
    with log_path.open("ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{log_path.stem} did not start: {log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        yield process, f"127.0.0.1:{ports['grpc']}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def round_times(events: list[tuple[Any, ...]], rounds: int) -> list[float]:
    """First TRAIN task of round r to the first task after it (bench_e2e's definition)."""

    def first(what: str, r: int) -> float:
        ts = [t for (_, w, rr, t) in events if w == what and rr == r]
        return min(ts) if ts else math.nan

    starts = [first("task_train", r) for r in range(1, rounds + 1)]
    after = min(first("task_evaluate", rounds), first("task_done", rounds))
    if math.isnan(after):
        after = first("task_done", rounds)
    ends = [*starts[1:], after]
    return [e - s for s, e in zip(starts, ends, strict=True)]


def run_mode(
    name: str,
    fed: Any,
    attestation: str,
    workdir: Path,
    trainers: int,
    relays: int,
    rounds: int,
    workers: int,
    timeout: float,
) -> dict[str, Any]:
    plan = write_plan(fed, name, trainers, relays, rounds)
    labels = [f"{name}-t{i:04d}" for i in range(trainers)]
    started = time.time()
    with contextlib.ExitStack() as stack:
        root, root_target = stack.enter_context(
            server_process(fed, plan, attestation, workdir / f"{name}-root.log", relays or trainers)
        )
        servers: list[tuple[str, subprocess.Popen[bytes], str]] = [("root", root, root_target)]
        for k in range(relays):
            group = math.ceil(trainers / relays)
            proc, target = stack.enter_context(
                server_process(
                    fed, plan, attestation, workdir / f"{name}-relay{k}.log", group, root_target
                )
            )
            servers.append((f"relay{k}", proc, target))
        time.sleep(1.0)
        samplers = {tier: stack.enter_context(e2e.ProcSampler(p.pid)) for tier, p, _ in servers}
        # Trainer i reports to relay i mod K (flat: to the root); a worker's trainers share
        # one target.
        targets = [t for _, _, t in servers[1:]] or [root_target]
        by_target: dict[str, list[str]] = {t: [] for t in targets}
        for i, label in enumerate(labels):
            by_target[targets[i % len(targets)]].append(label)
        per_target = max(1, workers // len(targets))
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for target, group_labels in by_target.items():
            size = math.ceil(len(group_labels) / per_target)
            for j in range(0, len(group_labels), size):
                i = len(procs)
                out = workdir / f"{name}.worker{i}.json"
                out.unlink(missing_ok=True)
                cfg_path = workdir / f"{name}.worker{i}.config.json"
                cfg = e2e.WorkerConfig(
                    plan=str(plan),
                    policy=str(fed.policy),
                    platform=str(fed.platform),
                    attestation=attestation,
                    aggregator=target,
                    state_dir=str(workdir / "trainers"),
                    model=str(fed.model_path),
                    labels=group_labels[j : j + size],
                    sequential=False,
                    out=str(out),
                )
                cfg_path.write_text(json.dumps(asdict(cfg)))
                with (workdir / f"{name}.worker{i}.log").open("ab") as wlog:
                    proc = subprocess.Popen(
                        [sys.executable, str(HERE / "bench_e2e.py"), "--worker", str(cfg_path)],
                        stdout=wlog,
                        stderr=subprocess.STDOUT,
                    )
                procs.append((proc, out))
        worker_samplers = [stack.enter_context(e2e.ProcSampler(p.pid)) for p, _ in procs]
        timed_out = False
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(1.0, timeout - (time.time() - started)))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, _ in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        hwm = {tier: e2e.proc_status_kb(p.pid, "VmHWM") * 1024 for tier, p, _ in servers}
    reports = [json.loads(out.read_text()) for _, out in procs if out.exists()]
    missing = [
        f"worker {i} exited {proc.returncode} without a report: "
        + (workdir / f"{name}.worker{i}.log").read_text(errors="replace")[-400:]
        for i, (proc, out) in enumerate(procs)
        if not out.exists()
    ]
    events = [tuple(e) for r in reports for e in r["events"]]
    times = round_times(events, rounds)
    first_train = min((t for (_, w, r, t) in events if w == "task_train" and r == 1), default=0)
    done = max((t for (_, w, _, t) in events if w == "task_done"), default=time.time())

    def cpu(sampler: Any) -> float:
        return float(sampler.cpu_at(done) - sampler.cpu_at(first_train))

    steady = [x for x in times[1:] if math.isfinite(x)] or [x for x in times if math.isfinite(x)]
    relay_tiers = [t for t in samplers if t != "root"]
    return {
        "mode": name,
        "trainers": trainers,
        "relays": relays,
        "rounds": rounds,
        "worker_processes": len(procs),
        "round_seconds": times,
        "round_p50_s": statistics.median(steady) if steady else math.nan,
        "cpu_s": {
            "root": cpu(samplers["root"]),
            "relays": sum(cpu(samplers[t]) for t in relay_tiers),
            "per_relay": [cpu(samplers[t]) for t in relay_tiers],
            "trainer_workers": sum(cpu(s) for s in worker_samplers),
        },
        "peak_rss_bytes": {
            "root": hwm["root"],
            "relays_max": max((hwm[t] for t in relay_tiers), default=0),
            "per_relay": [hwm[t] for t in relay_tiers],
            "trainer_workers_max": max((r["peak_rss_kb"] * 1024 for r in reports), default=0),
        },
        "failed_trainers": trainers - len({e[0] for e in events if e[1] == "task_done"}),
        "retries": sum(r["retries"] for r in reports),
        "errors": (missing + [e for r in reports for e in r["errors"]])[:10],
        "timed_out": timed_out,
        "tensorflow_imported": any(r["tensorflow_imported"] for r in reports),
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Tiered vs flat aggregation ({doc['label']})",
        "",
        f"{doc['machine']}; {doc['date']}. {doc['trainers']} no-op trainers "
        f"(bench_e2e.py's, real client over mutual RA-TLS, simulated TEE) in "
        f"{doc['runs'][0]['worker_processes']} worker processes; model "
        f"{doc['params']:,} float32 parameters ({_mb(doc['model_bytes'])}); "
        f"{doc['rounds']} rounds of FedAvg. Every tier shares this machine's cores.",
        "",
        "| mode | relays | round p50 (rounds 2..R) | each round | root CPU s | relays CPU s "
        "(each) | trainer workers CPU s | root peak RSS | relay peak RSS (max) | "
        "worker peak RSS (max) | failed | retries |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["runs"]:
        c, m = r["cpu_s"], r["peak_rss_bytes"]
        each = ", ".join(f"{x:.2f}" for x in r["round_seconds"])
        per = ", ".join(f"{x:.1f}" for x in c["per_relay"])
        lines.append(
            f"| {r['mode']} | {r['relays']} | {r['round_p50_s']:.2f} s | {each} | "
            f"{c['root']:.1f} | {c['relays']:.1f}{f' ({per})' if per else ''} | "
            f"{c['trainer_workers']:.1f} | {_mb(m['root'])} | "
            f"{_mb(m['relays_max']) if r['relays'] else '-'} | {_mb(m['trainer_workers_max'])} | "
            f"{r['failed_trainers']} | {r['retries']} |"
        )
    lines += ["", "CPU seconds are counted from the first TRAIN task to the last DONE task."]
    if doc.get("note"):
        lines += ["", doc["note"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=1000)
    p.add_argument("--relays", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--params", type=int, default=DEFAULT_PARAMS)
    p.add_argument("--workers", type=int, default=8, help="trainer worker processes")
    p.add_argument("--timeout", type=float, default=3000.0, help="seconds per mode")
    p.add_argument("--quick", action="store_true", help="smoke: 8 trainers, 2 relays, 2 rounds")
    p.add_argument("--label", default="", help="names the result files")
    p.add_argument("--note", default="", help="a sentence written under the table")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--only", choices=["flat", "tiered"], nargs="+", default=["tiered", "flat"])
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.trainers, args.relays, args.rounds, args.params, args.workers = 8, 2, 2, 10_000, 2
    if args.relays < 1 or args.trainers < args.relays:
        p.error("need at least one relay and at least as many trainers as relays")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="hfl-bench-tiered-"))
    weights = e2e.make_model(args.params)
    fed = e2e.prepare(workdir / "fed", weights)
    stem = "tiered" + (f"-{args.label}" if args.label else "") + ("-quick" if args.quick else "")
    doc: dict[str, Any] = {
        "label": args.label or "default",
        "machine": e2e._machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "trainers": args.trainers,
        "relays": args.relays,
        "rounds": args.rounds,
        "params": args.params,
        "model_bytes": e2e.model_bytes(weights),
        "note": args.note,
        "runs": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with e2e.attestation_service(fed) as attestation:
            for mode in args.only:
                log.info("%s: %d trainers", mode, args.trainers)
                result = run_mode(
                    mode,
                    fed,
                    attestation,
                    workdir,
                    args.trainers,
                    args.relays if mode == "tiered" else 0,
                    args.rounds,
                    args.workers,
                    args.timeout,
                )
                log.info("%s", json.dumps(result))
                doc["runs"].append(result)
                (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
                (args.out / f"{stem}.md").write_text(markdown(doc))
    finally:
        if args.keep:
            log.info("work directory kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
