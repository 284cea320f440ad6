"""Configuration files, as frozen dataclasses: the federation plan and the attestation policy.

Both are TOML files that the parties agree on. Each is parsed once, in main(),
and passed down. An invalid file gives one ConfigError naming the file and the
key ("plan.toml: [strategy] strategy 'trimmed_mean' parameter 'beta' must be
in [0, 0.5), got 0.7"). Strategy parameters are resolved (defaults filled in,
by hfl_common.strategy_registry) before the plan is hashed.

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
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_common.enrolment import PartyPublicKey, parse_public_key_text
from hfl_common.errors import ConfigError
from hfl_common.identity import NAME_RE
from hfl_common.strategy_registry import (
    STRATEGY_NAMES,
    central_dp_strategies,
    check_central_dp,
    check_mode,
    resolve_params,
    strategy_spec,
)

ROLES = ("attestation", "aggregator", "trainer", "relay")

# The strategy names, parameters and defaults: hfl_common.strategy_registry.
STRATEGIES = STRATEGY_NAMES
MODELS = ("small_cnn", "resnet20", "resnet56", "resnet50")
DATASETS = ("digits", "cifar10", "synthetic", "table", "images", "npz")
# The built-in models and datasets are ordinary entry points ("module:function"),
# resolved exactly like a project's own (hfl_trainer.project); the short names are
# spellings of these entries.
BUILTIN_MODEL_ENTRIES = {name: f"hfl_trainer.models:{name}" for name in MODELS}
BUILTIN_DATA_ENTRIES = {
    "digits": "hfl_trainer.data:digits",
    "cifar10": "hfl_trainer.data:cifar10",
    "synthetic": "hfl_trainer.data:synthetic_data",
    "table": "hfl_trainer.loaders:table",
    "images": "hfl_trainer.loaders:image_folder",
    "npz": "hfl_trainer.loaders:npz",
}
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
    # Enrolled parties by name ([parties.<name>]); empty: trainers need no enrolment.
    parties: Mapping[str, PartyPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class PartyPolicy:
    """An enrolled party (organisation): its name and its public enrolment key.

    A trainer certificate names this party only for an enclave key the party's key
    signed an enrolment for (hfl_common.enrolment).
    """

    name: str
    public_key: PartyPublicKey = field(repr=False)


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
    parties = _parse_parties(top.table("parties"))
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
        parties=parties,
    )


def _parse_parties(table: _Table) -> dict[str, PartyPolicy]:
    """[parties.<name>] public_key = "<base64 DER SubjectPublicKeyInfo>" for each party."""
    parties: dict[str, PartyPolicy] = {}
    keys: dict[str, str] = {}
    for name in sorted(table.data):
        if not NAME_RE.fullmatch(name):
            raise table.error(
                name,
                "is not a valid party name (lowercase letters, digits and '-', starting with "
                "a letter, at most 63 characters)",
            )
        t = table.table(name)
        text = t.get_str("public_key")
        key = parse_public_key_text(text, f"{table.source}: [parties.{name}] public_key")
        t.finish()
        if text.strip() in keys:
            raise t.error(
                "public_key", f"is also party {keys[text.strip()]}'s key; one key per party"
            )
        keys[text.strip()] = name
        parties[name] = PartyPolicy(name, key)
    return parties


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
    # The function that builds the model ("package.module:function"; a built-in
    # name resolves to BUILTIN_MODEL_ENTRIES) and the keyword parameters it gets.
    entry: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataPlan:
    dataset: str
    partition: str
    dirichlet_alpha: float
    # Examples per trainer for the synthetic dataset.
    synthetic_examples: int
    # The function that loads this party's data ("package.module:function"; a
    # built-in dataset name resolves to BUILTIN_DATA_ENTRIES) and its parameters.
    entry: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportPlan:
    """Who takes the trained model home: trainer labels, or "*" for every trainer."""

    receivers: tuple[str, ...] = ("*",)

    def receives(self, label: str) -> bool:
        return "*" in self.receivers or label in self.receivers


@dataclass(frozen=True)
class RelayPlan:
    """A tiered federation (`[relays]`): relays serve groups of trainers under the root.

    The root runs the plan's [federation] thresholds over its participants (the relays,
    and any trainer joining it directly); each relay runs `group_min_trainers` /
    `group_min_updates` over its own group, with every live trainer of the group in each
    round. An update may claim at most `max_examples_per_trainer` examples, and a relay's
    partial aggregate at most `max_group_size` times that: the root refuses more, so a
    relay cannot outweigh the trainers it could really have behind it.
    """

    group_min_trainers: int
    group_min_updates: int
    max_group_size: int
    max_examples_per_trainer: int

    @property
    def max_relay_examples(self) -> int:
        """The largest example count a relay's partial aggregate may carry."""
        return self.max_group_size * self.max_examples_per_trainer


# Why only mean-type strategies run over relays (docs/architecture.md, "Relays").
RELAY_STRATEGY_NOTE = (
    "a relay forwards the weighted mean of its group's updates, and the weighted mean of "
    "weighted means is the mean of them all, so FedAvg-family rules give the flat "
    "federation's model; a robust rule at the root would see one mean per relay (its "
    "median or Krum is not the rule over the trainers), and one per relay would be "
    "averaged again at the root"
)


def _parse_relays(r: _Table, *, strategy: str, mode: str, privacy_mode: str) -> RelayPlan | None:
    if not r.data:
        return None
    group_min = r.get_int("group_min_trainers", lo=1)
    group_updates = r.get_int("group_min_updates", default=group_min, lo=1)
    if group_updates > group_min:
        raise r.error(
            "group_min_updates",
            f"({group_updates}) cannot exceed group_min_trainers ({group_min})",
        )
    max_group = r.get_int("max_group_size", lo=1)
    if max_group < group_min:
        raise r.error(
            "max_group_size", f"({max_group}) cannot be below group_min_trainers ({group_min})"
        )
    per_trainer = r.get_int("max_examples_per_trainer", lo=1)
    r.finish()
    if mode != "sync":
        raise r.error(
            "group_min_trainers",
            'relays need federation.mode = "sync": a relay forwards one partial aggregate '
            "per round of the root",
        )
    if not strategy_spec(strategy).central_dp:
        raise r.error(
            "group_min_trainers",
            f"relays cannot run strategy {strategy!r}: {RELAY_STRATEGY_NOTE}; use one of "
            + ", ".join(central_dp_strategies()),
        )
    if privacy_mode == "central":
        raise r.error(
            "group_min_trainers",
            "relays cannot run with central DP: the root would clip and noise per relay "
            "aggregate, and its epsilon would be about relays, not trainers; use client-side "
            "DP ([privacy] clip_norm and noise_multiplier), which the trainers apply before "
            "anything leaves them (docs/privacy.md)",
        )
    return RelayPlan(group_min, group_updates, max_group, per_trainer)


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
    # Every parameter of the strategy, checked and with defaults filled in by
    # hfl_common.strategy_registry when the plan is parsed: the plan hash covers them.
    params: Mapping[str, float | int | str]


@dataclass(frozen=True)
class UpdatePlan:
    encoding: str
    # Refuse updates whose global L2 norm exceeds this (0 = no bound).
    max_norm: float
    # Scale down, rather than refuse, updates over max_norm.
    clip: bool
    # Refuse an aggregate that moves the global model by more than this L2 norm
    # (0 = only check that it is finite).
    max_aggregate_norm: float = 0.0


# Strategies central DP can account: they combine the round's updates by their
# (weighted) mean, so the aggregator can clip each update to C, add Gaussian noise
# calibrated to C to the sum, and hand the noised mean to the server optimiser.
CENTRAL_DP_STRATEGIES = central_dp_strategies()
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


STALENESS_RULES = ("constant", "polynomial", "hinge")


@dataclass(frozen=True)
class AsyncPlan:
    """Asynchronous aggregation (federation.mode = "async"): the [async] table.

    The server buffers `buffer_size` updates and applies them together (1: apply
    each update as it arrives, the reference's asynchronous parameter server;
    K > 1: FedBuff, Nguyen et al. AISTATS 2022). An update computed from model
    version v arriving when the model is at version V has staleness tau = V - v;
    its weight is num_examples * s(tau), with s given by `staleness`:
    constant 1; polynomial (1 + tau)^-exponent; hinge 1 for tau <= hinge_b, else
    1 / (hinge_a * (tau - hinge_b) + 1). Updates with tau > max_staleness are refused.
    """

    buffer_size: int = 1
    staleness: str = "polynomial"
    exponent: float = 0.5
    hinge_a: float = 10.0
    hinge_b: int = 4
    max_staleness: int = 10


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
    # "sync" (rounds with a barrier) or "async" (a buffer, see AsyncPlan); in async
    # mode `rounds` counts model versions (applied buffers).
    mode: str = "sync"
    asynchronous: AsyncPlan = field(default_factory=AsyncPlan)
    # A trainer not heard from for this long is lost: not sampled, and a round it
    # was sampled for goes on without it.
    liveness_seconds: float = 60.0
    # The voting unit is the party: at most this many of its trainers are active.
    max_trainers_per_party: int = 1
    export: ExportPlan = field(default_factory=ExportPlan)
    # A tiered federation's relays; None: trainers report to the root directly.
    relays: RelayPlan | None = None

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
    mode = fed.get_str("mode", default="sync", choices=("sync", "async"))
    liveness = fed.get_float("liveness_seconds", default=60.0, lo=1.0)
    per_party = fed.get_int("max_trainers_per_party", default=1, lo=1)
    fed.finish()

    m = top.table("model", required=True)
    model_entry, model_name = _entry_or_name(m, "name", MODELS, BUILTIN_MODEL_ENTRIES, None)
    model_params = _params(m)
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
    data_entry, dataset = _entry_or_name(d, "dataset", DATASETS, BUILTIN_DATA_ENTRIES, "digits")
    data_params = _params(d)
    data_plan = DataPlan(
        dataset=dataset,
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
    try:
        params = resolve_params(strategy_name, params)
        check_mode(strategy_name, mode)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [strategy] {exc}") from None

    u = top.table("update")
    update = UpdatePlan(
        encoding=u.get_str("encoding", default="raw", choices=ENCODINGS),
        max_norm=u.get_float("max_norm", default=0.0, lo=0.0),
        clip=u.get_bool("clip", False),
        max_aggregate_norm=u.get_float("max_aggregate_norm", default=0.0, lo=0.0),
    )
    u.finish()

    privacy = _parse_privacy(
        top.table("privacy"),
        strategy=strategy_name,
        non_trainable=non_trainable,
        min_trainers=min_trainers,
        min_updates=min_updates,
        fraction=fraction,
        mode=mode,
    )

    a = top.table("async")
    asynchronous = AsyncPlan(
        buffer_size=a.get_int("buffer_size", default=1, lo=1),
        staleness=a.get_str("staleness", default="polynomial", choices=STALENESS_RULES),
        exponent=a.get_float("exponent", default=0.5, lo=0.0),
        hinge_a=a.get_float("hinge_a", default=10.0, lo=0.0),
        hinge_b=a.get_int("hinge_b", default=4, lo=0),
        max_staleness=a.get_int("max_staleness", default=10, lo=0),
    )
    a.finish()
    if mode == "sync" and a.data:
        raise a.error(sorted(a.data)[0], 'applies only with federation.mode = "async"')
    e = top.table("export")
    receivers = e.str_list("receivers") if "receivers" in e.data else ("*",)
    export = ExportPlan(receivers=receivers)
    e.finish()
    relays = _parse_relays(
        top.table("relays"), strategy=strategy_name, mode=mode, privacy_mode=privacy.mode
    )
    top.finish()

    model_canonical: dict[str, Any] = {
        "name": model_name,
        "input_shape": list(shape_raw),
        "num_classes": num_classes,
        # The weights are identified by their digest, not by where they lie.
        "initial_weights_sha256": weights_sha.lower(),
        "non_trainable": list(non_trainable),
    }
    data_canonical: dict[str, Any] = {
        "dataset": data_plan.dataset,
        "partition": data_plan.partition,
        "dirichlet_alpha": data_plan.dirichlet_alpha,
        "synthetic_examples": data_plan.synthetic_examples,
    }
    # A project's entry points and every parameter are part of the plan's identity.
    # Built-ins without parameters keep the canonical form they always had.
    for section, entry, builtin, given in (
        (model_canonical, model_entry, BUILTIN_MODEL_ENTRIES.get(model_name), model_params),
        (data_canonical, data_entry, BUILTIN_DATA_ENTRIES.get(dataset), data_params),
    ):
        if entry != builtin:
            section["entry"] = entry
        if given:
            section["params"] = dict(given)
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
            "mode": mode,
            "liveness_seconds": liveness,
            "max_trainers_per_party": per_party,
        },
        "model": model_canonical,
        "data": data_canonical,
        "training": training.__dict__,
        "strategy": {"name": strategy_name, **params},
        "update": update.__dict__,
        "privacy": _privacy_canonical(privacy),
    }
    if mode == "async":
        canonical["async"] = asynchronous.__dict__
    if export.receivers != ("*",):
        canonical["export"] = {"receivers": list(export.receivers)}
    if relays is not None:
        canonical["relays"] = relays.__dict__
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
            entry=model_entry,
            params=model_params,
        ),
        data=DataPlan(
            dataset=data_plan.dataset,
            partition=data_plan.partition,
            dirichlet_alpha=data_plan.dirichlet_alpha,
            synthetic_examples=data_plan.synthetic_examples,
            entry=data_entry,
            params=data_params,
        ),
        training=training,
        strategy=StrategyPlan(name=strategy_name, params=params),
        update=update,
        privacy=privacy,
        canonical=canonical,
        mode=mode,
        asynchronous=asynchronous,
        liveness_seconds=liveness,
        max_trainers_per_party=per_party,
        export=export,
        relays=relays,
    )


_ENTRY_PATTERN = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)


def _entry_or_name(
    t: _Table,
    name_key: str,
    names: tuple[str, ...],
    entries: Mapping[str, str],
    default: str | None,
) -> tuple[str, str]:
    """(entry point, name) of a [model] or [data] table: `entry` or a built-in `name_key`.

    A project names its function (`entry = "myproject.model:build"`); a built-in is named
    by its short name, which is a spelling of its entry point. Giving both is an error.
    """
    has_entry = "entry" in t.data
    has_name = name_key in t.data
    if has_entry and has_name:
        raise t.error("entry", f"and {name_key} are exclusive; give one of them")
    if has_entry:
        entry = t.get_str("entry")
        if not _ENTRY_PATTERN.match(entry):
            raise t.error("entry", f'must look like "package.module:function", got {entry!r}')
        return entry, entry
    if not has_name and default is None:
        raise t.error(
            name_key,
            f"is required: a built-in ({', '.join(names)}) or "
            'entry = "package.module:function" (your own)',
        )
    name = t.get_str(name_key, default=default, choices=names)
    return entries[name], name


def _params(t: _Table) -> Mapping[str, Any]:
    """The [<section>.params] table: keyword parameters for the entry point, as given."""
    params = t.table("params")
    for key, value in params.data.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise params.error(key, "must be a Python identifier (it is a keyword argument)")
        _check_param_value(params, key, value)
        params.used.add(key)
    return dict(sorted(params.data.items()))


def _check_param_value(t: _Table, key: str, value: Any) -> None:
    if isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise t.error(key, f"must be finite, got {value}")
        return
    if isinstance(value, list):
        for item in value:
            _check_param_value(t, key, item)
        return
    if isinstance(value, dict):
        for item in value.values():
            _check_param_value(t, key, item)
        return
    raise t.error(key, f"must be a string, number, boolean, list or table, got {value!r}")


def _parse_privacy(
    p: _Table,
    *,
    strategy: str,
    non_trainable: tuple[str, ...],
    min_trainers: int,
    min_updates: int,
    fraction: float,
    mode: str,
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
        central = _parse_central(
            c, strategy, non_trainable, min_updates, fraction, population, mode
        )
        c.finish()
    if max_epsilon > 0 and central is None and noise_multiplier == 0:
        raise p.error(
            "max_epsilon",
            "needs differential privacy to account: set noise_multiplier (client-side) or "
            "a [privacy.central] table",
        )
    if max_epsilon > 0 and mode != "sync":
        raise p.error(
            "max_epsilon",
            'needs federation.mode = "sync": in asynchronous mode a trainer may send several '
            "updates per applied buffer, so the aggregator cannot count each party's releases "
            "(each trainer logs its own client-side epsilon)",
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
    mode: str,
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
    try:
        check_central_dp(strategy, mode)
    except ConfigError as exc:
        raise c.error("noise_multiplier", str(exc)) from None
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
    }
    if privacy.mode == "none":
        # Without DP the accounting settings change nothing: the canonical form (and
        # the plan hash) stays what it was before they existed.
        return out
    out |= {
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
