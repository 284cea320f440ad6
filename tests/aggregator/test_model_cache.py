"""The model cache: each version encoded once, every download byte for byte what the
codec's own stream (encode_tensors + iter_download_messages) sends."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from hfl_aggregator.model_cache import DOWNLOAD_CHUNK_BYTES, ModelCache
from hfl_common.api import tensor_pb2
from hfl_common.codec import collect_stream, encode_tensors, iter_download_messages, specs_of

PLAN = "cd" * 32


def model(scale: float = 1.0) -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(3)
    big = (rng.standard_normal((1500, 2000)) * scale).astype(np.float32)  # 12 MB
    return {
        "conv/kernel": big,
        "conv/bias": rng.standard_normal(7).astype(np.float32),
        "dense/kernel64": rng.standard_normal((33, 5)),
        "counter": np.array(3, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "strided": big[:50, ::3],  # not contiguous
        "big_endian": np.arange(11, dtype=">f4"),
    }


def old_path(
    version: int, weights: dict[str, npt.NDArray[Any]], encoding: int, chunk_bytes: int
) -> list[bytes]:
    stream = encode_tensors(weights, encoding, chunk_bytes=chunk_bytes)
    return [m.SerializeToString() for m in iter_download_messages(4, version, PLAN, stream)]


@pytest.mark.parametrize("encoding", [tensor_pb2.ENCODING_RAW, tensor_pb2.ENCODING_BFLOAT16])
def test_two_concurrent_downloads_encode_once_and_send_the_old_paths_bytes(
    encoding: int,
) -> None:
    weights = model()
    chunk_bytes = 64 * 1024 + 3  # chunks that straddle tensors, and an odd size
    cache = ModelCache(chunk_bytes)
    start = threading.Barrier(2)
    streams: list[list[bytes]] = [[], []]

    def download(i: int) -> None:
        start.wait()
        encoded = cache.get(5, weights, encoding)
        streams[i] = [m.SerializeToString() for m in encoded.download_messages(4, PLAN)]

    threads = [threading.Thread(target=download, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.encodings == 1
    expected = old_path(5, weights, encoding, chunk_bytes)
    assert streams[0] == expected
    assert streams[1] == expected


def test_a_cached_download_decodes_to_the_model_bit_for_bit() -> None:
    weights = model()
    encoded = ModelCache(1 << 20).get(2, weights)
    messages = list(encoded.download_messages(1, PLAN))
    header, arrays = collect_stream(
        messages, max_total_bytes=encoded.total_bytes + 1, expected=specs_of(weights)
    )
    assert (header.model_version, header.round, header.plan_sha256) == (2, 1, PLAN)
    for name, array in weights.items():
        assert arrays[name].tobytes() == np.asarray(array, dtype=arrays[name].dtype).tobytes()


def test_raw_chunks_are_views_of_the_model_not_copies() -> None:
    weights = {"w": np.arange(1 << 18, dtype=np.float32)}
    encoded = ModelCache(1 << 16).get(1, weights)
    first = encoded.chunks[0][0]
    assert isinstance(first, memoryview)
    assert np.shares_memory(np.frombuffer(first, dtype=np.uint8), weights["w"])


def test_only_the_newest_versions_are_kept() -> None:
    one = ModelCache(1 << 20)
    two = ModelCache(1 << 20, versions=2)
    for version in (1, 2, 3):
        weights = {"w": np.full(10, version, dtype=np.float32)}
        one.get(version, weights)
        two.get(version, weights)
    assert one.cached_versions() == [3]
    assert two.cached_versions() == [2, 3]
    # a cached version is served again without encoding it again
    two.get(3, {"w": np.full(10, 3, dtype=np.float32)})
    assert two.encodings == 3


def test_each_version_and_encoding_is_encoded_on_its_own() -> None:
    cache = ModelCache(1 << 20)
    a, b = model(), model(scale=2.0)
    first = cache.get(1, a)
    second = cache.get(2, b)
    lossy = cache.get(2, b, tensor_pb2.ENCODING_BFLOAT16)
    assert cache.encodings == 3
    assert first.trailer.sha256 != second.trailer.sha256
    assert lossy.total_bytes < second.total_bytes
    assert [m.SerializeToString() for m in second.download_messages(4, PLAN)] == old_path(
        2, b, tensor_pb2.ENCODING_RAW, 1 << 20
    )


def test_downloads_are_served_in_chunks_of_at_most_256_kib_by_default() -> None:
    weights = {"w": np.arange(1 << 18, dtype=np.float32)}  # 1 MiB
    encoded = ModelCache().get(1, weights)
    messages = list(encoded.download_messages(1, PLAN))
    sizes = [len(m.chunk.data) for m in messages if m.WhichOneof("part") == "chunk"]
    assert sizes == [DOWNLOAD_CHUNK_BYTES] * 4
    assert DOWNLOAD_CHUNK_BYTES == 256 * 1024
    _, arrays = collect_stream(
        messages, max_total_bytes=encoded.total_bytes + 1, expected=specs_of(weights)
    )
    assert arrays["w"].tobytes() == weights["w"].tobytes()
