"""Configuration files, as frozen dataclasses: the federation plan and the attestation policy.

Both are TOML files that the parties agree on. Each is parsed once, in main(),
and passed down. An invalid file gives one ConfigError naming the file and the
key ("plan.toml: [strategy] trim_fraction must be in [0, 0.5), got 0.7").

The canonical form of the plan (sorted-key JSON of the parsed values, see
`FederationPlan.canonical_json`) is what gets hashed into the aggregator's
attestation evidence (report_data[32:64]), so formatting and comments in the
file do not change the plan's identity; every value does.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_common.errors import ConfigError

ROLES = ("attestation", "aggregator", "trainer")

STRATEGIES = (
    "fedsgd",
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "median",
    "trimmed_mean",
    "krum",
    "multikrum",
)
MODELS = ("small_cnn", "resnet20", "resnet56", "resnet50")
DATASETS = ("digits", "cifar10", "synthetic")
ENCODINGS = ("raw", "float16", "bfloat16", "int8")


class _Table:
    """Typed access to one TOML table, with errors that name the file and the key."""

    def __init__(self, source: str, path: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.source}: [{self.path}] {key}" if self.path else f"{self.source}: {key}"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self._where(key)} {message}")

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self._where(key)} is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {what}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {what}, got {value!r}")
        return value

    def get_str(self, key: str, default: Any = None, choices: tuple[str, ...] = ()) -> str:
        value: str = self._get(key, _REQUIRED if default is None else default, (str,), "a string")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def get_int(
        self, key: str, default: Any = None, lo: int | None = None, hi: int | None = None
    ) -> int:
        value: int = self._get(key, _REQUIRED if default is None else default, (int,), "an integer")
        if lo is not None and value < lo:
            raise self.error(key, f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.error(key, f"must be at most {hi}, got {value}")
        return value

    def get_float(
        self,
        key: str,
        default: Any = None,
        lo: float | None = None,
        hi: float | None = None,
        hi_open: bool = False,
    ) -> float:
        value = self._get(key, _REQUIRED if default is None else default, (int, float), "a number")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value}")
        if lo is not None and value < lo:
            raise self.error(key, f"must be at least {lo}, got {value}")
        if hi is not None and (value >= hi if hi_open else value > hi):
            bound = f"below {hi}" if hi_open else f"at most {hi}"
            raise self.error(key, f"must be {bound}, got {value}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, (bool,), "true or false")
        return value

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self._get(key, [], (list,), "a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def hex_list(self, key: str, size: int) -> tuple[bytes, ...]:
        out = []
        for item in self.str_list(key):
            out.append(_hex(self, key, item, size))
        return tuple(out)

    def table(self, key: str, required: bool = False) -> _Table:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: table [{_join(self.path, key)}] is required")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return _Table(self.source, _join(self.path, key), value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "is not a known key (check its spelling)")


_REQUIRED: Any = object()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _hex(table: _Table, key: str, value: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise table.error(key, f"must be hexadecimal, got {value!r}") from None
    if len(raw) != size:
        raise table.error(key, f"must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


def _load_toml(path: Path, what: str) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        return raw, tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


# --------------------------------------------------------------------------
# Attestation policy
# --------------------------------------------------------------------------


class TrustRoot(enum.Enum):
    """Which root a quote's PCK chain must end in."""

    INTEL = "intel"
    SIMULATION = "simulation"


@dataclass(frozen=True)
class RolePolicy:
    """The expected enclave identity of one role.

    Empty tuples mean "not checked"; at least one of mrenclave and mrsigner is set.
    """

    mrenclave: tuple[bytes, ...]
    mrsigner: tuple[bytes, ...]
    isv_prod_id: int | None
    min_isv_svn: int


@dataclass(frozen=True)
class AttestationPolicy:
    """What the parties agreed a genuine, acceptable enclave of each role looks like."""

    roles: Mapping[str, RolePolicy]
    accepted_tcb_statuses: frozenset[str]
    rejected_advisories: frozenset[str]
    allow_debug: bool
    trust_root: TrustRoot
    simulation_root_sha256: bytes | None
    operator_spki_sha256: frozenset[bytes]
    certificate_lifetime_seconds: int
    sha256: bytes = b""
    text: str = field(default="", repr=False)


# dcap-qvl's names for TCB statuses (Intel PCS "tcbStatus" values).
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


def parse_policy(text: str, source: str = "policy") -> AttestationPolicy:
    """Parse policy TOML text; `source` names the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = _Table(source, "", data)
    trust = top.table("trust", required=True)
    root = TrustRoot(trust.get_str("root", choices=tuple(r.value for r in TrustRoot)))
    sim_pin = trust.get_str("simulation_root_sha256", default="")
    sim_root = _hex(trust, "simulation_root_sha256", sim_pin, 32) if sim_pin else None
    if root is TrustRoot.SIMULATION and sim_root is None:
        raise trust.error(
            "simulation_root_sha256",
            'is required when root = "simulation" (it pins the development root)',
        )
    statuses = trust.str_list("accepted_tcb_statuses") or ("UpToDate",)
    for status in statuses:
        if status not in TCB_STATUSES:
            raise trust.error(
                "accepted_tcb_statuses", f"has unknown status {status!r}; known: {TCB_STATUSES}"
            )
    advisories = trust.str_list("rejected_advisories")
    allow_debug = trust.get_bool("allow_debug", False)
    trust.finish()

    roles_table = top.table("roles", required=True)
    roles: dict[str, RolePolicy] = {}
    for role in sorted(roles_table.data):
        if role not in ROLES:
            raise roles_table.error(role, f"is not a role; roles are {', '.join(ROLES)}")
        t = roles_table.table(role)
        mrenclave = t.hex_list("mrenclave", 32)
        mrsigner = t.hex_list("mrsigner", 32)
        if not mrenclave and not mrsigner:
            raise t.error("mrenclave", "or mrsigner must list at least one expected value")
        prod = t.get_int("isv_prod_id", default=-1, lo=-1, hi=0xFFFF)
        roles[role] = RolePolicy(
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            isv_prod_id=None if prod < 0 else prod,
            min_isv_svn=t.get_int("min_isv_svn", default=0, lo=0, hi=0xFFFF),
        )
        t.finish()
    operators = top.table("operators")
    op_keys = frozenset(operators.hex_list("spki_sha256", 32))
    operators.finish()
    certs = top.table("certificates")
    lifetime = certs.get_int("lifetime_seconds", default=3600, lo=60, hi=7 * 24 * 3600)
    certs.finish()
    top.finish()
    return AttestationPolicy(
        roles=roles,
        accepted_tcb_statuses=frozenset(statuses),
        rejected_advisories=frozenset(advisories),
        allow_debug=allow_debug,
        trust_root=root,
        simulation_root_sha256=sim_root,
        operator_spki_sha256=op_keys,
        certificate_lifetime_seconds=lifetime,
        sha256=hashlib.sha256(text.encode()).digest(),
        text=text,
    )


def load_policy(path: Path) -> AttestationPolicy:
    raw, _ = _load_toml(path, "attestation policy")
    return parse_policy(raw.decode("utf-8"), str(path))


# --------------------------------------------------------------------------
# Federation plan
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    # The initial global weights (.npz) and their SHA-256: every party starts
    # from the same, agreed model. Relative paths are relative to the plan file.
    initial_weights: Path
    initial_weights_sha256: str
    # Variables that are not trained by gradients (BatchNorm moving statistics).
    # In FedSGD their values travel in the update and are averaged, not stepped.
    non_trainable: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataPlan:
    dataset: str
    partition: str
    dirichlet_alpha: float
    # Examples per trainer for the synthetic dataset.
    synthetic_examples: int


@dataclass(frozen=True)
class TrainingPlan:
    local_epochs: int
    local_steps: int
    batch_size: int
    learning_rate: float
    optimizer: str
    evaluate_every: int


@dataclass(frozen=True)
class StrategyPlan:
    name: str
    # Checked by the aggregator's strategy factory, which knows each strategy's
    # parameters (server_lr, momentum, beta1, beta2, tau, proximal_mu, beta, f, m, ...).
    params: Mapping[str, float | int | str]


@dataclass(frozen=True)
class UpdatePlan:
    encoding: str
    # Refuse updates whose global L2 norm exceeds this (0 = no bound).
    max_norm: float
    # Scale down, rather than refuse, updates over max_norm.
    clip: bool


# Strategies central DP can account: they combine the round's updates by their
# (weighted) mean, so the aggregator can clip each update to C, add Gaussian noise
# calibrated to C to the sum, and hand the noised mean to the server optimiser.
CENTRAL_DP_STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedsgd",
)
SAMPLINGS = ("fixed", "poisson")


@dataclass(frozen=True)
class CentralDPPlan:
    """Central differential privacy, enforced by the aggregator (see docs/privacy.md).

    Each round the aggregator clips every update to L2 norm `clip_norm`, sums them
    with equal weight, adds N(0, (noise_multiplier * clip_norm)^2) to every
    coordinate of the sum and divides by the number of trainers sampled.
    """

    noise_multiplier: float
    clip_norm: float
    # Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
    # Adaptive Clipping"): clip_norm is the initial value, moved each round towards
    # the `target_quantile` of the update norms, from a count noised with
    # N(0, clipped_count_stddev^2).
    adaptive_clipping: bool
    target_quantile: float
    clip_learning_rate: float
    clipped_count_stddev: float
    # How trainers are sampled each round: "fixed" (the plan's fraction of the active
    # trainers, uniformly without replacement). "poisson" is refused at load.
    sampling: str


@dataclass(frozen=True)
class PrivacyPlan:
    # Client-side DP: each trainer clips its own update and adds Gaussian noise.
    clip_norm: float
    noise_multiplier: float
    # Accounting, for either mode: delta (0 before parsing is resolved to
    # 1 / population**1.1), the number of parties N, and the budget (0 = none).
    delta: float = 0.0
    population: int = 0
    max_epsilon: float = 0.0
    central: CentralDPPlan | None = None

    @property
    def mode(self) -> str:
        """ "central", "client" (trainers add noise) or "none". Central wins when both are set."""
        if self.central is not None:
            return "central"
        if self.noise_multiplier > 0:
            return "client"
        return "none"


@dataclass(frozen=True)
class FederationPlan:
    name: str
    rounds: int
    min_trainers: int
    min_updates: int
    fraction: float
    round_timeout_seconds: float
    max_round_retries: int
    seed: int
    model: ModelPlan
    data: DataPlan
    training: TrainingPlan
    strategy: StrategyPlan
    update: UpdatePlan
    privacy: PrivacyPlan
    canonical: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def update_kind(self) -> str:
        """ "gradient" for FedSGD (the parameter-server workflow), else "delta"."""
        return "gradient" if self.strategy.name == "fedsgd" else "delta"

    def canonical_json(self) -> bytes:
        return json.dumps(self.canonical, sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.canonical_json()).digest()

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()


def parse_plan(text: str, source: str = "plan", base_dir: Path | None = None) -> FederationPlan:
    """Parse plan TOML text; relative paths resolve against `base_dir`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = _Table(source, "", data)
    fed = top.table("federation", required=True)
    name = fed.get_str("name", default="hfl")
    rounds = fed.get_int("rounds", lo=1, hi=100_000)
    min_trainers = fed.get_int("min_trainers", default=2, lo=1)
    min_updates = fed.get_int("min_updates", default=min_trainers, lo=1)
    if min_updates > min_trainers:
        raise fed.error(
            "min_updates", f"({min_updates}) cannot exceed min_trainers ({min_trainers})"
        )
    fraction = fed.get_float("fraction", default=1.0, lo=0.0, hi=1.0)
    if fraction <= 0:
        raise fed.error("fraction", "must be above 0")
    timeout = fed.get_float("round_timeout_seconds", default=300.0, lo=1.0)
    retries = fed.get_int("max_round_retries", default=2, lo=0)
    seed = fed.get_int("seed", default=0, lo=0)
    fed.finish()

    m = top.table("model", required=True)
    model_name = m.get_str("name", choices=MODELS)
    shape_raw = m._get("input_shape", _REQUIRED, (list,), "a list of positive integers")
    if not shape_raw or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape_raw
    ):
        raise m.error("input_shape", f"must be a list of positive integers, got {shape_raw!r}")
    num_classes = m.get_int("num_classes", lo=2)
    weights = m.get_str("initial_weights")
    weights_sha = m.get_str("initial_weights_sha256")
    non_trainable = m.str_list("non_trainable")
    _hex(m, "initial_weights_sha256", weights_sha, 32)
    m.finish()
    weights_path = Path(weights)
    if not weights_path.is_absolute() and base_dir is not None:
        weights_path = base_dir / weights_path

    d = top.table("data")
    data_plan = DataPlan(
        dataset=d.get_str("dataset", default="digits", choices=DATASETS),
        partition=d.get_str("partition", default="iid", choices=("iid", "dirichlet")),
        dirichlet_alpha=d.get_float("dirichlet_alpha", default=0.5, lo=1e-3),
        synthetic_examples=d.get_int("synthetic_examples", default=512, lo=1),
    )
    d.finish()

    t = top.table("training")
    training = TrainingPlan(
        local_epochs=t.get_int("local_epochs", default=1, lo=1),
        local_steps=t.get_int("local_steps", default=1, lo=1),
        batch_size=t.get_int("batch_size", default=32, lo=1),
        learning_rate=t.get_float("learning_rate", default=0.05, lo=0.0),
        optimizer=t.get_str("optimizer", default="sgd", choices=("sgd", "adam")),
        evaluate_every=t.get_int("evaluate_every", default=1, lo=1),
    )
    t.finish()

    s = top.table("strategy")
    strategy_name = s.get_str("name", default="fedavg", choices=STRATEGIES)
    params: dict[str, float | int | str] = {}
    for key in sorted(s.data):
        if key == "name":
            continue
        value = s.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise s.error(key, f"must be a number or a string, got {value!r}")
        params[key] = value
        s.used.add(key)
    s.finish()

    u = top.table("update")
    update = UpdatePlan(
        encoding=u.get_str("encoding", default="raw", choices=ENCODINGS),
        max_norm=u.get_float("max_norm", default=0.0, lo=0.0),
        clip=u.get_bool("clip", False),
    )
    u.finish()

    privacy = _parse_privacy(
        top.table("privacy"),
        strategy=strategy_name,
        non_trainable=non_trainable,
        min_trainers=min_trainers,
        min_updates=min_updates,
        fraction=fraction,
    )
    top.finish()

    canonical = {
        "federation": {
            "name": name,
            "rounds": rounds,
            "min_trainers": min_trainers,
            "min_updates": min_updates,
            "fraction": fraction,
            "round_timeout_seconds": timeout,
            "max_round_retries": retries,
            "seed": seed,
        },
        "model": {
            "name": model_name,
            "input_shape": list(shape_raw),
            "num_classes": num_classes,
            # The weights are identified by their digest, not by where they lie.
            "initial_weights_sha256": weights_sha.lower(),
            "non_trainable": list(non_trainable),
        },
        "data": data_plan.__dict__,
        "training": training.__dict__,
        "strategy": {"name": strategy_name, **params},
        "update": update.__dict__,
        "privacy": _privacy_canonical(privacy),
    }
    return FederationPlan(
        name=name,
        rounds=rounds,
        min_trainers=min_trainers,
        min_updates=min_updates,
        fraction=fraction,
        round_timeout_seconds=timeout,
        max_round_retries=retries,
        seed=seed,
        model=ModelPlan(
            name=model_name,
            input_shape=tuple(shape_raw),
            num_classes=num_classes,
            initial_weights=weights_path,
            initial_weights_sha256=weights_sha.lower(),
            non_trainable=non_trainable,
        ),
        data=data_plan,
        training=training,
        strategy=StrategyPlan(name=strategy_name, params=params),
        update=update,
        privacy=privacy,
        canonical=canonical,
    )


def _parse_privacy(
    p: _Table,
    *,
    strategy: str,
    non_trainable: tuple[str, ...],
    min_trainers: int,
    min_updates: int,
    fraction: float,
) -> PrivacyPlan:
    """The [privacy] table and its [privacy.central] sub-table, with every combination
    the accountant cannot state refused here, at plan load."""
    clip_norm = p.get_float("clip_norm", default=0.0, lo=0.0)
    noise_multiplier = p.get_float("noise_multiplier", default=0.0, lo=0.0)
    if noise_multiplier > 0 and clip_norm == 0:
        raise p.error("noise_multiplier", "needs clip_norm > 0 (noise is scaled to the clip norm)")
    population = p.get_int("population", default=0, lo=0)
    if population == 0:
        population = min_trainers
    elif population < min_trainers:
        raise p.error(
            "population",
            f"({population}) is the number of parties; it cannot be below min_trainers "
            f"({min_trainers})",
        )
    delta = p.get_float("delta", default=0.0, lo=0.0, hi=1.0, hi_open=True)
    if delta == 0:
        delta = 1.0 / population**1.1
    max_epsilon = p.get_float("max_epsilon", default=0.0, lo=0.0)
    central = None
    if "central" in p.data:
        c = p.table("central")
        central = _parse_central(c, strategy, non_trainable, min_updates, fraction, population)
        c.finish()
    if max_epsilon > 0 and central is None and noise_multiplier == 0:
        raise p.error(
            "max_epsilon",
            "needs differential privacy to account: set noise_multiplier (client-side) or "
            "a [privacy.central] table",
        )
    p.finish()
    return PrivacyPlan(
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        delta=delta,
        population=population,
        max_epsilon=max_epsilon,
        central=central,
    )


def _parse_central(
    c: _Table,
    strategy: str,
    non_trainable: tuple[str, ...],
    min_updates: int,
    fraction: float,
    population: int,
) -> CentralDPPlan:
    z = c.get_float("noise_multiplier", lo=0.0)
    if z <= 0:
        raise c.error("noise_multiplier", "must be above 0 (it is the noise that makes it private)")
    clip = c.get_float("clip_norm", lo=0.0)
    if clip <= 0:
        raise c.error("clip_norm", "must be above 0")
    adaptive = c.get_bool("adaptive_clipping", False)
    quantile = c.get_float("target_quantile", default=0.5, lo=0.0, hi=1.0)
    if not 0.0 < quantile < 1.0:
        raise c.error("target_quantile", f"must lie strictly between 0 and 1, got {quantile}")
    clip_lr = c.get_float("clip_learning_rate", default=0.2, lo=0.0)
    if adaptive and clip_lr <= 0:
        raise c.error("clip_learning_rate", "must be above 0 with adaptive_clipping")
    # Andrew et al. 2021 (section 3) suggest sigma_b = expected participants / 20.
    expected = max(min_updates, math.ceil(fraction * population))
    count_std = c.get_float("clipped_count_stddev", default=0.0, lo=0.0)
    if adaptive and count_std == 0:
        count_std = expected / 20.0
    if not adaptive:
        count_std = 0.0
    sampling = c.get_str("sampling", default="fixed", choices=SAMPLINGS)
    if sampling == "poisson":
        raise c.error(
            "sampling",
            '"poisson" cannot be run by this aggregator: a Poisson draw may select fewer '
            "trainers than min_updates (or none), and the round engine then retries, which "
            'the Poisson accountant does not cover; use "fixed" (fraction of the active '
            "trainers, uniformly at random, accounted as sampling without replacement)",
        )
    if strategy not in CENTRAL_DP_STRATEGIES:
        raise c.error(
            "noise_multiplier",
            f"cannot be accounted with strategy {strategy!r}: central DP adds noise calibrated "
            "to one trainer's clipped share of the SUM of the updates, and robust rules "
            "(median, trimmed mean, Krum) do not aggregate by a sum, so that noise bounds "
            "nothing they release; use one of " + ", ".join(CENTRAL_DP_STRATEGIES),
        )
    if strategy == "fedsgd" and non_trainable:
        raise c.error(
            "noise_multiplier",
            "cannot be accounted with fedsgd on a model with non-trainable variables "
            f"({', '.join(non_trainable)}): FedSGD averages their values outside the clipped, "
            "noised sum, so they would be released without noise",
        )
    return CentralDPPlan(
        noise_multiplier=z,
        clip_norm=clip,
        adaptive_clipping=adaptive,
        target_quantile=quantile,
        clip_learning_rate=clip_lr,
        clipped_count_stddev=count_std,
        sampling=sampling,
    )


def _privacy_canonical(privacy: PrivacyPlan) -> dict[str, Any]:
    out: dict[str, Any] = {
        "clip_norm": privacy.clip_norm,
        "noise_multiplier": privacy.noise_multiplier,
        "delta": privacy.delta,
        "population": privacy.population,
        "max_epsilon": privacy.max_epsilon,
    }
    if privacy.central is not None:
        out["central"] = dict(privacy.central.__dict__)
    return out


def load_plan(path: Path) -> FederationPlan:
    raw, _ = _load_toml(path, "federation plan")
    return parse_plan(raw.decode("utf-8"), str(path), base_dir=path.parent)
