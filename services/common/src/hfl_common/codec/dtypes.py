"""numpy dtypes <-> hfl.v1 DataType, wire widths of the encodings, and TensorSpec helpers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from hfl_common.api import tensor_pb2
from hfl_common.errors import InvalidArgumentError

# Wire dtype (always little-endian, tensor.proto: "raw little-endian bytes of the declared
# dtype") of each DataType a tensor may have. DATA_TYPE_BFLOAT16 is deliberately absent: numpy
# has no bfloat16 dtype, so bfloat16 exists here only as an encoding of float tensors.
_WIRE_DTYPES: dict[int, np.dtype[Any]] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_INT8: np.dtype("i1"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
}
_DATA_TYPE_BY_WIRE_DTYPE: dict[np.dtype[Any], int] = {dt: code for code, dt in _WIRE_DTYPES.items()}

FLOAT_DATA_TYPES = frozenset(
    {tensor_pb2.DATA_TYPE_FLOAT16, tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT64}
)

# Bytes per element on the wire of each lossy encoding (tensor.proto, enum Encoding).
_LOSSY_WIDTHS: dict[int, int] = {
    tensor_pb2.ENCODING_FLOAT16: 2,
    tensor_pb2.ENCODING_BFLOAT16: 2,
    tensor_pb2.ENCODING_INT8: 1,
}
KNOWN_ENCODINGS = frozenset({tensor_pb2.ENCODING_RAW, *_LOSSY_WIDTHS})

# numpy refuses arrays with more dimensions than this (NPY_MAXDIMS is 64 since numpy 2.0);
# no model tensor comes close, so a header that asks for more is malformed.
MAX_DIMS = 32


def data_type_name(code: int) -> str:
    """`DATA_TYPE_FLOAT32` -> "float32"; an unknown number is shown as such."""
    if code in _WIRE_DTYPES:
        return _WIRE_DTYPES[code].name
    if code == tensor_pb2.DATA_TYPE_BFLOAT16:
        return "bfloat16"
    if code == tensor_pb2.DATA_TYPE_UNSPECIFIED:
        return "unspecified"
    return f"unknown DataType {code}"


def encoding_name(code: int) -> str:
    """`ENCODING_INT8` -> "INT8"; an unknown number is shown as such."""
    names: dict[int, str] = {
        tensor_pb2.ENCODING_UNSPECIFIED: "UNSPECIFIED",
        tensor_pb2.ENCODING_RAW: "RAW",
        tensor_pb2.ENCODING_FLOAT16: "FLOAT16",
        tensor_pb2.ENCODING_BFLOAT16: "BFLOAT16",
        tensor_pb2.ENCODING_INT8: "INT8",
    }
    return names.get(code, f"unknown Encoding {code}")


def as_data_type(code: int) -> tensor_pb2.DataType:
    """Type the int `code` as a DataType for the generated stubs (no check)."""
    return cast("tensor_pb2.DataType", code)


def as_encoding(code: int) -> tensor_pb2.Encoding:
    """Type the int `code` as an Encoding for the generated stubs (no check)."""
    return cast("tensor_pb2.Encoding", code)


def data_type_of(dtype: npt.DTypeLike, name: str = "") -> int:
    """The DataType of a numpy dtype, either byte order; InvalidArgumentError if unsupported."""
    dt = np.dtype(dtype)
    code = _DATA_TYPE_BY_WIRE_DTYPE.get(dt.newbyteorder("<"))
    if code is None:
        where = f" of tensor {name!r}" if name else ""
        supported = ", ".join(sorted(d.name for d in _WIRE_DTYPES.values()))
        raise InvalidArgumentError(
            f"dtype {dt.str} ({dt.name}){where} is not supported by the tensor codec; "
            f"supported: {supported}"
        )
    return code


def wire_dtype(data_type: int, name: str = "") -> np.dtype[Any]:
    """The little-endian numpy dtype of a DataType; InvalidArgumentError for bfloat16 etc."""
    dt = _WIRE_DTYPES.get(data_type)
    if dt is None:
        where = f" for tensor {name!r}" if name else ""
        if data_type == tensor_pb2.DATA_TYPE_BFLOAT16:
            raise InvalidArgumentError(
                f"DATA_TYPE_BFLOAT16{where} is not a tensor dtype here: numpy has no bfloat16; "
                "declare the tensor float32 and send it with ENCODING_BFLOAT16"
            )
        raise InvalidArgumentError(f"{data_type_name(data_type)}{where} is not a tensor dtype")
    return dt


def native_dtype(data_type: int, name: str = "") -> np.dtype[Any]:
    """The native-byte-order numpy dtype decoded tensors of this DataType get."""
    return wire_dtype(data_type, name).newbyteorder("=")


def encoded_width(data_type: int, encoding: int) -> int:
    """Bytes per element on the wire; the caller has checked both values are known."""
    if encoding == tensor_pb2.ENCODING_RAW:
        return wire_dtype(data_type).itemsize
    return _LOSSY_WIDTHS[encoding]


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a shape, as an exact Python int (1 for a scalar)."""
    return math.prod(shape)


def format_shape(shape: Sequence[int]) -> str:
    """(2, 3) for [2, 3], () for a scalar, (5,) for one dimension: numpy's own notation."""
    return str(tuple(int(d) for d in shape))


def spec_of(name: str, array: npt.NDArray[Any]) -> tensor_pb2.TensorSpec:
    """The TensorSpec of one named array."""
    if not name:
        raise InvalidArgumentError("tensor names must be non-empty")
    return tensor_pb2.TensorSpec(
        name=name,
        dtype=as_data_type(data_type_of(array.dtype, name)),
        shape=[int(d) for d in array.shape],
    )


def specs_of(tensors: Mapping[str, npt.NDArray[Any]]) -> list[tensor_pb2.TensorSpec]:
    """The TensorSpecs of named arrays, in the mapping's order."""
    return [spec_of(name, np.asarray(array)) for name, array in tensors.items()]


def _first_duplicate(names: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def check_specs(
    expected: Sequence[tensor_pb2.TensorSpec],
    actual: Sequence[tensor_pb2.TensorSpec],
    what: str,
) -> None:
    """Raise InvalidArgumentError naming the first difference between two tensor lists.

    `what` says whose tensors `actual` are ("model update from trainer-1"), so the message
    reads "model update from trainer-1: tensor 'dense/kernel' has shape (2, 3), expected (3, 2)".
    Order matters: tensors travel in the listed order.
    """
    expected_names = [s.name for s in expected]
    actual_names = [s.name for s in actual]
    for label, names in (("expected", expected_names), ("received", actual_names)):
        dup = _first_duplicate(names)
        if dup is not None:
            raise InvalidArgumentError(
                f"{what}: tensor {dup!r} is listed twice in the {label} tensors"
            )
    expected_set = set(expected_names)
    actual_set = set(actual_names)
    for i in range(max(len(expected), len(actual))):
        if i >= len(actual):
            raise InvalidArgumentError(
                f"{what}: missing tensor {expected_names[i]!r} (expected at position {i}; "
                f"got {len(actual)} tensors, expected {len(expected)})"
            )
        if i >= len(expected):
            raise InvalidArgumentError(
                f"{what}: extra tensor {actual_names[i]!r} at position {i} "
                f"(got {len(actual)} tensors, expected {len(expected)})"
            )
        want, got = expected[i], actual[i]
        if want.name != got.name:
            if got.name not in expected_set:
                raise InvalidArgumentError(
                    f"{what}: extra tensor {got.name!r} at position {i} (expected {want.name!r})"
                )
            if want.name not in actual_set:
                raise InvalidArgumentError(
                    f"{what}: missing tensor {want.name!r} (expected at position {i}, "
                    f"found {got.name!r})"
                )
            raise InvalidArgumentError(
                f"{what}: tensors in the wrong order: position {i} holds {got.name!r}, "
                f"expected {want.name!r}"
            )
        if want.dtype != got.dtype:
            raise InvalidArgumentError(
                f"{what}: tensor {got.name!r} has dtype {data_type_name(got.dtype)}, "
                f"expected {data_type_name(want.dtype)}"
            )
        if list(want.shape) != list(got.shape):
            raise InvalidArgumentError(
                f"{what}: tensor {got.name!r} has shape {format_shape(got.shape)}, "
                f"expected {format_shape(want.shape)}"
            )
