"""Decoding a tensor stream chunk by chunk, straight into preallocated arrays."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_common.api import tensor_pb2
from hfl_common.codec.dtypes import (
    FLOAT_DATA_TYPES,
    KNOWN_ENCODINGS,
    MAX_DIMS,
    check_specs,
    data_type_name,
    element_count,
    encoded_width,
    encoding_name,
    format_shape,
    native_dtype,
    wire_dtype,
)
from hfl_common.codec.lossy import BLOCK_ELEMENTS, decode_block, int8_range_fits
from hfl_common.errors import HflError, InvalidArgumentError, ResourceExhaustedError, StreamError

logger = logging.getLogger(__name__)

# Bytes of a SHA-256 digest (FIPS 180-4).
SHA256_BYTES = 32


class _TensorSink:
    """Decodes the encoded bytes of one tensor into its output array, in arrival order."""

    def __init__(
        self, encoded: tensor_pb2.EncodedTensor, out: npt.NDArray[Any] | None = None
    ) -> None:
        spec = encoded.spec
        self.name = spec.name
        self.encoding = int(encoded.encoding)
        self.scale = float(encoded.scale)
        self.wire = wire_dtype(spec.dtype)
        self.width = encoded_width(spec.dtype, self.encoding)
        self.encoded_bytes = int(encoded.encoded_bytes)
        shape, dtype = tuple(spec.shape), native_dtype(spec.dtype)
        self.array: npt.NDArray[Any]
        if (
            out is not None
            and out.shape == shape
            and out.dtype == dtype
            and out.flags.c_contiguous
            and out.flags.writeable
        ):
            self.array = out  # the caller's buffer, overwritten element by element
        else:
            self.array = np.empty(shape, dtype=dtype)
        self._flat = self.array.reshape(-1)
        self._written = 0  # elements
        self._carry = b""  # the first bytes of an element split across chunks
        self.received = 0  # bytes

    @property
    def remaining(self) -> int:
        return self.encoded_bytes - self.received

    def write(self, piece: memoryview) -> None:
        """Decode `piece`, which the caller guarantees does not run past this tensor."""
        self.received += len(piece)
        if self._carry:
            need = self.width - len(self._carry)
            if len(piece) < need:
                self._carry += piece.tobytes()
                return
            self._decode(self._carry + piece[:need].tobytes())
            piece = piece[need:]
            self._carry = b""
        whole = len(piece) - len(piece) % self.width
        if whole:
            self._decode(piece[:whole])
        if whole < len(piece):
            self._carry = piece[whole:].tobytes()

    def _decode(self, data: memoryview | bytes) -> None:
        count = len(data) // self.width
        out = self._flat[self._written : self._written + count]
        if self.encoding == tensor_pb2.ENCODING_RAW:
            out[...] = np.frombuffer(data, dtype=self.wire)
        else:
            step = BLOCK_ELEMENTS * self.width
            for start in range(0, len(data), step):
                try:
                    values = decode_block(data[start : start + step], self.encoding, self.scale)
                except StreamError as err:
                    raise StreamError(f"tensor {self.name!r}: {err}") from None
                first = start // self.width
                out[first : first + values.size] = values
        self._written += count


def _check_encoded_tensor(index: int, encoded: tensor_pb2.EncodedTensor) -> int:
    """Validate one EncodedTensor of a header; return its decoded size in bytes."""
    spec = encoded.spec
    name = spec.name
    if not name:
        raise InvalidArgumentError(f"tensor header at position {index} has an empty name")
    wire = wire_dtype(spec.dtype, name)
    shape = list(spec.shape)
    if len(shape) > MAX_DIMS:
        raise InvalidArgumentError(
            f"tensor {name!r} has {len(shape)} dimensions; at most {MAX_DIMS} are supported"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(
            f"tensor {name!r} has a negative dimension: {format_shape(shape)}"
        )
    # numpy refuses shapes whose product, zero dimensions aside, overflows an int64 of bytes.
    if math.prod(max(d, 1) for d in shape) * wire.itemsize >= 1 << 62:
        raise InvalidArgumentError(
            f"tensor {name!r} has an impossibly large shape {format_shape(shape)}"
        )
    encoding = int(encoded.encoding)
    if encoding not in KNOWN_ENCODINGS:
        raise InvalidArgumentError(
            f"tensor {name!r} has encoding {encoding_name(encoding)}; "
            "expected RAW, FLOAT16, BFLOAT16 or INT8"
        )
    dtype_name = data_type_name(spec.dtype)
    if encoding != tensor_pb2.ENCODING_RAW:
        if spec.dtype not in FLOAT_DATA_TYPES:
            raise InvalidArgumentError(
                f"tensor {name!r} is {dtype_name}: only float tensors may use "
                f"ENCODING_{encoding_name(encoding)}, integer tensors travel RAW"
            )
        if spec.dtype == tensor_pb2.DATA_TYPE_FLOAT16 and encoding == tensor_pb2.ENCODING_BFLOAT16:
            raise InvalidArgumentError(
                f"tensor {name!r} is float16: ENCODING_BFLOAT16 would lose precision and range "
                "at no gain in size; send it RAW"
            )
    scale = float(encoded.scale)
    if encoding == tensor_pb2.ENCODING_INT8:
        if not math.isfinite(scale) or scale < 0.0:
            raise InvalidArgumentError(
                f"tensor {name!r} has INT8 scale {scale!r}; it must be finite and >= 0"
            )
        if not int8_range_fits(scale, wire):
            raise InvalidArgumentError(
                f"tensor {name!r} has INT8 scale {scale!r}, too large for {dtype_name} values"
            )
    elif scale != 0.0:
        raise InvalidArgumentError(
            f"tensor {name!r} has scale {scale!r} but encoding "
            f"{encoding_name(encoding)}: a scale belongs to INT8 only"
        )
    count = element_count(shape)
    width = encoded_width(spec.dtype, encoding)
    if encoded.encoded_bytes != count * width:
        raise InvalidArgumentError(
            f"tensor {name!r} declares {encoded.encoded_bytes} encoded bytes, but "
            f"{format_shape(shape)} {dtype_name} as {encoding_name(encoding)} is "
            f"{count} x {width} = {count * width} bytes"
        )
    return count * wire.itemsize


def _check_header(
    header: tensor_pb2.TensorStreamHeader,
    expected: Sequence[tensor_pb2.TensorSpec] | None,
    max_total_bytes: int,
    what: str,
) -> None:
    names: set[str] = set()
    for tensor in header.tensors:
        if tensor.spec.name in names:
            raise InvalidArgumentError(f"{what}: tensor {tensor.spec.name!r} is listed twice")
        names.add(tensor.spec.name)
    if expected is not None:
        check_specs(expected, [t.spec for t in header.tensors], what)
    decoded_bytes = 0
    for index, tensor in enumerate(header.tensors):
        try:
            decoded_bytes += _check_encoded_tensor(index, tensor)
        except InvalidArgumentError as err:
            raise InvalidArgumentError(f"{what}: {err}") from None
    total = sum(int(t.encoded_bytes) for t in header.tensors)
    if header.total_bytes != total:
        raise InvalidArgumentError(
            f"{what}: header total_bytes {header.total_bytes} is not the sum of the tensors' "
            f"encoded_bytes {total}"
        )
    if total > max_total_bytes:
        raise ResourceExhaustedError(
            f"{what}: payload of {total} bytes exceeds the limit of {max_total_bytes} bytes"
        )
    if decoded_bytes > max_total_bytes:
        raise ResourceExhaustedError(
            f"{what}: decoded tensors of {decoded_bytes} bytes exceed the limit of "
            f"{max_total_bytes} bytes"
        )
    if header.chunk_bytes == 0:
        raise InvalidArgumentError(f"{what}: header chunk_bytes is 0; chunks must be non-empty")


class StreamDecoder:
    """Decodes one tensor stream: construct with its header, feed() each chunk, then finish().

    The header is validated at construction (against `expected` when given); then the output
    arrays are allocated once, and every chunk is decoded into them as it arrives, so memory
    holds the arrays plus about one chunk. With `out` (tensor name -> array), a tensor whose
    shape and dtype match is decoded into the caller's array instead of a new one: a server
    decodes every upload into a few reused buffers (a refused stream leaves them partly
    overwritten: the caller must treat them as scratch). `max_total_bytes` bounds both the
    payload and the decoded arrays. Any inconsistency raises StreamError, InvalidArgumentError or
    ResourceExhaustedError, after which the decoder refuses further use; arrays are returned
    only once every byte arrived and the SHA-256 of the trailer matched.
    """

    def __init__(
        self,
        header: tensor_pb2.TensorStreamHeader,
        *,
        expected: Sequence[tensor_pb2.TensorSpec] | None = None,
        max_total_bytes: int,
        what: str = "tensor stream",
        out: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> None:
        _check_header(header, expected, max_total_bytes, what)
        self._what = what
        self._total = int(header.total_bytes)
        self._chunk_bytes = int(header.chunk_bytes)
        buffers = out or {}
        try:
            self._sinks = [_TensorSink(t, buffers.get(t.spec.name)) for t in header.tensors]
        except (ValueError, MemoryError) as err:
            raise ResourceExhaustedError(f"{what}: cannot allocate the tensors: {err}") from None
        self._index = 0
        self._received = 0
        self._hasher = hashlib.sha256()
        self._state = "open"  # then "failed" or "finished"

    @property
    def received_bytes(self) -> int:
        return self._received

    @property
    def total_bytes(self) -> int:
        return self._total

    def _check_open(self) -> None:
        if self._state != "open":
            raise StreamError(f"{self._what}: the decoder is {self._state} and takes no more input")

    def feed(self, chunk: tensor_pb2.TensorChunk) -> None:
        """Decode the next chunk, which must start exactly where the previous one ended."""
        self._check_open()
        try:
            self._feed(chunk)
        except HflError:
            self._state = "failed"
            raise

    def _feed(self, chunk: tensor_pb2.TensorChunk) -> None:
        data = chunk.data
        size = len(data)
        if chunk.offset != self._received:
            raise StreamError(
                f"{self._what}: chunk at offset {chunk.offset}, expected {self._received}: "
                "chunks out of order or missing"
            )
        end = self._received + size
        if end > self._total:
            raise StreamError(
                f"{self._what}: chunk at offset {chunk.offset} with {size} bytes ends at {end}, "
                f"beyond the header's total_bytes {self._total}"
            )
        if size > self._chunk_bytes or (size != self._chunk_bytes and end != self._total):
            raise StreamError(
                f"{self._what}: chunk at offset {chunk.offset} has {size} bytes; every chunk "
                f"but the last must have exactly the header's chunk_bytes {self._chunk_bytes}"
            )
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            while self._sinks[self._index].remaining == 0:
                self._index += 1
            sink = self._sinks[self._index]
            take = min(len(view), sink.remaining)
            try:
                sink.write(view[:take])
            except StreamError as err:
                raise StreamError(f"{self._what}: {err}") from None
            view = view[take:]
        self._received = end

    def finish(self, trailer: tensor_pb2.TensorStreamTrailer) -> dict[str, npt.NDArray[Any]]:
        """Check completeness and the digest; return the arrays by name, in header order."""
        self._check_open()
        self._state = "failed"
        if self._received != self._total:
            raise StreamError(
                f"{self._what}: stream truncated: received {self._received} of "
                f"{self._total} bytes before the trailer"
            )
        if trailer.total_bytes != self._total:
            raise StreamError(
                f"{self._what}: trailer total_bytes {trailer.total_bytes} does not match the "
                f"header's {self._total}"
            )
        if len(trailer.sha256) != SHA256_BYTES:
            raise StreamError(
                f"{self._what}: trailer sha256 has {len(trailer.sha256)} bytes, "
                f"expected {SHA256_BYTES}"
            )
        digest = self._hasher.digest()
        if not hmac.compare_digest(digest, trailer.sha256):
            raise StreamError(
                f"{self._what}: payload digest mismatch: trailer says {trailer.sha256.hex()}, "
                f"the {self._total} bytes received hash to {digest.hex()}"
            )
        self._state = "finished"
        logger.debug("decoded %d tensors, %d bytes", len(self._sinks), self._total)
        return {sink.name: sink.array for sink in self._sinks}


def decode_stream(
    header: tensor_pb2.TensorStreamHeader,
    parts: Iterable[tensor_pb2.TensorChunk | tensor_pb2.TensorStreamTrailer],
    *,
    expected: Sequence[tensor_pb2.TensorSpec] | None = None,
    max_total_bytes: int,
    what: str = "tensor stream",
) -> dict[str, npt.NDArray[Any]]:
    """Decode chunks then exactly one trailer, as the last part; see StreamDecoder."""
    decoder = StreamDecoder(header, expected=expected, max_total_bytes=max_total_bytes, what=what)
    result: dict[str, npt.NDArray[Any]] | None = None
    for part in parts:
        if result is not None:
            raise StreamError(f"{what}: a {type(part).__name__} came after the trailer")
        if isinstance(part, tensor_pb2.TensorStreamTrailer):
            result = decoder.finish(part)
        else:
            decoder.feed(part)
    if result is None:
        raise StreamError(
            f"{what}: stream ended without a trailer after {decoder.received_bytes} of "
            f"{decoder.total_bytes} bytes"
        )
    return result
