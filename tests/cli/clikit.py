"""clikit: the `hfl` command and real service processes, for end-to-end tests.

Import it as ``from tests.cli import clikit``. Nothing is mocked: the services run as
separate processes (`python -m hfl_attestation.main`, ...) through the same
`hfl_cli.run.Supervisor` that `hfl run` uses, with the simulated TEE and mutual RA-TLS on
127.0.0.1; the files come from `hfl_cli.local.prepare` (TensorFlow builds the initial
weights, so the first use in a test process takes a few seconds).

Public API:

- `hfl_command()`, `run_hfl()`, `clean_env()`: the command line as a subprocess
- `one_error_line()`: the single "error: ..." line of a failed command (no traceback)
- `processes_mentioning()`, `wait_for_line()`, `free_port()`, `wait_until()`
- `scrape_metrics()`, `metric()`: a service's Prometheus endpoint, over real HTTP
- `LocalFederation`: attestation service, aggregator and trainers as processes
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from hfl_cli.local import PlanOptions, Prepared, prepare
from hfl_cli.operator import OperatorCredentials, aggregator_channel, obtain_operator_certificate
from hfl_cli.run import Service, Supervisor, service_args
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 180.0  # a trainer imports TensorFlow first: slow on 2 busy cores

# Lines TensorFlow's C++ runtime writes to stderr at import whatever TF_CPP_MIN_LOG_LEVEL
# says (absl logging before InitializeLog, oneDNN notice); not hfl's output.
_TF_NOISE = (
    "WARNING: All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "cpu_feature_guard",
    "To enable the following instructions",
)


# --- the command line -----------------------------------------------------------------------


def hfl_command(*args: str) -> list[str]:
    """argv for `hfl ARGS` run by this interpreter (the same code as the console script)."""
    return [sys.executable, "-m", "hfl_cli.main", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without HFL_* (flags' defaults) plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFL_")}
    env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **extra})
    return env


def run_hfl(
    *args: str, timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `hfl ARGS` to its end; stdout and stderr captured as text."""
    return subprocess.run(
        hfl_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def hfl_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's start-up chatter and without JSON log lines."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("{") and not any(n in line for n in _TF_NOISE)
    ]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one "error: ..." line a failed command printed; fails on a traceback."""
    assert "Traceback" not in result.stderr, f"a traceback instead of one line:\n{result.stderr}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line on stderr, got:\n{result.stderr}"
    return errors[0]


# --- processes and ports ---------------------------------------------------------------------


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes (not zombies, not this one) whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # exited while we looked
        if text in cmdline and state != "Z":
            found.append((int(entry.name), cmdline.strip()))
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a fixed --listen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = 60.0, interval: float = 0.2
) -> None:
    """Poll `predicate` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_line(
    stream: IO[str], predicate: Callable[[str], bool], timeout: float, seen: list[str]
) -> str:
    """Read lines from a process's stdout until one satisfies `predicate` (appended to
    `seen` as read). The pipe is read in this thread: call it only while output flows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if predicate(line):
            return line
    raise AssertionError(f"no such line within {timeout} s; output so far:\n" + "".join(seen))


# --- metrics --------------------------------------------------------------------------------


def scrape_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:  # http://127.0.0.1 only
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def metric(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """A sample's value; 0.0 when a counter has no sample yet (never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- a federation of processes --------------------------------------------------------------


@dataclass
class LocalFederation:
    """Attestation service and aggregator (and trainers on request) as processes.

    Use as a context manager (every process is stopped at exit) or call `stop()`.
    """

    prepared: Prepared
    supervisor: Supervisor
    attestation: Service
    aggregator: Service | None = None
    trainers: list[Service] = field(default_factory=list)
    aggregator_args: list[str] = field(default_factory=list)
    _operator: OperatorCredentials | None = None

    @classmethod
    def start(
        cls,
        directory: Path,
        plan: PlanOptions,
        *,
        aggregator: bool = True,
        aggregator_listen: str = "127.0.0.1:0",
    ) -> LocalFederation:
        """Prepare `directory` (platform, policy, plan, operator key) and start services."""
        prepared = prepare(directory, plan)
        supervisor = Supervisor(directory)
        try:
            attestation = supervisor.start(
                "attestation", "hfl_attestation.main", service_args(prepared, "attestation")
            )
            supervisor.wait_ready(attestation, START_TIMEOUT_SECONDS)
            fed = cls(prepared, supervisor, attestation)
            if aggregator:
                fed.start_aggregator(listen=aggregator_listen)
        except BaseException:
            supervisor.stop_all()
            raise
        return fed

    @property
    def attestation_target(self) -> str:
        return f"127.0.0.1:{self.attestation.grpc_port}"

    @property
    def aggregator_target(self) -> str:
        assert self.aggregator is not None, "no aggregator started"
        return f"127.0.0.1:{self.aggregator.grpc_port}"

    @property
    def aggregator_metrics_url(self) -> str:
        assert self.aggregator is not None, "no aggregator started"
        return f"http://127.0.0.1:{self.aggregator.metrics_port}/metrics"

    def start_aggregator(self, *, listen: str = "127.0.0.1:0") -> Service:
        """Start (or restart, with the same state dir) the aggregator; wait until serving."""
        self.aggregator_args = [
            *service_args(self.prepared, "aggregator", listen=listen),
            "--plan", str(self.prepared.plan),
            "--attestation", self.attestation_target,
        ]  # fmt: skip
        self.aggregator = self.supervisor.start(
            "aggregator", "hfl_aggregator.main", self.aggregator_args
        )
        self.supervisor.wait_ready(self.aggregator, START_TIMEOUT_SECONDS)
        return self.aggregator

    def trainer_args(
        self,
        index: int,
        *,
        num_partitions: int = 2,
        plan: Path | None = None,
        policy: Path | None = None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The flags `hfl run` gives trainer `index` (0-based), with optional overrides."""
        return [
            *service_args(self.prepared, f"trainer-{index + 1}", policy=policy),
            "--plan", str(plan or self.prepared.plan),
            "--attestation", self.attestation_target,
            "--aggregator", self.aggregator_target,
            "--label", f"trainer-{index + 1}",
            "--trainer-index", str(index),
            "--num-partitions", str(num_partitions),
            *extra,
        ]  # fmt: skip

    def start_trainer(
        self,
        index: int,
        *,
        wait: bool = True,
        num_partitions: int = 2,
        plan: Path | None = None,
        policy: Path | None = None,
        extra: Sequence[str] = (),
    ) -> Service:
        """Start trainer `index` as `hfl run` does; `wait`: until it serves its Status."""
        args = self.trainer_args(
            index, num_partitions=num_partitions, plan=plan, policy=policy, extra=extra
        )
        service = self.supervisor.start(f"trainer-{index + 1}", "hfl_trainer.main", args)
        self.trainers.append(service)
        if wait:
            self.supervisor.wait_ready(service, START_TIMEOUT_SECONDS)
        return service

    def write_endpoints(self) -> Path:
        """endpoints.json as `hfl run` writes it (what `hfl status --run DIR` reads)."""
        endpoints = {
            s.name: {
                "grpc": f"127.0.0.1:{s.grpc_port}",
                "metrics": f"http://127.0.0.1:{s.metrics_port}/metrics",
            }
            for s in self.supervisor.services
            if s.process.poll() is None
        }
        path = self.prepared.directory / "endpoints.json"
        path.write_text(json.dumps(endpoints, indent=2))
        return path

    def operator(self) -> OperatorCredentials:
        """Operator credentials (writes operator/cert.pem and ca.pem, as `hfl run` does)."""
        if self._operator is None:
            self._operator = obtain_operator_certificate(
                self.prepared.operator_dir,
                self.attestation_target,
                self.prepared.policy,
                self.prepared.platform,
            )
        return self._operator

    def status(self) -> aggregator_pb2.GetStatusResponse:
        """The aggregator's Status, asked as the operator after re-verifying its quote."""
        channel = aggregator_channel(self.aggregator_target, self.operator())
        try:
            response: aggregator_pb2.GetStatusResponse = aggregator_pb2_grpc.AggregatorServiceStub(
                channel
            ).GetStatus(aggregator_pb2.GetStatusRequest(), timeout=10)
            return response
        finally:
            channel.close()

    def log_text(self, service: Service) -> str:
        return service.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.supervisor.stop_all()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def federation(
    directory: Path, plan: PlanOptions, *, aggregator_listen: str = "127.0.0.1:0"
) -> Iterator[LocalFederation]:
    """A generator for fixtures: yields a started `LocalFederation`, then stops it."""
    fed = LocalFederation.start(directory, plan, aggregator_listen=aggregator_listen)
    try:
        yield fed
    finally:
        fed.stop()
