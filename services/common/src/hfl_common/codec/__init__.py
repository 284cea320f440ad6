"""The tensor codec: named numpy arrays <-> hfl.v1 tensor streams (protos/hfl/v1/tensor.proto).

A stream is one TensorStreamHeader (specs, per-tensor encoding, sizes), TensorChunk messages
of exactly `chunk_bytes` bytes but the last, and a TensorStreamTrailer with the SHA-256 of the
whole payload. Neither side ever holds the payload as one bytes object: the encoder yields one
chunk at a time from the arrays, the decoder writes each chunk into preallocated arrays, so
memory stays at the model plus a few chunks (a 100 MB model in 1 MiB chunks: a few MiB more).

    stream = encode_tensors(weights, encoding=tensor_pb2.ENCODING_BFLOAT16)
    send(stream.header); for chunk in stream.chunks(): send(chunk); send(stream.trailer())

    decoder = StreamDecoder(header, expected=specs, max_total_bytes=limit)
    for chunk in chunks: decoder.feed(chunk)
    arrays = decoder.finish(trailer)

gRPC handlers use iter_download_messages / iter_upload_messages and collect_stream, which do
the `oneof part` plumbing and the header-first, trailer-last checks.

Encodings and their worst-case error, |x - decoded(x)|, for a finite x (all tested):

- RAW: exact, bit for bit (NaN payloads included). Integer tensors always travel RAW.
- FLOAT16 (IEEE 754 binary16, round to nearest even): at most 2**-11 * |x| in the normal
  range |x| >= 2**-14; below it, at most 2**-25 absolute (half the smallest subnormal).
  NaN and inf are kept. A finite value beyond 65504 would become inf: such a tensor is refused.
- BFLOAT16 (the upper 16 bits of binary32, round to nearest even, done with numpy bit
  operations): at most 2**-8 * |x| in the normal range |x| >= 2**-126, at most 2**-134
  absolute below it; float64 tensors are first rounded to float32 (another 2**-24 * |x|).
  NaN stays NaN (quiet bit set), inf stays inf; a value that would round to inf is refused.
  A float16 tensor asked for BFLOAT16 or FLOAT16 goes RAW (same size, exact).
- INT8 (symmetric, per tensor): q = round(x / scale) in [-127, 127], scale = max|x| / 127
  rounded up to a float32; error at most scale / 2 absolute (plus the rounding of q * scale
  to the tensor's dtype, 2**-24 relative for float32). An all-zero tensor has scale 0. NaN or
  inf cannot be encoded: InvalidArgumentError.

Errors are domain errors from hfl_common.errors: InvalidArgumentError for a malformed header
or input, ResourceExhaustedError beyond `max_total_bytes`, StreamError for a stream that is
truncated, reordered, corrupted or does not match its header.
"""

from hfl_common.codec.decoder import StreamDecoder, decode_stream
from hfl_common.codec.dtypes import (
    check_specs,
    data_type_name,
    data_type_of,
    native_dtype,
    spec_of,
    specs_of,
)
from hfl_common.codec.encoder import DEFAULT_CHUNK_BYTES, EncodedStream, encode_tensors
from hfl_common.codec.messages import collect_stream, iter_download_messages, iter_upload_messages

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EncodedStream",
    "StreamDecoder",
    "check_specs",
    "collect_stream",
    "data_type_name",
    "data_type_of",
    "decode_stream",
    "encode_tensors",
    "iter_download_messages",
    "iter_upload_messages",
    "native_dtype",
    "spec_of",
    "specs_of",
]
