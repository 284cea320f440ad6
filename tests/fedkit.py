"""fedkit: a real federation for tests, without TensorFlow in the test process.

Import it as ``from tests import fedkit`` (pytest's importlib mode makes ``tests`` a
namespace package). Everything is real: a simulated SGX platform whose quotes dcap-qvl
verifies, the policy and plan parsed from TOML, the attestation service and the
aggregator started in-process on 127.0.0.1 port 0 (or the aggregator as a subprocess),
mutual RA-TLS on every call.

Typical session fixture and test::

    files = fedkit.prepare_files(tmp_path_factory.mktemp("fed"))       # ~1 s, no TensorFlow
    attestation = fedkit.start_attestation(files)                       # stop() at teardown
    plan = files.write_plan(fedkit.PlanSpec(rounds=2, round_timeout_seconds=5))
    aggregator = fedkit.start_aggregator(files, plan, tmp_path / "agg", attestation.target)
    with fedkit.TestTrainer.attest(files, attestation.target, label="t1") as t1:
        t1.connect(aggregator.target, aggregator.plan)
        t1.join()
        task = t1.wait_for_task(aggregator_pb2.TASK_KIND_TRAIN)
        t1.upload(fedkit.constant_update(files.weights, 0.25), task)

The model is tiny and TensorFlow-free (`TINY_MODEL`: a dense kernel and bias of float32,
values multiples of 1/8) so that FedAvg of updates made of multiples of 1/4 is exact in
float32: tests compare models bit for bit. The plan still names "small_cnn" (the plan
schema wants a known model name); the aggregator never builds the model. Tests that need a
real trainer (TensorFlow) use `hfl_cli.local.prepare` instead.

Public API (kept stable; other test packages use it):

- `TINY_MODEL`, `tiny_weights()`, `constant_update()`
- `FederationFiles`, `prepare_files()`, `PlanSpec`, `FederationFiles.write_plan()`
- `start_attestation()`, `start_aggregator()`, `AggregatorProcess.start()`
- `TestTrainer` (an attested trainer identity speaking the wire protocol by hand,
  able to send malformed streams: `Corruption`), `OperatorClient`
- `rpc_error()`, `metric_value()`, `wait_until()`
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.duration_pb2 import Duration
from prometheus_client import CollectorRegistry

from hfl_aggregator.main import AggregatorConfig, RunningAggregator, build_aggregator
from hfl_attestation.service import (
    AttestationServiceConfig,
    RunningAttestationService,
    start_attestation_service,
)
from hfl_cli.local import policy_toml, write_operator_key
from hfl_cli.operator import OperatorCredentials, obtain_operator_certificate
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.attest_client import (
    ServiceCredentials,
    bootstrap_attestation_service,
    connect_verified,
    obtain_certificate,
)
from hfl_common.codec import StreamDecoder, encode_tensors, specs_of
from hfl_common.config import FederationPlan, load_plan
from hfl_common.ratls import EnclaveKey
from hfl_common.runtime import Enclave, EnclaveOptions
from hfl_common.server import CallLimits, ServerConfig, make_channel, role_dns_name
from hfl_common.tee import EnclaveIdentity, QuoteVerifier, SimulatedPlatform, SimulatedProvider

Weights = dict[str, npt.NDArray[Any]]

# The tiny model: name -> (shape, dtype). The aggregator only ever sees these arrays.
TINY_MODEL: Mapping[str, tuple[tuple[int, ...], str]] = {
    "dense/kernel": ((8, 4), "float32"),
    "dense/bias": ((4,), "float32"),
}
# Upload chunks in tests: small, so the tiny model (144 bytes) spans several chunks.
TEST_CHUNK_BYTES = 32
START_TIMEOUT_SECONDS = 60.0
RPC_TIMEOUT_SECONDS = 15.0


# --- the model ----------------------------------------------------------------------------


def tiny_weights(seed: int = 0) -> Weights:
    """The initial global model: multiples of 1/8 in [-2, 2), so sums stay exact."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.integers(-16, 16, size=shape) / 8).astype(dtype)
        for name, (shape, dtype) in TINY_MODEL.items()
    }


def constant_update(template: Mapping[str, npt.NDArray[Any]], value: float) -> Weights:
    """An update shaped like `template` with every element `value` (use multiples of 1/4)."""
    return {name: np.full_like(array, value) for name, array in template.items()}


# --- files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSpec:
    """The plan values tests vary; everything else is fixed. See hfl_common.config."""

    rounds: int = 3
    min_trainers: int = 2
    min_updates: int | None = None  # default: min_trainers
    fraction: float = 1.0
    round_timeout_seconds: float = 30.0
    max_round_retries: int = 2
    seed: int = 0
    evaluate_every: int = 1
    strategy: str = "fedavg"
    strategy_params: tuple[tuple[str, float], ...] = ()
    max_norm: float = 0.0
    max_aggregate_norm: float = 0.0
    name: str = "fedkit"
    liveness_seconds: float = 60.0
    # federation.mode and, for "async", the [async] table
    mode: str = "sync"
    buffer_size: int = 1
    staleness: str = "constant"
    max_staleness: int = 10

    def toml(self, weights_file: str, weights_sha256: str) -> str:
        strategy = "\n".join(f"{k} = {v!r}" for k, v in self.strategy_params)
        min_updates = self.min_trainers if self.min_updates is None else self.min_updates
        return (
            "# federation plan written by tests/fedkit.py\n"
            "[federation]\n"
            f'name = "{self.name}"\n'
            f"rounds = {self.rounds}\n"
            f"min_trainers = {self.min_trainers}\n"
            f"min_updates = {min_updates}\n"
            f"fraction = {self.fraction!r}\n"
            f"round_timeout_seconds = {float(self.round_timeout_seconds)!r}\n"
            f"max_round_retries = {self.max_round_retries}\n"
            f"seed = {self.seed}\n"
            f"liveness_seconds = {float(self.liveness_seconds)!r}\n"
            f'mode = "{self.mode}"\n\n'
            + (
                f"[async]\nbuffer_size = {self.buffer_size}\n"
                f'staleness = "{self.staleness}"\nmax_staleness = {self.max_staleness}\n\n'
                if self.mode == "async"
                else ""
            )
            + "[model]\n"
            'name = "small_cnn"\n'
            "input_shape = [8, 8, 1]\n"
            "num_classes = 10\n"
            f'initial_weights = "{weights_file}"\n'
            f'initial_weights_sha256 = "{weights_sha256}"\n\n'
            "[data]\n"
            'dataset = "synthetic"\n\n'
            "[training]\n"
            f"evaluate_every = {self.evaluate_every}\n\n"
            "[strategy]\n"
            f'name = "{self.strategy}"\n'
            f"{strategy}\n\n"
            "[update]\n"
            f"max_norm = {float(self.max_norm)!r}\n"
            f"max_aggregate_norm = {float(self.max_aggregate_norm)!r}\n"
        )


@dataclass(frozen=True)
class FederationFiles:
    """What `prepare_files` wrote: platform, policy (this code's identities), operator
    key, initial weights. Plans are written per test with `write_plan`."""

    directory: Path
    platform_dir: Path
    policy: Path
    operator_dir: Path
    initial_weights: Path
    initial_weights_sha256: str
    weights: Mapping[str, npt.NDArray[Any]] = field(repr=False)

    def write_plan(self, spec: PlanSpec | None = None) -> Path:
        """Write the plan for `spec` (default PlanSpec()) beside the weights; return its path.

        The file is named after its content, so equal specs share one file.
        """
        text = (spec or PlanSpec()).toml(self.initial_weights.name, self.initial_weights_sha256)
        path = self.directory / f"plan-{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml"
        if not path.exists():
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return path

    def enclave_options(self, role: str, state_dir: Path, isv_svn: int = 1) -> EnclaveOptions:
        """Options for a simulated enclave of `role` on this platform, under this policy."""
        return EnclaveOptions(
            role=role,
            tee="simulated",
            policy_path=self.policy,
            sim_platform=self.platform_dir,
            collateral_dir=None,
            pccs_url=None,
            isv_svn=isv_svn,
            state_dir=state_dir,
        )

    def platform(self) -> SimulatedPlatform:
        return SimulatedPlatform.load(self.platform_dir, refresh_collateral=False)


def prepare_files(
    directory: Path, weights: Mapping[str, npt.NDArray[Any]] | None = None
) -> FederationFiles:
    """Write platform/, policy.toml, operator/key.pem and initial_weights.npz into `directory`.

    No TensorFlow: the weights are `tiny_weights()` unless given. The policy names the
    measured identity of each service of the code installed now (hfl_cli.local.policy_toml).
    """
    directory.mkdir(parents=True, exist_ok=True)
    platform = SimulatedPlatform.load_or_create(directory / "platform")
    operator_dir = directory / "operator"
    spki = write_operator_key(operator_dir)
    policy = directory / "policy.toml"
    policy.write_text(policy_toml(platform, spki))
    model = dict(weights) if weights is not None else tiny_weights()
    path = directory / "initial_weights.npz"
    with path.open("wb") as f:
        np.savez(f, allow_pickle=False, **model)
    return FederationFiles(
        directory=directory,
        platform_dir=platform.directory,
        policy=policy,
        operator_dir=operator_dir,
        initial_weights=path,
        initial_weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        weights=model,
    )


# --- services -----------------------------------------------------------------------------


def start_attestation(
    files: FederationFiles,
    state_dir: Path | None = None,
    registry: CollectorRegistry | None = None,
) -> RunningAttestationService:
    """The attestation service in-process on 127.0.0.1 port 0; call .stop() when done."""
    state = state_dir or files.directory / "attestation-state"
    registry = registry or CollectorRegistry()
    enclave = Enclave.open(files.enclave_options("attestation", state), registry)
    return start_attestation_service(
        AttestationServiceConfig(
            server=ServerConfig(
                service="attestation",
                port=0,
                max_workers=8,
                grace_seconds=0.5,
                require_client_auth=False,
            ),
            state_dir=state,
        ),
        policy=enclave.policy,
        verifier=enclave.verifier,
        provider=enclave.provider,
        sealing=enclave.sealing,
        registry=registry,
    )


def start_aggregator(
    files: FederationFiles,
    plan: Path,
    state_dir: Path,
    attestation_target: str,
    *,
    registry: CollectorRegistry | None = None,
    tick_seconds: float = 0.1,
    upload_slots: int = 1,
    serve_metrics: bool = False,
    header_timeout_seconds: float = 10.0,
    call_limits: CallLimits | None = None,
) -> RunningAggregator:
    """The aggregator in-process on 127.0.0.1 port 0; call .stop(0) when done.

    Its registry is `registry` or a fresh one: read refusal counters from
    ``aggregator.registry`` with `metric_value`. `serve_metrics` also serves /metrics on a
    free port (``aggregator.metrics_port``); off by default, as stopping it costs ~0.5 s.
    """
    config = AggregatorConfig(
        enclave=files.enclave_options("aggregator", state_dir),
        plan_path=plan,
        attestation=attestation_target,
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0" if serve_metrics else None,
        upload_slots=upload_slots,
        header_timeout_seconds=header_timeout_seconds,
        tick_seconds=tick_seconds,
        grace_seconds=0.5,
        call_limits=call_limits or CallLimits(),
    )
    return build_aggregator(config, registry or CollectorRegistry())


@dataclass
class AggregatorProcess:
    """The aggregator as a subprocess (`python -m hfl_aggregator.main`), for restart tests."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        files: FederationFiles,
        plan: Path,
        state_dir: Path,
        attestation_target: str,
        *,
        log_path: Path,
        timeout: float = START_TIMEOUT_SECONDS,
    ) -> AggregatorProcess:
        """Start it and wait for its port file (SERVING); its output goes to `log_path`."""
        port_file = log_path.with_suffix(".ports.json")
        port_file.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "hfl_aggregator.main",
            "--plan",
            str(plan),
            "--policy",
            str(files.policy),
            "--tee",
            "simulated",
            "--sim-platform",
            str(files.platform_dir),
            "--state-dir",
            str(state_dir),
            "--attestation",
            attestation_target,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--log-json",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HFL_")}
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                tail = log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(
                    f"aggregator subprocess did not start (exit code {process.returncode}); "
                    f"log tail:\n{tail}"
                )
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        return cls(process, int(ports["grpc"]), int(ports["metrics"]), log_path)

    def kill(self) -> None:
        """SIGKILL: no drain, no final checkpoint, as a crash or an OOM kill."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful); return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# --- trainers -----------------------------------------------------------------------------


class Corruption(enum.Enum):
    """Ways `TestTrainer.upload` can break an update on purpose."""

    WRONG_DIGEST = "wrong_digest"  # trailer SHA-256 of other bytes
    TRUNCATED = "truncated"  # the stream ends after the chunks, without a trailer
    CHUNKS_OUT_OF_ORDER = "chunks_out_of_order"  # the first two chunks swapped
    OVERSIZED = "oversized"  # header total_bytes far above the model (1 GiB)
    WRONG_SHAPE = "wrong_shape"  # the first tensor has an extra row
    WRONG_DTYPE = "wrong_dtype"  # the first tensor is float64
    NAN = "nan"  # one NaN in the first tensor


def corrupt_arrays(update: Mapping[str, npt.NDArray[Any]], how: Corruption | None) -> Weights:
    """A copy of `update` with the array-level corruption applied to its first tensor."""
    out = {name: np.array(a, copy=True) for name, a in update.items()}
    first = next(iter(out))
    if how is Corruption.WRONG_SHAPE:
        a = out[first]
        out[first] = np.concatenate([a, a[:1]]) if a.ndim else np.stack([a, a])
    elif how is Corruption.WRONG_DTYPE:
        out[first] = out[first].astype(np.float64)
    elif how is Corruption.NAN:
        out[first].reshape(-1)[0] = np.nan
    return out


def update_messages(
    header: aggregator_pb2.UpdateHeader,
    update: Mapping[str, npt.NDArray[Any]],
    *,
    corrupt: Corruption | None = None,
    chunk_bytes: int = TEST_CHUNK_BYTES,
) -> list[aggregator_pb2.UploadUpdateRequest]:
    """The messages of one upload, built by hand with the codec, then mutated per `corrupt`.

    `header` is copied; its `tensors` field is filled from the encoded stream.
    """
    stream = encode_tensors(corrupt_arrays(update, corrupt), chunk_bytes=chunk_bytes)
    first = aggregator_pb2.UpdateHeader()
    first.CopyFrom(header)
    first.tensors.CopyFrom(stream.header)
    chunks = list(stream.chunks())
    trailer = stream.trailer()
    if corrupt is Corruption.OVERSIZED:
        first.tensors.total_bytes = 1 << 30
    if corrupt is Corruption.WRONG_DIGEST:
        trailer = tensor_pb2.TensorStreamTrailer(
            sha256=hashlib.sha256(b"not the payload").digest(), total_bytes=trailer.total_bytes
        )
    if corrupt is Corruption.CHUNKS_OUT_OF_ORDER:
        if len(chunks) < 2:
            raise ValueError("CHUNKS_OUT_OF_ORDER needs at least two chunks; lower chunk_bytes")
        chunks[0], chunks[1] = chunks[1], chunks[0]
    messages = [aggregator_pb2.UploadUpdateRequest(header=first)]
    messages += [aggregator_pb2.UploadUpdateRequest(chunk=c) for c in chunks]
    if corrupt is not Corruption.TRUNCATED:
        messages.append(aggregator_pb2.UploadUpdateRequest(trailer=trailer))
    return messages


class TestTrainer:
    """An attested trainer identity that speaks the aggregator's protocol by hand.

    `attest` opens a simulated trainer enclave (the policy's trainer identity, unless an
    `identity` is given) and gets a federation certificate for a fresh key; `connect`
    re-verifies the aggregator's quote and plan hash (connect_verified) and opens a
    channel; then `join`, `get_task`/`wait_for_task`, `download`, `upload`,
    `report_eval`, `leave`. Calls raise grpc.RpcError as the stub does; use `rpc_error`
    to catch them. A restarted aggregator needs `connect` again (new port, new key) and a
    new `join` (sessions live in memory only); the trainer id stays, as it comes from
    this trainer's key.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        credentials: ServiceCredentials,
        verifier: QuoteVerifier,
        *,
        label: str,
        num_examples: int = 100,
        closers: tuple[Callable[[], None], ...] = (),
    ) -> None:
        self.credentials = credentials
        self.verifier = verifier
        self.label = label
        self.num_examples = num_examples
        self._closers = closers
        self.channel: grpc.Channel | None = None
        self._stub: aggregator_pb2_grpc.AggregatorServiceStub | None = None
        self.plan: FederationPlan | None = None
        self.spec: list[tensor_pb2.TensorSpec] = []
        self.session_id = ""
        self.trainer_id = ""

    @classmethod
    def attest(
        cls,
        files: FederationFiles,
        attestation_target: str,
        *,
        label: str = "trainer",
        num_examples: int = 100,
        isv_svn: int = 1,
        identity: EnclaveIdentity | None = None,
        role: str = "trainer",
    ) -> TestTrainer:
        """A trainer with a federation certificate; raises what obtain_certificate raises
        (PermissionDeniedError when the policy refuses `identity`). `role="relay"` makes a
        hand-driven relay (its certificate names role relay)."""
        state = files.directory / "trainers" / label
        enclave = Enclave.open(files.enclave_options(role, state, isv_svn), None)
        if identity is None:
            credentials, renewer, pinned = enclave.attest(attestation_target, label)
            closers: tuple[Callable[[], None], ...] = (renewer.stop, pinned.close)
        else:
            with bootstrap_attestation_service(attestation_target, enclave.verifier) as pin:
                key = EnclaveKey.generate()
                provider = SimulatedProvider(files.platform(), identity)
                issued = obtain_certificate(pin, key, provider, role, label)
            credentials = ServiceCredentials(key, issued)
            closers = ()
        return cls(
            credentials,
            enclave.verifier,
            label=label,
            num_examples=num_examples,
            closers=closers,
        )

    # ------------------------------------------------------------- connection

    @property
    def stub(self) -> aggregator_pb2_grpc.AggregatorServiceStub:
        if self._stub is None:
            raise RuntimeError(f"{self.label}: connect() to the aggregator first")
        return self._stub

    def connect(
        self,
        target: str,
        plan: FederationPlan | Path,
        roles: str | tuple[str, ...] = "aggregator",
    ) -> TestTrainer:
        """Verify the aggregator at `target` (its quote, and its plan hash = `plan`'s);
        `roles=("aggregator", "relay")` accepts a relay too, as the trainer does."""
        loaded = load_plan(plan) if isinstance(plan, Path) else plan
        channel = connect_verified(
            target,
            self.credentials,
            self.verifier,
            roles,
            expected_user_data=loaded.sha256,
        )
        if self.channel is not None:
            self.channel.close()
        self.channel = channel
        self._stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
        self.plan = loaded
        self.spec = specs_of(load_model(loaded))
        self.session_id = ""
        return self

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for close in self._closers:
            close()
        self._closers = ()

    def __enter__(self) -> TestTrainer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------------- calls

    def join(
        self,
        *,
        plan_sha256: str | None = None,
        model_spec: list[tensor_pb2.TensorSpec] | None = None,
        num_examples: int | None = None,
    ) -> aggregator_pb2.JoinResponse:
        """Join with the connected plan's hash and model spec unless overridden."""
        assert self.plan is not None, "connect() first"
        response = self.stub.Join(
            aggregator_pb2.JoinRequest(
                label=self.label,
                plan_sha256=self.plan.sha256_hex if plan_sha256 is None else plan_sha256,
                model_spec=self.spec if model_spec is None else model_spec,
                num_examples=self.num_examples if num_examples is None else num_examples,
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        self.session_id = response.session_id
        self.trainer_id = response.trainer_id
        return response

    def get_task(
        self, wait_seconds: int = 0, *, session_id: str | None = None
    ) -> aggregator_pb2.Task:
        response = self.stub.GetTask(
            aggregator_pb2.GetTaskRequest(
                session_id=self.session_id if session_id is None else session_id,
                max_wait=Duration(seconds=wait_seconds),
            ),
            timeout=wait_seconds + RPC_TIMEOUT_SECONDS,
        )
        return response.task

    def wait_for_task(self, kind: int, timeout: float = 20.0) -> aggregator_pb2.Task:
        """Long-poll until a task of `kind` (aggregator_pb2.TASK_KIND_*) comes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            task = self.get_task(max(0, min(5, math.ceil(left))))
            if task.kind == kind:
                return task
            if left <= 0:
                raise AssertionError(
                    f"{self.label}: no task of kind {aggregator_pb2.TaskKind.Name(kind)} within "
                    f"{timeout} s; last: {aggregator_pb2.TaskKind.Name(task.kind)} "
                    f"{task.message!r}"
                )

    def download(self, version: int = 0) -> tuple[aggregator_pb2.ModelHeader, Weights]:
        """The global model (version 0: the current one), decoded and digest-checked."""
        parts = iter(
            self.stub.DownloadModel(
                aggregator_pb2.DownloadModelRequest(
                    session_id=self.session_id, model_version=version
                ),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        )
        first = next(parts)
        assert first.WhichOneof("part") == "header", "a download starts with its header"
        header = first.header
        decoder = StreamDecoder(header.tensors, expected=self.spec, max_total_bytes=1 << 24)
        for part in parts:
            if part.WhichOneof("part") == "chunk":
                decoder.feed(part.chunk)
            else:
                return header, decoder.finish(part.trailer)
        raise AssertionError("the model download ended without a trailer")

    def update_header(
        self,
        task: aggregator_pb2.Task,
        *,
        nonce: bytes | None = None,
        kind: aggregator_pb2.UpdateKind = aggregator_pb2.UPDATE_KIND_DELTA,
        num_examples: int | None = None,
        round_number: int | None = None,
        base_model_version: int | None = None,
        task_id: str | None = None,
        train_loss: float = 0.5,
        train_accuracy: float = 0.5,
    ) -> aggregator_pb2.UpdateHeader:
        """The UpdateHeader for `task`, every field overridable (a fresh nonce by default)."""
        return aggregator_pb2.UpdateHeader(
            session_id=self.session_id,
            task_id=task.task_id if task_id is None else task_id,
            round=task.round if round_number is None else round_number,
            base_model_version=(
                task.model_version if base_model_version is None else base_model_version
            ),
            kind=kind,
            num_examples=self.num_examples if num_examples is None else num_examples,
            nonce=secrets.token_bytes(16) if nonce is None else nonce,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
        )

    def upload(
        self,
        update: Mapping[str, npt.NDArray[Any]],
        task: aggregator_pb2.Task,
        *,
        corrupt: Corruption | None = None,
        chunk_bytes: int = TEST_CHUNK_BYTES,
        **header_fields: Any,
    ) -> aggregator_pb2.UploadUpdateResponse:
        """Upload `update` for `task`; `header_fields` go to `update_header` (nonce=...,
        round_number=..., kind=...); `corrupt` breaks the stream or the arrays on purpose."""
        header = self.update_header(task, **header_fields)
        messages = update_messages(header, update, corrupt=corrupt, chunk_bytes=chunk_bytes)
        return self.upload_messages(messages)

    def upload_messages(
        self, messages: list[aggregator_pb2.UploadUpdateRequest]
    ) -> aggregator_pb2.UploadUpdateResponse:
        """Send exactly these messages as one UploadUpdate call."""
        response: aggregator_pb2.UploadUpdateResponse = self.stub.UploadUpdate(
            iter(messages), timeout=RPC_TIMEOUT_SECONDS
        )
        return response

    def upload_and_vanish(
        self,
        update: Mapping[str, npt.NDArray[Any]],
        task: aggregator_pb2.Task,
        *,
        after_chunks: int = 2,
        chunk_bytes: int = TEST_CHUNK_BYTES,
        received: Callable[[], bool] | None = None,
    ) -> None:
        """Start an upload, send the header and `after_chunks` chunks, then cancel the call
        while the aggregator waits for more: a peer dying mid-stream.

        `received`, when given, is polled before cancelling until it says the aggregator
        has the chunks (e.g. its hfl_aggregator_update_bytes_total{direction="in"} grew);
        otherwise the call is cancelled 0.2 s after the chunks were handed to gRPC.
        """
        messages = update_messages(self.update_header(task), update, chunk_bytes=chunk_bytes)
        sent = threading.Event()
        hold = threading.Event()

        def requests() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
            yield from messages[: 1 + after_chunks]
            sent.set()
            hold.wait(RPC_TIMEOUT_SECONDS)

        future = self.stub.UploadUpdate.future(requests(), timeout=RPC_TIMEOUT_SECONDS)
        try:
            if not sent.wait(RPC_TIMEOUT_SECONDS):
                raise AssertionError("the partial upload was not sent")
            if received is None:
                time.sleep(0.2)  # let the chunks reach the aggregator before vanishing
            else:
                wait_until(received, "the aggregator to receive the partial upload")
            future.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs lacks a type
        finally:
            hold.set()

    def report_eval(
        self,
        task: aggregator_pb2.Task,
        *,
        loss: float = 0.5,
        accuracy: float = 0.75,
        num_examples: int | None = None,
    ) -> aggregator_pb2.ReportEvaluationResponse:
        response: aggregator_pb2.ReportEvaluationResponse = self.stub.ReportEvaluation(
            aggregator_pb2.ReportEvaluationRequest(
                report=aggregator_pb2.EvaluationReport(
                    session_id=self.session_id,
                    task_id=task.task_id,
                    round=task.round,
                    model_version=task.model_version,
                    num_examples=self.num_examples if num_examples is None else num_examples,
                    loss=loss,
                    accuracy=accuracy,
                )
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        return response

    def leave(self) -> None:
        self.stub.Leave(
            aggregator_pb2.LeaveRequest(session_id=self.session_id), timeout=RPC_TIMEOUT_SECONDS
        )


# --- operators ----------------------------------------------------------------------------


class OperatorClient:
    """An operator (role "operator", key listed in the policy) talking to the aggregator."""

    def __init__(self, operator: OperatorCredentials) -> None:
        self.operator = operator
        self.channel: grpc.Channel | None = None
        self._stub: aggregator_pb2_grpc.AggregatorServiceStub | None = None

    @classmethod
    def obtain(cls, files: FederationFiles, attestation_target: str) -> OperatorClient:
        """Get an operator certificate from the attestation service (writes cert.pem and
        ca.pem beside files.operator_dir/key.pem, as `hfl operator-cert` does)."""
        return cls(
            obtain_operator_certificate(
                files.operator_dir, attestation_target, files.policy, files.platform_dir
            )
        )

    @property
    def credentials(self) -> ServiceCredentials:
        return self.operator.credentials

    @property
    def stub(self) -> aggregator_pb2_grpc.AggregatorServiceStub:
        if self._stub is None:
            raise RuntimeError("operator: connect() to the aggregator first")
        return self._stub

    def connect(self, target: str) -> OperatorClient:
        """Verify the aggregator's quote (any plan) and open a channel to it."""
        channel = connect_verified(
            target, self.operator.credentials, self.operator.verifier, "aggregator"
        )
        if self.channel is not None:
            self.channel.close()
        self.channel = channel
        self._stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
        return self

    def status(self) -> aggregator_pb2.GetStatusResponse:
        response: aggregator_pb2.GetStatusResponse = self.stub.GetStatus(
            aggregator_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_SECONDS
        )
        return response

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


def anonymous_channel(target: str, ca_pem: bytes, role: str = "aggregator") -> grpc.Channel:
    """A TLS channel that trusts the federation CA but presents no client certificate."""
    return make_channel(
        target,
        grpc.ssl_channel_credentials(root_certificates=ca_pem),
        target_name_override=role_dns_name(role),
    )


# --- helpers ------------------------------------------------------------------------------


def load_model(plan: FederationPlan) -> Weights:
    """The initial weights the plan pins (read from disk; checked by the aggregator)."""
    with np.load(plan.model.initial_weights, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


@contextlib.contextmanager
def rpc_error() -> Iterator[list[grpc.RpcError]]:
    """``with rpc_error() as caught: stub.Call(...)``; then ``code_and_details(caught)``.

    Fails the test if the block raised no grpc.RpcError.
    """
    caught: list[grpc.RpcError] = []
    try:
        yield caught
    except grpc.RpcError as err:
        caught.append(err)
    if not caught:
        raise AssertionError("the call succeeded, but a gRPC error was expected")


def code_and_details(caught: list[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    err = caught[0]
    assert isinstance(err, grpc.Call)
    return err.code(), err.details() or ""


def metric_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value (0.0 when it does not exist yet), e.g.
    ``metric_value(reg, "hfl_aggregator_updates_refused_total", reason="stale")``."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll `predicate` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


__all__ = [
    "RPC_TIMEOUT_SECONDS",
    "TEST_CHUNK_BYTES",
    "TINY_MODEL",
    "AggregatorProcess",
    "Corruption",
    "FederationFiles",
    "OperatorClient",
    "PlanSpec",
    "TestTrainer",
    "anonymous_channel",
    "code_and_details",
    "constant_update",
    "corrupt_arrays",
    "load_model",
    "metric_value",
    "prepare_files",
    "rpc_error",
    "start_aggregator",
    "start_attestation",
    "tiny_weights",
    "update_messages",
    "wait_until",
]
