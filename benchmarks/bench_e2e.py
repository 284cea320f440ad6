"""What a user gets: end-to-end rounds of a real federation against the raw-TLS bound.

Everything is the real thing except the training itself: the aggregator runs as its own
process (`python -m hfl_aggregator.main`, simulated TEE, sealed checkpoints), the
attestation service verifies every enclave's quote with dcap-qvl, and the trainers are the
real trainer client library (`hfl_trainer.client.FederationClient`: join, long-poll, download,
decode, encode, upload, retries) over real mutual RA-TLS, each with its own enclave key and
federation certificate. Only `LocalTrainer` is replaced by a no-op stand-in that returns a
fixed delta at once (TensorFlow is never imported), so the figures are the framework's cost.
The no-op trainers run as threads in one or a few client processes (`--worker` mode of this
script).

Models are N float32 tensors (160, like ResNet-50) with log-normal sizes adding up to a
ResNet-50 (25.6M parameters, 102 MB) or to 1M parameters.

In the same run, a raw Python `ssl` socket pair on loopback (two processes, TLS 1.3,
AES-GCM) moves the same number of bytes: that is the transport bound every figure is
divided by. Reported, as ratios:

- transfer: two trainers that take turns (the second starts downloading when the first
  has uploaded), so each download and upload runs alone: throughput vs raw TLS. The first
  trainer's upload is UploadUpdate with decode, validation and fold; the second one's also
  closes the round (aggregation and the sealed checkpoint, in the current engine).
- rounds: N = 2, 8, 32 trainers of the 25.6M model at once: round time (median and p99 of
  rounds 2..R) vs N x model x 2 at the raw-TLS rate; the aggregator process's peak RSS
  during the rounds (VmHWM of /proc/<pid>/status, reset through /proc/<pid>/clear_refs once
  the process is idle, so the start's own peak is reported apart) above its idle RSS (which
  holds the initial model), as a multiple of the model; its CPU
  seconds (utime + stime of /proc/<pid>/stat) per trainer-round, also per 100 MB each way;
  the client processes' own extra peak memory per trainer vs the model.
- env: the N = 8 round again with MALLOC_ARENA_MAX=2 and OPENBLAS_NUM_THREADS=1 in the
  aggregator's environment.
- scale: 256 trainers x 1M parameters x 3 rounds (`--scale-rounds`): errors (failed
  trainers, retried calls, DEADLINE_EXCEEDED among them), p50 and p99 round time.

Every scenario also records the aggregator's resources per round: its RSS (VmRSS) and
open file descriptors (entries of /proc/<pid>/fd) at the end of each round and their
peaks within it, idle before anyone joined and once every trainer is done.
- resnet (`--only resnet`, not in the default set: it loads TensorFlow): 2 real trainers
  (`hfl_trainer.training.LocalTrainer`, Keras ResNet-50, 23.6M params for 32x32x3 and
  10 classes) on a generated CIFAR-format set, each in its own process: per round, the
  slower trainer's training time (its train_delta, which includes setting and reading
  the weights) vs the rest of the round (the framework).

Results go to benchmarks/results/e2e-<label>.json and .md (the label defaults to the git
commit). No figure is asserted anywhere: tests run `--quick` only to see it complete.

    .venv/bin/python benchmarks/bench_e2e.py                     # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_e2e.py --quick --out /tmp/x  # smoke: tiny, ~1 min
    .venv/bin/python benchmarks/bench_e2e.py --only rounds --trainers 2 8
    .venv/bin/python benchmarks/bench_e2e.py --only resnet --append   # TensorFlow, ~5 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import grpc

    from hfl_trainer.training import LocalTrainer

Weights = dict[str, npt.NDArray[Any]]

RESNET50_PARAMS = 25_557_032
SMALL_PARAMS = 1_000_000
TENSORS = 160
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Knobs of the aggregator process's environment that the `env` scenario measures.
TUNED_ENV = {"MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}


def launcher_env() -> dict[str, str]:
    """The aggregator's environment as `hfl run` sets it (none before it set any): every
    scenario runs with it, so the figures are what users get; `env` runs without it (or,
    where the launcher sets nothing, with TUNED_ENV)."""
    try:
        from hfl_cli.run import AGGREGATOR_ENV
    except ImportError:
        return {}
    return dict(AGGREGATOR_ENV)


def contrast_env() -> dict[str, str]:
    return {} if launcher_env() else dict(TUNED_ENV)


_STRIPPED_ENV = ("MALLOC_ARENA_MAX", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SAMPLE_SECONDS = 0.05

log = logging.getLogger("bench_e2e")


# ----------------------------------------------------------------------------- the model


def model_layout(params: int, tensors: int = TENSORS, seed: int = 0) -> list[int]:
    """`tensors` sizes drawn log-normal (sigma 2, like a CNN's), scaled to sum to `params`."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=2.0, size=tensors)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * params)).astype(np.int64)
    sizes[int(np.argmax(sizes))] += params - int(sizes.sum())
    return [int(s) for s in sizes]


def make_model(params: int, seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        f"layer{i:03d}/w": rng.standard_normal(n, dtype=np.float32) * np.float32(0.05)
        for i, n in enumerate(model_layout(params, seed=seed))
    }


def model_bytes(weights: Mapping[str, npt.NDArray[Any]]) -> int:
    return sum(int(a.nbytes) for a in weights.values())


# ------------------------------------------------------------------------ /proc readings


def proc_status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def proc_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[11], fields[12]: utime, stime (the 14th and 15th of proc(5), counted from 1)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float
    cpu: float
    rss_kb: int
    hwm_kb: int
    fds: int


def proc_open_fds(pid: int) -> int:
    """Open file descriptors of a process: the entries of /proc/<pid>/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class ProcSampler:
    """Samples a process's CPU seconds and RSS every SAMPLE_SECONDS in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _read(self) -> Sample:
        return Sample(
            time.time(),
            proc_cpu_seconds(self.pid),
            proc_status_kb(self.pid, "VmRSS"),
            proc_status_kb(self.pid, "VmHWM"),
            proc_open_fds(self.pid),
        )

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.samples.append(self._read())

    def __enter__(self) -> ProcSampler:
        self.samples.append(self._read())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.samples.append(self._read())

    def at(self, t: float) -> Sample:
        """The last sample taken at or before `t` (the first one if none was)."""
        before = [s for s in self.samples if s.t <= t]
        return before[-1] if before else self.samples[0]

    def during(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]

    def cpu_at(self, t: float) -> float:
        before = [s for s in self.samples if s.t <= t]
        return (before[-1] if before else self.samples[0]).cpu


# ------------------------------------------------------------------------- raw TLS bound


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "raw.crt", directory / "raw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def raw_tls_sender(port_file: Path, cert: Path, key: Path, nbytes: int, repeats: int) -> None:
    """The sending process of the raw-TLS measurement: `repeats` x `nbytes`, 1 MiB writes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    payload = memoryview(np.random.default_rng(0).bytes(1 << 20))
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_file.write_text(str(server.getsockname()[1]))
        conn, _ = server.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            for _ in range(repeats):
                tls.recv(1)
                left = nbytes
                while left:
                    n = min(left, len(payload))
                    tls.sendall(payload[:n])
                    left -= n


def raw_tls_rate(nbytes: int, repeats: int, workdir: Path) -> dict[str, Any]:
    """Bytes per second of a raw TLS 1.3 socket between two processes on loopback."""
    cert, key = _self_signed(workdir)
    port_file = workdir / f"raw-{secrets.token_hex(3)}.port"
    sender = subprocess.Popen(
        [sys.executable, __file__, "--raw-tls-sender", str(port_file), str(cert), str(key),
         str(nbytes), str(repeats)],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or sender.poll() is not None:
                raise RuntimeError("the raw TLS sender did not start")
            time.sleep(0.02)
        port = int(port_file.read_text())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        buf = bytearray(nbytes)
        view = memoryview(buf)
        seconds: list[float] = []
        with (
            socket.create_connection(("127.0.0.1", port)) as sock,
            ctx.wrap_socket(sock) as tls,
        ):
            cipher = tls.cipher()
            for _ in range(repeats):
                start = time.perf_counter()
                tls.sendall(b"g")
                got = 0
                while got < nbytes:
                    n = tls.recv_into(view[got:], min(nbytes - got, 1 << 20))
                    if n == 0:
                        raise RuntimeError("raw TLS sender closed early")
                    got += n
                seconds.append(time.perf_counter() - start)
        sender.wait(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    median = statistics.median(seconds)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "bytes_per_second": nbytes / median,
        "cipher": cipher[0] if cipher else "",
    }


# ------------------------------------------------------------------- the no-op trainer


@dataclass(frozen=True)
class _TrainResult:
    delta: dict[str, npt.NDArray[Any]]
    num_examples: int
    loss: float
    accuracy: float
    examples_per_second: float
    steps: int


@dataclass(frozen=True)
class _EvalResult:
    loss: float
    accuracy: float
    num_examples: int


class NoopTrainer:
    """Stands in for hfl_trainer.training.LocalTrainer: no TensorFlow, no work.

    train_delta returns the same fixed delta (one array per tensor, shared by every
    no-op trainer of the process) at once; evaluate returns fixed figures.
    """

    def __init__(
        self, delta: dict[str, npt.NDArray[Any]], num_examples: int, on_trained: Callable[[], None]
    ) -> None:
        self._delta = delta
        self.num_examples = num_examples
        self._on_trained = on_trained

    def train_delta(self, weights: Mapping[str, npt.NDArray[Any]], **_: Any) -> _TrainResult:
        self._on_trained()
        return _TrainResult(dict(self._delta), self.num_examples, 0.5, 0.5, 0.0, 1)

    def evaluate(self, weights: Mapping[str, npt.NDArray[Any]]) -> _EvalResult:
        return _EvalResult(0.5, 0.5, 10)


def _import_client_without_tensorflow() -> types.ModuleType:
    """Import hfl_trainer.client with its `training` module (the TensorFlow part) stubbed.

    client.py imports LocalTrainer from hfl_trainer.training only to name its type; the
    stub gives it NoopTrainer under that name, so TensorFlow is never loaded.
    """
    stub = types.ModuleType("hfl_trainer.training")
    stub.LocalTrainer = NoopTrainer  # type: ignore[attr-defined]
    sys.modules.setdefault("hfl_trainer.training", stub)
    import hfl_trainer.client

    return hfl_trainer.client


class _Recorder:
    """Timestamps of what each trainer does, collected in the worker process."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, float]] = []
        self._lock = threading.Lock()

    def add(self, label: str, what: str, round_number: int) -> None:
        with self._lock:
            self.events.append((label, what, round_number, time.time()))


def _timing_interceptor(
    label: str,
    recorder: _Recorder,
    current: list[Any],
    before_download: Callable[[int], None],
) -> Any:
    import grpc

    from hfl_common.api import aggregator_pb2

    kinds = {
        aggregator_pb2.TASK_KIND_TRAIN: "train",
        aggregator_pb2.TASK_KIND_EVALUATE: "evaluate",
        aggregator_pb2.TASK_KIND_DONE: "done",
    }

    class Interceptor(
        grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
        grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    ):
        def intercept_unary_unary(
            self, continuation: Callable[..., Any], details: Any, request: Any
        ) -> Any:
            outcome = continuation(details, request)
            if details.method.endswith("/GetTask"):
                with contextlib.suppress(grpc.RpcError):
                    task = outcome.result().task
                    kind = kinds.get(task.kind)
                    if kind is not None:
                        current[0], current[1] = int(task.round), kind
                        recorder.add(label, f"task_{kind}", int(task.round))
            return outcome

        def intercept_unary_stream(
            self, continuation: Callable[..., Any], details: Any, request: Any
        ) -> Any:
            if details.method.endswith("/DownloadModel"):
                before_download(int(current[0]))
                recorder.add(label, f"download_start_{current[1]}", int(current[0]))
            return continuation(details, request)

    return Interceptor()


def _make_trainer(
    cfg: WorkerConfig,
    index: int,
    delta: dict[str, npt.NDArray[Any]],
    on_trained: Callable[[], None],
    recorder: _Recorder,
    label: str,
    current: list[Any],
) -> tuple[LocalTrainer, Callable[[], Weights] | None]:
    """The no-op stand-in, or a real LocalTrainer (TensorFlow) whose training is timed."""
    if cfg.trainer == "noop":
        return cast("LocalTrainer", NoopTrainer(delta, 100 + index, on_trained)), None
    from hfl_trainer import data as data_lib
    from hfl_trainer.models import build_model, get_weights
    from hfl_trainer.training import LocalTrainer as RealTrainer

    full = data_lib.load_cifar10(cfg.data_dir)
    part = cfg.first_partition + index
    indices = data_lib.partition(full.y_train, cfg.partitions, part, scheme="iid", seed=0)
    model = build_model(cfg.trainer, (32, 32, 3), 10, 0)
    real = RealTrainer(model, full.with_train_indices(indices), 32, 0.001, seed=part)
    train = real.train_delta

    def timed(*args: Any, **kwargs: Any) -> Any:
        round_number = int(current[0])
        recorder.add(label, "downloaded", round_number)
        result = train(*args, **kwargs)
        recorder.add(label, "trained", round_number)
        return result

    setattr(real, "train_delta", timed)  # noqa: B010 (an instance attribute over the method)
    return real, lambda: get_weights(model)


@dataclass
class WorkerConfig:
    plan: str
    policy: str
    platform: str
    attestation: str
    aggregator: str
    state_dir: str
    model: str
    labels: list[str]
    sequential: bool
    out: str
    # "noop", or "resnet50": real TensorFlow training on CIFAR-format data in data_dir,
    # this worker's trainers being partitions first_partition.. of `partitions`.
    trainer: str = "noop"
    data_dir: str = ""
    first_partition: int = 0
    partitions: int = 1


def run_worker(config_path: Path) -> int:
    """One client process: attest its trainers, run FederationClient for each in a thread."""
    import grpc
    from prometheus_client import CollectorRegistry

    from hfl_common.attest_client import connect_verified
    from hfl_common.config import load_plan
    from hfl_common.runtime import Enclave, EnclaveOptions

    cfg = WorkerConfig(**json.loads(config_path.read_text()))
    if cfg.trainer == "noop":
        client_mod = _import_client_without_tensorflow()
    else:
        import hfl_trainer.client as client_mod
    from hfl_trainer.metrics import TrainerMetrics

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(message)s")
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING and len(warnings) < 200:
                warnings.append(record.getMessage()[:300])

    logging.getLogger().addHandler(Collect())
    plan = load_plan(Path(cfg.plan))
    with np.load(cfg.model, allow_pickle=False) as npz:
        weights = {name: npz[name] for name in npz.files}
    delta = {name: np.full_like(a, 1.0 / 1024) for name, a in weights.items()}
    recorder = _Recorder()
    clients: list[Any] = []
    registries: list[Any] = []
    # Installed first, so that a worker stopped even while its trainers attest reports.
    errors: list[str] = []
    rss_before = [proc_status_kb(os.getpid(), "VmRSS")]

    def report(stopped: bool) -> None:
        retries = sum(int(r.get_sample_value("hfl_trainer_retries_total") or 0) for r in registries)
        stop_note = ["stopped by the harness (scenario timeout)"] if stopped else []
        Path(cfg.out).write_text(
            json.dumps(
                {
                    "events": recorder.events,
                    "errors": [*errors, *stop_note],
                    "warnings": warnings,
                    "retries": retries,
                    "baseline_rss_kb": rss_before[0],
                    "peak_rss_kb": proc_status_kb(os.getpid(), "VmHWM"),
                    "trainers": len(cfg.labels),
                    "tensorflow_imported": "tensorflow" in sys.modules,
                }
            )
        )

    def on_sigterm(signum: int, frame: object) -> None:
        report(stopped=True)
        os._exit(3)

    signal.signal(signal.SIGTERM, on_sigterm)
    closers: list[Callable[[], None]] = []
    # sequential: trainer i+1 starts its download of round r once trainer i uploaded it.
    uploaded: dict[tuple[int, int], threading.Event] = {}
    uploaded_lock = threading.Lock()

    def event(index: int, round_number: int) -> threading.Event:
        with uploaded_lock:
            return uploaded.setdefault((index, round_number), threading.Event())

    for index, label in enumerate(cfg.labels):
        enclave = Enclave.open(
            EnclaveOptions(
                role="trainer",
                tee="simulated",
                policy_path=Path(cfg.policy),
                sim_platform=Path(cfg.platform),
                collateral_dir=None,
                pccs_url=None,
                isv_svn=1,
                state_dir=Path(cfg.state_dir) / label,
            ),
            None,
        )
        credentials, renewer, pinned = enclave.attest(cfg.attestation, label)
        closers += [renewer.stop, pinned.close]
        current: list[Any] = [0, ""]  # the round and kind of the last task

        def before_download(
            round_number: int, index: int = index, sequential: bool = cfg.sequential
        ) -> None:
            if sequential and index > 0:
                event(index - 1, round_number).wait(600)

        interceptor = _timing_interceptor(label, recorder, current, before_download)

        def connect(
            credentials: Any = credentials, enclave: Any = enclave, interceptor: Any = interceptor
        ) -> grpc.Channel:
            channel = connect_verified(
                cfg.aggregator,
                credentials,
                enclave.verifier,
                # bench_tiered.py points workers at relays, which trainers accept too
                ("aggregator", "relay"),
                expected_user_data=plan.sha256,
            )
            return grpc.intercept_channel(channel, interceptor)

        def on_trained(label: str = label, current: list[Any] = current) -> None:
            recorder.add(label, "downloaded", int(current[0]))

        def on_round(round_number: int, label: str = label, index: int = index) -> None:
            recorder.add(label, "uploaded", round_number)
            event(index, round_number).set()

        registry = CollectorRegistry()
        registries.append(registry)
        trainer, get_model = _make_trainer(cfg, index, delta, on_trained, recorder, label, current)
        clients.append(
            client_mod.FederationClient(
                plan,
                trainer,
                get_model or (lambda: weights),
                connect,
                label=label,
                on_round=on_round,
                metrics=TrainerMetrics.create(registry),
                backoff=client_mod.Backoff(give_up_after=600),
            )
        )
    rss_before[0] = proc_status_kb(os.getpid(), "VmRSS")

    def run(client: Any, label: str) -> None:
        try:
            client.run()
        except Exception as exc:  # reported in the worker's output
            errors.append(f"{label}: {type(exc).__name__}: {exc}"[:500])

    threads = [
        threading.Thread(target=run, args=(c, label), daemon=True)
        for c, label in zip(clients, cfg.labels, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for close in closers:
        with contextlib.suppress(Exception):
            close()
    report(stopped=False)
    return 0


# -------------------------------------------------------------------- the federation


@dataclass(frozen=True)
class Federation:
    directory: Path
    platform: Path
    policy: Path
    model_path: Path
    weights_sha256: str
    model_bytes: int


def prepare(directory: Path, weights: Weights) -> Federation:
    from hfl_cli.local import policy_toml, write_operator_key
    from hfl_common.tee import SimulatedPlatform

    directory.mkdir(parents=True, exist_ok=True)
    platform = SimulatedPlatform.load_or_create(directory / "platform")
    spki = write_operator_key(directory / "operator")
    policy = directory / "policy.toml"
    policy.write_text(policy_toml(platform, spki))
    model_path = directory / "initial_weights.npz"
    with model_path.open("wb") as f:
        np.savez(f, allow_pickle=False, **weights)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return Federation(
        directory, platform.directory, policy, model_path, digest, model_bytes(weights)
    )


def write_cifar_bin(directory: Path, train: int, test: int, seed: int = 0) -> None:
    """A CIFAR-10 set in the binary distribution format, random pixels and labels (the
    speed of a training step does not depend on them): `train` images over 5 batches."""
    folder = directory / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    record = 1 + 32 * 32 * 3
    per = -(-train // 5)
    for name, n in [*((f"data_batch_{i}.bin", per) for i in range(1, 6)), ("test_batch.bin", test)]:
        records = rng.integers(0, 256, size=(n, record), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=n)
        (folder / name).write_bytes(records.tobytes())


def prepare_keras(directory: Path, model: str, train_images: int) -> Federation:
    """A federation of a real Keras model (its initial weights made by hfl's trainer code)
    and a generated CIFAR-format data set in directory/cifar."""
    from hfl_trainer.models import initial_weights_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "keras_initial.npz"
    initial_weights_file(model, (32, 32, 3), 10, 0, path)
    with np.load(path, allow_pickle=False) as npz:
        weights = {name: npz[name] for name in npz.files}
    write_cifar_bin(directory / "cifar", train_images, 64)
    return prepare(directory, weights)


def write_plan(
    fed: Federation, name: str, trainers: int, rounds: int, model: str = "small_cnn"
) -> Path:
    shape = "[8, 8, 1]" if model == "small_cnn" else "[32, 32, 3]"
    text = (
        "[federation]\n"
        f'name = "{name}"\n'
        f"rounds = {rounds}\n"
        f"min_trainers = {trainers}\n"
        f"min_updates = {trainers}\n"
        "fraction = 1.0\n"
        "round_timeout_seconds = 900.0\n"
        "max_round_retries = 0\n"
        "seed = 0\n\n"
        "[model]\n"
        f'name = "{model}"\n'
        f"input_shape = {shape}\n"
        "num_classes = 10\n"
        f'initial_weights = "{fed.model_path.name}"\n'
        f'initial_weights_sha256 = "{fed.weights_sha256}"\n\n'
        "[data]\n"
        'dataset = "synthetic"\n\n'
        "[training]\n"
        "batch_size = 32\n"
        "learning_rate = 0.001\n"
        f"evaluate_every = {rounds}\n\n"
        "[strategy]\n"
        'name = "fedavg"\n'
    )
    path = fed.directory / f"plan-{name}.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def attestation_service(fed: Federation) -> Iterator[str]:
    """The attestation service in this process (it is idle while rounds run)."""
    from prometheus_client import CollectorRegistry

    from hfl_attestation.service import AttestationServiceConfig, start_attestation_service
    from hfl_common.runtime import Enclave, EnclaveOptions
    from hfl_common.server import ServerConfig

    registry = CollectorRegistry()
    state = fed.directory / "attestation-state"
    enclave = Enclave.open(
        EnclaveOptions("attestation", "simulated", fed.policy, fed.platform, None, None, 1, state),
        registry,
    )
    service = start_attestation_service(
        AttestationServiceConfig(
            server=ServerConfig(
                service="attestation",
                port=0,
                max_workers=16,
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
    try:
        yield f"127.0.0.1:{service.server.port}"
    finally:
        service.stop(0)


@contextlib.contextmanager
def aggregator_process(
    fed: Federation,
    plan: Path,
    attestation: str,
    env_extra: Mapping[str, str],
    log_path: Path,
    trainers: int,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    state = plan.with_suffix(".state")
    shutil.rmtree(state, ignore_errors=True)
    port_file = log_path.with_suffix(".ports.json")
    args = [
        sys.executable, "-m", "hfl_aggregator.main",
        "--plan", str(plan), "--policy", str(fed.policy), "--tee", "simulated",
        "--sim-platform", str(fed.platform), "--state-dir", str(state),
        "--attestation", attestation, "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file), "--log-json",
        # each waiting trainer's long-poll holds a worker (hfl_aggregator.main)
        "--max-workers", str(max(64, 2 * trainers + 8)),
    ]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("HFL_") and k not in _STRIPPED_ENV
    }
    env.update(env_extra)
    with log_path.open("ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"aggregator did not start: {log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        yield process, f"127.0.0.1:{ports['grpc']}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ----------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    params: int
    trainers: int
    rounds: int
    workers: int
    sequential: bool = False
    env: dict[str, str] = field(default_factory=dict)
    trainer: str = "noop"  # or "resnet50" (real TensorFlow, one trainer per process)


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def run_scenario(
    sc: Scenario,
    fed: Federation,
    attestation: str,
    workdir: Path,
    raw_bps: float,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    model_b = fed.model_bytes
    plan = write_plan(
        fed, sc.name, sc.trainers, sc.rounds, "small_cnn" if sc.trainer == "noop" else sc.trainer
    )
    log_path = workdir / f"{sc.name}.aggregator.log"
    labels = [f"{sc.name}-t{i:03d}" for i in range(sc.trainers)]
    per = math.ceil(sc.trainers / sc.workers)
    groups = [labels[i : i + per] for i in range(0, len(labels), per)]
    started = time.time()
    with aggregator_process(fed, plan, attestation, sc.env, log_path, sc.trainers) as (
        agg,
        target,
    ):
        time.sleep(1.0)  # let it settle: the idle RSS is measured before anyone joins
        # The start (plan, initial model, first checkpoint) has its own peak: recorded,
        # then VmHWM is reset, so the peak reported is that of the rounds alone.
        startup_hwm_kb = proc_status_kb(agg.pid, "VmHWM")
        hwm_reset = reset_hwm(agg.pid)
        with ProcSampler(agg.pid) as sampler:
            idle_rss_kb = sampler.samples[0].rss_kb
            workers: list[tuple[subprocess.Popen[bytes], Path]] = []
            for i, group in enumerate(groups):
                out = workdir / f"{sc.name}.worker{i}.json"
                out.unlink(missing_ok=True)
                cfg_path = workdir / f"{sc.name}.worker{i}.config.json"
                cfg = WorkerConfig(
                    plan=str(plan),
                    policy=str(fed.policy),
                    platform=str(fed.platform),
                    attestation=attestation,
                    aggregator=target,
                    state_dir=str(workdir / "trainers"),
                    model=str(fed.model_path),
                    labels=group,
                    sequential=sc.sequential,
                    out=str(out),
                    trainer=sc.trainer,
                    data_dir=str(fed.directory / "cifar"),
                    first_partition=i * per,
                    partitions=sc.trainers,
                )
                cfg_path.write_text(json.dumps(asdict(cfg)))
                with (workdir / f"{sc.name}.worker{i}.log").open("ab") as wlog:
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--worker", str(cfg_path)],
                        stdout=wlog,
                        stderr=subprocess.STDOUT,
                    )
                workers.append((proc, out))
            timed_out = False
            for proc, _ in workers:
                try:
                    proc.wait(timeout=max(1.0, timeout - (time.time() - started)))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
            if timed_out:  # workers report what they saw so far on SIGTERM
                for proc, _ in workers:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for proc, _ in workers:
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        agg_hwm_kb = proc_status_kb(agg.pid, "VmHWM")
    reports = [json.loads(out.read_text()) for _, out in workers if out.exists()]
    events = [tuple(e) for r in reports for e in r["events"]]
    result: dict[str, Any] = summarize(
        sc, model_b, raw_bps, events, reports, sampler, idle_rss_kb, agg_hwm_kb, timed_out,
        len(workers),
    )  # fmt: skip
    result["aggregator_startup_hwm_bytes"] = startup_hwm_kb * 1024
    result["aggregator_hwm_reset_after_start"] = hwm_reset
    result["aggregator_sampled_peak_rss_bytes"] = max(x.rss_kb for x in sampler.samples) * 1024
    # "seconds:MiB" of the RSS every time it moved by 1 MiB or more (sampled every
    # SAMPLE_SECONDS), and the trainers' events on the same clock: where the peak falls.
    # One string each keeps the JSON short.
    t0 = sampler.samples[0].t
    result["aggregator_rss_trace"] = " ".join(_rss_changes(sampler.samples, t0))
    result["events_since_first_sample"] = " ".join(
        f"{t:.3f}:{label}:{what}:{rnd}"
        for t, label, what, rnd in sorted((float(e[3]) - t0, e[0], e[1], e[2]) for e in events)
    )
    return result


def _rss_changes(samples: Sequence[Sample], t0: float) -> list[str]:
    out: list[str] = []
    last = -1.0
    for i, x in enumerate(samples):
        mib = x.rss_kb / 1024
        if abs(mib - last) >= 1.0 or i == len(samples) - 1:
            out.append(f"{x.t - t0:.2f}:{mib:.0f}")
            last = mib
    return out


def reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to clear_refs);
    False where the kernel refuses, and VmHWM then includes the start."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def summarize(
    sc: Scenario,
    model_b: int,
    raw_bps: float,
    events: list[tuple[Any, ...]],
    reports: list[dict[str, Any]],
    sampler: ProcSampler,
    idle_rss_kb: int,
    agg_hwm_kb: int,
    timed_out: bool,
    workers: int,
) -> dict[str, Any]:
    def first(what: str, round_number: int) -> float:
        ts = [t for (_, w, r, t) in events if w == what and r == round_number]
        return min(ts) if ts else math.nan

    # A round runs from the first TRAIN task handed out to the first next task (the next
    # round's TRAIN, or EVALUATE / DONE after the last).
    starts = [first("task_train", r) for r in range(1, sc.rounds + 1)]
    after_last = min(first("task_evaluate", sc.rounds), first("task_done", sc.rounds))
    if math.isnan(after_last):
        after_last = first("task_done", sc.rounds)
    ends = [*starts[1:], after_last]
    rounds = [e - s for s, e in zip(starts, ends, strict=True)]
    steady = [x for x in rounds[1:] if math.isfinite(x)] or [x for x in rounds if math.isfinite(x)]
    bound = sc.trainers * model_b * 2 / raw_bps
    p50 = statistics.median(steady) if steady else math.nan
    cpu_window = (starts[1], ends[-1]) if sc.rounds > 1 else (starts[0], ends[0])
    cpu = sampler.cpu_at(cpu_window[1]) - sampler.cpu_at(cpu_window[0])
    trainer_rounds = sc.trainers * (sc.rounds - 1 if sc.rounds > 1 else 1)
    cpu_per = cpu / trainer_rounds
    hwm = agg_hwm_kb * 1024
    idle = idle_rss_kb * 1024
    per_trainer_extra = [
        (r["peak_rss_kb"] - r["baseline_rss_kb"]) * 1024 / r["trainers"] / model_b
        for r in reports
        if r["trainers"]
    ]
    per_round = []
    for r, (s, e) in enumerate(zip(starts, ends, strict=True), start=1):
        if not (math.isfinite(s) and math.isfinite(e)):
            continue
        window = sampler.during(s, e) or [sampler.at(e)]
        end = sampler.at(e)
        per_round.append({"round": r, "end_rss_bytes": end.rss_kb * 1024, "end_fds": end.fds,
                          "peak_rss_bytes": max(x.rss_kb for x in window) * 1024,
                          "peak_fds": max(x.fds for x in window)})  # fmt: skip
    out: dict[str, Any] = {
        "scenario": sc.name,
        "params": sc.params,
        "model_bytes": model_b,
        "trainers": sc.trainers,
        "rounds": sc.rounds,
        "client_processes": workers,
        "aggregator_env": sc.env,
        "round_seconds": rounds,
        "round_p50_s": p50,
        "round_p99_s": _pct(steady, 99),
        "p99_over_p50": _pct(steady, 99) / p50 if steady else math.nan,
        "transport_bound_s": bound,
        "round_over_bound": p50 / bound,
        "aggregator_idle_rss_bytes": idle,
        "aggregator_peak_rss_bytes": hwm,
        "aggregator_peak_over_model": (hwm - idle) / model_b,
        "aggregator_idle_fds": sampler.samples[0].fds,
        # after every trainer process exited (or was stopped), before the aggregator stops
        "aggregator_final_fds": sampler.samples[-1].fds,
        "aggregator_final_rss_bytes": sampler.samples[-1].rss_kb * 1024,
        "aggregator_per_round": per_round,
        "aggregator_cpu_s_per_trainer_round": cpu_per,
        "aggregator_cpu_s_per_trainer_round_per_100MB": cpu_per * 100e6 / model_b,
        "client_extra_peak_per_trainer_over_model": (
            max(per_trainer_extra) if per_trainer_extra else math.nan
        ),
        # a trainer that never got its DONE task failed (or was stopped: timed_out)
        "failed_trainers": sc.trainers - len({e[0] for e in events if e[1] == "task_done"}),
        "retries": sum(r["retries"] for r in reports),
        "deadline_exceeded": sum(
            1 for r in reports for w in r["warnings"] if "DEADLINE_EXCEEDED" in w
        ),
        "errors": [e for r in reports for e in r["errors"]][:10],
        "warnings": [w for r in reports for w in r["warnings"]][:10],
        "timed_out": timed_out,
        "tensorflow_imported": any(r["tensorflow_imported"] for r in reports),
    }
    if sc.sequential:
        out.update(transfer_figures(sc, model_b, raw_bps, events))
    if sc.trainer != "noop":
        at = {(label, w, r): t for (label, w, r, t) in events}
        labels = sorted({label for (label, _, _, _) in events})
        split = []
        for r, seconds in enumerate(rounds, start=1):
            spans = [
                at[(lb, "trained", r)] - at[(lb, "downloaded", r)]
                for lb in labels
                if (lb, "trained", r) in at and (lb, "downloaded", r) in at
            ]
            training = max(spans) if spans else math.nan
            split.append({"round": r, "round_s": seconds, "training_s": training,
                          "framework_s": seconds - training})  # fmt: skip
        out["training_split"] = split
    return out


def transfer_figures(
    sc: Scenario, model_b: int, raw_bps: float, events: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """Lone downloads and uploads of the trainers that take turns (rounds 2..R)."""
    at = {(label, w, r): t for (label, w, r, t) in events}
    labels = sorted({label for (label, _, _, _) in events})
    downloads: list[float] = []
    uploads: list[float] = []
    closing: list[float] = []
    for r in range(2 if sc.rounds > 1 else 1, sc.rounds + 1):
        for i, label in enumerate(labels):
            d0, d1 = at.get((label, "download_start_train", r)), at.get((label, "downloaded", r))
            u1 = at.get((label, "uploaded", r))
            if d0 is None or d1 is None or u1 is None:
                continue
            downloads.append(d1 - d0)
            (closing if i == len(labels) - 1 else uploads).append(u1 - d1)
    raw_s = model_b / raw_bps
    down = statistics.median(downloads) if downloads else math.nan
    up = statistics.median(uploads) if uploads else math.nan
    close = statistics.median(closing) if closing else math.nan
    return {
        "raw_tls_seconds_for_model": raw_s,
        "download_s": down,
        "upload_s": up,
        "closing_upload_s": close,
        "download_over_raw_tls": raw_s / down,
        "upload_over_raw_tls": raw_s / up,
        "round_close_extra_s": close - up,
    }


# -------------------------------------------------------------------------- reporting


def _f(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "-"


def markdown(result: dict[str, Any]) -> str:
    raw = result["raw_tls"]
    lines = [
        f"# End-to-end benchmark ({result['label']})",
        "",
        f"{result['machine']}; {result['when']}; real processes (aggregator subprocess, "
        "no-op trainers using the real client over mutual RA-TLS, simulated TEE).",
        f"Raw TLS on loopback ({raw['cipher']}): "
        f"{raw['bytes_per_second'] / 1e6:.0f} MB/s (median of "
        f"{len(raw['seconds'])} x {raw['bytes'] / 1e6:.0f} MB at the start of this run; "
        "each scenario's bound uses its own raw-TLS rate, measured just before it).",
        "",
    ]
    transfers = [s for s in result["scenarios"] if "download_s" in s]
    if transfers:
        lines += [
            "| transfer | model | download | vs raw TLS | upload | vs raw TLS | "
            "round close (aggregate + checkpoint) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in transfers:
            lines.append(
                f"| {s['scenario']} | {s['model_bytes'] / 1e6:.0f} MB | {_f(s['download_s'])} s"
                f" | {_f(s['download_over_raw_tls'])}x | {_f(s['upload_s'])} s | "
                f"{_f(s['upload_over_raw_tls'])}x | {_f(s['round_close_extra_s'])} s |"
            )
        lines.append("")
    for s in result["scenarios"]:
        if "training_split" not in s:
            continue
        lines += [
            f"{s['scenario']}: {s['trainers']} TensorFlow trainers, real training of "
            f"{s['params'] / 1e6:.1f}M params on CIFAR-format images",
            "",
            "| round | round | training (slower trainer) | framework (round - training) |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['round']} | {_f(r['round_s'])} s | {_f(r['training_s'])} s | "
            f"{_f(r['framework_s'])} s |"
            for r in s["training_split"]
        ]
        lines.append("")
    lines += [
        "| scenario | agg env | model | trainers | raw TLS | round p50 | p99 | bound | "
        "p50 / bound | "
        "agg start peak | agg idle RSS | agg peak RSS | (peak - idle) / model | "
        "agg CPU s / trainer-round (per 100 MB) | client extra / trainer / model | failed | "
        "retries |",
        "| " + " | ".join(["---"] * 17) + " |",
    ]
    for s in result["scenarios"]:
        env = ", ".join(f"{k}={v}" for k, v in s["aggregator_env"].items()) or "none"
        lines.append(
            f"| {s['scenario']} | {env} | "
            f"{s['model_bytes'] / 1e6:.0f} MB | {s['trainers']} | "
            f"{s['raw_tls_bytes_per_second'] / 1e6:.0f} MB/s | {_f(s['round_p50_s'])} s | "
            f"{_f(s['round_p99_s'])} s | {_f(s['transport_bound_s'])} s | "
            f"{_f(s['round_over_bound'])}x | "
            f"{s.get('aggregator_startup_hwm_bytes', math.nan) / 1e6:.0f} MB | "
            f"{s['aggregator_idle_rss_bytes'] / 1e6:.0f} MB | "
            f"{s['aggregator_peak_rss_bytes'] / 1e6:.0f} MB | "
            f"{_f(s['aggregator_peak_over_model'])}x | "
            f"{_f(s['aggregator_cpu_s_per_trainer_round'], '.3f')} "
            f"({_f(s['aggregator_cpu_s_per_trainer_round_per_100MB'], '.3f')}) | "
            f"{_f(s['client_extra_peak_per_trainer_over_model'])}x | "
            f"{s['failed_trainers']} | {s['retries']} |"
        )
    for s in result["scenarios"]:
        if not s.get("aggregator_per_round"):
            continue
        lines += [
            "",
            f"{s['scenario']}: the aggregator's RSS and open file descriptors per round "
            f"(idle before anyone joined: {s['aggregator_idle_rss_bytes'] / 1e6:.0f} MB, "
            f"{s['aggregator_idle_fds']} fds; once every trainer was done: "
            f"{s['aggregator_final_rss_bytes'] / 1e6:.0f} MB, {s['aggregator_final_fds']} fds)",
            "",
            "| round | RSS at end | peak RSS | fds at end | peak fds |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['round']} | {r['end_rss_bytes'] / 1e6:.0f} MB | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} MB | {r['end_fds']} | {r['peak_fds']} |"
            for r in s["aggregator_per_round"]
        ]
    return "\n".join(lines) + "\n"


def _git_label() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = proc_meminfo_gb()
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GB RAM, Linux {os.uname().release}"


def proc_meminfo_gb() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return math.nan


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.quick:
        p = 200_000
        return [
            Scenario("transfer-quick", p, 2, 2, 1, sequential=True, env=launcher_env()),
            Scenario("rounds-quick-n2", p, 2, 2, 2, env=launcher_env()),
            Scenario("env-quick-n2", p, 2, 2, 2, env=contrast_env()),
            Scenario("scale-quick-n8", p, 8, 2, 2, env=launcher_env()),
        ]
    big, rounds = args.params, args.rounds
    out: list[Scenario] = []
    if "transfer" in args.only:
        out.append(Scenario("transfer", big, 2, rounds, 1, sequential=True, env=launcher_env()))
    if "rounds" in args.only:
        out += [
            Scenario(f"rounds-n{n}", big, n, rounds if n <= 8 else 3, min(n, 4), env=launcher_env())
            for n in args.trainers
        ]
    if "env" in args.only:
        out.append(Scenario("env-n8", big, 8, rounds, 4, env=contrast_env()))
    if "resnet" in args.only:
        out.append(Scenario("resnet50-tf", 0, 2, rounds, 2, env=launcher_env(), trainer="resnet50"))
    if "scale" in args.only:
        out.append(
            Scenario("scale-n256", SMALL_PARAMS, 256, args.scale_rounds, 8, env=launcher_env())
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    p.add_argument("--params", type=int, default=RESNET50_PARAMS)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--scale-rounds", type=int, default=3, help="rounds of the scale scenario")
    p.add_argument("--trainers", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument(
        "--train-images", type=int, default=256, help="resnet: CIFAR-format images, all trainers"
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=["transfer", "rounds", "env", "scale"],
        choices=["transfer", "rounds", "env", "scale", "resnet"],
    )
    p.add_argument("--label", default="", help="names the result files (default: git commit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds a scenario may run (then: stalled)"
    )
    p.add_argument(
        "--append", action="store_true", help="keep the other scenarios of an earlier run"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    label = args.label or _git_label()
    todo = scenarios(args)
    workdir = Path(tempfile.mkdtemp(prefix="hfl-bench-e2e-"))
    by_params: dict[int, Federation] = {}
    stem = f"e2e-{label}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    earlier: list[dict[str, Any]] = []
    if args.append and (args.out / f"{stem}.json").exists():
        earlier = json.loads((args.out / f"{stem}.json").read_text())["scenarios"]
    results: list[dict[str, Any]] = []
    document: dict[str, Any] = {}

    def save(raw: dict[str, Any], complete: bool) -> None:
        names = {r["scenario"] for r in results}
        document.update(
            label=label,
            when=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            machine=_machine(),
            load_average=os.getloadavg(),
            quick=args.quick,
            complete=complete,
            raw_tls=raw,
            scenarios=[r for r in earlier if r["scenario"] not in names] + results,
        )
        (args.out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(document))

    try:
        largest = max(s.params for s in todo) or RESNET50_PARAMS
        raw_bytes = model_bytes(make_model(largest)) if not args.quick else 50_000_000
        raw = raw_tls_rate(raw_bytes, 5, workdir)
        log.info("raw TLS: %.0f MB/s", raw["bytes_per_second"] / 1e6)
        for sc in todo:
            fed = by_params.get(sc.params)
            if fed is None and sc.trainer != "noop":
                fed = prepare_keras(workdir / f"fed-{sc.trainer}", sc.trainer, args.train_images)
                sc.params = fed.model_bytes // 4
            elif fed is None:
                fed = by_params[sc.params] = prepare(
                    workdir / f"fed-{sc.params}", make_model(sc.params)
                )
            # The bound of each scenario is measured just before it: the machine's load
            # drifts over a run (2 shared cores), the ratio should not.
            here = raw_tls_rate(max(fed.model_bytes, 50_000_000), 3, workdir)
            with attestation_service(fed) as attestation:
                log.info("scenario %s ...", sc.name)
                result = run_scenario(
                    sc, fed, attestation, workdir, here["bytes_per_second"], args.timeout
                )
            result["raw_tls_bytes_per_second"] = here["bytes_per_second"]
            result["load_average_after"] = os.getloadavg()
            log.info("%s", json.dumps({k: v for k, v in result.items() if k != "warnings"}))
            results.append(result)
            save(raw, complete=False)  # a long run keeps what it measured so far
        raw_after = raw_tls_rate(raw_bytes, 5, workdir)
        raw["bytes_per_second_after"] = raw_after["bytes_per_second"]
        save(raw, complete=True)
    finally:
        if args.keep:
            log.info("work directory kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(document))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        raise SystemExit(run_worker(Path(sys.argv[2])))
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-tls-sender":
        port_file, cert, key, nbytes, repeats = sys.argv[2:7]
        raw_tls_sender(Path(port_file), Path(cert), Path(key), int(nbytes), int(repeats))
        raise SystemExit(0)
    raise SystemExit(main())
