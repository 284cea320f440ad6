"""Encoding named numpy arrays into a tensor stream: a header, lazy chunks, then a trailer."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_common.api import tensor_pb2
from hfl_common.codec.dtypes import (
    FLOAT_DATA_TYPES,
    KNOWN_ENCODINGS,
    as_data_type,
    as_encoding,
    data_type_name,
    data_type_of,
    element_count,
    encoded_width,
    encoding_name,
    wire_dtype,
)
from hfl_common.codec.lossy import BLOCK_ELEMENTS, encode_block, prepare_lossy
from hfl_common.errors import FailedPreconditionError, InvalidArgumentError, StreamError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
# TensorStreamHeader.chunk_bytes is a uint32 (tensor.proto).
MAX_CHUNK_BYTES = (1 << 32) - 1


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    array: npt.NDArray[Any]
    data_type: int
    encoding: int
    scale: float
    encoded_bytes: int


class EncodedStream:
    """One tensor stream: `header` up front, `chunks()` lazily, `trailer()` at the end.

    The header is complete before any byte is encoded. chunks() encodes one tensor (a lossy
    one, one block of elements) at a time and yields chunks of exactly header.chunk_bytes bytes
    but the last; each call starts a fresh pass. trailer() holds the SHA-256 of the last
    complete pass. The arrays must not change while they are streamed. A non-contiguous or
    big-endian array is copied when its turn comes, one tensor at a time.
    """

    def __init__(self, tensors: list[_PlannedTensor], chunk_bytes: int) -> None:
        self._tensors = tensors
        self.header = tensor_pb2.TensorStreamHeader(
            tensors=[
                tensor_pb2.EncodedTensor(
                    spec=tensor_pb2.TensorSpec(
                        name=t.name,
                        dtype=as_data_type(t.data_type),
                        shape=[int(d) for d in t.array.shape],
                    ),
                    encoding=as_encoding(t.encoding),
                    scale=t.scale,
                    encoded_bytes=t.encoded_bytes,
                )
                for t in tensors
            ],
            total_bytes=sum(t.encoded_bytes for t in tensors),
            chunk_bytes=chunk_bytes,
        )
        self._trailer: tensor_pb2.TensorStreamTrailer | None = None

    def _pieces(self) -> Iterator[memoryview]:
        """The encoded bytes of the tensors in order, in pieces of bounded size."""
        for t in self._tensors:
            if t.encoded_bytes == 0:
                continue
            if t.encoding == tensor_pb2.ENCODING_RAW:
                # A view when the array already is contiguous little-endian (the usual case);
                # otherwise one copy of this one tensor.
                raw = np.ascontiguousarray(t.array, dtype=wire_dtype(t.data_type))
                yield raw.reshape(-1).view(np.uint8).data
                continue
            flat = t.array.reshape(-1)
            for start in range(0, flat.size, BLOCK_ELEMENTS):
                block = encode_block(flat[start : start + BLOCK_ELEMENTS], t.encoding, t.scale)
                yield block.view(np.uint8).data

    def chunks(self) -> Iterator[tensor_pb2.TensorChunk]:
        """Generate the chunks of the payload, hashing them on the way."""
        chunk_bytes = self.header.chunk_bytes
        hasher = hashlib.sha256()
        pending = bytearray()
        offset = 0
        for whole in self._pieces():
            piece = whole
            while piece:
                if not pending and len(piece) >= chunk_bytes:
                    data = bytes(piece[:chunk_bytes])
                    piece = piece[chunk_bytes:]
                else:
                    take = min(chunk_bytes - len(pending), len(piece))
                    pending += piece[:take]
                    piece = piece[take:]
                    if len(pending) < chunk_bytes:
                        continue
                    data = bytes(pending)
                    pending.clear()
                hasher.update(data)
                yield tensor_pb2.TensorChunk(offset=offset, data=data)
                offset += len(data)
        if pending:
            data = bytes(pending)
            hasher.update(data)
            yield tensor_pb2.TensorChunk(offset=offset, data=data)
            offset += len(data)
        if offset != self.header.total_bytes:
            raise StreamError(
                f"encoded {offset} bytes but the header announced {self.header.total_bytes}: "
                "an array changed while it was streamed"
            )
        self._trailer = tensor_pb2.TensorStreamTrailer(sha256=hasher.digest(), total_bytes=offset)
        logger.debug("encoded %d tensors, %d bytes", len(self._tensors), offset)

    def trailer(self) -> tensor_pb2.TensorStreamTrailer:
        """The trailer of the last complete pass of chunks()."""
        if self._trailer is None:
            raise FailedPreconditionError(
                "the trailer of a tensor stream exists only once chunks() has been exhausted"
            )
        return self._trailer


def _requested_encodings(names: list[str], encoding: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(encoding, Mapping):
        known = set(names)
        unknown = [name for name in encoding if name not in known]
        if unknown:
            raise InvalidArgumentError(
                f"encodings given for tensors that are not in the stream: {sorted(unknown)}"
            )
        requested = {name: int(encoding.get(name, tensor_pb2.ENCODING_RAW)) for name in names}
    else:
        requested = dict.fromkeys(names, int(encoding))
    for name, code in requested.items():
        if code not in KNOWN_ENCODINGS:
            raise InvalidArgumentError(
                f"encoding {encoding_name(code)} requested for tensor {name!r} is not one of "
                "RAW, FLOAT16, BFLOAT16, INT8"
            )
    return requested


def _effective_encoding(data_type: int, requested: int) -> int:
    """Lossy encodings apply to float tensors only; a float16 tensor is already 2 bytes wide."""
    if data_type not in FLOAT_DATA_TYPES:
        return tensor_pb2.ENCODING_RAW
    if data_type == tensor_pb2.DATA_TYPE_FLOAT16 and requested in (
        tensor_pb2.ENCODING_FLOAT16,
        tensor_pb2.ENCODING_BFLOAT16,
    ):
        return tensor_pb2.ENCODING_RAW
    return requested


def encode_tensors(
    tensors: Mapping[str, npt.NDArray[Any]],
    encoding: int | Mapping[str, int] = tensor_pb2.ENCODING_RAW,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> EncodedStream:
    """Plan the stream of `tensors` (in the mapping's order) without encoding them yet.

    `encoding` applies to every tensor, or per name (unnamed tensors go RAW). Integer tensors
    always go RAW, and so does a float16 tensor asked for FLOAT16 or BFLOAT16; the header says
    which encoding each tensor got. Raises InvalidArgumentError for an unsupported dtype, an
    unknown encoding, NaN/inf under INT8, or values out of the encoding's range.
    """
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise InvalidArgumentError(
            f"chunk_bytes {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES} (a uint32 on the wire)"
        )
    names = list(tensors)
    requested = _requested_encodings(names, encoding)
    planned: list[_PlannedTensor] = []
    for name in names:
        if not name:
            raise InvalidArgumentError("tensor names must be non-empty")
        array = np.asarray(tensors[name])
        data_type = data_type_of(array.dtype, name)
        chosen = _effective_encoding(data_type, requested[name])
        if chosen != requested[name]:
            logger.debug(
                "tensor %r (%s) goes RAW instead of %s",
                name,
                data_type_name(data_type),
                encoding_name(requested[name]),
            )
        scale = 0.0
        if chosen != tensor_pb2.ENCODING_RAW:
            scale = prepare_lossy(name, data_type_name(data_type), array.reshape(-1), chosen)
        planned.append(
            _PlannedTensor(
                name=name,
                array=array,
                data_type=data_type,
                encoding=chosen,
                scale=scale,
                encoded_bytes=element_count(array.shape) * encoded_width(data_type, chosen),
            )
        )
    return EncodedStream(planned, chunk_bytes)
