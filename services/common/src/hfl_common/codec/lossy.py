"""The lossy encodings of float tensors, one bounded block of elements at a time.

Every function here works on blocks of at most BLOCK_ELEMENTS elements, so the temporaries of
a conversion stay small (a block of float64 is 512 KiB) whatever the size of the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_common.api import tensor_pb2
from hfl_common.codec.dtypes import encoding_name
from hfl_common.errors import InvalidArgumentError, StreamError

BLOCK_ELEMENTS = 1 << 16

# Symmetric int8 (tensor.proto, ENCODING_INT8): value = q * scale, q in [-127, 127],
# scale = max|x| / 127.
INT8_LEVELS = 127

_F32_BITS = np.dtype("<u4")
_BF16_BITS = np.dtype("<u2")
# bfloat16 is the upper half of an IEEE 754 binary32: 1 sign, 8 exponent, 7 fraction bits.
# Round to nearest even on the 16 dropped bits: add 0x7FFF plus the lowest kept bit.
_BF16_ROUND_BIAS = np.uint32(0x7FFF)
# The most significant fraction bit of bfloat16 (the "quiet" bit): set on every NaN we emit,
# so a NaN whose payload lived only in the dropped bits stays a NaN and does not become inf.
_BF16_QUIET_NAN_BIT = np.uint16(0x0040)


def float32_to_bfloat16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns (little-endian uint16) of float32 values, round to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    # uint32 arithmetic wraps only for NaNs with a high payload, which are replaced below.
    rounded = ((bits + _BF16_ROUND_BIAS + lsb) >> np.uint32(16)).astype(_BF16_BITS)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = (bits[nan] >> np.uint32(16)).astype(_BF16_BITS) | _BF16_QUIET_NAN_BIT
    return rounded


def bfloat16_bits_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """float32 values of bfloat16 bit patterns (exact: bfloat16 is a subset of float32)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def int8_scale(abs_max: float) -> float:
    """The float32 scale for symmetric int8 of a tensor whose largest magnitude is abs_max.

    scale = abs_max / 127 rounded to float32 (the proto field is a float), nudged up by one
    float32 step if rounding made 127 * scale < abs_max, so that no value needs clipping and the
    error bound scale / 2 holds for every element. abs_max must be finite and >= 0.
    """
    if abs_max == 0.0:
        return 0.0
    with np.errstate(over="ignore"):
        scale = np.float32(abs_max / INT8_LEVELS)
    if float(scale) * INT8_LEVELS < abs_max:
        scale = np.nextafter(scale, np.float32(np.inf))
    return float(scale)


def quantize_int8(block: npt.NDArray[Any], scale: float) -> npt.NDArray[np.int8]:
    """q = round(x / scale) in [-127, 127]; zeros when scale is 0 (all values are 0)."""
    if scale == 0.0:
        return np.zeros(block.shape, dtype=np.int8)
    q = np.rint(block.astype(np.float64) / scale)
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)
    return q.astype(np.int8)


def encode_block(block: npt.NDArray[Any], encoding: int, scale: float) -> npt.NDArray[Any]:
    """The wire representation of a 1-D block of float values under a lossy encoding."""
    with np.errstate(over="ignore", invalid="ignore"):
        if encoding == tensor_pb2.ENCODING_FLOAT16:
            return block.astype("<f2")
        if encoding == tensor_pb2.ENCODING_BFLOAT16:
            return float32_to_bfloat16_bits(block.astype(np.float32))
    if encoding == tensor_pb2.ENCODING_INT8:
        return quantize_int8(block, scale)
    raise InvalidArgumentError(f"encoding {encoding_name(encoding)} is not a lossy encoding")


def decode_block(data: memoryview | bytes, encoding: int, scale: float) -> npt.NDArray[Any]:
    """The values of a whole number of encoded elements, ready to assign to the target array."""
    if encoding == tensor_pb2.ENCODING_FLOAT16:
        return np.frombuffer(data, dtype="<f2")
    if encoding == tensor_pb2.ENCODING_BFLOAT16:
        return bfloat16_bits_to_float32(np.frombuffer(data, dtype=_BF16_BITS))
    if encoding == tensor_pb2.ENCODING_INT8:
        q = np.frombuffer(data, dtype=np.int8)
        if q.size and int(np.min(q)) < -INT8_LEVELS:
            raise StreamError(
                f"INT8 value {int(np.min(q))} is outside the symmetric range "
                f"[-{INT8_LEVELS}, {INT8_LEVELS}]"
            )
        return q.astype(np.float64) * scale
    raise InvalidArgumentError(f"encoding {encoding_name(encoding)} is not a lossy encoding")


def int8_range_fits(scale: float, dtype: npt.DTypeLike) -> bool:
    """Whether the largest INT8 value, 127 * scale, stays finite in `dtype`."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.asarray(INT8_LEVELS * scale).astype(dtype)))


def decode_one(value: float, encoding: int, scale: float) -> float:
    """Encode then decode one value, as float64: the check of a tensor's extreme value."""
    block = np.array([value], dtype=np.float64)
    wire = encode_block(block, encoding, scale)
    return float(decode_block(wire.tobytes(), encoding, scale)[0])


def abs_max_and_finite(flat: npt.NDArray[Any]) -> tuple[float, bool]:
    """(largest finite |x|, whether every value is finite) of a 1-D float array.

    np.max / np.min do not allocate a temporary the size of the array (np.abs would); only
    when they find NaN or inf does this walk the array again, block by block.
    """
    if flat.size == 0:
        return 0.0, True
    hi, lo = float(np.max(flat)), float(np.min(flat))
    if np.isfinite(hi) and np.isfinite(lo):
        return max(abs(hi), abs(lo)), True
    abs_max = 0.0
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        block = flat[start : start + BLOCK_ELEMENTS]
        finite = block[np.isfinite(block)]
        if finite.size:
            abs_max = max(abs_max, float(np.max(np.abs(finite))))
    return abs_max, False


def prepare_lossy(name: str, dtype_name: str, flat: npt.NDArray[Any], encoding: int) -> float:
    """Check a float tensor can take a lossy encoding and return its scale (0 but for INT8).

    Raises InvalidArgumentError for non-finite values under INT8 and for finite values that
    would overflow to inf in the encoding or back in the tensor's dtype. Rounding is monotonic,
    so checking the largest magnitude is enough.
    """
    abs_max, all_finite = abs_max_and_finite(flat)
    scale = 0.0
    if encoding == tensor_pb2.ENCODING_INT8:
        if not all_finite:
            raise InvalidArgumentError(
                f"tensor {name!r} has NaN or infinite values, which ENCODING_INT8 cannot carry; "
                "fix the values or send the tensor with RAW, FLOAT16 or BFLOAT16"
            )
        scale = int8_scale(abs_max)
        if not np.isfinite(np.float32(scale)):
            raise InvalidArgumentError(
                f"tensor {name!r} has max |value| {abs_max:.6g}: its INT8 scale does not fit "
                "a float32; send it RAW"
            )
    if abs_max > 0.0:
        with np.errstate(over="ignore"):
            extreme = decode_one(abs_max, encoding, scale)
            back = np.asarray(extreme).astype(flat.dtype)
        if not np.isfinite(back):
            raise InvalidArgumentError(
                f"tensor {name!r} ({dtype_name}) has max |value| {abs_max:.6g}, beyond the range "
                f"of ENCODING_{encoding_name(encoding)}; send it RAW"
            )
    return scale
