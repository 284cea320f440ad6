"""The files a federation needs, made for a local run: platform, policy, plan, operator key.

`hfl run` and `hfl init` write, into one directory:

    platform/        the simulated SGX machine (development root, PCK chain, collateral)
    policy.toml      expected identities of the three services, measured from this code
    plan.toml        the federation plan, pinning initial_weights.npz by SHA-256
    operator/key.pem the operator's key (for `hfl status` and grpcurl); its SPKI hash is
                     the only operator key the policy admits
    parties/         one enrolled party per trainer ("party-1", ...): its private
                     enrolment key; the policy lists each party's public key

With a federation project (`PlanOptions.project`, `hfl run --project DIR`), the plan
is the project's own plan.toml with what only a run can add: the initial weights
that the project's model function builds (and their SHA-256), the number of
trainers and, if given, the rounds; the policy's trainer identity covers the
project's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_common.config import MODELS, parse_plan
from hfl_common.enrolment import PartySigner, public_key_text
from hfl_common.errors import ConfigError
from hfl_common.tee import SimulatedPlatform
from hfl_common.tee.identities import SERVICE_PACKAGES, service_identity
from hfl_common.tee.simulation import ROLE_ISV_PROD_ID

DEFAULT_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}


@dataclass(frozen=True)
class PlanOptions:
    trainers: int = 2
    rounds: int = 10
    model: str = "small_cnn"
    dataset: str = "digits"
    strategy: str = "fedavg"
    partition: str = "iid"
    alpha: float = 0.5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    encoding: str = "raw"
    seed: int = 0
    round_timeout: float = 300.0
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    # Central DP in the aggregator (docs/privacy.md): on when central_noise_multiplier > 0.
    central_noise_multiplier: float = 0.0
    central_clip_norm: float = 1.0
    max_epsilon: float = 0.0
    # The delta epsilon is stated at (0: the plan's default, 1 / parties^1.1).
    dp_delta: float = 0.0
    synthetic_examples: int = 256
    strategy_params: tuple[tuple[str, float], ...] = ()
    # "sync" or "async"; buffer_size is the asynchronous buffer (1: apply each update).
    mode: str = "sync"
    buffer_size: int = 1
    max_staleness: int = 10
    evaluate_every: int = 1
    # A federation project directory: its plan.toml replaces the options above, except
    # `trainers` and `rounds` (None: the project plan's rounds).
    project: Path | None = None
    project_rounds: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.dataset in DEFAULT_SHAPES:
            return DEFAULT_SHAPES[self.dataset]
        return (8, 8, 1) if self.model == "small_cnn" else (32, 32, 3)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_operator_key(directory: Path) -> bytes:
    """Make the operator's EC P-384 key (0600); return the SHA-256 of its SPKI."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(directory / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return operator_spki_sha256(directory / "key.pem")


def operator_spki_sha256(key_path: Path) -> bytes:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def party_name(trainer_index: int) -> str:
    """The party a local federation enrols for trainer `trainer_index` (0-based)."""
    return f"party-{trainer_index + 1}"


def party_key_path(directory: Path, party: str) -> Path:
    """Where a local federation keeps a party's private enrolment key."""
    return directory / "parties" / f"{party}.key.pem"


def write_party_keys(directory: Path, trainers: int) -> dict[str, str]:
    """One party per local trainer: its Ed25519 enrolment key (0600) in `directory`/parties;
    return each party's public key as the policy writes it."""
    (directory / "parties").mkdir(parents=True, exist_ok=True)
    public: dict[str, str] = {}
    for index in range(trainers):
        signer = PartySigner.generate(party_name(index))
        path = party_key_path(directory, signer.party)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_pem())
        public[signer.party] = public_key_text(signer.key)
    return public


def policy_toml(
    platform: SimulatedPlatform,
    operator_spki: bytes | None,
    isv_svn: int = 1,
    parties: Mapping[str, str] | None = None,
    project: Path | None = None,
) -> str:
    """A simulation policy naming the measured identity of each service of this code
    (the trainer's with the project's files, when there is a project), and the enrolled
    `parties` (name -> base64 DER public enrolment key)."""
    lines = [
        "# hfl attestation policy for a simulated (development) federation.",
        "# Generated by `hfl run` / `hfl init` from the code installed here: each MRENCLAVE is",
        '# the hash of that service\'s code. A production policy has root = "intel".',
        "",
        "[trust]",
        'root = "simulation"',
        f'simulation_root_sha256 = "{platform.root_sha256.hex()}"',
        'accepted_tcb_statuses = ["UpToDate"]',
        "rejected_advisories = []",
        "allow_debug = false",
        "",
    ]
    for role in SERVICE_PACKAGES:
        identity = service_identity(role, platform, isv_svn, project if role == "trainer" else None)
        lines += [
            f"[roles.{role}]",
            f'mrenclave = ["{identity.mrenclave.hex()}"]',
            f'mrsigner = ["{identity.mrsigner.hex()}"]',
            f"isv_prod_id = {ROLE_ISV_PROD_ID[role]}",
            f"min_isv_svn = {isv_svn}",
            "",
        ]
    lines += ["[operators]"]
    lines += [f'spki_sha256 = ["{operator_spki.hex()}"]' if operator_spki else "spki_sha256 = []"]
    lines += ["", "[certificates]", "lifetime_seconds = 3600", ""]
    for name, key in sorted((parties or {}).items()):
        lines += [f"[parties.{name}]", f'public_key = "{key}"', ""]
    return "\n".join(lines)


# The magnitude defence every generated plan carries (docs/security.md, "Magnitude
# defence"): an update may move the model by at most UPDATE_NORM_FACTOR times the
# initial model's L2 norm; the aggregate by AGGREGATE_HEADROOM * sqrt(trainers) times
# that (coordinate-wise rules can reach sqrt(n) times the largest update, server
# momentum 1 / (1 - 0.9) = 10 times one step).
UPDATE_NORM_FACTOR = 10.0
AGGREGATE_HEADROOM = 10.0
MIN_UPDATE_NORM = 1.0


@dataclass(frozen=True)
class MagnitudeBounds:
    max_norm: float
    max_aggregate_norm: float


def magnitude_bounds(
    initial_norm: float, trainers: int, central_noise_norm: float = 0.0
) -> MagnitudeBounds:
    """The plan's update and aggregate L2 bounds, derived from the initial model's norm.

    `central_noise_norm` is the L2 norm central DP's Gaussian noise may add to the
    aggregate (`central_dp_noise_allowance`): the aggregate bound makes room for it, or
    every noised round would be refused.
    """
    max_norm = max(MIN_UPDATE_NORM, UPDATE_NORM_FACTOR * initial_norm)
    aggregate = AGGREGATE_HEADROOM * math.sqrt(max(1, trainers)) * max_norm + central_noise_norm
    return MagnitudeBounds(
        max_norm=float(f"{max_norm:.6g}"), max_aggregate_norm=float(f"{aggregate:.6g}")
    )


def central_dp_noise_allowance(opts: PlanOptions, weights: Mapping[str, Any]) -> float:
    """Twice the expected L2 norm of central DP's noise on the mean when a single party is
    sampled (the worst case): z * C * sqrt(parameters) * 2. Zero without central DP."""
    if opts.central_noise_multiplier <= 0:
        return 0.0
    params = sum(
        int(np.asarray(a).size) for a in weights.values() if np.asarray(a).dtype.kind == "f"
    )
    return 2.0 * opts.central_noise_multiplier * opts.central_clip_norm * math.sqrt(params)


def weights_norm(weights: Mapping[str, Any]) -> float:
    """The L2 norm over every floating-point tensor of a model's weights."""
    total = 0.0
    for array in weights.values():
        a = np.asarray(array)
        if a.dtype.kind == "f":
            total += float(np.sum(np.square(a, dtype=np.float64)))
    return math.sqrt(total)


def plan_toml(
    opts: PlanOptions,
    weights_file: str,
    weights_sha256: str,
    non_trainable: list[str],
    bounds: MagnitudeBounds | None = None,
) -> str:
    if opts.model not in MODELS:
        raise ConfigError(f"unknown model {opts.model!r}; models are {', '.join(MODELS)}")
    strategy = {"name": opts.strategy, **dict(opts.strategy_params)}
    sections: dict[str, dict[str, object]] = {
        "federation": {
            "name": f"local-{opts.dataset}-{opts.model}",
            "rounds": opts.rounds,
            "min_trainers": opts.trainers,
            "min_updates": opts.trainers,
            "round_timeout_seconds": opts.round_timeout,
            "max_round_retries": 2,
            "seed": opts.seed,
            "mode": opts.mode,
        },
        "model": {
            "name": opts.model,
            "input_shape": list(opts.input_shape),
            "num_classes": 10,
            "initial_weights": weights_file,
            "initial_weights_sha256": weights_sha256,
            "non_trainable": non_trainable,
        },
        "data": {
            "dataset": opts.dataset,
            "partition": opts.partition,
            "dirichlet_alpha": opts.alpha,
            "synthetic_examples": opts.synthetic_examples,
        },
        "training": {
            "local_epochs": opts.local_epochs,
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "optimizer": opts.optimizer,
            "evaluate_every": opts.evaluate_every,
        },
        "strategy": strategy,
        "update": {"encoding": opts.encoding}
        | (
            {}
            if bounds is None
            else {"max_norm": bounds.max_norm, "max_aggregate_norm": bounds.max_aggregate_norm}
        ),
        "privacy": {
            "clip_norm": opts.clip_norm,
            "noise_multiplier": opts.noise_multiplier,
            "max_epsilon": opts.max_epsilon,
            **({"delta": opts.dp_delta} if opts.dp_delta > 0 else {}),
        },
    }
    if opts.central_noise_multiplier > 0:
        sections["privacy.central"] = {
            "noise_multiplier": opts.central_noise_multiplier,
            "clip_norm": opts.central_clip_norm,
        }
    if opts.mode == "async":
        sections["async"] = {
            "buffer_size": opts.buffer_size,
            "max_staleness": opts.max_staleness,
        }
    out = ["# hfl federation plan (generated by `hfl run` / `hfl init`)."]
    for name, values in sections.items():
        out.append(f"\n[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (native libraries write there
    directly, past Python's sys.stderr); Python's own errors still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class Prepared:
    directory: Path
    platform: Path
    policy: Path
    plan: Path
    operator_dir: Path
    project: Path | None = None


PROJECT_PLAN = "plan.toml"


def toml_document(data: Mapping[str, Any], header: str = "") -> str:
    """TOML text of nested tables of plain values (what a plan holds)."""
    out = [header] if header else []

    def table(path: str, values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        if path:
            out.append(f"\n[{path}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, Mapping):
                table(f"{path}.{k}" if path else k, v)

    table("", data)
    return "\n".join(out).lstrip("\n") + "\n"


def _project_plan(opts: PlanOptions, project: Path) -> dict[str, Any]:
    path = project / PROJECT_PLAN
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the project's plan ({exc.strerror or exc}); "
            "`hfl new DIR` writes one"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    federation = data.setdefault("federation", {})
    if not isinstance(federation, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path}: needs a [federation] and a [model] table")
    federation["min_trainers"] = opts.trainers
    federation["min_updates"] = min(
        int(federation.get("min_updates", opts.trainers)), opts.trainers
    )
    if opts.project_rounds is not None:
        federation["rounds"] = opts.project_rounds
    federation.setdefault("rounds", opts.rounds)
    return data


def _prepare_project_plan(directory: Path, opts: PlanOptions, project: Path) -> None:
    """Write plan.toml and initial_weights.npz for a project, built by its model function."""
    with _native_stderr_silenced():
        from hfl_trainer.models import get_weights, model_spec, trainable_spec, weights_npz_bytes
        from hfl_trainer.project import build, use_project

    use_project(project)
    data = _project_plan(opts, project)
    source = str(project / PROJECT_PLAN)
    model_table = data["model"]
    model_table.update(
        initial_weights="initial_weights.npz", initial_weights_sha256="0" * 64, non_trainable=[]
    )
    draft = parse_plan(toml_document(data), source, base_dir=directory)
    with _native_stderr_silenced():
        model = build(draft.model, draft.seed)
    weights = weights_npz_bytes(get_weights(model))
    (directory / "initial_weights.npz").write_bytes(weights)
    trainable = {name for name, _, _ in trainable_spec(model)}
    model_table["initial_weights_sha256"] = hashlib.sha256(weights).hexdigest()
    model_table["non_trainable"] = [n for n, _, _ in model_spec(model) if n not in trainable]
    # The project's own bounds win; a project without them gets the derived ones.
    update_table = data.setdefault("update", {})
    if isinstance(update_table, dict):
        bounds = magnitude_bounds(weights_norm(get_weights(model)), opts.trainers)
        update_table.setdefault("max_norm", bounds.max_norm)
        update_table.setdefault("max_aggregate_norm", bounds.max_aggregate_norm)
    text = toml_document(
        data,
        f"# hfl federation plan: {source} with the initial weights its model function built.",
    )
    parse_plan(text, str(directory / "plan.toml"), base_dir=directory)
    (directory / "plan.toml").write_text(text)


def prepare(directory: Path, opts: PlanOptions) -> Prepared:
    """Write platform, policy, plan, initial weights and operator key into `directory`."""
    # TensorFlow is needed only to make the initial weights; import it late, and keep
    # its C++ start-up notices (absl, oneDNN) off the user's terminal.
    with _native_stderr_silenced():
        from hfl_trainer.models import (
            build_model,
            get_weights,
            initial_weights_file,
            model_spec,
            trainable_spec,
        )

    directory.mkdir(parents=True, exist_ok=True)
    project = opts.project.resolve() if opts.project is not None else None
    if project is not None:
        _prepare_project_plan(directory, opts, project)
    platform = SimulatedPlatform.load_or_create(directory / "platform")
    operator_dir = directory / "operator"
    spki = write_operator_key(operator_dir)
    parties = write_party_keys(directory, opts.trainers)
    (directory / "policy.toml").write_text(
        policy_toml(platform, spki, parties=parties, project=project)
    )
    if project is not None:
        return Prepared(
            directory,
            directory / "platform",
            directory / "policy.toml",
            directory / "plan.toml",
            operator_dir,
            project,
        )
    with _native_stderr_silenced():
        digest = initial_weights_file(
            opts.model, opts.input_shape, 10, opts.seed, directory / "initial_weights.npz"
        )
        model = build_model(opts.model, opts.input_shape, 10, opts.seed)
    trainable = {name for name, _, _ in trainable_spec(model)}
    non_trainable = [name for name, _, _ in model_spec(model) if name not in trainable]
    weights = get_weights(model)
    bounds = magnitude_bounds(
        weights_norm(weights), opts.trainers, central_dp_noise_allowance(opts, weights)
    )
    if opts.central_noise_multiplier > 0:
        # Central DP clips every update to its clip norm C before it counts: that is the
        # per-update bound. (Trained from a noised model, an honest update can be far
        # larger than twice the initial model, and would be refused.)
        bounds = MagnitudeBounds(max_norm=0.0, max_aggregate_norm=bounds.max_aggregate_norm)
    (directory / "plan.toml").write_text(
        plan_toml(opts, "initial_weights.npz", digest, non_trainable, bounds)
    )
    return Prepared(
        directory,
        directory / "platform",
        directory / "policy.toml",
        directory / "plan.toml",
        operator_dir,
    )
