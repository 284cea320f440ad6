"""The aggregator end to end: real mutual RA-TLS, real status codes, the real round engine.

Each test starts its own aggregator in-process (conftest); two attested trainers of this
code and an operator talk to it over gRPC. Every refusal is checked for its status code
and message, for the hfl_aggregator_updates_refused_total counter, and for leaving the
global model and the round as they were.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from hfl_aggregator.main import RunningAggregator
from hfl_attestation.service import RunningAttestationService
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc
from hfl_common.codec import specs_of
from hfl_common.errors import PermissionDeniedError, error_info, error_reason
from hfl_common.tee import EnclaveIdentity
from hfl_common.tee.identities import service_identity
from tests import fedkit

from .conftest import T1_EXAMPLES, T2_EXAMPLES, AggregatorFactory, Trainers

REFUSED = "hfl_aggregator_updates_refused_total"
TRAIN = aggregator_pb2.TASK_KIND_TRAIN
# Rounds go straight on to the next one (only the last round is evaluated).
NO_EVAL = fedkit.PlanSpec(rounds=3, evaluate_every=100)
# Round deadline of the straggler tests: short, yet long enough for a loaded 2-core machine.
DEADLINE_SECONDS = 2.5

Weights = dict[str, npt.NDArray[Any]]


def patterned_update(template: fedkit.FederationFiles | Weights, offset: int) -> Weights:
    """A delta of multiples of 1/4 in [-0.75, 0.75] that differs per element and offset."""
    weights = template.weights if isinstance(template, fedkit.FederationFiles) else template
    out: Weights = {}
    for i, (name, array) in enumerate(weights.items()):
        values = (np.arange(array.size) + offset + 3 * i) % 7 - 3
        out[name] = (values / 4).reshape(array.shape).astype(array.dtype)
    return out


@dataclass
class Federation:
    """An aggregator with both trainers connected and joined: round 1 has started."""

    aggregator: RunningAggregator
    t1: fedkit.TestTrainer
    t2: fedkit.TestTrainer
    files: fedkit.FederationFiles

    def refused(self, reason: str) -> float:
        return fedkit.metric_value(self.aggregator.registry, REFUSED, reason=reason)

    def model(self) -> tuple[int, int, Weights]:
        completed, version, weights = self.aggregator.engine.model()
        return completed, version, {k: v.copy() for k, v in weights.items()}

    def round_state(self) -> tuple[str, int, int, list[tuple[int, str, int]]]:
        snap = self.aggregator.engine.snapshot()
        rounds = [(r.round, r.state.value, r.updates) for r in snap.rounds]
        return snap.phase.value, snap.round, snap.model_version, rounds

    def assert_refused(
        self,
        call: Callable[[], object],
        code: grpc.StatusCode,
        fragment: str,
        reason: str | None = None,
    ) -> str:
        """Run `call`; check it fails with `code` and `fragment` in the message, that the
        refusal counter for `reason` went up by one, and that model and round are as before."""
        before_model = self.model()
        before_round = self.round_state()
        before_count = self.refused(reason) if reason else 0.0
        with fedkit.rpc_error() as caught:
            call()
        got_code, details = fedkit.code_and_details(caught)
        assert got_code == code, f"{got_code}: {details}"
        assert fragment in details
        if reason is not None:
            assert self.refused(reason) == before_count + 1
            # clients act on the ErrorInfo reason, never on the message
            info = error_info(caught[0])
            assert info is not None, "the refusal carries no google.rpc.ErrorInfo"
            assert (info.domain, info.reason) == ("hfl", reason.upper())
        after_model = self.model()
        assert after_model[:2] == before_model[:2]
        for name, array in before_model[2].items():
            np.testing.assert_array_equal(after_model[2][name], array)
        assert self.round_state() == before_round
        return details


def join_both(aggregator: RunningAggregator, trainers: Trainers) -> None:
    for t in (trainers.t1, trainers.t2):
        t.connect(aggregator.target, aggregator.plan)
        t.join()


@pytest.fixture
def federation(
    start_aggregator: AggregatorFactory, trainers: Trainers, files: fedkit.FederationFiles
) -> Federation:
    aggregator = start_aggregator(NO_EVAL)
    join_both(aggregator, trainers)
    return Federation(aggregator, trainers.t1, trainers.t2, files)


def fedavg(base: Weights | fedkit.FederationFiles, updates: list[tuple[int, Weights]]) -> Weights:
    """The hand-computed FedAvg step: base + sum(n_i * delta_i) / sum(n_i), in float32."""
    weights = base.weights if isinstance(base, fedkit.FederationFiles) else base
    total = sum(n for n, _ in updates)
    return {
        name: (w + sum(n * d[name] for n, d in updates) / np.float32(total)).astype(w.dtype)
        for name, w in weights.items()
    }


# --- a round ---------------------------------------------------------------------------------


def test_two_trainers_complete_a_round_with_the_weighted_mean_of_their_deltas(
    federation: Federation,
) -> None:
    t1, t2 = federation.t1, federation.t2
    task1, task2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)
    assert (task1.round, task1.model_version, task1.task_id) == (1, 0, "1.1.train")
    assert task2.task_id == task1.task_id
    header, start = t1.download()
    assert header.model_version == 0
    for name, array in federation.files.weights.items():
        np.testing.assert_array_equal(start[name], array)
    d1, d2 = patterned_update(start, 0), patterned_update(start, 4)

    first = t1.upload(d1, task1)
    assert (first.disposition, first.round, first.base_model_version, first.model_version) == (
        aggregator_pb2.UPDATE_DISPOSITION_PENDING,
        1,
        0,
        0,
    )
    second = t2.upload(d2, task2)
    # the last update closes the round: it is part of model version 1
    assert (second.disposition, second.model_version) == (
        aggregator_pb2.UPDATE_DISPOSITION_APPLIED,
        1,
    )

    expected = fedavg(start, [(T1_EXAMPLES, d1), (T2_EXAMPLES, d2)])
    header, model = t1.download()
    assert (header.round, header.model_version) == (1, 1)
    assert header.plan_sha256 == federation.aggregator.plan.sha256_hex
    for name, array in expected.items():
        assert model[name].dtype == array.dtype
        np.testing.assert_array_equal(model[name], array)
    # the next round trains the new model
    assert t1.wait_for_task(TRAIN).model_version == 1


# --- refused updates -------------------------------------------------------------------------


def test_update_for_a_closed_round_is_refused_as_stale(federation: Federation) -> None:
    t1, t2 = federation.t1, federation.t2
    old1, old2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)
    t1.upload(patterned_update(federation.files, 1), old1)
    t2.upload(patterned_update(federation.files, 2), old2)
    assert t1.wait_for_task(TRAIN).round == 2

    details = federation.assert_refused(
        lambda: t1.upload(patterned_update(federation.files, 3), old1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale",
        "stale",
    )
    assert "update for round 1 (model version 0) is stale" in details
    assert "at round 2 (model version 1" in details


def test_second_update_for_the_same_round_is_refused_as_duplicate(
    federation: Federation,
) -> None:
    t1 = federation.t1
    task = t1.wait_for_task(TRAIN)
    federation.t2.wait_for_task(TRAIN)
    t1.upload(patterned_update(federation.files, 1), task)
    details = federation.assert_refused(
        lambda: t1.upload(patterned_update(federation.files, 5), task),
        grpc.StatusCode.ALREADY_EXISTS,
        "duplicate update",
        "duplicate",
    )
    assert f"trainer {t1.trainer_id} already sent its update for round 1" in details


def test_update_with_a_used_nonce_is_refused_as_replayed(federation: Federation) -> None:
    t1 = federation.t1
    task = t1.wait_for_task(TRAIN)
    federation.t2.wait_for_task(TRAIN)
    nonce = b"\x01" * 16
    t1.upload(patterned_update(federation.files, 1), task, nonce=nonce)
    federation.assert_refused(
        lambda: t1.upload(patterned_update(federation.files, 1), task, nonce=nonce),
        grpc.StatusCode.FAILED_PRECONDITION,
        "replayed update: its nonce was already used",
        "replayed",
    )


MALFORMED = [
    (
        fedkit.Corruption.WRONG_SHAPE,
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'dense/kernel' has shape (9, 4), expected (8, 4)",
        "invalidargument",
    ),
    (
        fedkit.Corruption.WRONG_DTYPE,
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'dense/kernel' has dtype float64, expected float32",
        "invalidargument",
    ),
    (
        fedkit.Corruption.NAN,
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'dense/kernel' contains 1 NaN or infinite values",
        "nan",
    ),
    (
        fedkit.Corruption.WRONG_DIGEST,
        grpc.StatusCode.INVALID_ARGUMENT,
        "payload digest mismatch",
        "stream",
    ),
    (
        fedkit.Corruption.TRUNCATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        "the stream ended without a trailer after 144 of 144 bytes",
        "stream",
    ),
    (
        fedkit.Corruption.CHUNKS_OUT_OF_ORDER,
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk at offset 32, expected 0: chunks out of order or missing",
        "stream",
    ),
    (
        fedkit.Corruption.OVERSIZED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "update stream announces 1073741824 bytes",
        "oversized",
    ),
]


@pytest.mark.parametrize(
    ("corruption", "code", "fragment", "reason"),
    MALFORMED,
    ids=[case[0].value for case in MALFORMED],
)
def test_malformed_update_is_refused_and_the_trainer_may_send_a_good_one(
    federation: Federation,
    corruption: fedkit.Corruption,
    code: grpc.StatusCode,
    fragment: str,
    reason: str,
) -> None:
    t1, t2 = federation.t1, federation.t2
    task1, task2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)
    good = patterned_update(federation.files, 1)
    federation.assert_refused(
        lambda: t1.upload(good, task1, corrupt=corruption), code, fragment, reason
    )
    # the refusal consumed nothing: the same trainer's good update completes the round
    t1.upload(good, task1)
    t2.upload(good, task2)
    assert federation.aggregator.engine.model()[1] == 1


def test_peer_that_vanishes_mid_stream_is_counted_and_the_round_stays_open(
    federation: Federation,
) -> None:
    t1, t2 = federation.t1, federation.t2
    task1, task2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)
    d1, d2 = patterned_update(federation.files, 2), patterned_update(federation.files, 6)
    before = federation.refused("stream")
    registry = federation.aggregator.registry
    bytes_in = fedkit.metric_value(registry, "hfl_aggregator_update_bytes_total", direction="in")

    t1.upload_and_vanish(
        d1,
        task1,
        after_chunks=2,
        received=lambda: (
            fedkit.metric_value(registry, "hfl_aggregator_update_bytes_total", direction="in")
            == bytes_in + 2 * fedkit.TEST_CHUNK_BYTES
        ),
    )

    fedkit.wait_until(lambda: federation.refused("stream") == before + 1, "the refusal count")
    assert federation.round_state()[:3] == ("training", 1, 0)
    trainer_a = next(
        t for t in federation.aggregator.engine.snapshot().trainers if t.label == t1.label
    )
    assert trainer_a.updates_refused == 1
    assert t1.get_task().task_id == task1.task_id  # its task is still open
    t1.upload(d1, task1)
    t2.upload(d2, task2)
    _, version, model = federation.model()
    assert version == 1
    expected = fedavg(federation.files, [(T1_EXAMPLES, d1), (T2_EXAMPLES, d2)])
    for name, array in expected.items():
        np.testing.assert_array_equal(model[name], array)


# --- refused joins and sessions --------------------------------------------------------------


def test_join_under_another_plan_is_refused(
    start_aggregator: AggregatorFactory, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    aggregator = start_aggregator(NO_EVAL)
    fed = Federation(aggregator, trainers.t1, trainers.t2, files)
    t1 = trainers.t1.connect(aggregator.target, aggregator.plan)
    details = fed.assert_refused(
        lambda: t1.join(plan_sha256="ab" * 32),
        grpc.StatusCode.FAILED_PRECONDITION,
        "was given plan abababababababab…, but this federation runs plan "
        f"{aggregator.plan.sha256_hex[:16]}…",
    )
    assert "both sides must use the same plan file" in details
    assert aggregator.engine.snapshot().trainers == ()
    assert fed.round_state() == ("waiting_for_trainers", 0, 0, [])


def test_join_with_another_model_is_refused_naming_the_first_mismatching_tensor(
    start_aggregator: AggregatorFactory, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    aggregator = start_aggregator(NO_EVAL)
    fed = Federation(aggregator, trainers.t1, trainers.t2, files)
    t1 = trainers.t1.connect(aggregator.target, aggregator.plan)
    other = dict(files.weights)
    other["dense/kernel"] = np.zeros((8, 5), np.float32)
    other["dense/bias"] = np.zeros((5,), np.float32)
    fed.assert_refused(
        lambda: t1.join(model_spec=specs_of(other)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "trainer model vs the plan's model: tensor 'dense/kernel' has shape (8, 5), "
        "expected (8, 4)",
    )
    assert aggregator.engine.snapshot().trainers == ()


def test_calls_with_an_unknown_session_are_not_found(federation: Federation) -> None:
    t1 = federation.t1
    federation.assert_refused(
        lambda: t1.get_task(session_id="0" * 32),
        grpc.StatusCode.NOT_FOUND,
        "unknown session: the aggregator may have restarted; join again",
    )
    stale = t1.session_id
    t1.join()  # a new session replaces the old one
    federation.assert_refused(
        lambda: t1.get_task(session_id=stale),
        grpc.StatusCode.NOT_FOUND,
        "unknown session",
    )
    request = aggregator_pb2.DownloadModelRequest(session_id="nope")
    federation.assert_refused(
        lambda: list(t1.stub.DownloadModel(request, timeout=10)),
        grpc.StatusCode.NOT_FOUND,
        "unknown session",
    )


# --- authorization ---------------------------------------------------------------------------


def test_operator_may_read_status_but_not_join(
    federation: Federation, operator: fedkit.OperatorClient
) -> None:
    operator.connect(federation.aggregator.target)
    assert operator.status().plan_sha256 == federation.aggregator.plan.sha256_hex
    request = aggregator_pb2.JoinRequest(
        label="operator",
        plan_sha256=federation.aggregator.plan.sha256_hex,
        model_spec=specs_of(federation.files.weights),
    )
    federation.assert_refused(
        lambda: operator.stub.Join(request, timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
        "role operator may not call /hfl.v1.AggregatorService/Join; allowed: relay, trainer",
    )
    assert len(federation.aggregator.engine.snapshot().trainers) == 2


def test_trainer_may_not_read_status(federation: Federation) -> None:
    federation.assert_refused(
        lambda: federation.t1.stub.GetStatus(aggregator_pb2.GetStatusRequest(), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
        "role trainer may not call /hfl.v1.AggregatorService/GetStatus; allowed: operator",
    )


def test_client_without_a_certificate_cannot_connect(
    federation: Federation, operator: fedkit.OperatorClient
) -> None:
    ca_pem = operator.credentials.current.ca_pem
    channel = fedkit.anonymous_channel(federation.aggregator.target, ca_pem)
    try:
        stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
        with fedkit.rpc_error() as caught:
            stub.GetStatus(aggregator_pb2.GetStatusRequest(), timeout=5)
    finally:
        channel.close()
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "failed to connect" in details


def test_trainer_code_outside_the_policy_gets_no_certificate(
    files: fedkit.FederationFiles, attestation: RunningAttestationService
) -> None:
    genuine = service_identity("trainer", files.platform())
    rogue = EnclaveIdentity(
        mrenclave=bytes(32 - 1) + b"\x01",
        mrsigner=genuine.mrsigner,
        isv_prod_id=genuine.isv_prod_id,
        isv_svn=genuine.isv_svn,
    )
    with pytest.raises(PermissionDeniedError) as err:
        fedkit.TestTrainer.attest(files, attestation.target, label="rogue", identity=rogue)
    assert "certificate for role trainer refused" in str(err.value)
    assert "mrenclave" in str(err.value).lower()


# --- stragglers ------------------------------------------------------------------------------


def test_round_closes_at_the_deadline_with_the_updates_it_has(
    start_aggregator: AggregatorFactory, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    aggregator = start_aggregator(
        fedkit.PlanSpec(
            rounds=2, min_updates=1, round_timeout_seconds=DEADLINE_SECONDS, evaluate_every=100
        )
    )
    join_both(aggregator, trainers)
    task = trainers.t1.wait_for_task(TRAIN)
    assert trainers.t2.wait_for_task(TRAIN).task_id == task.task_id  # both were sampled
    d1 = patterned_update(files, 3)
    trainers.t1.upload(d1, task)

    fedkit.wait_until(lambda: aggregator.engine.model()[1] == 1, "the deadline", timeout=10)
    summary = aggregator.engine.snapshot().rounds[0]
    assert (summary.round, summary.state.value, summary.updates) == (1, "completed", 1)
    # it closed at the deadline, not at trainer-a's update
    assert summary.duration_seconds >= DEADLINE_SECONDS
    _, _, model = aggregator.engine.model()
    for name, array in fedavg(files, [(T1_EXAMPLES, d1)]).items():
        np.testing.assert_array_equal(model[name], array)
    # the straggler's late update is stale now
    with fedkit.rpc_error() as caught:
        trainers.t2.upload(patterned_update(files, 4), task)
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "update for round 1 (model version 0) is stale" in details


def test_round_without_enough_updates_fails_and_is_retried(
    start_aggregator: AggregatorFactory,
    trainers: Trainers,
    files: fedkit.FederationFiles,
    operator: fedkit.OperatorClient,
) -> None:
    aggregator = start_aggregator(
        fedkit.PlanSpec(
            rounds=1, min_updates=2, round_timeout_seconds=DEADLINE_SECONDS, evaluate_every=100
        )
    )
    join_both(aggregator, trainers)
    first = trainers.t1.wait_for_task(TRAIN)
    trainers.t2.wait_for_task(TRAIN)
    trainers.t1.upload(patterned_update(files, 1), first)

    retry = trainers.t1.wait_for_task(TRAIN, timeout=10)
    assert (retry.round, retry.task_id, retry.model_version) == (1, "1.2.train", 0)
    status = operator.connect(aggregator.target).status()
    failed, running = status.rounds
    assert (failed.round, failed.attempt, failed.state, failed.updates) == (
        1,
        1,
        aggregator_pb2.ROUND_STATE_FAILED,
        1,
    )
    assert failed.failure == aggregator_pb2.ROUND_FAILURE_DEADLINE
    assert failed.failure_message == "deadline passed with 1 of the 2 updates needed"
    assert (running.round, running.attempt, running.state) == (
        1,
        2,
        aggregator_pb2.ROUND_STATE_RUNNING,
    )
    assert status.model_version == 0
    # the update of the failed attempt does not count: attempt 2 needs both again
    d1, d2 = patterned_update(files, 2), patterned_update(files, 5)
    trainers.t1.upload(d1, retry)
    trainers.t2.upload(d2, trainers.t2.wait_for_task(TRAIN))
    _, version, model = aggregator.engine.model()
    assert version == 1
    for name, array in fedavg(files, [(T1_EXAMPLES, d1), (T2_EXAMPLES, d2)]).items():
        np.testing.assert_array_equal(model[name], array)


def test_a_session_presented_by_another_trainer_is_permission_denied(
    federation: Federation,
) -> None:
    with fedkit.rpc_error() as caught:
        federation.t2.get_task(session_id=federation.t1.session_id)
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"this session belongs to trainer {federation.t1.trainer_id}" in details


def test_an_upload_stream_without_a_header_holds_no_slot_and_is_cut_off(
    start_aggregator: AggregatorFactory, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    aggregator = start_aggregator(NO_EVAL, header_timeout_seconds=1.0)
    join_both(aggregator, trainers)
    task = trainers.t1.wait_for_task(TRAIN)
    trainers.t2.wait_for_task(TRAIN)
    release = threading.Event()

    def silent() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        release.wait(fedkit.RPC_TIMEOUT_SECONDS)
        yield from ()

    idle = trainers.t1.stub.UploadUpdate.future(silent(), timeout=fedkit.RPC_TIMEOUT_SECONDS)
    try:
        # the only upload slot is free for trainer-b while trainer-a's stream idles
        response = trainers.t2.upload(patterned_update(files, 1), task)
        assert response.round == 1
        with fedkit.rpc_error() as caught:
            idle.result()
    finally:
        release.set()
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no update header within 1 s of opening the upload stream" in details


def test_a_failed_federation_is_an_error_with_reason_federation_failed(
    start_aggregator: AggregatorFactory, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    aggregator = start_aggregator(
        fedkit.PlanSpec(
            rounds=1,
            round_timeout_seconds=DEADLINE_SECONDS,
            max_round_retries=0,
            evaluate_every=100,
        )
    )
    join_both(aggregator, trainers)
    task = trainers.t1.wait_for_task(TRAIN)
    trainers.t1.upload(patterned_update(files, 1), task)
    fedkit.wait_until(lambda: aggregator.engine.done, "the round to fail", timeout=10)
    with fedkit.rpc_error() as caught:
        trainers.t1.get_task()
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "federation failed: round 1 failed 1 times" in details
    assert error_reason(caught[0]) == "FEDERATION_FAILED"


# --- status ----------------------------------------------------------------------------------


def test_status_shows_plan_trainers_rounds_and_evaluation(
    start_aggregator: AggregatorFactory,
    trainers: Trainers,
    files: fedkit.FederationFiles,
    operator: fedkit.OperatorClient,
) -> None:
    aggregator = start_aggregator(fedkit.PlanSpec(rounds=1))
    join_both(aggregator, trainers)
    operator.connect(aggregator.target)
    t1, t2 = trainers.t1, trainers.t2
    task1, task2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)

    status = operator.status()
    assert status.plan_sha256 == aggregator.plan.sha256_hex
    assert (status.federation_id, status.model, status.strategy) == (
        "fedkit",
        "small_cnn",
        "fedavg",
    )
    assert status.mode == aggregator_pb2.AGGREGATION_MODE_SYNC
    assert (status.state, status.round, status.total_rounds, status.model_version) == (
        aggregator_pb2.FEDERATION_STATE_TRAINING,
        1,
        1,
        0,
    )
    mrenclave = service_identity("trainer", files.platform()).mrenclave.hex()
    assert [
        (t.label, t.trainer_id, t.state, t.mrenclave, t.num_examples) for t in status.trainers
    ] == [
        (t1.label, t1.trainer_id, aggregator_pb2.TRAINER_STATE_ACTIVE, mrenclave, T1_EXAMPLES),
        (t2.label, t2.trainer_id, aggregator_pb2.TRAINER_STATE_ACTIVE, mrenclave, T2_EXAMPLES),
    ]
    assert all(t.last_seen.seconds > 0 for t in status.trainers)
    assert [(r.round, r.state, r.updates) for r in status.rounds] == [
        (1, aggregator_pb2.ROUND_STATE_RUNNING, 0)
    ]

    t1.upload(patterned_update(files, 1), task1, train_loss=1.0)
    t2.upload(patterned_update(files, 2), task2, train_loss=3.0)
    eval1 = t1.wait_for_task(aggregator_pb2.TASK_KIND_EVALUATE)
    eval2 = t2.wait_for_task(aggregator_pb2.TASK_KIND_EVALUATE)
    assert (eval1.round, eval1.model_version) == (1, 1)
    assert operator.status().state == aggregator_pb2.FEDERATION_STATE_EVALUATING
    t1.report_eval(eval1, loss=0.5, accuracy=0.75)
    t2.report_eval(eval2, loss=1.5, accuracy=0.25)

    assert t1.wait_for_task(aggregator_pb2.TASK_KIND_DONE).message == "done"
    status = operator.status()
    assert (status.state, status.model_version) == (aggregator_pb2.FEDERATION_STATE_DONE, 1)
    assert [(t.label, t.state, t.updates_accepted) for t in status.trainers] == [
        (t1.label, aggregator_pb2.TRAINER_STATE_IDLE, 1),
        (t2.label, aggregator_pb2.TRAINER_STATE_IDLE, 1),
    ]
    (summary,) = status.rounds
    assert (summary.round, summary.state, summary.updates, summary.model_version) == (
        1,
        aggregator_pb2.ROUND_STATE_COMPLETED,
        2,
        1,
    )
    # weighted by examples (24 and 8): train loss (24*1 + 8*3)/32, evaluation likewise
    assert summary.train_loss == pytest.approx(1.5)
    assert summary.eval_loss == pytest.approx(0.75)
    assert summary.eval_accuracy == pytest.approx(0.625)
    assert summary.eval_examples == T1_EXAMPLES + T2_EXAMPLES


def test_status_names_the_plan_the_aggregator_attested(
    federation: Federation, operator: fedkit.OperatorClient
) -> None:
    # connect_verified with the plan's hash as expected user data: a trainer given another
    # plan refuses the aggregator before sending anything.
    other = federation.files.write_plan(fedkit.PlanSpec(rounds=7))
    with pytest.raises(PermissionDeniedError) as err:
        federation.t1.connect(federation.aggregator.target, other)
    assert "aggregator's attested plan hash" in str(err.value)
    assert federation.aggregator.plan.sha256_hex in str(err.value)
    status = operator.connect(federation.aggregator.target).status()
    assert status.plan_sha256 == federation.aggregator.plan.sha256_hex


# --- asynchronous mode -----------------------------------------------------------------------


def test_async_server_applies_each_update_as_it_arrives_and_refuses_too_stale_ones(
    start_aggregator: AggregatorFactory,
    trainers: Trainers,
    files: fedkit.FederationFiles,
    operator: fedkit.OperatorClient,
) -> None:
    aggregator = start_aggregator(
        fedkit.PlanSpec(rounds=10, mode="async", buffer_size=1, max_staleness=1, evaluate_every=100)
    )
    join_both(aggregator, trainers)
    t1, t2 = trainers.t1, trainers.t2
    old = t2.wait_for_task(TRAIN)  # trainer-b works on version 0 ...
    assert old.train.max_staleness == 1
    d = patterned_update(files, 1)
    first = t1.upload(d, t1.wait_for_task(TRAIN))
    assert (first.disposition, first.model_version, first.staleness) == (
        aggregator_pb2.UPDATE_DISPOSITION_APPLIED,
        1,
        0,
    )
    # ... while trainer-a goes on without waiting for it
    task = t1.wait_for_task(TRAIN)
    assert task.model_version == 1
    t1.upload(d, task)
    with fedkit.rpc_error() as caught:
        t2.upload(d, old)
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is 2 versions stale; the plan allows 1" in details
    info = error_info(caught[0])
    assert info is not None
    assert (info.reason, info.metadata["staleness"]) == ("TOO_STALE", "2")
    status = operator.connect(aggregator.target).status()
    assert (status.mode, status.buffer_size, status.model_version) == (
        aggregator_pb2.AGGREGATION_MODE_ASYNC,
        1,
        2,
    )
    assert fedkit.metric_value(aggregator.registry, "hfl_aggregator_staleness_count") == 2.0
