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
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from cryptography import x509
from prometheus_client import CollectorRegistry

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc
from hfl_common.attest_client import (
    AttestedRoleAuthorizer,
    ServiceCredentials,
    connect_verified,
    embedded_evidence,
    fetch_server_certificate,
    split_target,
    verify_ra_tls_certificate,
)
from hfl_common.config import FederationPlan, load_plan
from hfl_common.errors import ConfigError, FailedPreconditionError, HflError
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
from hfl_common.server import ServerConfig, ServiceRegistration, build_server
from hfl_common.tee.verify import QuoteVerifier
from hfl_trainer import data as data_lib
from hfl_trainer import project as project_lib
from hfl_trainer.client import Backoff, FederationClient, TrainerState
from hfl_trainer.export import export_model
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
    return p


def load_partition(
    plan: FederationPlan, data_dir: Path | None, index: int, parts: int
) -> data_lib.Dataset:
    """This party's validated data (partition `index` of `parts` in a local simulation)."""
    if parts < 1:
        raise ConfigError(f"--num-partitions {parts} must be at least 1")
    return project_lib.load_data(plan, data_dir, index=index, num_partitions=parts)


def attested_mrenclave(
    target: str, credentials: ServiceCredentials, verifier: QuoteVerifier
) -> str:
    """The aggregator's MRENCLAVE, read from its certificate's quote and verified again."""
    host, port = split_target(target)
    cert_pem, key_pem = credentials.client_pem_pair()
    der = fetch_server_certificate(host, port, client_cert_pem=cert_pem, client_key_pem=key_pem)
    ca = x509.load_pem_x509_certificates(credentials.current.ca_pem)[0]
    cert = embedded_evidence(x509.load_der_x509_certificate(der), ca)
    verdict = verify_ra_tls_certificate(cert, verifier, "aggregator")
    if not verdict.accepted or verdict.measurements is None:
        return ""
    return verdict.measurements.mrenclave.hex()


class TrainerStatusServicer(aggregator_pb2_grpc.TrainerServiceServicer):
    def __init__(self, state: TrainerState, label: str, examples: int) -> None:
        self._state = state
        self._label = label
        self._examples = examples
        self.aggregator_mrenclave = ""

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
                state=s.state,
                round=s.round,
                model_version=s.model_version,
                last_train_loss=s.last_train_loss,
                last_eval_accuracy=s.last_eval_accuracy,
                num_examples=self._examples,
                aggregator_mrenclave=self.aggregator_mrenclave,
            )


def _main(argv: Sequence[str] | None) -> int:
    ns = parse_service_args(parser(), argv)
    configure_logging(f"trainer:{ns.label}", ns.log_level, True if ns.log_json else None)
    plan = load_plan(ns.plan)
    if ns.project is not None:
        project_lib.use_project(ns.project)
    partition = load_partition(plan, ns.data_dir, ns.trainer_index, ns.num_partitions)
    model = project_lib.build(plan.model, plan.seed)
    project_lib.check_initial_weights(model, plan.model)
    output_dir: Path = ns.output_dir or ns.state_dir / "model"
    trainer = LocalTrainer(
        model,
        partition,
        plan.training.batch_size,
        plan.training.learning_rate,
        optimizer="adam" if plan.training.optimizer == "adam" else "sgd",
        seed=plan.seed + ns.trainer_index,
    )
    registry = CollectorRegistry()
    metrics = TrainerMetrics.create(registry)
    enclave = Enclave.open(EnclaveOptions.from_args("trainer", ns), registry)
    credentials, renewer, pinned = enclave.attest(ns.attestation, ns.label)
    state = TrainerState()
    status = TrainerStatusServicer(state, ns.label, trainer.num_examples)
    peers = enclave.peer_verifier()
    host, port = split_listen(ns.listen)
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
    m_host, m_port = split_listen(ns.metrics_listen)
    metrics_port, stop_metrics = start_metrics_http(
        registry, m_host, m_port, ready=lambda: server.serving
    )

    def connect() -> grpc.Channel:
        # Re-attests the aggregator on every (re)connection, plan hash included.
        return connect_verified(
            ns.aggregator,
            credentials,
            enclave.verifier,
            "aggregator",
            expected_user_data=plan.sha256,
        )

    def take_model_home(rounds: int, version: int, weights: dict[str, np.ndarray]) -> None:
        try:
            measured = attested_mrenclave(ns.aggregator, credentials, enclave.verifier)
        except (HflError, OSError) as exc:
            log.warning("could not re-read the aggregator's measurement: %s", exc)
            measured = ""
        status.aggregator_mrenclave = measured
        evaluation = trainer.evaluate(weights)
        export_model(
            output_dir,
            model,
            weights,
            plan=plan,
            label=ns.label,
            rounds_completed=rounds,
            model_version=version,
            aggregator_mrenclave=measured,
            evaluation=evaluation,
        )

    client = FederationClient(
        plan,
        trainer,
        lambda: get_weights(model),
        connect,
        label=ns.label,
        progress=ProgressReporter(),
        state=state,
        metrics=metrics,
        backoff=Backoff(give_up_after=ns.give_up_after),
        on_done=take_model_home if plan.export.receives(ns.label) else None,
    )
    server.add_shutdown_hook(stop_metrics)
    server.add_shutdown_hook(pinned.close)
    server.add_shutdown_hook(renewer.stop)
    server.add_shutdown_hook(client.stop)
    server.install_signal_handlers()
    server.set_serving(True)
    write_port_file(ns.port_file, server.port, metrics_port)
    log.info(
        "trainer %s serving status on :%d (metrics :%d); %d training examples, %d held out",
        ns.label,
        server.port,
        metrics_port,
        trainer.num_examples,
        len(partition.y_test),
    )
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            client.run()
        except BaseException as exc:  # reported by the main thread
            outcome.append(exc)
        finally:
            server.stop()

    threading.Thread(target=work, name="hfl-trainer-loop", daemon=True).start()
    server.wait()
    if outcome:
        exc = outcome[0]
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
