"""Tests of hfl_common.codec: dtypes, specs, encoder, decoder, lossy bounds, gRPC plumbing."""

from __future__ import annotations

import hashlib
import math
import tracemalloc
from collections.abc import Iterator
from concurrent import futures
from typing import Any, Literal

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.codec import (
    EncodedStream,
    StreamDecoder,
    check_specs,
    collect_stream,
    data_type_of,
    decode_stream,
    encode_tensors,
    iter_download_messages,
    iter_upload_messages,
    spec_of,
    specs_of,
)
from hfl_common.codec.dtypes import encoded_width
from hfl_common.codec.lossy import bfloat16_bits_to_float32, float32_to_bfloat16_bits
from hfl_common.errors import (
    FailedPreconditionError,
    HflError,
    InvalidArgumentError,
    ResourceExhaustedError,
    StreamError,
)

Arrays = dict[str, npt.NDArray[Any]]
Part = tensor_pb2.TensorChunk | tensor_pb2.TensorStreamTrailer

RAW = tensor_pb2.ENCODING_RAW
FLOAT16 = tensor_pb2.ENCODING_FLOAT16
BFLOAT16 = tensor_pb2.ENCODING_BFLOAT16
INT8 = tensor_pb2.ENCODING_INT8

LIMIT = 1 << 30
MIB = 1 << 20

ALL_DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.int8, np.uint8]
FLOAT_DTYPES = [np.float32, np.float64, np.float16]


def parts_of(stream: EncodedStream) -> list[Part]:
    parts: list[Part] = list(stream.chunks())
    parts.append(stream.trailer())
    return parts


def round_trip(tensors: Arrays, encoding: Any = RAW, chunk_bytes: int = 7) -> Arrays:
    stream = encode_tensors(tensors, encoding, chunk_bytes=chunk_bytes)
    return decode_stream(
        stream.header, parts_of(stream), expected=specs_of(tensors), max_total_bytes=LIMIT
    )


def le_bytes(array: npt.NDArray[Any]) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def spec(name: str, dtype: int, shape: tuple[int, ...]) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, dtype=dtype, shape=list(shape))  # type: ignore[arg-type]


# --- dtype mapping and specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "code"),
    [
        (np.float32, tensor_pb2.DATA_TYPE_FLOAT32),
        (np.float64, tensor_pb2.DATA_TYPE_FLOAT64),
        (np.int32, tensor_pb2.DATA_TYPE_INT32),
        (np.int64, tensor_pb2.DATA_TYPE_INT64),
        (np.float16, tensor_pb2.DATA_TYPE_FLOAT16),
        (np.int8, tensor_pb2.DATA_TYPE_INT8),
        (np.uint8, tensor_pb2.DATA_TYPE_UINT8),
        (">f4", tensor_pb2.DATA_TYPE_FLOAT32),
        (">i8", tensor_pb2.DATA_TYPE_INT64),
    ],
)
def test_supported_numpy_dtypes_map_to_their_data_type(dtype: Any, code: int) -> None:
    assert data_type_of(dtype) == code


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.uint16, np.object_, "U3"])
def test_unsupported_numpy_dtype_is_rejected_naming_tensor_and_dtype(dtype: Any) -> None:
    with pytest.raises(InvalidArgumentError, match=r"of tensor 'w' is not supported by the"):
        encode_tensors({"w": np.zeros(2, dtype=dtype)})


def test_bfloat16_data_type_is_rejected_as_tensor_dtype() -> None:
    header = encode_tensors({"w": np.zeros(2, np.float32)}).header
    header.tensors[0].spec.dtype = tensor_pb2.DATA_TYPE_BFLOAT16
    with pytest.raises(InvalidArgumentError, match="DATA_TYPE_BFLOAT16 for tensor 'w' is not a"):
        StreamDecoder(header, max_total_bytes=LIMIT)


def test_spec_of_gives_name_dtype_and_shape_including_scalars() -> None:
    assert spec_of("k", np.zeros((2, 3), np.float16)) == spec(
        "k", tensor_pb2.DATA_TYPE_FLOAT16, (2, 3)
    )
    specs = specs_of({"s": np.array(1.0), "e": np.zeros((0, 4), np.int8)})
    assert [(s.name, s.dtype, list(s.shape)) for s in specs] == [
        ("s", tensor_pb2.DATA_TYPE_FLOAT64, []),
        ("e", tensor_pb2.DATA_TYPE_INT8, [0, 4]),
    ]


F32 = tensor_pb2.DATA_TYPE_FLOAT32
EXPECTED = [spec("dense/kernel", F32, (3, 2)), spec("dense/bias", F32, (2,))]


@pytest.mark.parametrize(
    ("actual", "message"),
    [
        (
            [spec("dense/kernel", F32, (2, 3)), EXPECTED[1]],
            "update: tensor 'dense/kernel' has shape (2, 3), expected (3, 2)",
        ),
        (
            [spec("dense/kernel", tensor_pb2.DATA_TYPE_FLOAT64, (3, 2)), EXPECTED[1]],
            "update: tensor 'dense/kernel' has dtype float64, expected float32",
        ),
        (
            [EXPECTED[0]],
            "update: missing tensor 'dense/bias' (expected at position 1; got 1 tensors, "
            "expected 2)",
        ),
        (
            [*EXPECTED, spec("x", F32, ())],
            "update: extra tensor 'x' at position 2 (got 3 tensors, expected 2)",
        ),
        (
            [EXPECTED[1], EXPECTED[0]],
            "update: tensors in the wrong order: position 0 holds 'dense/bias', "
            "expected 'dense/kernel'",
        ),
        (
            [spec("conv/kernel", F32, (3, 2)), EXPECTED[1]],
            "update: extra tensor 'conv/kernel' at position 0 (expected 'dense/kernel')",
        ),
        (
            [EXPECTED[1], EXPECTED[1]],
            "update: tensor 'dense/bias' is listed twice in the received tensors",
        ),
        (
            [EXPECTED[1]],
            "update: missing tensor 'dense/kernel' (expected at position 0, found 'dense/bias')",
        ),
    ],
)
def test_check_specs_names_the_first_mismatch(
    actual: list[tensor_pb2.TensorSpec], message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_specs(EXPECTED, actual, "update")
    assert str(info.value) == message


def test_check_specs_accepts_identical_lists() -> None:
    check_specs(EXPECTED, list(EXPECTED), "update")


# --- encoder -------------------------------------------------------------------------------------


def test_header_is_complete_before_any_chunk_is_encoded() -> None:
    tensors: Arrays = {
        "w": np.ones((4, 5), np.float32),
        "b": np.ones(5, np.float64),
        "step": np.array(3, np.int64),
        "e": np.zeros((0, 2), np.float32),
    }
    stream = encode_tensors(tensors, INT8, chunk_bytes=16)
    h = stream.header
    assert [(t.spec.name, t.encoding, t.encoded_bytes) for t in h.tensors] == [
        ("w", INT8, 20),
        ("b", INT8, 5),
        ("step", RAW, 8),
        ("e", INT8, 0),
    ]
    assert h.tensors[0].scale == pytest.approx(1.0 / 127, rel=1e-6)
    assert h.tensors[3].scale == 0.0
    assert (h.total_bytes, h.chunk_bytes) == (33, 16)
    with pytest.raises(FailedPreconditionError, match="only once chunks\\(\\) has been exhausted"):
        stream.trailer()


def test_chunks_have_chunk_bytes_but_the_last_and_trailer_hashes_payload() -> None:
    tensors: Arrays = {"a": np.arange(10, dtype=np.int32), "b": np.arange(3, dtype=np.float64)}
    stream = encode_tensors(tensors, chunk_bytes=16)
    chunks = list(stream.chunks())
    assert [len(c.data) for c in chunks] == [16, 16, 16, 16]
    assert [c.offset for c in chunks] == [0, 16, 32, 48]
    payload = b"".join(c.data for c in chunks)
    assert payload == le_bytes(tensors["a"]) + le_bytes(tensors["b"])
    trailer = stream.trailer()
    assert trailer.sha256 == hashlib.sha256(payload).digest()
    assert trailer.total_bytes == 64


def test_integer_tensors_go_raw_and_float16_goes_raw_when_asked_for_16_bit_encodings() -> None:
    tensors: Arrays = {"i": np.arange(4, dtype=np.int8), "h": np.ones(3, np.float16)}
    for encoding in (FLOAT16, BFLOAT16):
        header = encode_tensors(tensors, encoding).header
        assert [t.encoding for t in header.tensors] == [RAW, RAW]
    assert [t.encoding for t in encode_tensors(tensors, INT8).header.tensors] == [RAW, INT8]


def test_encoding_per_tensor_name_leaves_unnamed_tensors_raw() -> None:
    tensors = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
    header = encode_tensors(tensors, {"b": BFLOAT16}).header
    assert [t.encoding for t in header.tensors] == [RAW, BFLOAT16]


def test_encoding_for_unknown_tensor_name_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match=r"not in the stream: \['typo'\]"):
        encode_tensors({"a": np.ones(2, np.float32)}, {"typo": INT8})


@pytest.mark.parametrize("encoding", [tensor_pb2.ENCODING_UNSPECIFIED, 9])
def test_unknown_encoding_is_rejected(encoding: int) -> None:
    with pytest.raises(InvalidArgumentError, match="requested for tensor 'a' is not one of"):
        encode_tensors({"a": np.ones(2, np.float32)}, encoding)


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1 << 32])
def test_chunk_bytes_outside_uint32_range_is_rejected(chunk_bytes: int) -> None:
    with pytest.raises(InvalidArgumentError, match=f"chunk_bytes {chunk_bytes} is outside"):
        encode_tensors({"a": np.ones(2, np.float32)}, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_encoding_of_non_finite_values_is_rejected(bad: float) -> None:
    with pytest.raises(InvalidArgumentError, match="tensor 'w' has NaN or infinite values"):
        encode_tensors({"w": np.array([1.0, bad], np.float32)}, INT8)


@pytest.mark.parametrize(
    ("dtype", "value", "encoding"),
    [
        (np.float32, 70000.0, FLOAT16),
        (np.float64, 1e39, BFLOAT16),
        (np.float32, float(np.finfo(np.float32).max), BFLOAT16),
        (np.float64, 1e300, INT8),
    ],
)
def test_values_beyond_the_encodings_range_are_rejected(
    dtype: Any, value: float, encoding: int
) -> None:
    tensors = {"w": np.array([1.0, -value, np.nan if encoding != INT8 else 0.0], dtype)}
    with pytest.raises(InvalidArgumentError, match=r"tensor 'w' .*has max \|value\|"):
        encode_tensors(tensors, encoding)


def test_big_endian_and_non_contiguous_inputs_round_trip() -> None:
    base = np.arange(24, dtype=">f8").reshape(4, 6)
    tensors = {"be": base, "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]}
    out = round_trip(tensors, chunk_bytes=5)
    assert out["be"].dtype == np.dtype(np.float64)
    np.testing.assert_array_equal(out["be"], base)
    np.testing.assert_array_equal(out["strided"], tensors["strided"])


def test_chunks_can_be_generated_again_with_the_same_payload() -> None:
    stream = encode_tensors({"w": np.linspace(-1, 1, 50, dtype=np.float32)}, BFLOAT16, 8)
    first = [c.data for c in stream.chunks()]
    digest = stream.trailer().sha256
    assert [c.data for c in stream.chunks()] == first
    assert stream.trailer().sha256 == digest


# --- round trips -------------------------------------------------------------------------------

NAMES = st.text(alphabet="abcxyz/_:0123456789", min_size=1, max_size=12)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def tensor_dicts(draw: st.DrawFn, dtypes: list[Any], elements: Any = None) -> Arrays:
    """Up to five named arrays; `elements(dtype)` gives an element strategy or None."""
    names = draw(st.lists(NAMES, max_size=5, unique=True))
    out: Arrays = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(dtypes)))
        strategy = None if elements is None else elements(dtype)
        out[name] = draw(hnp.arrays(dtype, draw(SHAPES), elements=strategy))
    return out


@settings(deadline=None)
@given(tensors=tensor_dicts(ALL_DTYPES), chunk_bytes=st.integers(1, 40))
def test_raw_round_trip_is_bit_exact(tensors: Arrays, chunk_bytes: int) -> None:
    out = round_trip(tensors, RAW, chunk_bytes)
    assert list(out) == list(tensors)
    for name, array in tensors.items():
        assert out[name].dtype == array.dtype
        assert out[name].shape == array.shape
        assert le_bytes(out[name]) == le_bytes(array)


# Documented worst cases (module docstring of hfl_common.codec): relative error in the normal
# range, and absolute error below it (half the smallest subnormal).
FLOAT16_REL, FLOAT16_ABS = 2.0**-11, 2.0**-25
BFLOAT16_REL, BFLOAT16_ABS = 2.0**-8, 2.0**-134
# Rounding of a decoded value to the tensor's dtype: unit roundoff, half the smallest subnormal.
DTYPE_ROUNDING = {
    np.dtype(np.float16): (2.0**-11, 2.0**-25),
    np.dtype(np.float32): (2.0**-24, 2.0**-150),
    np.dtype(np.float64): (2.0**-53, 2.0**-1075),
}


def error_bound(
    x: npt.NDArray[np.float64], dtype: np.dtype[Any], encoding: int, scale: float
) -> npt.NDArray[np.float64]:
    ax = np.abs(x)
    if encoding == RAW:
        return np.zeros_like(ax)
    if encoding == FLOAT16:
        return np.maximum(FLOAT16_REL * ax, FLOAT16_ABS)
    if encoding == BFLOAT16:
        bound = np.maximum(BFLOAT16_REL * ax, BFLOAT16_ABS)
        if dtype == np.float64:  # first rounded to float32
            bound = bound + 2.0**-24 * ax + 2.0**-150
        return bound
    rel, tiny = DTYPE_ROUNDING[dtype]
    return scale / 2 + rel * (ax + scale / 2) + tiny


def finite_in_range(dtype: np.dtype[Any], encoding: int) -> Any:
    """Finite values the encoding can carry: FLOAT16 refuses anything beyond 65504."""
    width: Literal[16, 32, 64] = {2: 16, 4: 32, 8: 64}[dtype.itemsize]  # type: ignore[assignment]
    limit = 65504.0 if width == 16 or encoding == FLOAT16 else 2.0**120
    return st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=width)


@st.composite
def lossy_cases(draw: st.DrawFn) -> tuple[Arrays, int]:
    encoding = draw(st.sampled_from([FLOAT16, BFLOAT16, INT8]))
    tensors = draw(
        tensor_dicts(
            ALL_DTYPES, lambda dt: finite_in_range(dt, encoding) if dt.kind == "f" else None
        )
    )
    return tensors, encoding


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=lossy_cases(), chunk_bytes=st.integers(1, 40))
def test_lossy_round_trip_stays_within_documented_bounds(
    case: tuple[Arrays, int], chunk_bytes: int
) -> None:
    tensors, encoding = case
    stream = encode_tensors(tensors, encoding, chunk_bytes=chunk_bytes)
    out = decode_stream(stream.header, parts_of(stream), max_total_bytes=LIMIT)
    for encoded in stream.header.tensors:
        name = encoded.spec.name
        x, y = tensors[name], out[name]
        assert y.dtype == x.dtype
        assert y.shape == x.shape
        if x.dtype.kind != "f":
            assert encoded.encoding == RAW
            np.testing.assert_array_equal(y, x)
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        bound = error_bound(x64, x.dtype, int(encoded.encoding), encoded.scale)
        assert np.all(np.abs(x64 - y64) <= bound), (name, encoded.encoding, x64, y64)
        if encoded.encoding == INT8 and x.size:
            # max|x| / 127 rounded up to a float32 (the smallest subnormal 2**-149 at worst).
            ideal = float(np.max(np.abs(x64))) / 127
            assert ideal <= encoded.scale <= ideal * (1 + 2.0**-22) + 2.0**-149


@settings(deadline=None)
@given(
    tensors=tensor_dicts(
        [np.float32, np.float64],
        lambda dt: st.one_of(
            st.floats(-6e4, 6e4, width=32),
            st.sampled_from([math.nan, math.inf, -math.inf]),
        ),
    ),
    encoding=st.sampled_from([FLOAT16, BFLOAT16]),
)
def test_float16_and_bfloat16_keep_nan_and_infinity(tensors: Arrays, encoding: int) -> None:
    out = round_trip(tensors, encoding)
    for name, x in tensors.items():
        y = out[name]
        np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
        inf = np.isinf(x)
        np.testing.assert_array_equal(y[inf], x[inf])
        finite = np.isfinite(x)
        x64, y64 = x[finite].astype(np.float64), y[finite].astype(np.float64)
        assert np.all(np.abs(x64 - y64) <= error_bound(x64, x.dtype, encoding, 0.0))


def test_bfloat16_rounds_ties_to_even_and_keeps_low_payload_nans() -> None:
    one = 1.0
    ulp = 2.0**-7  # bfloat16 spacing at 1.0
    values = np.array(
        [one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0**-20, -(one + 3 * ulp / 2)],
        dtype=np.float32,
    )
    rounded = bfloat16_bits_to_float32(float32_to_bfloat16_bits(values))
    np.testing.assert_array_equal(rounded, [one, one + 2 * ulp, one + ulp, -(one + 2 * ulp)])
    nan_low_payload = np.array([0x7F800001, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    assert np.all(np.isnan(bfloat16_bits_to_float32(float32_to_bfloat16_bits(nan_low_payload))))


def test_bfloat16_worst_case_relative_error_reaches_its_bound() -> None:
    # Just below a tie: the largest error a round to nearest can make, 2**-8 relative at 1.0.
    x = np.array([1.0 + 2.0**-8 - 2.0**-23], dtype=np.float32)
    y = round_trip({"x": x}, BFLOAT16)["x"]
    err = abs(float(x[0]) - float(y[0])) / float(x[0])
    assert 0.99 * 2.0**-8 < err <= 2.0**-8


def test_float16_worst_case_relative_error_reaches_its_bound() -> None:
    x = np.array([1.0 + 2.0**-11 - 2.0**-23], dtype=np.float32)
    y = round_trip({"x": x}, FLOAT16)["x"]
    err = abs(float(x[0]) - float(y[0])) / float(x[0])
    assert 0.99 * 2.0**-11 < err <= 2.0**-11


def test_int8_of_all_zero_tensor_has_scale_zero_and_decodes_to_zeros() -> None:
    tensors = {"z": np.zeros((3, 3), np.float32)}
    stream = encode_tensors(tensors, INT8)
    assert stream.header.tensors[0].scale == 0.0
    out = decode_stream(stream.header, parts_of(stream), max_total_bytes=LIMIT)
    np.testing.assert_array_equal(out["z"], tensors["z"])


def test_int8_of_tiny_values_keeps_error_within_half_a_scale() -> None:
    x = np.array([1e-44, -3e-45, 0.0], np.float32)  # float32 subnormals
    stream = encode_tensors({"x": x}, INT8)
    scale = stream.header.tensors[0].scale
    assert scale > 0.0
    y = decode_stream(stream.header, parts_of(stream), max_total_bytes=LIMIT)["x"]
    assert np.all(np.abs(x.astype(np.float64) - y) <= scale / 2 + 2.0**-150)


def test_int8_of_float16_tensor_near_its_maximum_round_trips() -> None:
    x = np.array([65020.0, -1.0], np.float16)  # 128 * scale would overflow float16; 127 * not
    y = round_trip({"x": x}, INT8)["x"]
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(x.astype(np.float64) - y) <= 65020.0 / 254 + 2.0**-11 * 65536)


def test_int8_value_minus_128_on_the_wire_is_a_stream_error() -> None:
    stream = encode_tensors({"w": np.array([1.0, -1.0], np.float32)}, INT8)
    payload = b"\x80" + b"".join(c.data for c in stream.chunks())[1:]
    trailer = tensor_pb2.TensorStreamTrailer(
        sha256=hashlib.sha256(payload).digest(), total_bytes=len(payload)
    )
    parts: list[Part] = [tensor_pb2.TensorChunk(offset=0, data=payload), trailer]
    with pytest.raises(StreamError) as info:
        decode_stream(stream.header, parts, max_total_bytes=LIMIT)
    assert str(info.value) == (
        "tensor stream: tensor 'w': INT8 value -128 is outside the symmetric range [-127, 127]"
    )


# --- header validation -------------------------------------------------------------------------


def valid_header() -> tensor_pb2.TensorStreamHeader:
    tensors: Arrays = {
        "dense/kernel": np.ones((3, 2), np.float32),
        "dense/bias": np.ones(2, np.float32),
        "step": np.array(1, np.int64),
    }
    return encode_tensors(tensors, {"dense/kernel": INT8}, chunk_bytes=4).header


def _set_dims(h: tensor_pb2.TensorStreamHeader, dims: list[int]) -> None:
    del h.tensors[1].spec.shape[:]
    h.tensors[1].spec.shape.extend(dims)


HEADER_CASES: list[tuple[str, Any, type[HflError], str]] = [
    (
        "duplicate",
        lambda h: setattr(h.tensors[1].spec, "name", "step"),
        InvalidArgumentError,
        "tensor stream: tensor 'step' is listed twice",
    ),
    (
        "empty name",
        lambda h: setattr(h.tensors[1].spec, "name", ""),
        InvalidArgumentError,
        "tensor header at position 1 has an empty name",
    ),
    (
        "negative dim",
        lambda h: _set_dims(h, [-2]),
        InvalidArgumentError,
        "tensor 'dense/bias' has a negative dimension: (-2,)",
    ),
    (
        "too many dims",
        lambda h: _set_dims(h, [1] * 40),
        InvalidArgumentError,
        "tensor 'dense/bias' has 40 dimensions; at most 32",
    ),
    (
        "absurd shape",
        lambda h: _set_dims(h, [0, 1 << 62]),
        InvalidArgumentError,
        "tensor 'dense/bias' has an impossibly large shape (0, 4611686018427387904)",
    ),
    (
        "unspecified dtype",
        lambda h: setattr(h.tensors[1].spec, "dtype", 0),
        InvalidArgumentError,
        "unspecified for tensor 'dense/bias' is not a tensor dtype",
    ),
    (
        "unknown dtype",
        lambda h: setattr(h.tensors[1].spec, "dtype", 42),
        InvalidArgumentError,
        "unknown DataType 42 for tensor 'dense/bias' is not a tensor dtype",
    ),
    (
        "unknown encoding",
        lambda h: setattr(h.tensors[1], "encoding", 17),
        InvalidArgumentError,
        "tensor 'dense/bias' has encoding unknown Encoding 17; expected RAW",
    ),
    (
        "lossy integer",
        lambda h: setattr(h.tensors[2], "encoding", FLOAT16),
        InvalidArgumentError,
        "tensor 'step' is int64: only float tensors may use ENCODING_FLOAT16",
    ),
    (
        "nan scale",
        lambda h: setattr(h.tensors[0], "scale", math.nan),
        InvalidArgumentError,
        "tensor 'dense/kernel' has INT8 scale nan; it must be finite and >= 0",
    ),
    (
        "negative scale",
        lambda h: setattr(h.tensors[0], "scale", -1.0),
        InvalidArgumentError,
        "tensor 'dense/kernel' has INT8 scale -1.0; it must be finite and >= 0",
    ),
    (
        "stray scale",
        lambda h: setattr(h.tensors[1], "scale", 0.5),
        InvalidArgumentError,
        "tensor 'dense/bias' has scale 0.5 but encoding RAW",
    ),
    (
        "encoded bytes",
        lambda h: setattr(h.tensors[0], "encoded_bytes", 24),
        InvalidArgumentError,
        "tensor 'dense/kernel' declares 24 encoded bytes, but (3, 2) float32 as INT8 is "
        "6 x 1 = 6 bytes",
    ),
    (
        "total",
        lambda h: setattr(h, "total_bytes", 17),
        InvalidArgumentError,
        "header total_bytes 17 is not the sum of the tensors' encoded_bytes 22",
    ),
    (
        "chunk bytes",
        lambda h: setattr(h, "chunk_bytes", 0),
        InvalidArgumentError,
        "header chunk_bytes is 0",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [case[1:] for case in HEADER_CASES],
    ids=[case[0] for case in HEADER_CASES],
)
def test_inconsistent_header_is_rejected_at_construction(
    mutate: Any, error: type[HflError], message: str
) -> None:
    header = valid_header()
    mutate(header)
    with pytest.raises(error) as info:
        StreamDecoder(header, max_total_bytes=LIMIT)
    assert type(info.value) is error
    assert message in str(info.value)


def test_payload_over_the_limit_is_resource_exhausted() -> None:
    with pytest.raises(
        ResourceExhaustedError,
        match="model download: payload of 22 bytes exceeds the limit of 21 bytes",
    ):
        StreamDecoder(valid_header(), max_total_bytes=21, what="model download")


def test_decoded_size_over_the_limit_is_resource_exhausted() -> None:
    header = encode_tensors({"w": np.ones(100, np.float64)}, INT8).header
    StreamDecoder(header, max_total_bytes=800)
    with pytest.raises(
        ResourceExhaustedError, match="decoded tensors of 800 bytes exceed the limit of 799"
    ):
        StreamDecoder(header, max_total_bytes=799)


def test_header_is_checked_against_expected_specs() -> None:
    expected = [spec("dense/kernel", F32, (2, 3))]
    with pytest.raises(
        InvalidArgumentError,
        match=r"upload: tensor 'dense/kernel' has shape \(3, 2\), expected \(2, 3\)",
    ):
        StreamDecoder(valid_header(), expected=expected, max_total_bytes=LIMIT, what="upload")


def test_bfloat16_encoding_of_float16_tensor_is_rejected() -> None:
    header = encode_tensors({"h": np.ones(2, np.float16)}).header
    header.tensors[0].encoding = BFLOAT16
    with pytest.raises(InvalidArgumentError, match="tensor 'h' is float16: ENCODING_BFLOAT16"):
        StreamDecoder(header, max_total_bytes=LIMIT)


def test_int8_scale_too_large_for_the_tensor_dtype_is_rejected() -> None:
    header = encode_tensors({"h": np.ones(2, np.float16)}, INT8).header
    header.tensors[0].scale = 1000.0
    with pytest.raises(InvalidArgumentError, match=r"INT8 scale 1000\.0, too large for float16"):
        StreamDecoder(header, max_total_bytes=LIMIT)


DIMS = st.one_of(st.integers(-3, 6), st.integers(-3, 1 << 40))


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.integers(-1, 10),
    encoding=st.integers(-1, 6),
    shape=st.lists(DIMS, max_size=4),
    scale=st.floats(width=32),
    sizes=st.one_of(st.none(), st.tuples(st.integers(0, 1 << 45), st.integers(0, 1 << 45))),
    chunk_bytes=st.integers(0, 10),
    data=st.lists(st.binary(max_size=12), max_size=4),
)
def test_arbitrary_headers_and_chunks_raise_only_domain_errors(
    dtype: int,
    encoding: int,
    shape: list[int],
    scale: float,
    sizes: tuple[int, int] | None,
    chunk_bytes: int,
    data: list[bytes],
) -> None:
    """Whatever the header and chunks, the decoder raises a domain error, never anything else.

    With sizes None the byte counts are made consistent with shape, dtype and encoding where
    that is possible, so that chunks get fed too; the all-zero digest then fails at the end.
    """
    if sizes is None:
        try:
            width = encoded_width(dtype, encoding)
        except (HflError, KeyError):
            width = 1
        encoded_bytes = total = min(math.prod(max(d, 0) for d in shape) * width, (1 << 64) - 1)
    else:
        encoded_bytes, total = sizes
    header = tensor_pb2.TensorStreamHeader(total_bytes=total, chunk_bytes=chunk_bytes)
    t = header.tensors.add(encoded_bytes=encoded_bytes, scale=scale)
    t.spec.name = "t"
    t.spec.dtype = dtype  # type: ignore[assignment]
    t.spec.shape.extend(shape)
    t.encoding = encoding  # type: ignore[assignment]
    chunks = []
    offset = 0
    for piece in data:
        chunks.append(tensor_pb2.TensorChunk(offset=offset, data=piece))
        offset += len(piece)
    parts: list[Part] = [*chunks, tensor_pb2.TensorStreamTrailer(sha256=b"\0" * 32)]
    with pytest.raises(HflError):
        decode_stream(header, parts, max_total_bytes=1 << 16)


# --- damaged streams ---------------------------------------------------------------------------

MUTATIONS = [
    "drop",
    "duplicate",
    "swap",
    "truncate",
    "flip",
    "digest",
    "trailer_total",
    "extra",
    "offset",
    "grow",
    "no_trailer",
    "two_trailers",
    "short_digest",
]


@st.composite
def damaged_streams(draw: st.DrawFn) -> tuple[tensor_pb2.TensorStreamHeader, list[Part], str]:
    tensors = draw(tensor_dicts(ALL_DTYPES).filter(lambda t: sum(a.nbytes for a in t.values())))
    stream = encode_tensors(tensors, chunk_bytes=draw(st.integers(1, 24)))
    chunks = list(stream.chunks())
    trailer = stream.trailer()
    n = len(chunks)
    mutation = draw(st.sampled_from(MUTATIONS if n > 1 else [m for m in MUTATIONS if m != "swap"]))
    i = draw(st.integers(0, n - 1))
    if mutation == "drop":
        del chunks[i]
    elif mutation == "duplicate":
        chunks.insert(i, chunks[i])
    elif mutation == "swap":
        j = draw(st.integers(0, n - 1).filter(lambda j: j != i))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif mutation == "truncate":
        del chunks[draw(st.integers(0, n - 1)) :]
    elif mutation == "flip":
        data = bytearray(chunks[i].data)
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        chunks[i] = tensor_pb2.TensorChunk(offset=chunks[i].offset, data=bytes(data))
    elif mutation == "digest":
        trailer = tensor_pb2.TensorStreamTrailer(
            sha256=hashlib.sha256(b"other").digest(), total_bytes=trailer.total_bytes
        )
    elif mutation == "trailer_total":
        trailer = tensor_pb2.TensorStreamTrailer(
            sha256=trailer.sha256, total_bytes=trailer.total_bytes + draw(st.integers(1, 9))
        )
    elif mutation == "extra":
        chunks.append(tensor_pb2.TensorChunk(offset=stream.header.total_bytes, data=b"x"))
    elif mutation == "offset":
        chunks[i] = tensor_pb2.TensorChunk(
            offset=chunks[i].offset + draw(st.integers(1, 9)), data=chunks[i].data
        )
    elif mutation == "grow":
        chunks[i] = tensor_pb2.TensorChunk(offset=chunks[i].offset, data=chunks[i].data + b"\0")
    elif mutation == "short_digest":
        trailer = tensor_pb2.TensorStreamTrailer(
            sha256=trailer.sha256[:31], total_bytes=trailer.total_bytes
        )
    parts: list[Part] = list(chunks)
    if mutation != "no_trailer":
        parts.append(trailer)
    if mutation == "two_trailers":
        parts.append(trailer)
    return stream.header, parts, mutation


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(damaged=damaged_streams())
def test_damaged_stream_always_raises_stream_error(
    damaged: tuple[tensor_pb2.TensorStreamHeader, list[Part], str],
) -> None:
    header, parts, mutation = damaged
    with pytest.raises(StreamError) as info:
        decode_stream(header, parts, max_total_bytes=LIMIT)
    expected_words = {
        "flip": "payload digest mismatch",
        "digest": "payload digest mismatch",
        "trailer_total": "does not match the header's",
        "no_trailer": "ended without a trailer",
        "two_trailers": "came after the trailer",
        "short_digest": "expected 32",
    }
    if mutation in expected_words:
        assert expected_words[mutation] in str(info.value)


def test_missing_chunk_names_the_offsets() -> None:
    stream = encode_tensors({"w": np.arange(8, dtype=np.int32)}, chunk_bytes=8)
    chunks = list(stream.chunks())
    decoder = StreamDecoder(stream.header, max_total_bytes=LIMIT, what="model download")
    decoder.feed(chunks[0])
    with pytest.raises(StreamError) as info:
        decoder.feed(chunks[2])
    assert str(info.value) == (
        "model download: chunk at offset 16, expected 8: chunks out of order or missing"
    )


def test_truncated_stream_names_bytes_received_of_total() -> None:
    stream = encode_tensors({"w": np.arange(8, dtype=np.int32)}, chunk_bytes=8)
    chunks = list(stream.chunks())
    decoder = StreamDecoder(stream.header, max_total_bytes=LIMIT)
    decoder.feed(chunks[0])
    with pytest.raises(
        StreamError, match="stream truncated: received 8 of 32 bytes before the trailer"
    ):
        decoder.finish(stream.trailer())


def test_chunk_past_total_bytes_is_refused() -> None:
    stream = encode_tensors({"w": np.arange(3, dtype=np.int8)}, chunk_bytes=4)
    decoder = StreamDecoder(stream.header, max_total_bytes=LIMIT)
    with pytest.raises(
        StreamError, match="chunk at offset 0 with 4 bytes ends at 4, beyond the header's total"
    ):
        decoder.feed(tensor_pb2.TensorChunk(offset=0, data=b"\0" * 4))


def test_short_chunk_before_the_end_is_refused() -> None:
    stream = encode_tensors({"w": np.arange(8, dtype=np.int8)}, chunk_bytes=4)
    decoder = StreamDecoder(stream.header, max_total_bytes=LIMIT)
    with pytest.raises(StreamError, match="chunk at offset 0 has 3 bytes; every chunk but the"):
        decoder.feed(tensor_pb2.TensorChunk(offset=0, data=b"\0" * 3))


def test_decoder_refuses_input_after_a_failure_and_after_finishing() -> None:
    stream = encode_tensors({"w": np.arange(8, dtype=np.int8)}, chunk_bytes=4)
    chunks = list(stream.chunks())
    decoder = StreamDecoder(stream.header, max_total_bytes=LIMIT)
    with pytest.raises(StreamError):
        decoder.feed(chunks[1])
    with pytest.raises(StreamError, match="the decoder is failed and takes no more input"):
        decoder.feed(chunks[0])
    good = StreamDecoder(stream.header, max_total_bytes=LIMIT)
    for chunk in chunks:
        good.feed(chunk)
    good.finish(stream.trailer())
    with pytest.raises(StreamError, match="the decoder is finished and takes no more input"):
        good.feed(chunks[0])


def test_empty_stream_round_trips() -> None:
    stream = encode_tensors({})
    assert list(stream.chunks()) == []
    assert decode_stream(stream.header, [stream.trailer()], max_total_bytes=0) == {}


# --- memory of a ResNet-50-sized model ---------------------------------------------------------


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The weights of Keras' ResNet-50 (25.6 M parameters), batch-norm statistics included."""
    shapes: list[tuple[str, tuple[int, ...]]] = []

    def conv_bn(name: str, kernel: tuple[int, ...]) -> None:
        shapes.append((f"{name}/kernel", kernel))
        shapes.append((f"{name}/bias", (kernel[-1],)))
        shapes.extend((f"{name}_bn/{p}", (kernel[-1],)) for p in ("gamma", "beta", "mean", "var"))

    conv_bn("conv1", (7, 7, 3, 64))
    channels = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=2):
        for block in range(1, blocks + 1):
            prefix = f"conv{stage}_block{block}"
            if block == 1:
                conv_bn(f"{prefix}_0", (1, 1, channels, 4 * width))
            conv_bn(f"{prefix}_1", (1, 1, channels, width))
            conv_bn(f"{prefix}_2", (3, 3, width, width))
            conv_bn(f"{prefix}_3", (1, 1, width, 4 * width))
            channels = 4 * width
    shapes.append(("predictions/kernel", (2048, 1000)))
    shapes.append(("predictions/bias", (1000,)))
    return shapes


@pytest.mark.parametrize("encoding", [RAW, FLOAT16, BFLOAT16, INT8])
def test_resnet50_sized_round_trip_holds_only_a_few_chunks_beyond_the_arrays(
    encoding: int,
) -> None:
    rng = np.random.default_rng(50)
    model = {
        name: rng.standard_normal(shape, dtype=np.float32) for name, shape in resnet50_shapes()
    }
    params = sum(a.size for a in model.values())
    assert 25_000_000 < params < 26_000_000
    specs = specs_of(model)

    tracemalloc.start()
    try:
        stream = encode_tensors(model, encoding, chunk_bytes=MIB)
        decoder = StreamDecoder(stream.header, expected=specs, max_total_bytes=4 * params)
        for chunk in stream.chunks():
            decoder.feed(chunk)
        out = decoder.finish(stream.trailer())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    outputs = sum(a.nbytes for a in out.values())
    assert outputs == 4 * params
    extra = peak - outputs
    assert extra < 8 * MIB, f"peak {peak} bytes is {extra / MIB:.1f} MiB beyond the outputs"
    for name, x in model.items():
        if encoding == RAW:
            np.testing.assert_array_equal(out[name], x)
        else:
            np.testing.assert_allclose(out[name], x, rtol=0, atol=float(np.max(np.abs(x))) / 127)


# --- oneof messages and gRPC -------------------------------------------------------------------

SMALL_MODEL: Arrays = {
    "dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
    "dense/bias": np.array([0.5, -0.5, 1.5, 2.5], np.float32),
}


def download_messages(chunk_bytes: int = 10) -> list[aggregator_pb2.DownloadModelResponse]:
    stream = encode_tensors(SMALL_MODEL, chunk_bytes=chunk_bytes)
    return list(iter_download_messages(3, 7, "ab" * 32, stream))


def test_download_messages_round_trip_through_collect_stream() -> None:
    messages = download_messages()
    assert [m.WhichOneof("part") for m in messages] == ["header"] + ["chunk"] * 7 + ["trailer"]
    header, arrays = collect_stream(
        iter(messages), expected=specs_of(SMALL_MODEL), max_total_bytes=LIMIT
    )
    assert (header.round, header.model_version, header.plan_sha256) == (3, 7, "ab" * 32)
    for name, x in SMALL_MODEL.items():
        np.testing.assert_array_equal(arrays[name], x)


def test_upload_messages_carry_the_update_header_and_leave_the_callers_header_alone() -> None:
    update = aggregator_pb2.UpdateHeader(session_id="s", round=2, nonce=b"n" * 16)
    stream = encode_tensors(SMALL_MODEL, BFLOAT16, chunk_bytes=16)
    messages = list(iter_upload_messages(update, stream))
    assert not update.HasField("tensors")
    header, arrays = collect_stream(iter(messages), max_total_bytes=LIMIT)
    assert (header.session_id, header.round, header.nonce) == ("s", 2, b"n" * 16)
    assert header.tensors == stream.header
    np.testing.assert_allclose(arrays["dense/kernel"], SMALL_MODEL["dense/kernel"], rtol=2**-8)


def _without(
    messages: list[aggregator_pb2.DownloadModelResponse], index: int
) -> list[aggregator_pb2.DownloadModelResponse]:
    return messages[:index] + messages[index + 1 :]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: [], "tensor stream: the stream ended before its header"),
        (lambda m: m[1:], "model download: the first message is a chunk, not the header"),
        (
            lambda m: [m[0], m[1], m[0], *m[2:]],
            "model download: a second header arrived after 10 bytes",
        ),
        (
            lambda m: [*m, m[1]],
            "model download: a chunk message came after the trailer",
        ),
        (
            lambda m: [*m, m[-1]],
            "model download: a trailer message came after the trailer",
        ),
        (
            lambda m: m[:4],
            "model download: the stream ended without a trailer after 30 of 64 bytes: "
            "the peer stopped mid-stream",
        ),
        (
            lambda m: [*m[:2], aggregator_pb2.DownloadModelResponse(), *m[2:]],
            "model download: a message with no part set arrived",
        ),
    ],
)
def test_collect_stream_refuses_misordered_messages(build: Any, message: str) -> None:
    with pytest.raises(StreamError) as info:
        collect_stream(iter(build(download_messages())), max_total_bytes=LIMIT)
    assert str(info.value) == message


def test_on_header_refusal_stops_before_reading_any_chunk() -> None:
    pulled: list[str | None] = []

    def source() -> Iterator[aggregator_pb2.DownloadModelResponse]:
        for m in download_messages():
            pulled.append(m.WhichOneof("part"))
            yield m

    def refuse(header: aggregator_pb2.ModelHeader) -> None:
        raise FailedPreconditionError(f"round {header.round} is stale; the current round is 4")

    with pytest.raises(FailedPreconditionError, match="round 3 is stale; the current round is 4"):
        collect_stream(source(), max_total_bytes=LIMIT, on_header=refuse)
    assert pulled == ["header"]


class _Aggregator:
    """The two streaming methods of a real gRPC AggregatorService, using only codec helpers."""

    def __init__(self) -> None:
        self.stop_after_chunks: int | None = None

    def download_model(
        self, request: aggregator_pb2.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.DownloadModelResponse]:
        stream = encode_tensors(SMALL_MODEL, chunk_bytes=8)
        for sent, message in enumerate(iter_download_messages(1, 5, "cd" * 32, stream)):
            if self.stop_after_chunks is not None and sent > self.stop_after_chunks:
                return
            yield message

    def upload_update(
        self,
        request_iterator: Iterator[aggregator_pb2.UploadUpdateRequest],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        try:
            header, arrays = collect_stream(
                request_iterator, expected=specs_of(SMALL_MODEL), max_total_bytes=1 << 16
            )
        except HflError as err:
            context.abort(err.code, str(err))
        ok = all(np.array_equal(arrays[k], v) for k, v in SMALL_MODEL.items())
        disposition = (
            aggregator_pb2.UPDATE_DISPOSITION_APPLIED
            if ok
            else aggregator_pb2.UPDATE_DISPOSITION_UNSPECIFIED
        )
        return aggregator_pb2.UploadUpdateResponse(disposition=disposition, round=header.round)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "hfl.v1.AggregatorService",
            {
                "DownloadModel": grpc.unary_stream_rpc_method_handler(
                    self.download_model,
                    request_deserializer=aggregator_pb2.DownloadModelRequest.FromString,
                    response_serializer=aggregator_pb2.DownloadModelResponse.SerializeToString,
                ),
                "UploadUpdate": grpc.stream_unary_rpc_method_handler(
                    self.upload_update,
                    request_deserializer=aggregator_pb2.UploadUpdateRequest.FromString,
                    response_serializer=aggregator_pb2.UploadUpdateResponse.SerializeToString,
                ),
            },
        )


@pytest.fixture
def aggregator_stub() -> Iterator[tuple[_Aggregator, aggregator_pb2_grpc.AggregatorServiceStub]]:
    servicer = _Aggregator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, aggregator_pb2_grpc.AggregatorServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_model_download_over_grpc_round_trips(
    aggregator_stub: tuple[_Aggregator, aggregator_pb2_grpc.AggregatorServiceStub],
) -> None:
    _, stub = aggregator_stub
    responses = stub.DownloadModel(aggregator_pb2.DownloadModelRequest(), timeout=10)
    header, arrays = collect_stream(responses, max_total_bytes=LIMIT)
    assert header.model_version == 5
    np.testing.assert_array_equal(arrays["dense/kernel"], SMALL_MODEL["dense/kernel"])


def test_download_cut_mid_stream_over_grpc_is_a_stream_error(
    aggregator_stub: tuple[_Aggregator, aggregator_pb2_grpc.AggregatorServiceStub],
) -> None:
    servicer, stub = aggregator_stub
    servicer.stop_after_chunks = 2
    responses = stub.DownloadModel(aggregator_pb2.DownloadModelRequest(), timeout=10)
    with pytest.raises(StreamError, match="ended without a trailer after 16 of 64 bytes"):
        collect_stream(responses, max_total_bytes=LIMIT)


def test_upload_over_grpc_is_accepted_and_a_truncated_one_is_invalid_argument(
    aggregator_stub: tuple[_Aggregator, aggregator_pb2_grpc.AggregatorServiceStub],
) -> None:
    _, stub = aggregator_stub
    update = aggregator_pb2.UpdateHeader(session_id="s", round=4)
    messages = list(iter_upload_messages(update, encode_tensors(SMALL_MODEL, chunk_bytes=8)))
    reply = stub.UploadUpdate(iter(messages), timeout=10)
    assert (reply.disposition, reply.round) == (aggregator_pb2.UPDATE_DISPOSITION_APPLIED, 4)
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadUpdate(iter(messages[:-1]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update upload: the stream ended without a trailer after 64 of 64 bytes" in str(
        info.value.details()
    )
