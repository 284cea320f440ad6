"""Throughput and peak memory of the tensor codec on a ResNet-50-sized float32 model.

Encodes a synthetic model of --size-mb MB (float32, ResNet-50's largest tensor shapes) with
each encoding, decodes it chunk by chunk, and prints the wall time, the throughput in MB/s of
model, the wire size, and the peak traced memory (tracemalloc sees numpy's buffers) beyond the
decoded arrays, which should stay at a few chunks whatever the model size.

    .venv/bin/python benchmarks/bench_codec.py                  # 100 MB, 1 MiB chunks
    .venv/bin/python benchmarks/bench_codec.py --size-mb 25 --chunk-kib 256
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_common.api import tensor_pb2
from hfl_common.codec import StreamDecoder, encode_tensors, specs_of

ENCODINGS = {
    "raw": tensor_pb2.ENCODING_RAW,
    "float16": tensor_pb2.ENCODING_FLOAT16,
    "bfloat16": tensor_pb2.ENCODING_BFLOAT16,
    "int8": tensor_pb2.ENCODING_INT8,
}
SHAPES = [(3, 3, 256, 256), (1, 1, 1024, 256), (1, 1, 256, 1024), (512,), (2048, 1000)]


def synthetic_model(size_mb: float, rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
    budget = int(size_mb * 1e6) // 4
    model: dict[str, npt.NDArray[Any]] = {}
    i = 0
    while budget > 0:
        shape = SHAPES[i % len(SHAPES)]
        if int(np.prod(shape)) > budget:
            shape = (budget,)
        model[f"layer{i}"] = rng.standard_normal(shape, dtype=np.float32)
        budget -= int(np.prod(shape))
        i += 1
    return model


def measure(
    model: dict[str, npt.NDArray[Any]], encoding: int, chunk_bytes: int
) -> tuple[float, int, int]:
    """(seconds, wire bytes, peak traced bytes beyond the decoded arrays) of one round trip."""
    specs = specs_of(model)
    tracemalloc.start()
    start = time.perf_counter()
    stream = encode_tensors(model, encoding, chunk_bytes=chunk_bytes)
    decoder = StreamDecoder(stream.header, expected=specs, max_total_bytes=1 << 34)
    for chunk in stream.chunks():
        decoder.feed(chunk)
    out = decoder.finish(stream.trailer())
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, stream.header.total_bytes, peak - sum(a.nbytes for a in out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    model = synthetic_model(args.size_mb, np.random.default_rng(0))
    model_bytes = sum(a.nbytes for a in model.values())
    print(f"model: {len(model)} tensors, {model_bytes / 1e6:.1f} MB; chunks {args.chunk_kib} KiB")
    print(f"{'encoding':>9} {'seconds':>8} {'MB/s':>8} {'wire MB':>8} {'extra MiB':>10}")
    for name, encoding in ENCODINGS.items():
        seconds, wire, extra = measure(model, encoding, args.chunk_kib * 1024)
        print(
            f"{name:>9} {seconds:8.2f} {model_bytes / 1e6 / seconds:8.0f} "
            f"{wire / 1e6:8.1f} {extra / 2**20:10.2f}"
        )


if __name__ == "__main__":
    main()
