"""The oneof plumbing of streamed models and updates, so gRPC handlers need none.

A model download (DownloadModelResponse) and an update upload (UploadUpdateRequest) are both
`oneof part { header; chunk; trailer }`: one header, the chunks, then one trailer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import numpy.typing as npt

from hfl_common.api import aggregator_pb2, tensor_pb2
from hfl_common.codec.decoder import StreamDecoder
from hfl_common.codec.encoder import EncodedStream
from hfl_common.errors import StreamError

logger = logging.getLogger(__name__)


def iter_download_messages(
    round: int,  # ModelHeader's own field name
    model_version: int,
    plan_sha256: str,
    stream: EncodedStream,
) -> Iterator[aggregator_pb2.DownloadModelResponse]:
    """The messages of one model download: ModelHeader, the chunks, the trailer."""
    yield aggregator_pb2.DownloadModelResponse(
        header=aggregator_pb2.ModelHeader(
            round=round,
            model_version=model_version,
            plan_sha256=plan_sha256,
            tensors=stream.header,
        )
    )
    for chunk in stream.chunks():
        yield aggregator_pb2.DownloadModelResponse(chunk=chunk)
    yield aggregator_pb2.DownloadModelResponse(trailer=stream.trailer())


def iter_upload_messages(
    header: aggregator_pb2.UpdateHeader, stream: EncodedStream
) -> Iterator[aggregator_pb2.UploadUpdateRequest]:
    """The messages of one update upload: a copy of `header` with the stream's tensor header
    filled in, the chunks, the trailer."""
    first = aggregator_pb2.UpdateHeader()
    first.CopyFrom(header)
    first.tensors.CopyFrom(stream.header)
    yield aggregator_pb2.UploadUpdateRequest(header=first)
    for chunk in stream.chunks():
        yield aggregator_pb2.UploadUpdateRequest(chunk=chunk)
    yield aggregator_pb2.UploadUpdateRequest(trailer=stream.trailer())


@overload
def collect_stream(
    messages: Iterable[aggregator_pb2.DownloadModelResponse],
    *,
    max_total_bytes: int,
    expected: Sequence[tensor_pb2.TensorSpec] | None = None,
    on_header: Callable[[aggregator_pb2.ModelHeader], None] | None = None,
    what: str | None = None,
    out: Mapping[str, npt.NDArray[Any]] | None = None,
) -> tuple[aggregator_pb2.ModelHeader, dict[str, npt.NDArray[Any]]]: ...


@overload
def collect_stream(
    messages: Iterable[aggregator_pb2.UploadUpdateRequest],
    *,
    max_total_bytes: int,
    expected: Sequence[tensor_pb2.TensorSpec] | None = None,
    on_header: Callable[[aggregator_pb2.UpdateHeader], None] | None = None,
    what: str | None = None,
    out: Mapping[str, npt.NDArray[Any]] | None = None,
) -> tuple[aggregator_pb2.UpdateHeader, dict[str, npt.NDArray[Any]]]: ...


def collect_stream(
    messages: Iterable[Any],
    *,
    max_total_bytes: int,
    expected: Sequence[tensor_pb2.TensorSpec] | None = None,
    on_header: Callable[[Any], None] | None = None,
    what: str | None = None,
    out: Mapping[str, npt.NDArray[Any]] | None = None,
) -> tuple[Any, dict[str, npt.NDArray[Any]]]:
    """Read header, chunks and trailer from oneof messages; return (header, arrays by name).

    `on_header` runs as soon as the header arrives, before any chunk is read: the place to
    refuse a stale round or an unknown session (raise a domain error) without receiving the
    payload. After the trailer the iterator must end. `what` names the stream in error
    messages ("update upload from trainer-1"); by default "model download" or "update upload"
    after the message type. Errors of the transport itself (a
    grpc.RpcError from a client's response iterator) pass through unchanged. `out`: decode
    into these arrays where shape and dtype match (see StreamDecoder).
    """
    iterator = iter(messages)
    first = next(iterator, None)
    if what is None:
        if isinstance(first, aggregator_pb2.DownloadModelResponse):
            what = "model download"
        elif isinstance(first, aggregator_pb2.UploadUpdateRequest):
            what = "update upload"
        else:
            what = "tensor stream"
    if first is None:
        raise StreamError(f"{what}: the stream ended before its header")
    kind = first.WhichOneof("part")
    if kind != "header":
        raise StreamError(f"{what}: the first message is a {kind or 'empty part'}, not the header")
    header = first.header
    if on_header is not None:
        on_header(header)
    decoder = StreamDecoder(
        header.tensors, expected=expected, max_total_bytes=max_total_bytes, what=what, out=out
    )
    for message in iterator:
        kind = message.WhichOneof("part")
        if kind == "chunk":
            decoder.feed(message.chunk)
        elif kind == "trailer":
            arrays = decoder.finish(message.trailer)
            extra = next(iterator, None)
            if extra is not None:
                raise StreamError(
                    f"{what}: a {extra.WhichOneof('part') or 'empty part'} message came after "
                    "the trailer"
                )
            return header, arrays
        elif kind == "header":
            raise StreamError(
                f"{what}: a second header arrived after {decoder.received_bytes} bytes"
            )
        else:
            raise StreamError(f"{what}: a message with no part set arrived")
    raise StreamError(
        f"{what}: the stream ended without a trailer after {decoder.received_bytes} of "
        f"{decoder.total_bytes} bytes: the peer stopped mid-stream"
    )
