"""The plan and policy file formats: valid files parse, invalid ones name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfl_common.config import TrustRoot, load_plan, load_policy, parse_plan, parse_policy
from hfl_common.errors import ConfigError

SHA = "ab" * 32

PLAN = f"""
[federation]
name = "digits"
rounds = 5
min_trainers = 2

[model]
name = "small_cnn"
input_shape = [8, 8, 1]
num_classes = 10
initial_weights = "init.npz"
initial_weights_sha256 = "{SHA}"

[strategy]
name = "fedadam"
server_lr = 0.01
beta1 = 0.9
"""

POLICY = f"""
[trust]
root = "simulation"
simulation_root_sha256 = "{SHA}"
accepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
rejected_advisories = ["INTEL-SA-00334"]

[roles.aggregator]
mrenclave = ["{"11" * 32}"]
isv_prod_id = 2
min_isv_svn = 1

[roles.trainer]
mrsigner = ["{"22" * 32}"]

[operators]
spki_sha256 = ["{"33" * 32}"]
"""


def test_plan_parses_with_defaults_and_resolves_weights_path(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    plan = load_plan(path)
    assert plan.rounds == 5
    assert plan.min_updates == 2
    assert plan.strategy.name == "fedadam"
    # resolved: the defaults of the parameters the file left out are filled in
    assert plan.strategy.params == {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert plan.model.initial_weights == tmp_path / "init.npz"
    assert plan.update_kind == "delta"
    assert plan.data.dataset == "digits"


def test_plan_hash_ignores_formatting_but_not_values() -> None:
    a = parse_plan(PLAN)
    b = parse_plan("# a comment\n" + PLAN.replace("rounds = 5", "rounds   =   5"))
    c = parse_plan(PLAN.replace("rounds = 5", "rounds = 6"))
    assert a.sha256 == b.sha256
    assert a.sha256 != c.sha256
    assert len(a.sha256_hex) == 64


def test_plan_hash_covers_the_initial_weights_digest_not_their_path() -> None:
    a = parse_plan(PLAN)
    moved = parse_plan(PLAN.replace('"init.npz"', '"/elsewhere/init.npz"'))
    other = parse_plan(PLAN.replace(SHA, "cd" * 32))
    assert a.sha256 == moved.sha256
    assert a.sha256 != other.sha256


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("rounds = 5", "rounds = 0"), "plan: [federation] rounds must be at least 1, got 0"),
        (("rounds = 5", 'rounds = "5"'), "plan: [federation] rounds must be an integer"),
        (('name = "fedadam"', 'name = "fedmagic"'), "plan: [strategy] name must be one of"),
        (("beta1 = 0.9", "beta1 = [0.9]"), "plan: [strategy] beta1 must be a number or a string"),
        (
            ("num_classes = 10", "num_classes = 10\ncolour = 1"),
            "plan: [model] colour is not a known key",
        ),
        (("input_shape = [8, 8, 1]", "input_shape = [8, 0]"), "[model] input_shape must be"),
        ((f'"{SHA}"', '"abc"'), "plan: [model] initial_weights_sha256 must be hexadecimal"),
        (("min_trainers = 2", "min_trainers = 2\nmin_updates = 3"), "min_updates (3) cannot"),
        (("[strategy]", "[privacy]\nnoise_multiplier = 1.0\n[strategy]"), "needs clip_norm > 0"),
    ],
)
def test_invalid_plan_names_the_key(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_plan(PLAN.replace(*edit))
    assert message in str(err.value)


def test_plan_hash_covers_resolved_strategy_parameters() -> None:
    explicit = PLAN.replace("beta1 = 0.9", "beta1 = 0.9\nbeta2 = 0.99\ntau = 0.001")
    assert parse_plan(explicit).sha256 == parse_plan(PLAN).sha256
    changed = PLAN.replace("beta1 = 0.9", "beta1 = 0.9\ntau = 0.01")
    assert parse_plan(changed).sha256 != parse_plan(PLAN).sha256
    assert parse_plan(PLAN).canonical["strategy"]["tau"] == 1e-3


def test_async_plan_parses_its_table_into_the_hash() -> None:
    text = PLAN.replace("min_trainers = 2", 'min_trainers = 2\nmode = "async"')
    plan = parse_plan(text + '\n[async]\nbuffer_size = 3\nstaleness = "hinge"\n')
    assert (plan.mode, plan.asynchronous.buffer_size, plan.asynchronous.staleness) == (
        "async",
        3,
        "hinge",
    )
    assert plan.canonical["async"]["buffer_size"] == 3
    other = parse_plan(text + "\n[async]\nbuffer_size = 4\n")
    assert other.sha256 != plan.sha256


def test_async_table_without_async_mode_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"\[async\] buffer_size applies only with federation.mode"
    ):
        parse_plan(PLAN + "\n[async]\nbuffer_size = 3\n")


def test_robust_strategy_in_async_mode_is_refused_at_plan_load() -> None:
    text = PLAN.replace("min_trainers = 2", 'min_trainers = 2\nmode = "async"').replace(
        'name = "fedadam"\nserver_lr = 0.01\nbeta1 = 0.9', 'name = "median"'
    )
    with pytest.raises(
        ConfigError, match=r"strategy 'median' supports federation\.mode = sync, not 'async'"
    ):
        parse_plan(text)


def test_missing_plan_table_is_named() -> None:
    with pytest.raises(ConfigError, match=r"table \[model\] is required"):
        parse_plan("[federation]\nrounds = 1\n")


def test_unreadable_and_malformed_plan_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the federation plan"):
        load_plan(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_plan(bad)


def test_policy_parses_roles_trust_and_operators(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    policy = load_policy(path)
    assert policy.trust_root is TrustRoot.SIMULATION
    assert policy.simulation_root_sha256 == bytes.fromhex(SHA)
    assert policy.accepted_tcb_statuses == {"UpToDate", "SWHardeningNeeded"}
    assert policy.rejected_advisories == {"INTEL-SA-00334"}
    assert policy.allow_debug is False
    agg = policy.roles["aggregator"]
    assert agg.mrenclave == (bytes.fromhex("11" * 32),)
    assert agg.isv_prod_id == 2
    assert agg.min_isv_svn == 1
    assert policy.roles["trainer"].isv_prod_id is None
    assert policy.operator_spki_sha256 == {bytes.fromhex("33" * 32)}
    assert policy.certificate_lifetime_seconds == 3600
    assert len(policy.sha256) == 32


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('root = "simulation"', 'root = "someone"'), "[trust] root must be one of intel"),
        ((f'simulation_root_sha256 = "{SHA}"\n', ""), "simulation_root_sha256 is required when"),
        (('"SWHardeningNeeded"', '"Fine"'), "accepted_tcb_statuses has unknown status 'Fine'"),
        (("[roles.trainer]", "[roles.janitor]"), "[roles] janitor is not a role"),
        (("min_isv_svn = 1", "min_isv_svn = -1"), "[roles.aggregator] min_isv_svn must be at"),
        ((f'mrsigner = ["{"22" * 32}"]', ""), "[roles.trainer] mrenclave or mrsigner must list"),
        ((f'mrenclave = ["{"11" * 32}"]', 'mrenclave = ["1111"]'), "must be 32 bytes (64 hex"),
        (("[operators]", "[operators]\nallow = true"), "[operators] allow is not a known key"),
    ],
)
def test_invalid_policy_names_the_key(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy(POLICY.replace(*edit), "policy.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("policy.toml: ")


def test_intel_policy_needs_no_simulation_pin() -> None:
    text = POLICY.replace('root = "simulation"', 'root = "intel"').replace(
        f'simulation_root_sha256 = "{SHA}"\n', ""
    )
    policy = parse_policy(text)
    assert policy.trust_root is TrustRoot.INTEL
    assert policy.simulation_root_sha256 is None
