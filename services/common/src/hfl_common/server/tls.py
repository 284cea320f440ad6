"""TLS credentials: the server's (fixed, or renewed without restart) and the client's
channel with the server's message limits and keepalive."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from hfl_common.server.config import (
    CLIENT_KEEPALIVE_TIME_MS,
    DEFAULT_MAX_MESSAGE_BYTES,
    KEEPALIVE_TIMEOUT_MS,
)

_LOG = logging.getLogger("hfl_common.server")


@dataclass(frozen=True)
class ServerCertificate:
    """What a TLS server needs: its key and chain, and the roots its clients must chain to."""

    private_key_pem: bytes = field(repr=False)
    certificate_chain_pem: bytes
    client_ca_pem: bytes


CredentialsProvider = Callable[[], ServerCertificate]
"""Returns the server's current certificate; asked before every new TLS handshake.

It must be cheap (return what it holds in memory) and thread-safe: gRPC calls it from its
own threads. Returning an equal `ServerCertificate` keeps the current configuration.
"""


def server_credentials(certificate: ServerCertificate) -> grpc.ServerCredentials:
    """Fixed mTLS server credentials that require a client certificate chained to the CA."""
    return grpc.ssl_server_credentials(
        [(certificate.private_key_pem, certificate.certificate_chain_pem)],
        root_certificates=certificate.client_ca_pem,
        require_client_auth=True,
    )


def _certificate_configuration(cert: ServerCertificate) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(cert.private_key_pem, cert.certificate_chain_pem)],
        root_certificates=cert.client_ca_pem,
    )


class RotatingCredentials:
    """Adapts a CredentialsProvider to grpc's certificate-configuration fetcher."""

    def __init__(self, provider: CredentialsProvider, *, require_client_auth: bool = True) -> None:
        self._provider = provider
        self._require_client_auth = require_client_auth
        self._lock = threading.Lock()
        self._current = provider()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(self._current),
            # the stubs say the fetcher may not return None; gRPC documents None as "no change"
            cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch),
            require_client_authentication=self._require_client_auth,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before every new handshake; None keeps the current configuration.
        try:
            latest = self._provider()
        except Exception:
            _LOG.exception("the credentials provider failed; keeping the current certificate")
            return None
        with self._lock:
            if latest == self._current:
                return None
            self._current = latest
        _LOG.info("server certificate renewed; new connections use the new certificate")
        return _certificate_configuration(latest)


# --- the client side -----------------------------------------------------------------------


def channel_credentials(
    *, root_ca_pem: bytes, private_key_pem: bytes, certificate_chain_pem: bytes
) -> grpc.ChannelCredentials:
    """mTLS client credentials: trust `root_ca_pem`, present our key and chain."""
    return grpc.ssl_channel_credentials(
        root_certificates=root_ca_pem,
        private_key=private_key_pem,
        certificate_chain=certificate_chain_pem,
    )


def make_channel(
    target: str,
    credentials: grpc.ChannelCredentials,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    target_name_override: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A secure channel with the server's message limits and keepalive for long-polls.

    `target_name_override` is the name the server certificate is checked against, e.g.
    ``role_dns_name("aggregator")``: certificates carry role names, not IP addresses, so a
    client dialling "10.0.0.7:50051" must say which name it expects. `options` are added
    last and win over the defaults.
    """
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": CLIENT_KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 1,
        # allow keepalive pings while a long-poll sends no data (gRPC core default: 2)
        "grpc.http2.max_pings_without_data": 0,
    }
    if target_name_override is not None:
        merged["grpc.ssl_target_name_override"] = target_name_override
    merged.update(dict(options))
    return grpc.secure_channel(target, credentials, options=list(merged.items()))
