"""`hfl run`: a whole federation on this machine, as separate processes on loopback.

The attestation service, the aggregator and N trainers each run as their own
process with the simulated TEE, talking real gRPC over mutual RA-TLS. This
process prepares the files (see hfl_cli.local), starts the services in
order, follows the federation through the aggregator's Status as an operator,
and at the end prints a table of per-round loss and accuracy and writes a PNG
plot. Every process it started is stopped on exit, on Ctrl-C and on error.

With a federation project (`--project DIR`), the project's model and data
functions are imported, the model built and every party's data loaded and
validated here first, so a mistake is one line before any service starts. Each
trainer writes the final model into `models/<trainer>/` (model.keras and
provenance.json; hfl_trainer.export).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc

from hfl_cli.local import PlanOptions, Prepared, party_key_path, party_name, prepare
from hfl_cli.operator import (
    OperatorCredentials,
    aggregator_channel,
    format_privacy,
    obtain_operator_certificate,
)
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc
from hfl_common.errors import ConfigError, HflError, UnavailableError

START_TIMEOUT_SECONDS = 120.0
# Once the federation is done, trainers get the DONE task, leave and exit on their own;
# only after this long are they sent SIGTERM.
DONE_GRACE_SECONDS = 30.0
POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
# The aggregator process's settings, measured by benchmarks/bench_e2e.py (docs/performance.md):
# 8 trainers x 100 MB, peak RSS -35% and CPU -50%. Few malloc arenas across gRPC's threads;
# no OpenBLAS threads fighting in concurrent upload handlers (its work is memory-bound).
AGGREGATOR_ENV = {"MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}
_ERROR_PREFIX = "error: "  # hfl_common.runtime.run_main's one-line errors


class FederationError(HflError):
    """The local federation could not run to its end."""


def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    # Linux: the child gets SIGTERM if hfl run itself is killed, so nothing is orphaned.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port_file: Path
    log: IO[bytes]
    grpc_port: int = 0
    metrics_port: int = 0

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def error_line(self) -> str:
        """The last one-line error the service printed ("error: ..."), without the prefix."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(text):
            if line.startswith(_ERROR_PREFIX):
                return line.removeprefix(_ERROR_PREFIX).strip()
        return ""

    def exit_message(self, when: str) -> str:
        """Why it exited, in one line when it said why; else with the last lines of its log."""
        code = self.process.returncode
        reason = self.error_line()
        if reason:
            return f"{self.name} exited with code {code}{when}: {reason} (log: {self.log_path})"
        return f"{self.name} exited with code {code}{when}; last lines of {self.log_path}:\n" + (
            self.tail()
        )


@dataclass
class Supervisor:
    """Starts services in order and stops them all, in reverse order, whatever happens."""

    workdir: Path
    services: list[Service] = field(default_factory=list)

    def start(
        self, name: str, module: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Service:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        port_file = self.workdir / "ports" / f"{name}.json"
        port_file.parent.mkdir(exist_ok=True)
        port_file.unlink(missing_ok=True)
        log_path = logs / f"{name}.log"
        log = log_path.open("ab")
        environ = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **(env or {}),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port-file", str(port_file), "--log-json"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environ,
            start_new_session=True,  # Ctrl-C reaches hfl run, which stops children in order
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (only calls prctl)
        )
        service = Service(name, process, log_path, port_file, log)
        self.services.append(service)
        return service

    def wait_ready(self, service: Service, timeout: float = START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.port_file.exists():
                ports = json.loads(service.port_file.read_text())
                service.grpc_port, service.metrics_port = ports["grpc"], ports["metrics"]
                return
            if service.process.poll() is not None:
                raise FederationError(service.exit_message(" while starting"))
            time.sleep(0.1)
        raise FederationError(f"{service.name} did not start within {timeout:.0f} s")

    def check_alive(self, names: Sequence[str] | None = None) -> None:
        for s in self.services:
            if (names is None or s.name in names) and s.process.poll() is not None:
                raise FederationError(s.exit_message(""))

    def wait_exited(self, names: Sequence[str], timeout: float) -> bool:
        """Wait up to `timeout` s for the named services to exit by themselves."""
        deadline = time.monotonic() + timeout
        for s in self.services:
            if s.name in names:
                try:
                    s.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    return False
        return True

    def stop_all(self, grace: float = 15.0) -> None:
        for s in reversed(self.services):
            if s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for s in reversed(self.services):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                s.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                s.process.kill()
                s.process.wait()
            s.log.close()


@dataclass(frozen=True)
class RunOptions:
    plan: PlanOptions
    workdir: Path | None = None
    data_dir: Path | None = None
    expect_accuracy: float | None = None
    plot: bool = True
    # One data directory per trainer (each party's own data; no partitioning).
    party_data: tuple[Path, ...] = ()


def _workdir(base: Path | None) -> Path:
    if base is not None:
        if base.exists() and any(base.iterdir()):
            raise FederationError(f"--workdir {base} is not empty; give a new directory")
        return base
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / stamp
    path.mkdir(parents=True, exist_ok=False)
    latest = Path("runs") / "latest"
    with contextlib.suppress(OSError):
        latest.unlink(missing_ok=True)
        latest.symlink_to(stamp)
    return path


def _say(message: str) -> None:
    print(message, flush=True)  # the command's own output, not logging


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_data(opts: RunOptions) -> None:
    """Load the trainers' data once here, so a missing or malformed dataset stops the run
    with the loader's one-line error before any service starts."""
    if opts.plan.dataset != "cifar10":
        return  # digits are bundled with scikit-learn; synthetic data is generated
    if opts.data_dir is None:
        raise ConfigError("--dataset cifar10 needs --data-dir (nothing is downloaded at run time)")
    from hfl_trainer.data import load_cifar10

    load_cifar10(opts.data_dir)


def check_project(prepared: Prepared, opts: RunOptions) -> str:
    """Import the project, build its model and load every party's data, as the trainers
    will; the first problem stops the run with one line. Returns a description."""
    from hfl_cli.local import _native_stderr_silenced
    from hfl_common.config import load_plan

    with _native_stderr_silenced():
        from hfl_trainer import project as project_lib

        assert prepared.project is not None
        project_lib.use_project(prepared.project)
        plan = load_plan(prepared.plan)
        model = project_lib.build(plan.model, plan.seed)
        project_lib.check_initial_weights(model, plan.model)
        trainers = opts.plan.trainers
        for i in range(trainers):
            if opts.party_data:
                project_lib.load_data(plan, opts.party_data[i])
            else:
                project_lib.load_data(plan, opts.data_dir, index=i, num_partitions=trainers)
    where = "own data directories" if opts.party_data else f"{plan.data.partition} partitions"
    return (
        f"{plan.model.entry} on {plan.data.entry} ({where}); {plan.strategy.name}; "
        f"{plan.rounds} rounds"
    )


def run(opts: RunOptions) -> int:
    p = opts.plan
    if p.project is None:
        check_data(opts)
    if opts.party_data and len(opts.party_data) != p.trainers:
        raise ConfigError(
            f"{len(opts.party_data)} party data directories for {p.trainers} trainers; "
            "give one --party-data per trainer"
        )
    workdir = _workdir(opts.workdir)
    prepared = prepare(workdir, p)
    if prepared.project is not None:
        what = check_project(prepared, opts)
    else:
        what = f"{p.model} on {p.dataset}, {p.partition}; {p.strategy}; {p.rounds} rounds"
    _say(f"hfl run: a local federation in {workdir} (simulated SGX; {p.trainers} trainers; {what})")
    supervisor = Supervisor(workdir)
    with _sigterm_as_interrupt():
        try:
            history = _run_services(supervisor, prepared, opts)
            trainers = [s.name for s in supervisor.services if s.name.startswith("trainer-")]
            supervisor.wait_exited(trainers, DONE_GRACE_SECONDS)
        except KeyboardInterrupt:
            _say("interrupted: stopping every process of the federation")
            supervisor.stop_all()
            return 130
        except BaseException:
            supervisor.stop_all()
            raise
    supervisor.stop_all()
    return _report(workdir, history, opts)


def service_args(
    prepared: Prepared, name: str, *, listen: str = "127.0.0.1:0", policy: Path | None = None
) -> list[str]:
    """The flags every service of a local federation takes, with its own state dir; a
    trainer ("trainer-N") also gets its party's enrolment key when the run enrolled one."""
    args = [
        "--policy", str(policy or prepared.policy),
        "--tee", "simulated",
        "--sim-platform", str(prepared.platform),
        "--state-dir", str(prepared.directory / "state" / name),
        "--listen", listen,
        "--metrics-listen", "127.0.0.1:0",
    ]  # fmt: skip
    number = name.removeprefix("trainer-")
    if name.startswith("trainer-") and number.isdigit():
        party = party_name(int(number) - 1)
        key = party_key_path(prepared.directory, party)
        if key.exists():
            args += ["--party", party, "--party-key", str(key)]
    return args


def trainer_args(
    prepared: Prepared, index: int, trainers: int, attestation: str, aggregator: str
) -> list[str]:
    name = f"trainer-{index + 1}"
    args = [
        *service_args(prepared, name),
        "--plan", str(prepared.plan),
        "--attestation", attestation,
        "--aggregator", aggregator,
        "--label", name,
        "--trainer-index", str(index),
        "--num-partitions", str(trainers),
        "--output-dir", str(prepared.directory / "models" / name),
    ]  # fmt: skip
    if prepared.project is not None:
        args += ["--project", str(prepared.project)]
    return args


@dataclass(frozen=True)
class StartedFederation:
    attestation: str
    aggregator: str
    operator: OperatorCredentials


def start_federation(
    supervisor: Supervisor,
    prepared: Prepared,
    trainers: int,
    data_dir: Path | None = None,
    party_data: Sequence[Path] = (),
) -> StartedFederation:
    """Start attestation, aggregator and trainers in order, and get an operator certificate."""
    att = supervisor.start(
        "attestation", "hfl_attestation.main", service_args(prepared, "attestation")
    )
    supervisor.wait_ready(att)
    attestation = f"127.0.0.1:{att.grpc_port}"
    agg = supervisor.start(
        "aggregator",
        "hfl_aggregator.main",
        [*service_args(prepared, "aggregator"), "--plan", str(prepared.plan),
         "--attestation", attestation,
         # each waiting trainer's long-poll holds a worker (hfl_aggregator.main)
         "--max-workers", str(max(64, 2 * trainers + 8))],
        env=AGGREGATOR_ENV,
    )  # fmt: skip
    supervisor.wait_ready(agg)
    aggregator = f"127.0.0.1:{agg.grpc_port}"
    started = []
    for i in range(trainers):
        args = trainer_args(prepared, i, trainers, attestation, aggregator)
        if party_data:
            # Each party's own directory: the whole of it, no partitioning.
            args += ["--data-dir", str(party_data[i]), "--num-partitions", "1"]
        elif data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        started.append(supervisor.start(f"trainer-{i + 1}", "hfl_trainer.main", args))
    operator = obtain_operator_certificate(
        prepared.operator_dir, attestation, prepared.policy, prepared.platform
    )
    for t in started:
        supervisor.wait_ready(t)
    return StartedFederation(attestation, aggregator, operator)


def _run_services(
    supervisor: Supervisor, prepared: Prepared, opts: RunOptions
) -> aggregator_pb2.GetStatusResponse:
    federation = start_federation(
        supervisor, prepared, opts.plan.trainers, opts.data_dir, opts.party_data
    )
    endpoints = {
        s.name: {
            "grpc": f"127.0.0.1:{s.grpc_port}",
            "metrics": f"http://127.0.0.1:{s.metrics_port}/metrics",
        }
        for s in supervisor.services
    }
    (prepared.directory / "endpoints.json").write_text(json.dumps(endpoints, indent=2))
    for name, e in endpoints.items():
        _say(f"  {name:<12} gRPC {e['grpc']:<22} metrics {e['metrics']}")
    _say(f"  operator credentials for grpcurl and `hfl status`: {prepared.operator_dir}")
    return _follow(supervisor, federation.operator, federation.aggregator, opts)


# GetStatus failures that a busy or slow aggregator gives; anything else ends the run.
_TRANSIENT_STATUS = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
STATUS_PATIENCE_SECONDS = 120.0


@dataclass
class StatusPatience:
    """Whether `hfl run` keeps polling a status that did not answer.

    A slow or busy answer (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE) while the
    aggregator process lives is not the end of the federation: keep asking for up to
    `seconds` since the first failure in a row. Any other failure ends the run at once.
    """

    seconds: float = STATUS_PATIENCE_SECONDS
    failing_since: float | None = None

    def answered(self) -> None:
        self.failing_since = None

    def keep_asking(self, code: grpc.StatusCode | None, now: float) -> bool:
        if code not in _TRANSIENT_STATUS:
            return False
        if self.failing_since is None:
            self.failing_since = now
        return now - self.failing_since <= self.seconds


def _follow(
    supervisor: Supervisor, operator: OperatorCredentials, aggregator: str, opts: RunOptions
) -> aggregator_pb2.GetStatusResponse:
    channel = aggregator_channel(aggregator, operator)
    stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
    shown: set[tuple[int, int]] = set()
    patience = StatusPatience()
    try:
        while True:
            supervisor.check_alive(["attestation", "aggregator"])
            try:
                status = stub.GetStatus(aggregator_pb2.GetStatusRequest(), timeout=10)
                patience.answered()
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if not patience.keep_asking(code, time.monotonic()):
                    raise UnavailableError(f"aggregator Status failed: {code}: {err}") from None
                _say(f"  (aggregator status not answered: {code}; asking again)")
                time.sleep(POLL_SECONDS)
                continue
            for r in status.rounds:
                key = (r.round, r.attempt)
                settled = r.state == aggregator_pb2.ROUND_STATE_FAILED or (
                    r.state == aggregator_pb2.ROUND_STATE_COMPLETED
                    and (
                        r.eval_examples > 0
                        or status.round > r.round
                        or status.state == aggregator_pb2.FEDERATION_STATE_DONE
                    )
                )
                if key not in shown and settled:
                    shown.add(key)
                    _say(_round_line(r, status.total_rounds, status.HasField("privacy")))
            if status.state == aggregator_pb2.FEDERATION_STATE_FAILED:
                raise FederationError(
                    f"the federation failed: {status.failure}; see the aggregator's log"
                )
            if status.state == aggregator_pb2.FEDERATION_STATE_DONE:
                return status
            if all(s.process.poll() is not None for s in supervisor.services[2:]):
                supervisor.check_alive()
            time.sleep(POLL_SECONDS)
    finally:
        channel.close()


def _fmt(value: float, spec: str = ".4f") -> str:
    if not value or not math.isfinite(value):
        return "   -  "
    return format(value, spec if abs(value) < 1e5 else ".3e")


def _round_line(r: aggregator_pb2.RoundSummary, total: int, private: bool = False) -> str:
    if r.state == aggregator_pb2.ROUND_STATE_FAILED:
        return f"round {r.round:>3}/{total}  attempt {r.attempt} failed: {r.failure_message}"
    return (
        f"round {r.round:>3}/{total}  {r.updates} updates  train loss {_fmt(r.train_loss)}  "
        f"eval loss {_fmt(r.eval_loss)}  accuracy {_fmt(r.eval_accuracy)}  "
        + (f"epsilon {_fmt(r.dp_epsilon)}  " if private else "")
        + f"({r.duration.ToTimedelta().total_seconds():.1f} s)"
    )


def _report(workdir: Path, status: aggregator_pb2.GetStatusResponse, opts: RunOptions) -> int:
    rows = [r for r in status.rounds if r.state == aggregator_pb2.ROUND_STATE_COMPLETED]
    _say("")
    _say(" round | updates | train loss | eval loss | accuracy | seconds")
    _say("-------+---------+------------+-----------+----------+--------")
    for r in rows:
        _say(
            f" {r.round:>5} | {r.updates:>7} | {_fmt(r.train_loss):>10} | "
            f"{_fmt(r.eval_loss):>9} | {_fmt(r.eval_accuracy):>8} | "
            f"{r.duration.ToTimedelta().total_seconds():>6.1f}"
        )
    records: list[dict[str, Any]] = [
        {"round": r.round, "updates": r.updates, "train_loss": r.train_loss,
         "eval_loss": r.eval_loss, "eval_accuracy": r.eval_accuracy,
         "seconds": r.duration.ToTimedelta().total_seconds()}
        for r in rows
    ]  # fmt: skip
    if status.HasField("privacy"):
        # Differential privacy: epsilon spent after each round, at the plan's delta.
        for record, r in zip(records, rows, strict=True):
            record["dp_epsilon"] = r.dp_epsilon
            record["dp_delta"] = status.privacy.delta
    (workdir / "rounds.json").write_text(json.dumps(records, indent=2))
    if opts.plot and rows:
        path = _plot(workdir, records)
        _say(f"\nplot of loss and accuracy per round: {path}")
    evaluated = [r for r in rows if r.eval_examples > 0]
    final = evaluated[-1].eval_accuracy if evaluated else float("nan")
    _say(f"federation done: {len(rows)} rounds, final test accuracy {final:.4f}")
    if status.HasField("privacy"):
        _say(format_privacy(status.privacy))
    if status.stop_reason:
        _say(f"stopped before round {len(rows) + 1}: {status.stop_reason}")
    _report_models(workdir, status, final)
    if opts.expect_accuracy is not None:
        if not final >= opts.expect_accuracy:
            _say(f"FAILED: accuracy {final:.4f} is below the expected {opts.expect_accuracy:.2f}")
            return 1
        _say(f"reached the expected test accuracy of at least {opts.expect_accuracy:.0%}")
    return 0


def _report_models(workdir: Path, status: aggregator_pb2.GetStatusResponse, final: float) -> None:
    """List the models the trainers took home; add the federated metrics beside them."""
    models = sorted((workdir / "models").glob("*/model.keras"))
    if not models:
        return
    summary = {
        "plan_sha256": status.plan_sha256,
        "rounds_completed": len(
            [r for r in status.rounds if r.state == aggregator_pb2.ROUND_STATE_COMPLETED]
        ),
        "final_federated_accuracy": final if math.isfinite(final) else None,
        "models": {m.parent.name: str(m.relative_to(workdir)) for m in models},
    }
    (workdir / "models" / "federation.json").write_text(json.dumps(summary, indent=2) + "\n")
    _say(f"final model taken home by {len(models)} trainer(s): {models[0].parent.parent}/")
    for m in models:
        _say(f"  {m}  (provenance: {m.parent / 'provenance.json'})")
    _say(f"  evaluate one: hfl evaluate {models[0].parent} [--project DIR] [--data-dir DIR]")


def _plot(workdir: Path, records: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, [r["train_loss"] for r in records], marker="o", label="train loss")
    ax1.plot(rounds, [r["eval_loss"] or float("nan") for r in records], marker="s",
             label="eval loss")  # fmt: skip
    ax1.set_xlabel("round")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [r["eval_accuracy"] or float("nan") for r in records], marker="o",
             color="tab:green")  # fmt: skip
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy (federated evaluation)")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    fig.suptitle("hfl local federation")
    fig.tight_layout()
    path = workdir / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
