"""hfl-aggregator: the parameter server, in its enclave.

Start-up, in order: flags -> policy and plan -> the initial weights the plan
pins (SHA-256 checked) -> the enclave (evidence, sealing, verifier) -> verify
and pin the attestation service -> our certificate, with the plan's hash in
report_data[32:64] -> the round engine (resuming from a sealed checkpoint if
one exists) -> the gRPC server (mTLS, role + quote check on every call) ->
SERVING. SIGTERM drains, writes a final checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from hfl_aggregator.checkpoint import CheckpointStore
from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.rounds import RoundEngine
from hfl_aggregator.service import ALLOWED_ROLES, SERVICE_NAME, AggregatorServicer
from hfl_aggregator.strategies import make_strategy
from hfl_common.api import aggregator_pb2_grpc
from hfl_common.attest_client import AttestedRoleAuthorizer
from hfl_common.codec import specs_of
from hfl_common.config import FederationPlan, load_plan
from hfl_common.errors import ConfigError
from hfl_common.logs import configure_logging
from hfl_common.metrics import start_metrics_http
from hfl_common.runtime import (
    Enclave,
    EnclaveOptions,
    add_enclave_flags,
    env_defaults,
    run_main,
    split_listen,
    write_port_file,
)
from hfl_common.server import PeerIdentity, ServerConfig, ServiceRegistration, build_server

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfl aggregator", description=__doc__.splitlines()[0])
    add_enclave_flags(p, listen="127.0.0.1:7401", metrics_listen="127.0.0.1:9401")
    p.add_argument("--plan", type=Path, required=True, help="the federation plan (TOML)")
    p.add_argument("--attestation", default="127.0.0.1:7400", help="attestation service")
    p.add_argument("--label", default="aggregator")
    p.add_argument("--upload-slots", type=int, default=1, help="uploads decoded at once")
    env_defaults(p)
    return p


def load_initial_weights(plan: FederationPlan) -> dict[str, np.ndarray]:
    path = plan.model.initial_weights
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the plan's initial weights {path}: {exc.strerror or exc}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != plan.model.initial_weights_sha256:
        raise ConfigError(
            f"{path} has SHA-256 {digest}, but the plan pins "
            f"{plan.model.initial_weights_sha256}: not the agreed initial model"
        )
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _main(argv: Sequence[str] | None) -> int:
    ns = parser().parse_args(argv)
    configure_logging("aggregator", ns.log_level, True if ns.log_json else None)
    plan = load_plan(ns.plan)
    weights = load_initial_weights(plan)
    registry = CollectorRegistry()
    enclave = Enclave.open(EnclaveOptions.from_args("aggregator", ns), registry)
    credentials, renewer, pinned = enclave.attest(ns.attestation, ns.label, plan.sha256)
    ns.state_dir.mkdir(parents=True, exist_ok=True)
    metrics = AggregatorMetrics.create(registry)
    strategy = make_strategy(plan.strategy.name, plan.strategy.params)
    spill = ns.state_dir / "spill"
    engine = RoundEngine(
        plan,
        strategy,
        weights,
        metrics,
        checkpoints=CheckpointStore(ns.state_dir, enclave.sealing),
        collector_factory=lambda s, w: RoundCollector.for_strategy(s, w, spill),
    )
    peers = enclave.peer_verifier()

    def mrenclave_of(peer: PeerIdentity) -> str:
        m = peers.verify_peer(peer).measurements
        return m.mrenclave.hex() if m is not None else ""

    servicer = AggregatorServicer(
        engine,
        plan,
        metrics,
        specs_of(weights),
        mrenclave_of=mrenclave_of,
        upload_slots=ns.upload_slots,
    )
    host, port = split_listen(ns.listen)
    server = build_server(
        ServerConfig(service="aggregator", host=host, port=port),
        services=[
            ServiceRegistration(
                SERVICE_NAME, servicer, aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server
            )
        ],
        credentials=credentials.server_credentials(),
        registry=registry,
        authorizer=AttestedRoleAuthorizer(ALLOWED_ROLES, peers),
    )
    m_host, m_port = split_listen(ns.metrics_listen)
    metrics_port, stop_metrics = start_metrics_http(
        registry, m_host, m_port, ready=lambda: server.serving
    )

    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(TICK_SECONDS):
            engine.tick()

    threading.Thread(target=ticker, name="hfl-round-ticker", daemon=True).start()
    server.add_shutdown_hook(stop_metrics)
    server.add_shutdown_hook(pinned.close)
    server.add_shutdown_hook(renewer.stop)
    server.add_shutdown_hook(stop.set)
    server.install_signal_handlers()
    server.set_serving(True)
    write_port_file(ns.port_file, server.port, metrics_port)
    log.info(
        "aggregator serving on %s:%d (metrics :%d); plan %s, %d rounds of %s",
        host,
        server.port,
        metrics_port,
        plan.sha256_hex[:16],
        plan.rounds,
        plan.strategy.name,
    )
    server.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
