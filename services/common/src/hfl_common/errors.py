"""Domain exceptions, each mapped to one gRPC status code at the edge.

Handlers raise these with a message that says what was wrong and what to do;
`hfl_common.server` turns them into the status code below with `rich_status`,
whose details carry a google.rpc.ErrorInfo (domain "hfl", the error's reason in
UPPER_SNAKE_CASE, its metadata), so clients act on `error_info(err).reason`
rather than on the message. The `hfl` command line turns them into one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# google.rpc.ErrorInfo.domain of every error hfl raises.
ERROR_DOMAIN = "hfl"


class HflError(Exception):
    """Base of every error hfl raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, reason: str = "", metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        # A short, bounded label for metrics ("stale", "nan", "mrenclave_mismatch"); as
        # ErrorInfo.reason it is sent upper-cased ("STALE").
        self.reason = reason or type(self).__name__.removesuffix("Error").lower()
        # Machine-readable facts about the error (ErrorInfo.metadata).
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def wire_reason(self) -> str:
        """The reason as google.rpc.ErrorInfo wants it: [A-Z][A-Z0-9_]*."""
        return re.sub(r"[^A-Z0-9]+", "_", self.reason.upper()).strip("_") or "UNKNOWN"


def rich_status(err: HflError) -> grpc.Status:
    """The gRPC status for `err`: its code, its message and an ErrorInfo detail."""
    info = error_details_pb2.ErrorInfo(
        reason=err.wire_reason, domain=ERROR_DOMAIN, metadata=err.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=err.code.value[0], message=str(err), details=[detail])
    return rpc_status.to_status(status)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo an hfl server attached to a failed call, or None."""
    if not isinstance(err, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None


def error_reason(err: grpc.RpcError) -> str:
    """ErrorInfo.reason of a failed call ("" when the server attached none)."""
    info = error_info(err)
    return info.reason if info is not None else ""


class InvalidArgumentError(HflError):
    """The request itself is malformed: wrong shape, dtype, NaN, bad digest."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PermissionDeniedError(HflError):
    """The peer is authenticated but not allowed: wrong role, refused evidence."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(HflError):
    """The peer did not present a usable certificate."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(HflError):
    """The request is well-formed but the state forbids it: stale round, replayed update."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(HflError):
    """The request is larger than the limits allow."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFoundError(HflError):
    """The thing asked for does not exist (unknown session, model version)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(HflError):
    """A duplicate: the update for this round was already accepted."""

    code = grpc.StatusCode.ALREADY_EXISTS


class UnavailableError(HflError):
    """Not ready to serve yet (no attested certificate, draining)."""

    code = grpc.StatusCode.UNAVAILABLE


class ConfigError(HflError):
    """A configuration or policy file is invalid; the message names the key."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EvidenceError(PermissionDeniedError):
    """Attestation evidence is unusable or refused; the message gives the reason."""

    def __init__(self, message: str, reason_code: str = "evidence_invalid") -> None:
        super().__init__(message, reason_code)
        self.reason_code = reason_code


class StreamError(InvalidArgumentError):
    """A tensor stream is truncated, reordered, corrupted or does not match its header."""


class DeadlineExceededError(HflError):
    """Something the call waited for did not come in time (an upload's header)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
