"""Domain exceptions, each mapped to one gRPC status code at the edge.

Handlers raise these with a message that says what was wrong and what to do;
`hfl_common.server` turns them into the status code below, and the `hfl`
command line turns them into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import grpc


class HflError(Exception):
    """Base of every error hfl raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        # A short, bounded label for metrics ("stale", "nan", "mrenclave_mismatch").
        self.reason = reason or type(self).__name__.removesuffix("Error").lower()


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
