"""Where a round's updates go before a strategy combines them.

Two ways to hold a round's updates, both behind `UpdateSource`:

- `MeanAccumulator` folds each update into a running weighted sum as soon as
  it is decoded, so a FedAvg-type round holds the global model, the running
  sum and the one update being decoded: 3x the model, whatever the number of
  trainers.
- `SpillStore` keeps every update, for strategies that need them all
  (median, trimmed mean, Krum). Updates are written to disk encrypted with
  AES-256-GCM under a random key that lives only in this process's memory,
  so the spill files are useless to the host that stores them. They are read
  back one update at a time, or one tensor of every update at a time
  (`stacked`), which is what coordinate-wise rules need: n x the largest
  tensor, not n x the model.

The running sum is float32 for float32 (and narrower) models. A float64 sum
would be more accurate but costs 2x the model, which breaks the 3x budget
above. The float32 sum's rounding error is at most about n * 2**-24 relative
(n = number of updates), below 1e-6 for dozens of trainers: far below the
noise of stochastic training. Pass ``sum_dtype=np.float64`` for small models
where the memory does not matter. Float64 tensors are always summed in
float64, integer tensors in float64 with the mean rounded back.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import grpc
import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hfl_common.errors import FailedPreconditionError, HflError, InvalidArgumentError

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
# A model or an update: tensor name -> array, in the model's order.
Weights = dict[str, Array]

# Elements folded per step of `MeanAccumulator`: bounds its scratch buffer
# (4 MiB of float64) whatever the size of the largest tensor.
_FOLD_BLOCK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class TensorLayout:
    """Name, shape and dtype of one tensor of a model."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in its own dtype."""
        return self.size * self.dtype.itemsize


ModelSpec = Mapping[str, Array] | Sequence[tuple[str, Sequence[int], npt.DTypeLike]]


def model_layout(spec: ModelSpec | Sequence[TensorLayout]) -> list[TensorLayout]:
    """The layout of a model, from a template model or a list of (name, shape, dtype)."""
    layout: list[TensorLayout] = []
    if isinstance(spec, Mapping):
        for name, array in spec.items():
            layout.append(TensorLayout(name, tuple(array.shape), array.dtype))
    else:
        for entry in spec:
            if isinstance(entry, TensorLayout):
                layout.append(entry)
            else:
                name, shape, dtype = entry
                layout.append(TensorLayout(name, tuple(int(d) for d in shape), np.dtype(dtype)))
    if not layout:
        raise InvalidArgumentError("the model spec has no tensors")
    names = [t.name for t in layout]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgumentError(f"the model spec names tensors more than once: {duplicates}")
    for t in layout:
        if any(d < 0 for d in t.shape):
            raise InvalidArgumentError(f"tensor {t.name!r} has a negative dimension {t.shape}")
    return layout


def check_matches_layout(update: Mapping[str, Array], layout: Sequence[TensorLayout]) -> None:
    """Raise InvalidArgumentError unless `update` has exactly the layout's names and shapes."""
    expected = [t.name for t in layout]
    missing = [n for n in expected if n not in update]
    if missing:
        raise InvalidArgumentError(f"update lacks tensors {missing} of the model")
    extra = [n for n in update if n not in set(expected)]
    if extra:
        raise InvalidArgumentError(f"update has tensors {extra} that the model does not have")
    for t in layout:
        shape = tuple(update[t.name].shape)
        if shape != t.shape:
            raise InvalidArgumentError(
                f"update tensor {t.name!r} has shape {shape}, the model's is {t.shape}"
            )


def _sum_dtype(dtype: np.dtype[Any], float_sum: np.dtype[Any]) -> np.dtype[Any]:
    if np.issubdtype(dtype, np.floating) and dtype.itemsize <= float_sum.itemsize:
        return float_sum
    return np.dtype(np.float64)


def _check_weight(weight: float) -> float:
    value = float(weight)
    if not math.isfinite(value) or value <= 0.0:
        raise InvalidArgumentError(f"an update's weight must be finite and > 0, got {weight}")
    return value


def _check_scale(scale: float) -> float:
    value = float(scale)
    if not math.isfinite(value) or value < 0.0:
        raise InvalidArgumentError(f"an update's scale must be finite and >= 0, got {scale}")
    return value


class UpdateSource(Protocol):
    """A round's updates, as a strategy sees them.

    Mean-type strategies call `mean()`, `total_weight` and `count` only;
    strategies with ``needs_all_updates`` also use `weights()`, `stacked()`
    and `updates()`, which only a source that kept every update provides
    (the others raise FailedPreconditionError).
    """

    @property
    def count(self) -> int:
        """Number of updates in the round."""
        ...

    @property
    def total_weight(self) -> float:
        """Sum of the updates' weights (their num_examples)."""
        ...

    def layout(self) -> list[TensorLayout]:
        """Names, shapes and dtypes of the updates' tensors, in model order."""
        ...

    def mean(self) -> Weights:
        """The weighted mean of the updates; InvalidArgumentError when there are none."""
        ...

    def weights(self) -> list[float]:
        """Each update's weight, in arrival order."""
        ...

    def stacked(self, name: str) -> Array:
        """Tensor `name` of every update, stacked: shape (count, *tensor shape)."""
        ...

    def updates(self) -> Iterator[tuple[Weights, float]]:
        """Every update with its weight, one at a time, in arrival order."""
        ...


class MeanAccumulator:
    """Folds whole, validated updates into a running weighted sum; `mean()` divides it once.

    An update is folded only after it was decoded and validated completely (the
    engine's admission), so nothing folded ever has to be taken out again.
    """

    def __init__(
        self,
        spec: ModelSpec | Sequence[TensorLayout],
        sum_dtype: npt.DTypeLike = np.float32,
    ) -> None:
        float_sum = np.dtype(sum_dtype)
        if float_sum not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise InvalidArgumentError(f"sum_dtype must be float32 or float64, got {float_sum}")
        self._layout = model_layout(spec)
        self._by_name = {t.name: t for t in self._layout}
        self._sums: dict[str, Array] = {
            t.name: np.zeros(t.shape, dtype=_sum_dtype(t.dtype, float_sum)) for t in self._layout
        }
        self._scratch: dict[np.dtype[Any], Array] = {}
        self._count = 0
        self._total_weight = 0.0
        self._mean: Weights | None = None

    @property
    def count(self) -> int:
        """Number of updates folded and committed."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the committed updates' weights."""
        return self._total_weight

    def layout(self) -> list[TensorLayout]:
        """The model layout this accumulator folds."""
        return list(self._layout)

    def add(self, update: Mapping[str, Array], weight: float, scale: float = 1.0) -> None:
        """Fold one whole update with its weight (its num_examples).

        `scale` multiplies the update's values (a norm clip, a staleness weight) as they
        are folded, without counting in the total weight: the mean divides by the sum
        of the weights only. Folding scaled is how the engine clips or down-weights an
        update without a scaled copy of it.
        """
        self._check_open()
        w = _check_weight(weight)
        s = _check_scale(scale)
        check_matches_layout(update, self._layout)
        for t in self._layout:
            self._fold(t.name, 0, np.asarray(update[t.name]).reshape(-1), w * s)
        self._count += 1
        self._total_weight += w

    def mean(self) -> Weights:
        """The weighted mean, in the model's dtypes; the accumulator is closed after it.

        The division happens in place in the sum buffers, so no second copy of
        the model is made. Later calls return the same arrays.
        """
        if self._mean is not None:
            return self._mean
        if self._count == 0:
            raise InvalidArgumentError("no updates to average: the round received none")
        result: Weights = {}
        for t in self._layout:
            total = self._sums.pop(t.name)
            total /= self._total_weight
            if np.issubdtype(t.dtype, np.integer):
                np.rint(total, out=total)
            result[t.name] = total.astype(t.dtype, copy=False)
            del total
        self._scratch.clear()
        self._mean = result
        return result

    def weights(self) -> list[float]:
        """Not available: the updates were folded."""
        raise self._folded_error()

    def stacked(self, name: str) -> Array:
        """Not available: the updates were folded."""
        raise self._folded_error()

    def updates(self) -> Iterator[tuple[Weights, float]]:
        """Not available: the updates were folded."""
        raise self._folded_error()

    def _folded_error(self) -> FailedPreconditionError:
        return FailedPreconditionError(
            "the round's updates were folded into a mean; a strategy that needs every "
            "update must be given a SpillStore"
        )

    def _check_open(self) -> None:
        if self._mean is not None:
            raise FailedPreconditionError("the accumulator was already averaged; start a new one")

    def _fold(self, name: str, offset: int, flat: Array, weight: float) -> None:
        """target[offset:offset + flat.size] += weight * flat, a block at a time."""
        target = self._sums[name].reshape(-1)
        scratch = self._scratch.get(target.dtype)
        if scratch is None:
            scratch = np.empty(_FOLD_BLOCK_ELEMENTS, dtype=target.dtype)
            self._scratch[target.dtype] = scratch
        for start in range(0, flat.size, _FOLD_BLOCK_ELEMENTS):
            block = flat[start : start + _FOLD_BLOCK_ELEMENTS]
            tmp = scratch[: block.size]
            np.multiply(block, weight, out=tmp, casting="unsafe")
            dst = target[offset + start : offset + start + block.size]
            np.add(dst, tmp, out=dst)


class InMemoryUpdates:
    """Every update kept in memory: for tests and small models."""

    def __init__(self, updates: Sequence[tuple[Mapping[str, Array], float]]) -> None:
        if not updates:
            raise InvalidArgumentError("no updates to aggregate: the round received none")
        self._layout = model_layout(updates[0][0])
        self._updates: list[tuple[Weights, float]] = []
        for update, weight in updates:
            check_matches_layout(update, self._layout)
            self._updates.append(
                ({t.name: np.asarray(update[t.name]) for t in self._layout}, _check_weight(weight))
            )

    @property
    def count(self) -> int:
        """Number of updates."""
        return len(self._updates)

    @property
    def total_weight(self) -> float:
        """Sum of the updates' weights."""
        return sum(w for _, w in self._updates)

    def layout(self) -> list[TensorLayout]:
        """The updates' layout."""
        return list(self._layout)

    def mean(self) -> Weights:
        """The weighted mean."""
        acc = MeanAccumulator(self._layout)
        for update, weight in self._updates:
            acc.add(update, weight)
        return acc.mean()

    def weights(self) -> list[float]:
        """Each update's weight."""
        return [w for _, w in self._updates]

    def stacked(self, name: str) -> Array:
        """Tensor `name` of every update, stacked."""
        if name not in self._updates[0][0]:
            raise InvalidArgumentError(f"the updates have no tensor {name!r}")
        return np.stack([u[name] for u, _ in self._updates])

    def updates(self) -> Iterator[tuple[Weights, float]]:
        """Every update with its weight."""
        return iter(list(self._updates))


class SpillIntegrityError(HflError):
    """A spill file was modified, truncated or removed by someone other than this process."""

    code = grpc.StatusCode.DATA_LOSS


# AES-GCM nonce: 4-byte big-endian update index, then 8-byte big-endian segment
# index. The key is fresh per store, so (update, segment) never repeats under a
# key (NIST SP 800-38D section 8.2.1, deterministic construction).
_NONCE = struct.Struct(">IQ")
# AES-GCM tag length in bytes (NIST SP 800-38D; cryptography's AESGCM default).
_TAG_BYTES = 16
_AAD = b"hfl-spill-v1"
# Plaintext bytes per encrypted segment: bounds the crypto buffers to a
# constant, and stays far below AESGCM's 2**31 - 1 byte limit per call.
_SEGMENT_BYTES = 4 << 20


@dataclass(frozen=True)
class _Segment:
    tensor: int
    index: int  # global segment index within one update: part of the nonce
    byte_start: int  # within the tensor's bytes
    byte_len: int
    file_offset: int


class SpillStore:
    """A round's updates on disk, encrypted under a key held only in memory.

    One file per update under a fresh private directory inside `directory`;
    `close()` (or leaving the `with` block) deletes them all. The weights
    (num_examples) stay in memory. Reading detects any change to a file and
    raises SpillIntegrityError.
    """

    def __init__(
        self,
        spec: ModelSpec | Sequence[TensorLayout],
        directory: str | os.PathLike[str],
        segment_bytes: int = _SEGMENT_BYTES,
    ) -> None:
        if segment_bytes <= 0 or segment_bytes % 8 != 0:
            raise InvalidArgumentError(
                f"segment_bytes must be a positive multiple of 8, got {segment_bytes}"
            )
        self._layout = model_layout(spec)
        for t in self._layout:
            if t.dtype.byteorder == ">":
                raise InvalidArgumentError(f"tensor {t.name!r} is big-endian ({t.dtype})")
        self._segments = self._plan_segments(segment_bytes)
        self._record_bytes = sum(s.byte_len + _TAG_BYTES for s in self._segments)
        self._aead: AESGCM | None = AESGCM(AESGCM.generate_key(bit_length=256))
        self._dir = Path(tempfile.mkdtemp(prefix="hfl-spill-", dir=os.fspath(directory)))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._weights: list[float] = []
        self._buffer = bytearray(max(s.byte_len for s in self._segments) + _TAG_BYTES)
        logger.debug("spill store opened in %s", self._dir)

    def _plan_segments(self, segment_bytes: int) -> list[_Segment]:
        segments: list[_Segment] = []
        file_offset = 0
        for ti, t in enumerate(self._layout):
            start = 0
            while start < t.nbytes or (start == 0 and t.nbytes == 0):
                length = min(segment_bytes - segment_bytes % t.dtype.itemsize, t.nbytes - start)
                segments.append(_Segment(ti, len(segments), start, length, file_offset))
                file_offset += length + _TAG_BYTES
                start += length
                if t.nbytes == 0:
                    break
        return segments

    @property
    def directory(self) -> Path:
        """The private directory holding this store's files."""
        return self._dir

    @property
    def count(self) -> int:
        """Number of updates stored."""
        return len(self._weights)

    @property
    def total_weight(self) -> float:
        """Sum of the stored updates' weights."""
        return sum(self._weights)

    def layout(self) -> list[TensorLayout]:
        """The updates' layout."""
        return list(self._layout)

    def weights(self) -> list[float]:
        """Each update's weight, in arrival order."""
        return list(self._weights)

    def path_of(self, index: int) -> Path:
        """The file holding update `index`."""
        return self._dir / f"update-{index:06d}.spill"

    def add(self, update: Mapping[str, Array], weight: float, scale: float = 1.0) -> None:
        """Encrypt one update to its own file; float tensors multiplied by `scale` first
        (a segment at a time: no scaled copy of the update)."""
        aead = self._open_aead()
        w = _check_weight(weight)
        s = _check_scale(scale)
        check_matches_layout(update, self._layout)
        index = len(self._weights)
        arrays = [np.ascontiguousarray(update[t.name], dtype=t.dtype) for t in self._layout]
        path = self.path_of(index)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            for seg in self._segments:
                t = self._layout[seg.tensor]
                raw = arrays[seg.tensor].reshape(-1).view(np.uint8)
                plain = raw[seg.byte_start : seg.byte_start + seg.byte_len]
                if s != 1.0 and t.dtype.kind == "f":
                    plain = (plain.view(t.dtype) * s).astype(t.dtype, copy=False).view(np.uint8)
                out = memoryview(self._buffer)[: seg.byte_len + _TAG_BYTES]
                aead.encrypt_into(_NONCE.pack(index, seg.index), plain.data, _AAD, out)
                f.write(out)
        self._weights.append(w)

    def stacked(self, name: str) -> Array:
        """Tensor `name` of every update, decrypted: shape (count, *shape)."""
        self._open_aead()
        ti = next((i for i, t in enumerate(self._layout) if t.name == name), None)
        if ti is None:
            raise InvalidArgumentError(f"the stored updates have no tensor {name!r}")
        t = self._layout[ti]
        out = np.empty((self.count, *t.shape), dtype=t.dtype)
        segments = [s for s in self._segments if s.tensor == ti]
        for index in range(self.count):
            raw = out[index].reshape(-1).view(np.uint8)
            with self._open_file(index) as f:
                for seg in segments:
                    self._read_segment(
                        f, index, seg, raw[seg.byte_start : seg.byte_start + seg.byte_len]
                    )
        return out

    def read(self, index: int) -> Weights:
        """Update `index`, decrypted."""
        self._open_aead()
        if not 0 <= index < self.count:
            raise InvalidArgumentError(f"no stored update {index}; the store has {self.count}")
        update = {t.name: np.empty(t.shape, dtype=t.dtype) for t in self._layout}
        raws = [update[t.name].reshape(-1).view(np.uint8) for t in self._layout]
        with self._open_file(index) as f:
            for seg in self._segments:
                raw = raws[seg.tensor][seg.byte_start : seg.byte_start + seg.byte_len]
                self._read_segment(f, index, seg, raw)
        return update

    def updates(self) -> Iterator[tuple[Weights, float]]:
        """Every update with its weight, decrypted one at a time."""
        for index, weight in enumerate(list(self._weights)):
            yield self.read(index), weight

    def mean(self) -> Weights:
        """The weighted mean, folded one update at a time."""
        acc = MeanAccumulator(self._layout)
        for update, weight in self.updates():
            acc.add(update, weight)
        return acc.mean()

    def close(self) -> None:
        """Delete every spill file and forget the key."""
        self._aead = None
        self._weights = []
        self._cleanup()
        logger.debug("spill store %s deleted", self._dir)

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open_aead(self) -> AESGCM:
        if self._aead is None:
            raise FailedPreconditionError("the spill store was closed; its updates are gone")
        return self._aead

    def _open_file(self, index: int) -> BinaryIO:
        self._open_aead()
        path = self.path_of(index)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise SpillIntegrityError(f"spill file {path} of update {index} is missing") from None
        size = os.fstat(f.fileno()).st_size
        if size != self._record_bytes:
            f.close()
            raise SpillIntegrityError(
                f"spill file {path} of update {index} has {size} bytes, expected "
                f"{self._record_bytes}"
            )
        return f

    def _read_segment(self, f: BinaryIO, index: int, seg: _Segment, out: Array) -> None:
        aead = self._open_aead()
        f.seek(seg.file_offset)
        data = f.read(seg.byte_len + _TAG_BYTES)
        try:
            aead.decrypt_into(_NONCE.pack(index, seg.index), data, _AAD, out.data)
        except InvalidTag:
            raise SpillIntegrityError(
                f"spill file {self.path_of(index)} of update {index} failed authentication "
                f"in tensor {self._layout[seg.tensor].name!r}: it was modified on disk"
            ) from None
