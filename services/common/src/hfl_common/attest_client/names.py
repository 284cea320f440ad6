"""Roles, their proto values, timeouts and target parsing: shared by the attest_client modules."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cryptography import x509

from hfl_common.api import attestation_pb2
from hfl_common.errors import (
    InvalidArgumentError,
)
from hfl_common.identity import (
    spki_sha256,
)

logger = logging.getLogger("hfl_common.attest_client")

ATTESTATION_ROLE = "attestation"
OPERATOR_ROLE = "operator"
TRAINER_ROLE = "trainer"
ENCLAVE_ROLES = ("attestation", "aggregator", "trainer", "relay")


DEFAULT_TIMEOUT_SECONDS = 10.0
# How long to keep retrying a certificate request the attestation service refuses as busy
# (its per-address limits: a few hundred enclaves of one host bootstrapping at once).
BUSY_RETRY_SECONDS = 120.0
# Renew at this fraction of a certificate's lifetime.
RENEW_AT_FRACTION = 2 / 3
# Peer verdicts kept in a PeerVerifier's cache (each until its certificate expires).
PEER_CACHE_SIZE = 4096

_PROTO_BY_ROLE: Mapping[str, attestation_pb2.Role] = {
    "attestation": attestation_pb2.ROLE_ATTESTATION,
    "aggregator": attestation_pb2.ROLE_AGGREGATOR,
    "trainer": attestation_pb2.ROLE_TRAINER,
    "operator": attestation_pb2.ROLE_OPERATOR,
    "relay": attestation_pb2.ROLE_RELAY,
}
_ROLE_BY_PROTO: Mapping[int, str] = {int(value): name for name, value in _PROTO_BY_ROLE.items()}


# --- names ------------------------------------------------------------------------------------


def role_name(role: int) -> str:
    """The role's name for an hfl.v1.Role value; InvalidArgumentError for UNSPECIFIED/unknown."""
    name = _ROLE_BY_PROTO.get(int(role))
    if name is None:
        raise InvalidArgumentError(
            f"role {role} is not one of ROLE_ATTESTATION, ROLE_AGGREGATOR, ROLE_TRAINER, "
            "ROLE_OPERATOR, ROLE_RELAY"
        )
    return name


def role_proto(name: str) -> attestation_pb2.Role:
    """The hfl.v1.Role value for a role name ("trainer" -> ROLE_TRAINER)."""
    value = _PROTO_BY_ROLE.get(name)
    if value is None:
        raise InvalidArgumentError(
            f"role {name!r} is not one of {', '.join(sorted(_PROTO_BY_ROLE))}"
        )
    return value


def spki_sha256_of(certificate: x509.Certificate) -> bytes:
    """SHA-256 of a certificate's DER SubjectPublicKeyInfo (hfl_common.identity)."""
    return spki_sha256(certificate)


def split_target(target: str) -> tuple[str, int]:
    """ "host:port" (or "[v6]:port") -> (host, port); InvalidArgumentError otherwise."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgumentError(f"target {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)
