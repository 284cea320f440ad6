"""Each global model version encoded and hashed once, every trainer's download served from it.

Without it, DownloadModel encodes the model again (and hashes all of its bytes) for every
trainer: N trainers, N passes of SHA-256 over the model per round. `ModelCache.get`
does the work once per (version, encoding): for RAW, the chunks are memoryviews straight
into the model's arrays (a chunk that spans two tensors is a tuple of views, joined
only while its message is built), so a cached version costs no copy of the model; a lossy
encoding is encoded once into its own buffers. Concurrent downloads of a version that is
not cached yet wait for the one encoding instead of doing their own.

Memory is bounded: at most `versions` versions are kept (default 1, the current one;
the engine never serves another). A download still streaming an evicted version keeps
only that version alive, through its own reference, until it ends.

The arrays must not change once they are cached (the round engine installs a new dict of
new arrays for every version and never writes into a published one). The stream is
byte for byte what `encode_tensors` + `iter_download_messages` produce for the same
weights and chunk size: same header, chunks and SHA-256.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_common.api import aggregator_pb2, tensor_pb2
from hfl_common.codec import DEFAULT_CHUNK_BYTES, encode_tensors
from hfl_common.codec.dtypes import wire_dtype

# The chunk of a download. Each download in flight holds about one chunk at a time
# a few times over (the message's bytes, its serialization, gRPC's buffers): at 1 MiB
# that is several MB per trainer downloading at once. 4 MB model x 64 trainers, BDP probing
# off (64 KiB window): peak RSS 312 MB at 256 KiB vs 411 MB at 1 MiB (docs/performance.md).
DOWNLOAD_CHUNK_BYTES = 256 * 1024

# One chunk's bytes: its pieces in order (one view when it lies within one tensor).
_Chunk = tuple[memoryview | bytes, ...]


@dataclass(frozen=True)
class EncodedModel:
    """One model version, encoded: its tensor header, its chunks and its trailer."""

    model_version: int
    header: tensor_pb2.TensorStreamHeader
    chunks: tuple[_Chunk, ...]
    trailer: tensor_pb2.TensorStreamTrailer

    @property
    def total_bytes(self) -> int:
        return int(self.header.total_bytes)

    def download_messages(
        self, round: int, plan_sha256: str
    ) -> Iterator[aggregator_pb2.DownloadModelResponse]:
        """The DownloadModel stream: ModelHeader, the chunks, the trailer."""
        yield aggregator_pb2.DownloadModelResponse(
            header=aggregator_pb2.ModelHeader(
                round=round,
                model_version=self.model_version,
                plan_sha256=plan_sha256,
                tensors=self.header,
            )
        )
        offset = 0
        for parts in self.chunks:
            data = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
            yield aggregator_pb2.DownloadModelResponse(
                chunk=tensor_pb2.TensorChunk(offset=offset, data=data)
            )
            offset += len(data)
        yield aggregator_pb2.DownloadModelResponse(trailer=self.trailer)


def _raw_pieces(
    header: tensor_pb2.TensorStreamHeader, arrays: list[npt.NDArray[Any]]
) -> Iterator[memoryview]:
    for spec, array in zip(header.tensors, arrays, strict=True):
        if spec.encoded_bytes == 0:
            continue
        # A view when the array is contiguous little-endian (always, for the engine's
        # models); otherwise this one tensor is converted once, and cached with the rest.
        raw = np.ascontiguousarray(array, dtype=wire_dtype(spec.spec.dtype))
        yield raw.reshape(-1).view(np.uint8).data


def _split(pieces: Iterator[memoryview | bytes], chunk_bytes: int) -> Iterator[_Chunk]:
    pending: list[memoryview | bytes] = []
    size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = min(len(view), chunk_bytes - size)
            pending.append(view[:take])
            size += take
            view = view[take:]
            if size == chunk_bytes:
                yield tuple(pending)
                pending, size = [], 0
    if pending:
        yield tuple(pending)


def encode_model(
    model_version: int,
    weights: Mapping[str, npt.NDArray[Any]],
    encoding: int = tensor_pb2.ENCODING_RAW,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> EncodedModel:
    """Encode and hash `weights` once. RAW keeps views of the arrays; lossy encodings
    keep their encoded chunks."""
    stream = encode_tensors(weights, encoding, chunk_bytes=chunk_bytes)
    header = stream.header
    chunks: list[_Chunk]
    if all(t.encoding == tensor_pb2.ENCODING_RAW for t in header.tensors):
        chunks = list(
            _split(_raw_pieces(header, [weights[t.spec.name] for t in header.tensors]), chunk_bytes)
        )
        hasher = hashlib.sha256()
        for parts in chunks:
            for part in parts:
                hasher.update(part)
        total = sum(len(p) for parts in chunks for p in parts)
        trailer = tensor_pb2.TensorStreamTrailer(sha256=hasher.digest(), total_bytes=total)
    else:
        chunks = [(c.data,) for c in stream.chunks()]
        trailer = stream.trailer()
    return EncodedModel(model_version, header, tuple(chunks), trailer)


class ModelCache:
    """Encoded model versions, each made once; see the module docstring."""

    def __init__(self, chunk_bytes: int = DOWNLOAD_CHUNK_BYTES, versions: int = 1) -> None:
        if versions < 1:
            raise ValueError(f"versions {versions} must be at least 1")
        self._chunk_bytes = chunk_bytes
        self._versions = versions
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], EncodedModel] = OrderedDict()
        # How many times a model was encoded (tests and benchmarks read it).
        self.encodings = 0

    def get(
        self,
        model_version: int,
        weights: Mapping[str, npt.NDArray[Any]],
        encoding: int = tensor_pb2.ENCODING_RAW,
    ) -> EncodedModel:
        """The encoded `weights` of `model_version`, encoded now if not cached yet.

        `weights` must be the model of that version (the caller reads both from the engine
        at once). Callers for the same key while it is being encoded wait for it.
        """
        key = (model_version, int(encoding))
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                return cached
            encoded = encode_model(model_version, weights, encoding, self._chunk_bytes)
            self.encodings += 1
            self._entries[key] = encoded
            # Keep the newest `versions` versions (all encodings of each).
            kept = sorted({v for v, _ in self._entries}, reverse=True)[: self._versions]
            for old in [k for k in self._entries if k[0] not in kept]:
                del self._entries[old]
            return encoded

    def cached_versions(self) -> list[int]:
        with self._lock:
            return sorted({v for v, _ in self._entries})
