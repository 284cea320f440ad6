"""hfl-trainer: trains on this party's private data, inside its enclave.

Start-up, in order: flags -> policy and plan -> the federation project, if
any (--project: its package made importable; its files are measured into this
trainer's identity) -> this party's data through the plan's data entry point
(never downloaded; validated: shapes, labels, NaN) and, in a local simulation
only, its partition -> the model through the plan's model entry point, checked
against the plan's initial weights (the first mismatch is named) -> the
enclave -> verify and pin the attestation service -> our certificate
-> before anything is sent: verify the aggregator's quote under the policy
and that the plan hash in its evidence is this trainer's plan -> join and
work until the federation is done (exit 0) or fails (exit 1). When it is
done, a trainer the plan's [export] receivers names downloads the final model
and writes model.keras and provenance.json into --output-dir (hfl_trainer.export).

Everything after the flags is `build_trainer` (beside the aggregator's
`build_aggregator`), which returns a SERVING `RunningTrainer`; its
`run_federation()` is the federation loop.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc
from hfl_common.attest_client import AttestedRoleAuthorizer, connect_verified
from hfl_common.config import FederationPlan, load_plan
from hfl_common.errors import ConfigError, FailedPreconditionError
from hfl_common.export_signature import ExportSigner
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
from hfl_common.server import RunningServer, ServerConfig, ServiceRegistration, build_server
from hfl_common.tee.verify import Verdict
from hfl_trainer import data as data_lib
from hfl_trainer import project as project_lib
from hfl_trainer.client import Backoff, FederationClient, TrainerState
from hfl_trainer.export import export_model, privacy_provenance
from hfl_trainer.freshness import FILE_NAME as VERSIONS_FILE
from hfl_trainer.freshness import ModelVersionMemory
from hfl_trainer.metrics import TrainerMetrics
from hfl_trainer.models import get_weights
from hfl_trainer.progress import ProgressReporter
from hfl_trainer.training import LocalTrainer

log = logging.getLogger(__name__)

SERVICE_NAME = "hfl.v1.TrainerService"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfl trainer", description=__doc__.splitlines()[0])
    add_enclave_flags(p, listen="127.0.0.1:7410", metrics_listen="127.0.0.1:9410")
    p.add_argument("--plan", type=Path, required=True, help="the federation plan (TOML)")
    p.add_argument("--attestation", default="127.0.0.1:7400", help="attestation service")
    p.add_argument("--aggregator", default="127.0.0.1:7401", help="aggregator address")
    p.add_argument("--label", default="trainer", help="a name for logs and Status")
    p.add_argument(
        "--project", type=Path,
        help="the federation project directory (its code is measured into this identity)",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", type=Path,
        help="this party's own data directory, passed to the plan's data entry point",
    )  # fmt: skip
    p.add_argument(
        "--output-dir", type=Path,
        help="where the final model goes (model.keras, provenance.json); "
        "default: <state-dir>/model",
    )  # fmt: skip
    p.add_argument("--trainer-index", type=int, default=0, help="this party's partition")
    p.add_argument(
        "--num-partitions", type=int, default=1,
        help="local simulation only: split the loaded data into this many partitions",
    )  # fmt: skip
    p.add_argument(
        "--give-up-after", type=float, default=300.0, help="seconds without the aggregator"
    )
    p.add_argument(
        "--step-delay",
        type=float,
        default=0.0,
        help="seconds to sleep after every local batch: simulates a slow machine (benchmarks)",
    )
    return p


def load_partition(
    plan: FederationPlan, data_dir: Path | None, index: int, parts: int
) -> data_lib.Dataset:
    """This party's validated data (partition `index` of `parts` in a local simulation)."""
    if parts < 1:
        raise ConfigError(f"--num-partitions {parts} must be at least 1")
    return project_lib.load_data(plan, data_dir, index=index, num_partitions=parts)


class TrainerStatusServicer(aggregator_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self, state: TrainerState, label: str, examples: int, tee_simulated: bool = False
    ) -> None:
        self._state = state
        self._label = label
        self._examples = examples
        self._tee_simulated = tee_simulated
        self.aggregator_mrenclave = ""

    def record_aggregator(self, verdict: Verdict) -> None:
        """Remember the MRENCLAVE of the aggregator the trainer last verified."""
        if verdict.measurements is not None:
            self.aggregator_mrenclave = verdict.measurements.mrenclave.hex()

    def GetStatus(  # noqa: N802 (gRPC method name)
        self,
        request: aggregator_pb2.TrainerServiceGetStatusRequest,
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.TrainerServiceGetStatusResponse:
        s = self._state
        with s.lock:
            return aggregator_pb2.TrainerServiceGetStatusResponse(
                trainer_id=s.trainer_id,
                label=self._label,
                state=aggregator_pb2.TrainerPhase.Value(  # type: ignore[arg-type]
                    f"TRAINER_PHASE_{s.state.upper()}"
                ),
                round=s.round,
                model_version=s.model_version,
                last_train_loss=s.last_train_loss,
                last_eval_accuracy=s.last_eval_accuracy,
                num_examples=self._examples,
                aggregator_mrenclave=self.aggregator_mrenclave,
                tee_simulated=self._tee_simulated,
            )


@dataclass(frozen=True)
class TrainerConfig:
    """Everything a trainer is built from. Made once from flags (`from_args`) or by a test."""

    enclave: EnclaveOptions
    plan_path: Path
    attestation: str
    aggregator: str
    label: str = "trainer"
    data_dir: Path | None = None
    trainer_index: int = 0
    num_partitions: int = 1
    listen: str = "127.0.0.1:0"
    metrics_listen: str = "127.0.0.1:0"
    give_up_after: float = 300.0
    step_delay: float = 0.0
    # Where the final model goes; None: <state dir>/model.
    output_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.step_delay < 0:
            raise ConfigError(f"--step-delay {self.step_delay} must be at least 0")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainerConfig:
        return cls(
            enclave=EnclaveOptions.from_args("trainer", ns),
            plan_path=ns.plan,
            attestation=ns.attestation,
            aggregator=ns.aggregator,
            label=ns.label,
            data_dir=ns.data_dir,
            trainer_index=ns.trainer_index,
            num_partitions=ns.num_partitions,
            listen=ns.listen,
            metrics_listen=ns.metrics_listen,
            give_up_after=ns.give_up_after,
            step_delay=ns.step_delay,
            output_dir=ns.output_dir,
        )


@dataclass
class RunningTrainer:
    """A started trainer serving its Status; `run_federation()` takes part until the end."""

    server: RunningServer
    client: FederationClient
    state: TrainerState
    plan: FederationPlan
    config: TrainerConfig
    num_examples: int
    held_out: int
    metrics_port: int

    @property
    def port(self) -> int:
        return self.server.port

    def run_federation(self) -> BaseException | None:
        """Join and work until the federation ends (or stop()); the error it ended with."""
        outcome: list[BaseException] = []

        def work() -> None:
            try:
                self.client.run()
            except BaseException as exc:  # reported by the caller
                outcome.append(exc)
            finally:
                self.server.stop()

        threading.Thread(target=work, name="hfl-trainer-loop", daemon=True).start()
        self.server.wait()
        return outcome[0] if outcome else None

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace)


def build_trainer(config: TrainerConfig, registry: CollectorRegistry) -> RunningTrainer:
    """Data, model, enclave, certificate and the Status server; returns once SERVING.

    The aggregator is not contacted yet: `run_federation()` verifies it (quote and plan
    hash) before anything is sent. Raises ConfigError or what attestation raises.
    """
    plan = load_plan(config.plan_path)
    if config.enclave.project is not None:
        project_lib.use_project(config.enclave.project)
    partition = load_partition(plan, config.data_dir, config.trainer_index, config.num_partitions)
    model = project_lib.build(plan.model, plan.seed)
    project_lib.check_initial_weights(model, plan.model)
    output_dir = config.output_dir or config.enclave.state_dir / "model"
    trainer = LocalTrainer(
        model,
        partition,
        plan.training.batch_size,
        plan.training.learning_rate,
        optimizer="adam" if plan.training.optimizer == "adam" else "sgd",
        seed=plan.seed + config.trainer_index,
    )
    metrics = TrainerMetrics.create(registry)
    enclave = Enclave.open(config.enclave, registry)
    credentials, renewer, pinned = enclave.attest(config.attestation, config.label)
    state = TrainerState()
    status = TrainerStatusServicer(
        state, config.label, trainer.num_examples, config.enclave.tee == "simulated"
    )
    peers = enclave.peer_verifier()
    host, port = split_listen(config.listen)
    server = build_server(
        ServerConfig(service="trainer", host=host, port=port, max_workers=4),
        services=[
            ServiceRegistration(
                SERVICE_NAME, status, aggregator_pb2_grpc.add_TrainerServiceServicer_to_server
            )
        ],
        credentials=credentials.server_credentials(),
        registry=registry,
        authorizer=AttestedRoleAuthorizer(
            {f"/{SERVICE_NAME}/GetStatus": frozenset({"operator"})}, peers
        ),
    )
    m_host, m_port = split_listen(config.metrics_listen)
    metrics_port, stop_metrics = start_metrics_http(
        registry, m_host, m_port, ready=lambda: server.serving
    )

    def connect() -> grpc.Channel:
        # Re-attests the aggregator on every (re)connection, plan hash included.
        return connect_verified(
            config.aggregator,
            credentials,
            enclave.verifier,
            # A relay serves its group exactly as the aggregator does (docs/architecture.md).
            ("aggregator", "relay"),
            expected_user_data=plan.sha256,
            on_verdict=status.record_aggregator,
        )

    def take_model_home(rounds: int, version: int, weights: dict[str, np.ndarray]) -> None:
        # The aggregator's MRENCLAVE as the trainer last verified it (connect_verified).
        measured = status.aggregator_mrenclave
        evaluation = trainer.evaluate(weights)
        export_model(
            output_dir,
            model,
            weights,
            plan=plan,
            label=config.label,
            rounds_completed=rounds,
            model_version=version,
            aggregator_mrenclave=measured,
            evaluation=evaluation,
            privacy=privacy_provenance(plan, client.final_privacy, client.dp_releases),
            # Signed with the enclave key under the certificate current now (the
            # renewer keeps one valid): `hfl verify-export` checks it.
            signer=ExportSigner(
                credentials.key, credentials.current.cert_pem, credentials.current.ca_pem
            ),
        )

    client = FederationClient(
        plan,
        trainer,
        lambda: get_weights(model),
        connect,
        label=config.label,
        progress=ProgressReporter(),
        state=state,
        metrics=metrics,
        backoff=Backoff(give_up_after=config.give_up_after),
        step_delay=config.step_delay,
        on_done=take_model_home if plan.export.receives(config.label) else None,
        versions=ModelVersionMemory(config.enclave.state_dir / VERSIONS_FILE),
    )
    server.add_shutdown_hook(stop_metrics)
    server.add_shutdown_hook(pinned.close)
    server.add_shutdown_hook(renewer.stop)
    server.add_shutdown_hook(client.stop)
    server.set_serving(True)
    return RunningTrainer(
        server=server,
        client=client,
        state=state,
        plan=plan,
        config=config,
        num_examples=trainer.num_examples,
        held_out=len(partition.y_test),
        metrics_port=metrics_port,
    )


def _main(argv: Sequence[str] | None) -> int:
    ns = parse_service_args(parser(), argv)
    configure_logging(f"trainer:{ns.label}", ns.log_level, True if ns.log_json else None)
    running = build_trainer(TrainerConfig.from_args(ns), CollectorRegistry())
    running.server.install_signal_handlers()
    write_port_file(ns.port_file, running.port, running.metrics_port)
    log.info(
        "trainer %s serving status on :%d (metrics :%d); %d training examples, %d held out",
        ns.label,
        running.port,
        running.metrics_port,
        running.num_examples,
        running.held_out,
    )
    exc = running.run_federation()
    if exc is None:
        return 0
    if isinstance(exc, FailedPreconditionError):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, grpc.RpcError):
        # A refusal the client does not retry (PERMISSION_DENIED, INVALID_ARGUMENT...).
        code = exc.code().name if isinstance(exc, grpc.Call) else "error"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"error: the aggregator at {ns.aggregator} answered {code}: {details}",
              file=sys.stderr)  # fmt: skip
        return 2
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
