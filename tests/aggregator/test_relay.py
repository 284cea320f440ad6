"""Relays (hierarchical aggregation): real services, real gRPC over mutual RA-TLS on loopback.

A relay is `build_aggregator` with `relay_upstream` (role relay); the root is an ordinary
aggregator whose plan has a [relays] table. Trainers are fedkit's hand-driven
TestTrainers, so every update is known exactly and the same updates can be sent flat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from hfl_aggregator.main import AggregatorConfig, RunningAggregator, build_aggregator
from hfl_attestation.service import RunningAttestationService
from hfl_common.api import aggregator_pb2
from hfl_common.config import parse_plan
from hfl_common.errors import ConfigError, PermissionDeniedError
from tests import fedkit

Weights = dict[str, npt.NDArray[Any]]
RELAY_TIMEOUT = 60.0

# Trainer label -> examples it claims; two groups of two behind two relays.
GROUPS = {"relay-a": {"a1": 100, "a2": 300}, "relay-b": {"b1": 50, "b2": 250}}
EXAMPLES = {label: n for group in GROUPS.values() for label, n in group.items()}


def relays_table(group: int = 2, max_group: int = 2, per_trainer: int = 1000) -> str:
    return (
        "\n[relays]\n"
        f"group_min_trainers = {group}\n"
        f"max_group_size = {max_group}\n"
        f"max_examples_per_trainer = {per_trainer}\n"
    )


def write_plan(files: fedkit.FederationFiles, spec: fedkit.PlanSpec, extra: str = "") -> Path:
    text = spec.toml(files.initial_weights.name, files.initial_weights_sha256) + extra
    path = files.directory / f"plan-{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml"
    path.write_text(text)
    return path


def start_relay(
    files: fedkit.FederationFiles,
    plan: Path,
    state_dir: Path,
    attestation: str,
    root: str,
    label: str,
) -> RunningAggregator:
    config = AggregatorConfig(
        enclave=files.enclave_options("relay", state_dir),
        plan_path=plan,
        attestation=attestation,
        label=label,
        listen="127.0.0.1:0",
        metrics_listen=None,
        tick_seconds=0.1,
        grace_seconds=0.5,
        relay_upstream=root,
    )
    return build_aggregator(config, CollectorRegistry())


def update_for(label: str, round_number: int, template: Weights) -> Weights:
    """Trainer `label`'s update in `round_number`: small float32 values, not dyadic."""
    seed = int.from_bytes(hashlib.sha256(f"{label}/{round_number}".encode()).digest()[:8])
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(a.shape) * 0.05).astype(a.dtype) for name, a in template.items()
    }


def train_loss_of(label: str, round_number: int) -> float:
    """The training loss trainer `label` reports in `round_number` (differs per trainer)."""
    return 0.1 * (1 + sorted(EXAMPLES).index(label)) + 1.0 / round_number


def run_trainer(
    trainer: fedkit.TestTrainer, template: Weights, errors: list[BaseException]
) -> None:
    """Answer TRAIN with this trainer's update and EVALUATE with a fixed report until DONE."""
    try:
        while True:
            task = trainer.get_task(5)
            if task.kind == aggregator_pb2.TASK_KIND_DONE:
                return
            if task.kind == aggregator_pb2.TASK_KIND_TRAIN:
                trainer.upload(
                    update_for(trainer.label, task.round, template),
                    task,
                    chunk_bytes=1 << 16,
                    train_loss=train_loss_of(trainer.label, task.round),
                )
            elif task.kind == aggregator_pb2.TASK_KIND_EVALUATE:
                trainer.report_eval(task, loss=0.25, accuracy=0.5)
    except BaseException as exc:  # handed to the test thread
        errors.append(exc)


def drive(trainers: list[fedkit.TestTrainer], template: Weights) -> None:
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=run_trainer, args=(t, template, errors), daemon=True)
        for t in trainers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RELAY_TIMEOUT * 2)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a trainer did not finish"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> fedkit.FederationFiles:
    return fedkit.prepare_files(tmp_path_factory.mktemp("relay"))


@pytest.fixture(scope="module")
def attestation(files: fedkit.FederationFiles) -> Iterator[RunningAttestationService]:
    service = fedkit.start_attestation(files)
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def trainers(
    files: fedkit.FederationFiles, attestation: RunningAttestationService
) -> Iterator[dict[str, fedkit.TestTrainer]]:
    made = {
        label: fedkit.TestTrainer.attest(
            files, attestation.target, label=label, num_examples=EXAMPLES[label]
        )
        for label in EXAMPLES
    }
    yield made
    for t in made.values():
        t.close()


def policy_with(files: fedkit.FederationFiles, role: str, mrenclave: str) -> fedkit.FederationFiles:
    """`files` with a policy whose `role` lists only `mrenclave` (another build's)."""
    text = files.policy.read_text()
    pattern = re.compile(rf"(\[roles\.{role}\]\nmrenclave = \[)\"[0-9a-f]+\"")
    changed, n = pattern.subn(rf'\g<1>"{mrenclave}"', text)
    assert n == 1, f"no [roles.{role}] mrenclave in the policy"
    path = files.directory / f"policy-{role}-{mrenclave[:8]}.toml"
    path.write_text(changed)
    return dataclasses.replace(files, policy=path)


def final_model(aggregator: RunningAggregator) -> tuple[int, Weights]:
    assert aggregator.engine.wait_done(RELAY_TIMEOUT), aggregator.engine.snapshot()
    _, version, weights = aggregator.engine.model()
    return version, weights


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_two_relays_give_the_flat_federations_model(
    strategy: str,
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: dict[str, fedkit.TestTrainer],
    tmp_path: Path,
) -> None:
    template = dict(files.weights)
    base = fedkit.PlanSpec(rounds=2, min_trainers=2, strategy=strategy, round_timeout_seconds=30)
    # Flat: the four trainers report to one aggregator.
    flat_plan = write_plan(files, dataclasses.replace(base, min_trainers=4))
    flat = fedkit.start_aggregator(files, flat_plan, tmp_path / "flat", attestation.target)
    try:
        for t in trainers.values():
            t.connect(flat.target, flat_plan).join()
        drive(list(trainers.values()), template)
        flat_version, flat_weights = final_model(flat)
        flat_losses = [r.train_loss for r in flat.engine.snapshot().rounds]
    finally:
        flat.stop(0)

    # Tiered: the same updates through two relays of two trainers each to a root.
    plan = write_plan(files, base, relays_table())
    root = fedkit.start_aggregator(files, plan, tmp_path / "root", attestation.target)
    relays = [
        start_relay(files, plan, tmp_path / name, attestation.target, root.target, name)
        for name in GROUPS
    ]
    try:
        for relay, group in zip(relays, GROUPS.values(), strict=True):
            for label in group:
                trainers[label].connect(relay.target, plan, ("aggregator", "relay")).join()
        drive(list(trainers.values()), template)
        root_version, root_weights = final_model(root)
        for relay in relays:
            relay_version, relay_weights = final_model(relay)
            assert relay_version == root_version
            for name in root_weights:
                assert np.array_equal(relay_weights[name], root_weights[name])
        snap = root.engine.snapshot()
        # The root saw two participants per round, each carrying its group's examples.
        assert [r.updates for r in snap.rounds] == [2, 2]
        examples = {t.label: t.num_examples for t in snap.trainers}
        assert sorted(examples) == sorted(GROUPS)
        # ... and each relay's group evaluation became one report (4 x 0.25 loss).
        assert snap.rounds[-1].eval_examples == sum(EXAMPLES.values())
        # Each relay forwarded its group's example-weighted training loss, so the root's
        # round record has the flat federation's (not NaN).
        root_losses = [r.train_loss for r in snap.rounds]
    finally:
        for relay in relays:
            relay.stop(0)
        root.stop(0)

    assert root_version == flat_version == 2
    expected = [
        sum(n * train_loss_of(label, rnd) for label, n in EXAMPLES.items()) / sum(EXAMPLES.values())
        for rnd in (1, 2)
    ]
    np.testing.assert_allclose(flat_losses, expected, rtol=1e-12)
    np.testing.assert_allclose(root_losses, expected, rtol=1e-12)
    for name, flat_tensor in flat_weights.items():
        # Not bit for bit: a relay's mean is rounded to float32 before the root sums it
        # again, and the float32 sums run in another order (docs/architecture.md, Relays).
        np.testing.assert_allclose(root_weights[name], flat_tensor, rtol=1e-6, atol=1e-7)
    moved = max(float(np.max(np.abs(flat_weights[n] - template[n]))) for n in template)
    assert moved > 1e-3, "the federation did not move the model: the comparison would be empty"


def test_group_train_metrics_are_example_weighted_over_finite_reports() -> None:
    from hfl_aggregator.engine.admission import UpdateMeta
    from hfl_aggregator.relay import group_train_metrics

    def meta(n: int, loss: float, accuracy: float) -> UpdateMeta:
        return UpdateMeta("s", "t", 1, 0, "delta", n, b"", loss, accuracy)

    loss, accuracy = group_train_metrics(
        [meta(100, 1.0, 0.2), meta(300, 2.0, float("nan")), meta(50, float("nan"), 0.8)]
    )
    assert loss == pytest.approx((100 * 1.0 + 300 * 2.0) / 400)
    assert accuracy == pytest.approx((100 * 0.2 + 50 * 0.8) / 150)
    nan_loss, nan_accuracy = group_train_metrics([meta(10, float("nan"), float("inf"))])
    assert np.isnan(nan_loss)
    assert np.isnan(nan_accuracy)
    assert all(np.isnan(v) for v in group_train_metrics([]))


@pytest.mark.slow
def test_root_refuses_a_relay_whose_mrenclave_its_policy_does_not_list(
    files: fedkit.FederationFiles, attestation: RunningAttestationService, tmp_path: Path
) -> None:
    plan = write_plan(files, fedkit.PlanSpec(rounds=1, min_trainers=1), relays_table(1, 2))
    strict = policy_with(files, "relay", "ab" * 32)
    root = fedkit.start_aggregator(strict, plan, tmp_path / "root", attestation.target)
    relay = start_relay(files, plan, tmp_path / "relay", attestation.target, root.target, "r")
    try:
        assert relay.uplink is not None
        assert relay.uplink.done.wait(RELAY_TIMEOUT)
        assert "PERMISSION_DENIED" in relay.uplink.failure
        assert "mrenclave" in relay.uplink.failure.lower()
        assert root.engine.snapshot().trainers == ()
    finally:
        relay.stop(0)
        root.stop(0)


@pytest.mark.slow
def test_trainer_refuses_a_relay_whose_identity_is_not_in_its_policy(
    files: fedkit.FederationFiles, attestation: RunningAttestationService, tmp_path: Path
) -> None:
    plan = write_plan(files, fedkit.PlanSpec(rounds=1, min_trainers=1), relays_table(1, 2))
    root = fedkit.start_aggregator(files, plan, tmp_path / "root", attestation.target)
    relay = start_relay(files, plan, tmp_path / "relay", attestation.target, root.target, "r")
    strict = policy_with(files, "relay", "cd" * 32)
    try:
        with fedkit.TestTrainer.attest(strict, attestation.target, label="wary") as wary:
            with pytest.raises(PermissionDeniedError, match=r"(?i)mrenclave"):
                wary.connect(relay.target, plan, ("aggregator", "relay"))
            # A trainer that does not accept relays at all refuses the role first.
            with pytest.raises(PermissionDeniedError, match="role relay"):
                wary.connect(relay.target, plan)
        assert relay.engine.snapshot().trainers == ()
    finally:
        relay.stop(0)
        root.stop(0)


@pytest.mark.slow
def test_root_refuses_a_relay_update_claiming_more_examples_than_its_group_can_have(
    files: fedkit.FederationFiles, attestation: RunningAttestationService, tmp_path: Path
) -> None:
    # Bound: max_group_size (3) x max_examples_per_trainer (100) = 300.
    plan = write_plan(files, fedkit.PlanSpec(rounds=1, min_trainers=1), relays_table(1, 3, 100))
    root = fedkit.start_aggregator(files, plan, tmp_path / "root", attestation.target)
    try:
        with fedkit.TestTrainer.attest(
            files, attestation.target, label="hand-relay", role="relay"
        ) as relay:
            relay.connect(root.target, plan).join()
            task = relay.wait_for_task(aggregator_pb2.TASK_KIND_TRAIN)
            update = fedkit.constant_update(files.weights, 0.25)
            with fedkit.rpc_error() as caught:
                relay.upload(update, task, num_examples=301)
            err = caught[0]
            assert isinstance(err, grpc.Call)
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "3 trainers x 100 examples" in (err.details() or "")
            assert (
                fedkit.metric_value(
                    root.registry,
                    "hfl_aggregator_updates_refused_total",
                    reason="too_many_examples",
                )
                == 1
            )
            # At the bound it is one participant carrying its group's examples.
            relay.upload(update, task, num_examples=300)
        assert root.engine.wait_done(RELAY_TIMEOUT)
        assert root.engine.snapshot().rounds[0].updates == 1
    finally:
        root.stop(0)


@pytest.mark.slow
def test_root_without_relays_in_its_plan_refuses_a_relay(
    files: fedkit.FederationFiles, attestation: RunningAttestationService, tmp_path: Path
) -> None:
    plan = files.write_plan(fedkit.PlanSpec(rounds=1, min_trainers=1))
    root = fedkit.start_aggregator(files, plan, tmp_path / "root", attestation.target)
    try:
        with fedkit.TestTrainer.attest(files, attestation.target, label="r2", role="relay") as r:
            with fedkit.rpc_error() as caught:
                r.connect(root.target, plan).join()
            err = caught[0]
            assert isinstance(err, grpc.Call)
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "[relays]" in (err.details() or "")
    finally:
        root.stop(0)


def _plan_text(strategy: str = "fedavg", extra: str = "", mode: str = "sync") -> str:
    spec = fedkit.PlanSpec(strategy=strategy, mode=mode)
    return spec.toml("w.npz", "0" * 64) + extra


@pytest.mark.parametrize(
    ("strategy", "extra", "mode", "message"),
    [
        ("median", "", "sync", "cannot run strategy 'median'"),
        ("krum", "", "sync", "cannot run strategy 'krum'"),
        ("fedavg", "", "async", 'federation.mode = "sync"'),
        (
            "fedavg",
            "\n[privacy.central]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n",
            "sync",
            "central DP",
        ),
    ],
)
def test_plans_refuse_relays_with_rules_that_would_be_silently_wrong(
    strategy: str, extra: str, mode: str, message: str
) -> None:
    text = _plan_text(strategy, mode=mode)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_plan(text + extra + relays_table())


def test_plan_with_relays_keeps_its_thresholds_and_hash_in_the_relay_engine() -> None:
    from hfl_aggregator.relay import relay_engine_plan

    plan = parse_plan(_plan_text() + relays_table(3, 5, 70))
    assert plan.relays is not None
    assert plan.relays.max_relay_examples == 350
    engine_plan = relay_engine_plan(plan)
    assert (engine_plan.min_trainers, engine_plan.min_updates) == (3, 3)
    assert engine_plan.sha256 == plan.sha256
    # The [relays] table is part of the plan's identity.
    assert parse_plan(_plan_text() + relays_table(3, 5, 71)).sha256 != plan.sha256
    with pytest.raises(ConfigError, match=re.escape("needs a plan with a [relays] table")):
        relay_engine_plan(parse_plan(_plan_text()))


@pytest.mark.slow
def test_a_relay_dying_mid_round_costs_its_group_that_round_and_resumes_from_its_seal(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: dict[str, fedkit.TestTrainer],
    tmp_path: Path,
) -> None:
    template = dict(files.weights)
    spec = fedkit.PlanSpec(
        rounds=3,
        min_trainers=2,
        min_updates=1,
        evaluate_every=10,
        liveness_seconds=4,
        round_timeout_seconds=30,
    )
    plan = write_plan(files, spec, relays_table())
    root = fedkit.start_aggregator(files, plan, tmp_path / "root", attestation.target)
    relay_a = start_relay(files, plan, tmp_path / "relay-a", attestation.target, root.target, "a")
    relay_b = start_relay(files, plan, tmp_path / "relay-b", attestation.target, root.target, "b")
    current_b = {"relay": relay_b}
    b_restarted = threading.Event()
    errors: list[BaseException] = []

    def run(label: str, relay: dict[str, RunningAggregator], hold_round: int) -> None:
        trainer = trainers[label]
        try:
            trainer.connect(relay["relay"].target, plan, ("aggregator", "relay")).join()
            while True:
                try:
                    task = trainer.get_task(2)
                except grpc.RpcError:
                    # The relay died: come back to its restarted instance.
                    assert b_restarted.wait(RELAY_TIMEOUT), "relay b was not restarted"
                    trainer.connect(current_b["relay"].target, plan, ("aggregator", "relay"))
                    trainer.join()
                    continue
                if task.kind == aggregator_pb2.TASK_KIND_DONE:
                    return
                if task.kind == aggregator_pb2.TASK_KIND_EVALUATE:
                    trainer.report_eval(task)
                elif task.kind == aggregator_pb2.TASK_KIND_TRAIN:
                    if task.round == hold_round and not b_restarted.is_set():
                        # b2 never sends its round-2 update: its relay dies first.
                        b_restarted.wait(RELAY_TIMEOUT)
                        continue
                    try:
                        trainer.upload(update_for(label, task.round, template), task)
                    except grpc.RpcError as err:
                        # Overtaken (the relay caught up with the root meanwhile): as the
                        # real client does, ask for the next task.
                        if not isinstance(err, grpc.Call) or err.code() not in (
                            grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.ALREADY_EXISTS,
                        ):
                            raise
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    holds = {"a1": 0, "a2": 0, "b1": 0, "b2": 2}
    routes = {"a1": {"relay": relay_a}, "a2": {"relay": relay_a}, "b1": current_b, "b2": current_b}
    threads = [
        threading.Thread(target=run, args=(label, routes[label], holds[label]), daemon=True)
        for label in holds
    ]
    restarted: RunningAggregator | None = None
    try:
        for t in threads:
            t.start()

        def b_has_half_of_round_two() -> bool:
            snap = relay_b.engine.snapshot()
            return any(r.round == 2 and r.updates == 1 for r in snap.rounds)

        fedkit.wait_until(b_has_half_of_round_two, "b1's round-2 update at relay b", 60)
        relay_b.stop(0)  # dies mid-round: b2's update never came
        # The root closes round 2 with relay a alone once b is lost (liveness 4 s).
        fedkit.wait_until(lambda: root.engine.model()[1] >= 2, "the root's round 2", 60)
        restarted = start_relay(
            files, plan, tmp_path / "relay-b", attestation.target, root.target, "b"
        )
        current_b["relay"] = restarted
        b_restarted.set()
        for t in threads:
            t.join(RELAY_TIMEOUT * 2)
        assert not errors, errors
        root_version, root_weights = final_model(root)
        b_version, b_weights = final_model(restarted)
        assert root_version == b_version == 3
        for name in root_weights:
            assert np.array_equal(b_weights[name], root_weights[name])
        rounds = root.engine.snapshot().rounds
        assert [(r.round, r.updates) for r in rounds if r.state.value == "completed"] == [
            (1, 2),
            (2, 1),
            (3, 2),
        ]
        # The restarted relay resumed from its sealed round 1, adopted the root's version 2
        # (no round 2 of its own) and ran round 3 with its group.
        b_rounds = [r.round for r in restarted.engine.snapshot().rounds if r.updates]
        assert b_rounds == [1, 3], restarted.engine.snapshot().rounds
    finally:
        b_restarted.set()
        for relay in (restarted, relay_a, relay_b):
            if relay is not None:
                relay.stop(0)
        root.stop(0)


@pytest.mark.slow
def test_a_relay_refuses_trainers_beyond_its_group_and_updates_beyond_a_trainers_bound(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: dict[str, fedkit.TestTrainer],
    tmp_path: Path,
) -> None:
    # Groups of at most 2 trainers, each claiming at most 300 examples.
    plan = write_plan(files, fedkit.PlanSpec(rounds=1, min_trainers=1), relays_table(2, 2, 300))
    root = fedkit.start_aggregator(files, plan, tmp_path / "root", attestation.target)
    relay = start_relay(files, plan, tmp_path / "relay", attestation.target, root.target, "r")
    try:
        first, second, third = (trainers[label] for label in ("a1", "a2", "b1"))
        for t in (first, second, third):
            t.connect(relay.target, plan, ("aggregator", "relay"))
        first.join()
        second.join()
        with fedkit.rpc_error() as caught:
            third.join()
        code, details = fedkit.code_and_details(caught)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_group_size is 2" in details
        first.join()  # a member of the group may join again
        task = first.wait_for_task(aggregator_pb2.TASK_KIND_TRAIN)
        update = fedkit.constant_update(files.weights, 0.25)
        with fedkit.rpc_error() as caught:
            first.upload(update, task, num_examples=301)
        code, details = fedkit.code_and_details(caught)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "bound for a trainer is 300" in details
        assert (
            fedkit.metric_value(
                relay.registry, "hfl_aggregator_updates_refused_total", reason="too_many_examples"
            )
            == 1
        )
    finally:
        relay.stop(0)
        root.stop(0)
