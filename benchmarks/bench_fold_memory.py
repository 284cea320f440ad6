"""Peak memory of a FedAvg round's fold, against the number of updates.

Folds N updates (N = 2, 4, 8 by default) of a float32 model of --size-mb
through `MeanAccumulator`, then applies the mean to the global model as
FedAvg does, and prints the peak traced memory (tracemalloc, which sees
numpy's buffers) as a multiple of the model size. The global model is
counted, so the aim is a flat ratio of about 3: the global model, the
running sum, and the one update being decoded (or, at the end, the new
global model).

With --strategy median the updates go through an encrypted `SpillStore`
instead, and the peak is about 3x the model plus N x the largest tensor.

    .venv/bin/python benchmarks/bench_fold_memory.py                 # 25 MB model
    .venv/bin/python benchmarks/bench_fold_memory.py --size-mb 100   # ResNet-50 scale
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc

import numpy as np

from hfl_aggregator.accumulate import MeanAccumulator, SpillStore, Weights
from hfl_aggregator.strategies import make_strategy

# Largest tensor of the synthetic model: 2048 x 1000 float32 (about 8 MB),
# ResNet-50's classifier kernel.
_LARGEST = (2048, 1000)


def synthetic_layout(size_mb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors adding up to about size_mb MB of float32, none above _LARGEST."""
    budget = int(size_mb * 1e6) // 4
    shapes: list[tuple[str, tuple[int, ...]]] = []
    sizes = [(3, 3, 256, 256), (1, 1, 1024, 256), (1, 1, 256, 1024), (512,), _LARGEST]
    i = 0
    while budget > 0:
        shape = sizes[i % len(sizes)]
        elements = int(np.prod(shape))
        if elements > budget:
            shape = (budget,)
            elements = budget
        shapes.append((f"layer{i}/{'x'.join(map(str, shape))}", shape))
        budget -= elements
        i += 1
    return shapes


def random_update(layout: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> Weights:
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in layout}


def measure(
    layout: list[tuple[str, tuple[int, ...]]], n: int, strategy_name: str
) -> tuple[int, float]:
    """(peak traced bytes, seconds) for one round of n updates, global model included."""
    rng = np.random.default_rng(n)
    strategy = make_strategy(strategy_name, {})
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        global_weights = {name: np.zeros(shape, np.float32) for name, shape in layout}
        if strategy.needs_all_updates:
            with tempfile.TemporaryDirectory() as tmp, SpillStore(global_weights, tmp) as store:
                for _ in range(n):
                    update = random_update(layout, rng)
                    store.add(update, 100)
                    del update
                new = strategy.aggregate(global_weights, store)
        else:
            acc = MeanAccumulator(global_weights)
            for _ in range(n):
                update = random_update(layout, rng)
                acc.add(update, 100)
                del update
            new = strategy.aggregate(global_weights, acc)
            del acc
        del new
        return tracemalloc.get_traced_memory()[1], time.perf_counter() - start
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=25.0, help="model size in MB (1e6 bytes)")
    parser.add_argument("--counts", default="2,4,8", help="numbers of updates, comma-separated")
    parser.add_argument("--strategy", default="fedavg", help="fedavg (fold) or median (spill)")
    args = parser.parse_args()
    layout = synthetic_layout(args.size_mb)
    model_bytes = sum(int(np.prod(s)) * 4 for _, s in layout)
    largest = max(int(np.prod(s)) * 4 for _, s in layout)
    print(
        f"model: {model_bytes / 1e6:.1f} MB in {len(layout)} float32 tensors "
        f"(largest {largest / 1e6:.1f} MB), strategy {args.strategy}"
    )
    print(f"{'updates':>8} {'peak MB':>10} {'peak/model':>11} {'seconds':>8}")
    for n in (int(c) for c in args.counts.split(",")):
        peak, seconds = measure(layout, n, args.strategy)
        print(f"{n:>8} {peak / 1e6:>10.1f} {peak / model_bytes:>11.2f} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
