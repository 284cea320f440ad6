"""hfl-aggregator: the parameter server, in its enclave.

Start-up, in order: flags -> policy and plan -> the initial weights the plan
pins (SHA-256 checked) -> the enclave (evidence, sealing, verifier) -> verify
and pin the attestation service -> our certificate, with the plan's hash in
report_data[32:64] -> the round engine (resuming from a sealed checkpoint if
one exists) -> the gRPC server (mTLS, role + quote check on every call) ->
SERVING. A sealed checkpoint is written after every completed round (and its
evaluation), so SIGTERM only drains and exits 0: no completed round is lost.

Everything after the flags is `build_aggregator`, which tests call in-process
(port 0, a fresh registry) and which returns a serving `RunningAggregator`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from hfl_aggregator.checkpoint import CheckpointStore
from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.engine import RoundEngine
from hfl_aggregator.engine.journal import UpdateJournal
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.relay import RelayStrategy, Uplink, group_guard, relay_engine_plan
from hfl_aggregator.service import ALLOWED_ROLES, SERVICE_NAME, AggregatorServicer
from hfl_aggregator.strategies import Strategy, make_strategy
from hfl_aggregator.strategies.central_dp import private_strategy
from hfl_common.api import aggregator_pb2_grpc
from hfl_common.attest_client import AttestedRoleAuthorizer, connect_verified
from hfl_common.codec import specs_of
from hfl_common.config import FederationPlan, load_plan
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
from hfl_common.server import (
    CallLimits,
    PeerIdentity,
    RunningServer,
    ServerConfig,
    ServiceRegistration,
    build_server,
)

log = logging.getLogger(__name__)

# A waiting trainer's GetTask long-poll holds a worker thread for up to 30 s, and
# hfl_common.server refuses ordinary calls beyond max_workers - control_reserve:
# 64 serves about 30 trainers without refusals (more: raise --max-workers).
DEFAULT_MAX_WORKERS = 64

TICK_SECONDS = 0.5

# Each upload stream's HTTP/2 receive window: with gRPC's BDP probing instead, every
# connected uploader could hold megabytes in the aggregator before its handler read
# them (4 MB model x 64 trainers, with 256 KiB download chunks: peak RSS 360 MB at
# 1 MiB vs 563 MB probing; docs/performance.md). It bounds one upload to about
# 1 MiB per round trip (about 10 MB/s at 100 ms): raise it for far trainers.
DEFAULT_STREAM_WINDOW_BYTES = 1 << 20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfl aggregator", description=__doc__.splitlines()[0])
    add_enclave_flags(p, listen="127.0.0.1:7401", metrics_listen="127.0.0.1:9401")
    p.add_argument("--plan", type=Path, required=True, help="the federation plan (TOML)")
    p.add_argument("--attestation", default="127.0.0.1:7400", help="attestation service")
    p.add_argument("--label", default="aggregator")
    p.add_argument(
        "--relay-upstream", default=None, metavar="HOST:PORT",
        help="run as a relay (role relay): serve a group of trainers and take part in the "
        "root aggregator's rounds at HOST:PORT as one participant (the plan needs [relays])",
    )  # fmt: skip
    p.add_argument("--upload-slots", type=int, default=1, help="uploads decoded at once")
    p.add_argument(
        "--max-workers", type=int, default=DEFAULT_MAX_WORKERS,
        help="gRPC worker threads: a trainer's long-poll holds one, so allow about two per "
        "trainer plus a few (calls beyond the limit are refused RESOURCE_EXHAUSTED and retried)",
    )  # fmt: skip
    p.add_argument(
        "--stream-window-bytes", type=int, default=DEFAULT_STREAM_WINDOW_BYTES,
        help="HTTP/2 receive window of each upload stream (memory held per uploader; an "
        "upload moves at most this much per round trip); 0: gRPC's BDP probing",
    )  # fmt: skip
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


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything an aggregator is built from. Made once from flags (`from_args`) or by a test.

    `listen` and `metrics_listen` are HOST:PORT; port 0 lets the OS choose (tests).
    `metrics_listen` None serves no /metrics HTTP at all (in-process tests read the
    registry directly).
    `tick_seconds` is how often round deadlines are enforced; `grace_seconds` how long
    in-flight calls may run on when the server stops.
    """

    enclave: EnclaveOptions
    plan_path: Path
    attestation: str
    label: str = "aggregator"
    listen: str = "127.0.0.1:7401"
    metrics_listen: str | None = "127.0.0.1:9401"
    upload_slots: int = 1
    # Worker threads of the gRPC server (long-polls hold one each; see --max-workers).
    max_workers: int = DEFAULT_MAX_WORKERS
    # HTTP/2 receive window per stream (--stream-window-bytes); None: BDP probing.
    stream_window_bytes: int | None = DEFAULT_STREAM_WINDOW_BYTES
    # How long an upload stream may stay open without sending its header.
    header_timeout_seconds: float = 10.0
    tick_seconds: float = TICK_SECONDS
    grace_seconds: float = 10.0
    # HOST:PORT of the root aggregator: this aggregator is a relay (hfl_aggregator.relay).
    relay_upstream: str | None = None
    # Per-peer and global call limits, stream idle and whole-stream deadlines (defaults:
    # hfl_common.server.CallLimits; tests shorten the deadlines).
    call_limits: CallLimits = field(default_factory=CallLimits)

    def __post_init__(self) -> None:
        if self.relay_upstream is not None and self.enclave.role != "relay":
            raise ConfigError(
                f"--relay-upstream runs a relay, whose enclave role is 'relay', not "
                f"{self.enclave.role!r}"
            )
        if self.upload_slots < 1:
            raise ConfigError(f"--upload-slots {self.upload_slots} must be at least 1")
        if self.tick_seconds <= 0:
            raise ConfigError(f"tick_seconds {self.tick_seconds} must be above 0")

    @property
    def state_dir(self) -> Path:
        return self.enclave.state_dir

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> AggregatorConfig:
        return cls(
            enclave=EnclaveOptions.from_args("relay" if ns.relay_upstream else "aggregator", ns),
            relay_upstream=ns.relay_upstream,
            plan_path=ns.plan,
            attestation=ns.attestation,
            label=ns.label,
            listen=ns.listen,
            metrics_listen=ns.metrics_listen,
            upload_slots=ns.upload_slots,
            max_workers=ns.max_workers,
            stream_window_bytes=ns.stream_window_bytes or None,
        )


@dataclass
class RunningAggregator:
    """A started, SERVING aggregator: its server, round engine, plan and bound ports."""

    server: RunningServer
    engine: RoundEngine
    plan: FederationPlan
    metrics: AggregatorMetrics
    registry: CollectorRegistry
    host: str
    # 0 when no metrics HTTP server was asked for
    metrics_port: int
    # A relay's participation in its root's federation (None: not a relay).
    uplink: Uplink | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        """HOST:PORT to dial (what connect_verified takes)."""
        return f"{self.host}:{self.server.port}"

    def stop(self, grace: float | None = None) -> None:
        """Drain (`grace` seconds, default the config's), stop the ticker, metrics,
        certificate renewal and the attestation channel. Idempotent; blocks until done."""
        self.server.stop(grace)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (by stop() or a signal); False if `timeout` passed first."""
        return self.server.wait(timeout)


def build_aggregator(config: AggregatorConfig, registry: CollectorRegistry) -> RunningAggregator:
    """Attest, resume or start the round engine, and serve; returns once SERVING.

    Raises ConfigError (bad plan, weights, policy or checkpoint) or what attestation
    raises; on failure whatever was started (renewal, channels, server) is stopped again.
    """
    plan = load_plan(config.plan_path)
    weights = load_initial_weights(plan)
    enclave = Enclave.open(config.enclave, registry)
    credentials, renewer, pinned = enclave.attest(config.attestation, config.label, plan.sha256)
    with contextlib.ExitStack() as undo:
        undo.callback(pinned.close)
        undo.callback(renewer.stop)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        metrics = AggregatorMetrics.create(registry)
        strategy: Strategy = private_strategy(
            make_strategy(plan.strategy.name, plan.strategy.params, plan.model.non_trainable), plan
        )
        engine_plan = plan
        uplink: Uplink | None = None
        if config.relay_upstream is not None:
            engine_plan = relay_engine_plan(plan)
            upstream = config.relay_upstream

            def connect_root() -> grpc.Channel:
                # Re-verifies the root on every (re)connection, plan hash included.
                return connect_verified(
                    upstream,
                    credentials,
                    enclave.verifier,
                    "aggregator",
                    expected_user_data=plan.sha256,
                )

            uplink = Uplink(plan, connect_root, specs_of(weights), label=config.label)
            strategy = RelayStrategy(strategy, uplink)
        spill = config.state_dir / "spill"
        engine = RoundEngine(
            engine_plan,
            strategy,
            weights,
            metrics,
            checkpoints=CheckpointStore(config.state_dir, enclave.sealing),
            collector_factory=lambda s, w: RoundCollector.for_strategy(s, w, spill),
            journal=UpdateJournal(config.state_dir / "journal", enclave.sealing),
            aggregate_in_background=uplink is not None,
        )
        if uplink is not None:
            uplink.bind(engine)
        peers = enclave.peer_verifier()

        def mrenclave_of(peer: PeerIdentity) -> str:
            m = peers.verify_peer(peer).measurements
            return m.mrenclave.hex() if m is not None else ""

        def simulated_of(peer: PeerIdentity) -> bool:
            return peers.verify_peer(peer).simulated  # cached verdict

        servicer = AggregatorServicer(
            engine,
            plan,
            metrics,
            specs_of(weights),
            mrenclave_of=mrenclave_of,
            simulated_of=simulated_of,
            tee_simulated=config.enclave.tee == "simulated",
            upload_slots=config.upload_slots,
            header_timeout_seconds=config.header_timeout_seconds,
            join_guard=(
                group_guard(engine, plan.relays.max_group_size)
                if uplink is not None and plan.relays is not None
                else None
            ),
        )
        host, port = split_listen(config.listen)
        server = build_server(
            ServerConfig(
                service="aggregator",
                host=host,
                port=port,
                grace_seconds=config.grace_seconds,
                max_workers=config.max_workers,
                limits=config.call_limits,
                stream_window_bytes=config.stream_window_bytes,
            ),
            services=[
                ServiceRegistration(
                    SERVICE_NAME,
                    servicer,
                    aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server,
                )
            ],
            credentials=credentials.server_credentials(),
            registry=registry,
            authorizer=AttestedRoleAuthorizer(ALLOWED_ROLES, peers),
        )
        undo.callback(server.stop, 0)
        metrics_port = 0
        if config.metrics_listen is not None:
            m_host, m_port = split_listen(config.metrics_listen)
            metrics_port, stop_metrics = start_metrics_http(
                registry, m_host, m_port, ready=lambda: server.serving
            )
            server.add_shutdown_hook(stop_metrics)
        # Nothing below can fail: from here on the server's shutdown hooks own the cleanup.
        undo.pop_all()
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(config.tick_seconds):
            engine.tick()

    threading.Thread(target=ticker, name="hfl-round-ticker", daemon=True).start()
    server.add_shutdown_hook(pinned.close)
    server.add_shutdown_hook(renewer.stop)
    server.add_shutdown_hook(stop.set)
    server.add_drain_hook(engine.close)
    if uplink is not None:
        server.add_shutdown_hook(uplink.stop)
        uplink.start()
    server.set_serving(True)
    return RunningAggregator(
        server=server,
        engine=engine,
        plan=plan,
        metrics=metrics,
        registry=registry,
        host=host,
        metrics_port=metrics_port,
        uplink=uplink,
    )


def _main(argv: Sequence[str] | None) -> int:
    ns = parse_service_args(parser(), argv)
    configure_logging("aggregator", ns.log_level, True if ns.log_json else None)
    config = AggregatorConfig.from_args(ns)
    aggregator = build_aggregator(config, CollectorRegistry())
    aggregator.server.install_signal_handlers()
    write_port_file(ns.port_file, aggregator.port, aggregator.metrics_port)
    plan = aggregator.plan
    log.info(
        "%s serving on %s:%d (metrics :%d); plan %s, %d rounds of %s",
        "relay" if config.relay_upstream else "aggregator",
        aggregator.host,
        aggregator.port,
        aggregator.metrics_port,
        plan.sha256_hex[:16],
        plan.rounds,
        plan.strategy.name,
    )
    aggregator.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
