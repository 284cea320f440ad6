"""The gRPC server bootstrap every hfl service starts through, and the matching client channel.

`build_server` returns a started `RunningServer` whose `port` is the port actually bound
(port 0 in tests). Every server it builds has:

- **mTLS only.** One secure port whose credentials require a client certificate; there is
  no insecure port and no fallback. The factory refuses to start without credentials, and
  the interceptor refuses any call whose peer presented no certificate (UNAUTHENTICATED),
  so even a misconfigured `grpc.ServerCredentials` cannot serve an anonymous caller.
- **Certificate renewal without restart.** Pass a `CredentialsProvider` (a callable that
  returns the current `ServerCertificate`) instead of fixed credentials: the server is then
  built on `grpc.dynamic_ssl_server_credentials`, gRPC asks the provider before every new
  TLS handshake, and a renewed certificate is used by every connection made after it.
  Established connections keep the certificate they were opened with.
- **The standard health service** (grpc.health.v1) `Check`, with an entry per registered
  service and the overall entry "". `Watch` is refused with UNIMPLEMENTED (an open watch
  would hold a worker thread; see `hfl_common.server.interceptor`). Everything starts
  NOT_SERVING: the caller flips it with `set_serving(True)` once it can serve (e.g. once
  it holds its attested certificate), and shutdown flips it back to NOT_SERVING for good.
- **Server reflection** (grpc.reflection.v1alpha) listing our services, health and
  reflection, so `grpcurl` works (with a client certificate, like every other caller).
- **Deliberate message limits**: 4 MiB each way by default. Models and updates are
  streamed in chunks of 1 MiB (protos/hfl/v1/tensor.proto), so the largest legitimate
  message is a chunk plus its framing; anything larger is refused with RESOURCE_EXHAUSTED
  by gRPC before a handler sees it.
- **Bounded resources** (`CallLimits`, `hfl_common.server.limits`): calls in flight per
  client certificate and per anonymous address, a global bound that keeps workers for
  health Check and GetStatus, idle and whole-stream deadlines on every streaming call,
  anonymous calls rate-limited per address and restricted to the methods bootstrap needs,
  and connection limits (idle and maximum age, keepalive enforcement, at most 32 calls per
  connection). Refusals are RESOURCE_EXHAUSTED with a message naming the limit, counted in
  ``hfl_grpc_refusals_total``.
- **One interceptor** that, for every call of every kind (unary/stream in both directions):
  reads the peer certificate from the TLS auth context into a `PeerIdentity`, asks the
  `Authorizer` (health and reflection are open to any authenticated peer), makes the peer
  available to the handler through `current_peer()`, maps `HflError` subclasses to their
  status code with their message, turns any other exception into INTERNAL with a generic
  message (the traceback goes to the log, never to the peer), and records the request
  metrics of `hfl_common.metrics`.

Identity convention: see `hfl_common.identity` (role, id and party URI SANs, role and
key-pinned DNS names); its helpers are re-exported here.

The package: `config` (ServerConfig, CallLimits, StreamLimits), `tls` (credentials,
client channels), `peer` (PeerIdentity, current_peer, authorizers), `limits` (admission,
rate limits, the stream reaper), `interceptor`, `running` (build_server, RunningServer).
"""

from hfl_common.identity import (
    ID_SAN_PREFIX,
    PARTY_SAN_PREFIX,
    ROLE_DNS_SUFFIX,
    ROLE_SAN_PREFIX,
    id_san,
    party_san,
    role_dns_name,
    role_san,
)
from hfl_common.server.config import (
    CLIENT_KEEPALIVE_TIME_MS,
    DEFAULT_CONTROL_METHODS,
    DEFAULT_MAX_MESSAGE_BYTES,
    HEALTH_CHECK_METHOD,
    HEALTH_WATCH_METHOD,
    KEEPALIVE_TIMEOUT_MS,
    MIB,
    REFLECTION_METHOD,
    SERVER_KEEPALIVE_TIME_MS,
    SERVER_MIN_PING_INTERVAL_MS,
    CallLimits,
    ServerConfig,
    StreamLimits,
)
from hfl_common.server.interceptor import (
    INTERNAL_ERROR_MESSAGE,
    PUBLIC_SERVICES,
    WATCH_REFUSED_MESSAGE,
)
from hfl_common.server.limits import LimitRefusedError
from hfl_common.server.peer import (
    Authorizer,
    PeerIdentity,
    RoleAuthorizer,
    current_peer,
    party_of,
)
from hfl_common.server.running import RunningServer, ServiceRegistration, build_server
from hfl_common.server.tls import (
    CredentialsProvider,
    ServerCertificate,
    channel_credentials,
    make_channel,
    server_credentials,
)

__all__ = [
    "CLIENT_KEEPALIVE_TIME_MS",
    "DEFAULT_CONTROL_METHODS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEALTH_CHECK_METHOD",
    "HEALTH_WATCH_METHOD",
    "ID_SAN_PREFIX",
    "INTERNAL_ERROR_MESSAGE",
    "KEEPALIVE_TIMEOUT_MS",
    "MIB",
    "PARTY_SAN_PREFIX",
    "PUBLIC_SERVICES",
    "REFLECTION_METHOD",
    "ROLE_DNS_SUFFIX",
    "ROLE_SAN_PREFIX",
    "SERVER_KEEPALIVE_TIME_MS",
    "SERVER_MIN_PING_INTERVAL_MS",
    "WATCH_REFUSED_MESSAGE",
    "Authorizer",
    "CallLimits",
    "CredentialsProvider",
    "LimitRefusedError",
    "PeerIdentity",
    "RoleAuthorizer",
    "RunningServer",
    "ServerCertificate",
    "ServerConfig",
    "ServiceRegistration",
    "StreamLimits",
    "build_server",
    "channel_credentials",
    "current_peer",
    "id_san",
    "make_channel",
    "party_of",
    "party_san",
    "role_dns_name",
    "role_san",
    "server_credentials",
]
