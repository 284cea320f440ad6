"""A ResNet-50 round of a real federation, split into training time and framework time.

Writes a small CIFAR-10 set in the binary distribution format (random pixels and labels:
`--train-images` images over data_batch_1..5.bin, `--test-images` in test_batch.bin; the
speed of a step does not depend on the pixels), then runs `hfl run --model resnet50
--dataset cifar10` with 2 trainers: real TensorFlow trainers, the real aggregator and
attestation service, simulated TEE. Per round it reads

- the round's duration from the aggregator (rounds.json: from the round's start to its
  aggregation; evaluation is not in it);
- each trainer's training time: num_examples / examples_per_second from its
  "round N finished" log record (the tf.function training loop's wall time; round 1
  includes compiling it);

and reports training (the slower trainer) vs framework time (duration - training:
downloads, decode, set_weights, the delta, encoding, upload, fold, aggregation,
checkpoint) for rounds 2.., plus the first round apart. JSON and markdown under
benchmarks/results/resnet-round-<label>.*.

    .venv/bin/python benchmarks/bench_resnet_round.py              # 3 rounds, 256 images
    .venv/bin/python benchmarks/bench_resnet_round.py --rounds 4 --train-images 512
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
HFL = Path(sys.executable).parent / "hfl"
RECORD = 1 + 32 * 32 * 3


def write_cifar_bin(directory: Path, train: int, test: int, seed: int = 0) -> Path:
    """CIFAR-10 binary batches of random images: `train` over 5 files, `test` in one."""
    folder = directory / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(path: Path, n: int) -> None:
        records = rng.integers(0, 256, size=(n, RECORD), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=n)
        path.write_bytes(records.tobytes())

    per = -(-train // 5)
    for i in range(1, 6):
        batch(folder / f"data_batch_{i}.bin", per)
    batch(folder / "test_batch.bin", test)
    return folder


def training_seconds(log: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        eps = record.get("examples_per_second")
        if eps and "round" in record and str(record.get("msg", "")).startswith("round "):
            out[int(record["round"])] = float(record["num_examples"]) / float(eps)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-images", type=int, default=256, help="split between 2 trainers")
    p.add_argument("--test-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--label", default="latest")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hfl-bench-resnet-") as tmp:
        data = write_cifar_bin(Path(tmp), args.train_images, args.test_images)
        workdir = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run(
            [str(HFL), "run", "--model", "resnet50", "--dataset", "cifar10",
             "--data-dir", str(data), "--trainers", "2", "--rounds", str(args.rounds),
             "--batch-size", str(args.batch_size), "--workdir", str(workdir), "--no-plot"],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        rounds = json.loads((workdir / "rounds.json").read_text())
        trainers = [
            training_seconds(log) for log in sorted((workdir / "logs").glob("trainer-*.log"))
        ]
    rows = []
    for r in rounds:
        n = int(r["round"])
        train = max((t.get(n, float("nan")) for t in trainers), default=float("nan"))
        rows.append(
            {"round": n, "round_s": r["seconds"], "training_s": train,
             "framework_s": r["seconds"] - train}
        )  # fmt: skip
    steady = [row for row in rows if row["round"] > 1]
    summary = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "examples_per_trainer": args.train_images // 2,
        "batch_size": args.batch_size,
        "wall_s_including_startup": wall,
        "rounds": rows,
        "steady_round_s": statistics.median(r["round_s"] for r in steady) if steady else None,
        "steady_training_s": statistics.median(r["training_s"] for r in steady) if steady else None,
        "steady_framework_s": statistics.median(r["framework_s"] for r in steady)
        if steady
        else None,
    }
    lines = [
        f"ResNet-50 (25.6M params), 2 trainers x {args.train_images // 2} CIFAR-format images, "
        f"batch {args.batch_size}, {os.cpu_count()} cores; whole run {wall:.0f} s",
        "",
        "| round | round (aggregator) | training (slower trainer) | framework |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['round']} | {r['round_s']:.2f} s | {r['training_s']:.2f} s | "
        f"{r['framework_s']:.2f} s |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"resnet-round-{args.label}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"resnet-round-{args.label}.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
