"""hfl-attestation: the federation's attestation service and certificate authority.

Start-up, in order: flags (each also from HFL_<FLAG>) -> logging -> the policy -> the
enclave (evidence provider, sealing keys, quote verifier; with --tee simulated the
identity is MRENCLAVE = measure_code over hfl_attestation and hfl_common, MRSIGNER from
the platform's development signing key, ISV_PROD_ID 1, ISV_SVN from --isv-svn) -> the
sealed CA key (created at first start) -> our own self-signed RA-TLS certificate ->
gRPC over TLS (client certificates optional on this port) -> SERVING -> the port file.
SIGTERM drains and exits 0. Errors a user can cause: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from hfl_attestation.service import (
    AttestationServiceConfig,
    start_attestation_service,
)
from hfl_common.errors import ConfigError
from hfl_common.logs import configure_logging
from hfl_common.metrics import start_metrics_http
from hfl_common.runtime import (
    Enclave,
    EnclaveOptions,
    add_enclave_flags,
    parse_service_args,
    run_main,
    split_listen,
    write_port_file,
)
from hfl_common.server import ServerConfig

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:7400"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9400"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfl-attestation", description=(__doc__ or "").splitlines()[0])
    add_enclave_flags(p, listen=DEFAULT_LISTEN, metrics_listen=DEFAULT_METRICS_LISTEN)
    p.add_argument("--workers", type=int, default=8, help="gRPC worker threads (default 8)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    ns = parse_service_args(parser(), argv)
    configure_logging("attestation", ns.log_level, True if ns.log_json else None)
    registry = CollectorRegistry()
    enclave = Enclave.open(EnclaveOptions.from_args("attestation", ns), registry)
    host, port = split_listen(ns.listen)
    m_host, m_port = split_listen(ns.metrics_listen)
    service = start_attestation_service(
        AttestationServiceConfig(
            server=ServerConfig(
                service="attestation",
                host=host,
                port=port,
                max_workers=ns.workers,
                require_client_auth=False,
            ),
            state_dir=ns.state_dir,
        ),
        policy=enclave.policy,
        verifier=enclave.verifier,
        provider=enclave.provider,
        sealing=enclave.sealing,
        registry=registry,
    )
    server = service.server
    try:
        metrics_port, stop_metrics = start_metrics_http(
            registry, m_host, m_port, ready=lambda: server.serving
        )
    except ConfigError:
        server.stop(0)
        raise
    server.add_shutdown_hook(stop_metrics)
    server.install_signal_handlers()
    write_port_file(ns.port_file, server.port, metrics_port)
    log.info(
        "attestation service ready on %s:%d (metrics :%d), policy %s",
        host,
        server.port,
        metrics_port,
        enclave.policy.sha256.hex()[:16],
    )
    server.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `hfl-attestation` command; returns the exit code."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
