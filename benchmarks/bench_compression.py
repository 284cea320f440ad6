"""Error and size of each update encoding, on real model deltas.

Trains the small CNN on half of the digits for five local epochs (an update
like a trainer's in the demo) and ResNet-20 for three epochs on synthetic 32x32 images,
then sends each delta through the codec with every encoding and reports,
against the raw float32 stream in the same run: bytes on the wire (ratio),
relative L2 error of the whole update, worst relative error per tensor, and
the held-out accuracy of the model after applying the decoded update.

    .venv/bin/python benchmarks/bench_compression.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from hfl_common.api import tensor_pb2
from hfl_common.codec import decode_stream, encode_tensors
from hfl_trainer import data as data_lib
from hfl_trainer.models import build_model, get_weights
from hfl_trainer.training import LocalTrainer

ENCODINGS = {
    "raw": tensor_pb2.ENCODING_RAW,
    "float16": tensor_pb2.ENCODING_FLOAT16,
    "bfloat16": tensor_pb2.ENCODING_BFLOAT16,
    "int8": tensor_pb2.ENCODING_INT8,
}


def round_trip(update: dict[str, np.ndarray], encoding: int) -> tuple[int, dict[str, np.ndarray]]:
    stream = encode_tensors(update, encoding)
    chunks = list(stream.chunks())
    size = sum(len(c.data) for c in chunks)
    decoded = decode_stream(
        stream.header, [*chunks, stream.trailer()], max_total_bytes=size * 8 + 4096
    )
    return size, decoded


def measure(name: str, trainer: LocalTrainer, weights: dict[str, np.ndarray], epochs: int) -> None:
    delta = trainer.train_delta(weights, epochs=epochs).delta
    flat = np.concatenate([d.ravel().astype(np.float64) for d in delta.values()])
    print(f"\n{name}: update of {flat.size:,} values, L2 norm {np.linalg.norm(flat):.4g}")
    print(
        f"{'encoding':<9} {'bytes':>10} {'ratio':>6} {'rel L2 err':>11} "
        f"{'worst tensor':>12} {'accuracy':>9}"
    )
    raw_size = 0
    for label, code in ENCODINGS.items():
        size, decoded = round_trip(delta, code)
        raw_size = raw_size or size
        err = np.concatenate([(decoded[k].astype(np.float64) - delta[k]).ravel() for k in delta])
        worst = max(
            float(np.linalg.norm(decoded[k].astype(np.float64) - delta[k]))
            / max(float(np.linalg.norm(delta[k])), 1e-30)
            for k in delta
        )
        updated = {k: weights[k] + decoded[k].astype(weights[k].dtype) for k in weights}
        acc = trainer.evaluate(updated).accuracy
        print(
            f"{label:<9} {size:>10,} {size / raw_size:>6.2f} "
            f"{np.linalg.norm(err) / np.linalg.norm(flat):>11.2e} {worst:>12.2e} {acc:>9.4f}"
        )


def main() -> None:
    digits = data_lib.load_digits()
    part = digits.with_train_indices(data_lib.partition(digits.y_train, 2, 0, seed=0))
    model = build_model("small_cnn", (8, 8, 1), 10, seed=0)
    trainer = LocalTrainer(model, part, batch_size=32, learning_rate=0.05)
    measure(
        "small_cnn on digits, 5 local epochs from the initial model", trainer, get_weights(model), 5
    )

    synth = data_lib.synthetic(256, (32, 32, 3), 10, seed=0)
    resnet = build_model("resnet20", (32, 32, 3), 10, seed=0)
    trainer = LocalTrainer(resnet, synth, batch_size=32, learning_rate=0.05)
    measure("resnet20 on synthetic 32x32, 3 local epochs", trainer, get_weights(resnet), 3)


if __name__ == "__main__":
    main()
