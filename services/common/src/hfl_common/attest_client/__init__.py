"""The client side of the federation's attestation: bootstrap, pinning, credentials, re-checks.

How a service comes to talk mutual, attested TLS (DESIGN.md, "Trust model"):

1. `bootstrap_attestation_service`: read the attestation service's self-signed RA-TLS
   certificate with a bare TLS handshake (`fetch_server_certificate`, no verification
   there), verify the quote in it for role "attestation" under the agreed policy and
   check that it binds the certificate's key, then open a gRPC channel that trusts
   exactly that certificate (it is the only root) and checks the key-pinned name in it.
   From then on the channel can only reach the enclave whose quote was verified.
2. `obtain_certificate`: generate evidence for our own enclave key (a quote with
   report_data = SHA-256(SPKI) || user data) and have the attestation service, the
   federation CA, issue a short-lived certificate for that key.
3. `ServiceCredentials`: our key and current certificate, as gRPC server credentials
   (mTLS, client certificates required, chained to the federation CA; renewable without
   restart) and channel credentials. `Renewer` re-issues the certificate at about 2/3
   of its lifetime with fresh evidence.
4. Relying parties do not stop at "the CA signed it": `PeerVerifier` (server side, as
   an `Authorizer`) re-verifies the quote copied into the peer's certificate for the
   role its SAN names, bound to that certificate's key; `connect_verified` (client side)
   does the same for the server before a channel is used, checks its attested user
   data (the aggregator's plan hash), and pins the channel to that key's name.

Names in federation certificates (issued by hfl_attestation.ca): URI SANs
``hfl://role/<role>`` and ``hfl://id/<peer_id_for(spki)>``, DNS SANs
``<role>.hfl.internal`` and ``key_dns_name(spki)`` = ``k-<32 hex>.hfl.internal``.

The package: `names` (roles, timeouts, targets), `evidence` (bare-TLS certificate fetch,
RA-TLS evidence checks), `bootstrap`, `certificates` (issuance, credentials, renewal) and
`peers` (re-verification of peers, server and client side). Every name is re-exported
here; import from `hfl_common.attest_client`.
"""

from __future__ import annotations

from hfl_common.attest_client.bootstrap import (
    PinnedAttestationService,
    bootstrap_attestation_service,
)
from hfl_common.attest_client.certificates import (
    IssuedCertificate,
    Renewer,
    ServiceCredentials,
    evidence_quote,
    obtain_certificate,
)
from hfl_common.attest_client.evidence import (
    embedded_evidence,
    fetch_server_certificate,
    verify_ra_tls_certificate,
)
from hfl_common.attest_client.names import (
    ATTESTATION_ROLE,
    BUSY_RETRY_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    ENCLAVE_ROLES,
    OPERATOR_ROLE,
    PEER_CACHE_SIZE,
    RENEW_AT_FRACTION,
    TRAINER_ROLE,
    role_name,
    role_proto,
    spki_sha256_of,
    split_target,
)
from hfl_common.attest_client.peers import (
    AttestedRoleAuthorizer,
    PeerVerifier,
    connect_verified,
    credentials_role,
)
from hfl_common.identity import KEY_DNS_PREFIX, PEER_ID_HEX_DIGITS, key_dns_name, peer_id_for

__all__ = [
    "ATTESTATION_ROLE",
    "BUSY_RETRY_SECONDS",
    "DEFAULT_TIMEOUT_SECONDS",
    "ENCLAVE_ROLES",
    "KEY_DNS_PREFIX",
    "OPERATOR_ROLE",
    "PEER_CACHE_SIZE",
    "PEER_ID_HEX_DIGITS",
    "RENEW_AT_FRACTION",
    "TRAINER_ROLE",
    "AttestedRoleAuthorizer",
    "IssuedCertificate",
    "PeerVerifier",
    "PinnedAttestationService",
    "Renewer",
    "ServiceCredentials",
    "bootstrap_attestation_service",
    "connect_verified",
    "credentials_role",
    "embedded_evidence",
    "evidence_quote",
    "fetch_server_certificate",
    "key_dns_name",
    "obtain_certificate",
    "peer_id_for",
    "role_name",
    "role_proto",
    "spki_sha256_of",
    "split_target",
    "verify_ra_tls_certificate",
]
