"""A real hfl server process for the SIGTERM test (tests/common/test_server.py).

Usage: python sigterm_server.py DIR GRACE_SECONDS. DIR holds server.key, server.pem and
ca.pem (made by the test in its tmp_path). Prints "PORT <n>" on stdout once serving,
writes DIR/hook-ran from its shutdown hook, and exits with the status main() returns.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from hfl_common.logs import configure_logging
from hfl_common.server import (
    ServerCertificate,
    ServerConfig,
    build_server,
    server_credentials,
)


def main(argv: list[str]) -> int:
    directory = Path(argv[1])
    grace = float(argv[2])
    configure_logging("sigterm-test", "INFO", json=True)
    certificate = ServerCertificate(
        private_key_pem=(directory / "server.key").read_bytes(),
        certificate_chain_pem=(directory / "server.pem").read_bytes(),
        client_ca_pem=(directory / "ca.pem").read_bytes(),
    )
    running = build_server(
        ServerConfig(service="sigterm-test", grace_seconds=grace),
        services=[],  # health and reflection are enough to watch the drain
        credentials=server_credentials(certificate),
        registry=CollectorRegistry(),
        authorizer=None,
    )

    def mark_hook_ran() -> None:
        (directory / "hook-ran").write_text("yes")

    running.add_shutdown_hook(mark_hook_ran)
    running.install_signal_handlers()
    running.set_serving(True)
    sys.stdout.write(f"PORT {running.port}\n")
    sys.stdout.flush()
    running.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
