"""Throughput of the trainer's local epochs against plain Keras `Model.fit`.

For each workload, builds the same model twice from the same seed, runs one
warm-up epoch on each (compiling the train step), then times `--epochs`
epochs of `LocalTrainer.train_delta` and of `model.fit` (same batch size,
same optimizer: SGD with momentum 0.9, same data, verbose=0) and prints
examples per second and the ratio trainer / fit. The aim is a ratio of at
least 0.9. The two are measured alternately, `--repeats` times each; the
best of each is kept. On a shared or loaded machine, rerun: the ratio is
what matters, and the absolute numbers move with the load.

Workloads: small_cnn on scikit-learn's digits; resnet20 on synthetic 32x32x3
data (a few hundred examples).

    .venv/bin/python benchmarks/bench_trainer_throughput.py           # full
    .venv/bin/python benchmarks/bench_trainer_throughput.py --quick   # a short run
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from hfl_trainer import models
from hfl_trainer.data import Dataset, load_digits, synthetic
from hfl_trainer.training import SGD_MOMENTUM, LocalTrainer


@dataclass(frozen=True)
class Workload:
    model: str
    dataset: Dataset
    batch_size: int
    learning_rate: float


def measure(
    workload: Workload, epochs: int, repeats: int, jit_compile: bool
) -> tuple[float, float]:
    """Best examples/s of `model.fit` and of `train_delta`, measured alternately.

    Alternating the two keeps a change in machine load (other processes on a
    shared machine) from favouring one side.
    """
    data = workload.dataset
    fit_model = models.build_model(workload.model, data.input_shape, data.num_classes, seed=0)
    fit_model.compile(
        optimizer=keras.optimizers.SGD(workload.learning_rate, momentum=SGD_MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model = models.build_model(workload.model, data.input_shape, data.num_classes, seed=0)
    trainer = LocalTrainer(
        model,
        data,
        batch_size=workload.batch_size,
        learning_rate=workload.learning_rate,
        jit_compile=jit_compile,
    )
    weights = models.get_weights(model)
    examples = epochs * data.y_train.shape[0]

    def run_fit(n: int) -> None:
        fit_model.fit(
            data.x_train, data.y_train, batch_size=workload.batch_size, epochs=n, verbose=0
        )

    def run_trainer(n: int) -> None:
        trainer.train_delta(weights, epochs=n)

    run_fit(1)  # warm-up: traces and compiles the train step
    run_trainer(1)
    best_fit = best_trainer = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        run_fit(epochs)
        best_fit = max(best_fit, examples / (time.perf_counter() - start))
        start = time.perf_counter()
        run_trainer(epochs)
        best_trainer = max(best_trainer, examples / (time.perf_counter() - start))
    return best_fit, best_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="measurements (best kept)")
    parser.add_argument(
        "--jit",
        action="store_true",
        help="compile the trainer's steps with XLA (fit: Keras default)",
    )
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.quick else 5)
    repeats = args.repeats or (1 if args.quick else 3)
    cifar_examples = 256 if args.quick else 512

    workloads = {
        "small_cnn / digits": Workload("small_cnn", load_digits(), 32, 0.05),
        "resnet20 / synthetic 32x32x3": Workload(
            "resnet20",
            synthetic(cifar_examples, (32, 32, 3), 10, seed=0, test_fraction=0.2),
            32,
            0.05,
        ),
    }
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs, {epochs} timed epochs, best of {repeats}, "
        f"trainer XLA {'on' if args.jit else 'off'}"
    )
    print(f"{'workload':32} {'examples':>8} {'fit ex/s':>10} {'trainer ex/s':>13} {'ratio':>6}")
    for label, workload in workloads.items():
        fit, ours = measure(workload, epochs, repeats, args.jit)
        examples = workload.dataset.y_train.shape[0]
        print(f"{label:32} {examples:>8} {fit:>10,.0f} {ours:>13,.0f} {ours / fit:>6.2f}")


if __name__ == "__main__":
    main()
