"""Uploads in bounded memory: decoded into a few reused buffers, held until folded.

The aggregator decodes each upload into one of `upload_slots` decode buffers and keeps it
until the engine has folded (or refused) the update; a clip or a staleness weight is
applied while folding, not by copying the update. These tests check what that must not
change: a refused upload leaves nothing behind (even though its bytes were written into a
buffer the next upload reuses), uploads beyond the slots wait and then land, and the
clipped mean is the mean of the clipped updates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from hfl_aggregator.accumulate import MeanAccumulator, SpillStore
from hfl_aggregator.engine import Accepted, UpdateMeta
from hfl_aggregator.main import RunningAggregator
from hfl_aggregator.service import DecodeSlots
from hfl_common.api import aggregator_pb2
from hfl_common.codec import StreamDecoder, encode_tensors, specs_of
from tests import fedkit

from .conftest import T1_EXAMPLES, T2_EXAMPLES, AggregatorFactory, Trainers
from .test_async import Fed
from .test_async import make_plan as async_plan
from .test_rounds import SESSIONS, join, make_engine, make_plan, task_of
from .test_service import NO_EVAL, TRAIN, Weights, fedavg, join_both, patterned_update

REFUSED = "hfl_aggregator_updates_refused_total"


# --- folding with a scale --------------------------------------------------------------------


def test_a_scaled_fold_equals_folding_the_scaled_update_and_keeps_the_weight() -> None:
    rng = np.random.default_rng(7)
    a: Weights = {"w": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=4)}
    b: Weights = {"w": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=4)}
    scaled = MeanAccumulator(a)
    scaled.add(a, 2.0, scale=0.25)
    scaled.add(b, 6.0)
    copied = MeanAccumulator(a)
    copied.add({k: v * 0.25 for k, v in a.items()}, 2.0)
    copied.add(b, 6.0)
    assert scaled.total_weight == copied.total_weight == 8.0
    got, want = scaled.mean(), copied.mean()
    for name in a:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_a_spilled_update_is_stored_scaled_and_its_caller_array_is_untouched(
    tmp_path: Path,
) -> None:
    update: Weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.arange(3)}
    original = update["w"].copy()
    with SpillStore(update, tmp_path, segment_bytes=16) as store:
        store.add(update, 1.0, scale=0.5)
        back = store.read(0)
    np.testing.assert_array_equal(back["w"], original * 0.5)
    np.testing.assert_array_equal(back["n"], np.arange(3))  # integers are never scaled
    np.testing.assert_array_equal(update["w"], original)


# --- the engine: clip while folding, hand the buffers back before aggregating ----------------


def _meta(engine_session: str, value: float, task_id: str) -> UpdateMeta:
    return UpdateMeta(
        session_id=engine_session,
        task_id=task_id,
        round=1,
        base_model_version=0,
        kind="delta",
        num_examples=10,
        nonce=f"{engine_session}-{value}".encode(),
        train_loss=1.0,
    )


def test_an_update_over_the_norm_bound_is_folded_clipped_to_it() -> None:
    plan = make_plan()
    plan = replace(plan, update=replace(plan.update, max_norm=2.0, clip=True))
    engine, _, _ = make_engine(plan)
    a, b = join(engine, "a"), join(engine, "b")
    big = {"w": np.full((2, 2), 3.0, np.float32), "b": np.full(2, 3.0, np.float32)}
    small = {"w": np.full((2, 2), 0.5, np.float32), "b": np.full(2, 0.5, np.float32)}
    for session, update, value in ((a, big, 3.0), (b, small, 0.5)):
        ticket = engine.check_update(
            _meta(session, value, task_of(engine, session).task_id), SESSIONS[session]
        )
        engine.accept_update(ticket, update)
    # big has norm sqrt(6 * 9): it is scaled to norm 2; small (norm 1.22) is not
    clipped = 3.0 * 2.0 / np.sqrt(54.0)
    _, version, w = engine.model()
    assert version == 1
    np.testing.assert_allclose(w["w"], np.full((2, 2), (clipped + 0.5) / 2), rtol=1e-6)
    np.testing.assert_array_equal(big["w"], np.full((2, 2), 3.0, np.float32))  # not in place


def test_stored_is_called_once_after_the_fold_and_before_the_round_is_aggregated() -> None:
    engine, _, registry = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    seen: list[tuple[str, int]] = []

    def send(session: str, update: Weights, value: float) -> Accepted:
        ticket = engine.check_update(
            _meta(session, value, task_of(engine, session).task_id), SESSIONS[session]
        )
        return engine.accept_update(
            ticket, update, stored=lambda: seen.append((session, engine.model()[1]))
        )

    nan = {"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(Exception, match="NaN"):
        send(a, nan, 9.0)
    assert seen == [(a, 0)]  # a refused update hands its buffers back too
    send(a, {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}, 1.0)
    closing = send(b, {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}, 2.0)
    # b's update closed the round: its buffers were free while the model was still version 0
    assert seen == [(a, 0), (a, 0), (b, 0)]
    assert closing.applied_version == 1
    assert registry.get_sample_value(REFUSED, {"reason": "nan"}) == 1.0


# --- decode buffers ----------------------------------------------------------------------


def test_decode_slots_reuse_their_buffers_and_make_no_more_than_the_slots() -> None:
    model: Weights = {"k": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float64)}
    slots = DecodeSlots(specs_of(model), 2)
    first, second = slots.slot(), slots.slot()
    ids = {id(first.buffers["k"]), id(second.buffers["k"])}
    assert first.buffers["b"].dtype == np.float64
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(slots.slot()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    assert not got
    first.release()
    first.release()  # a second release gives nothing back twice
    waiter.join(10)
    assert len(got) == 1
    third = got[0]
    assert isinstance(third, type(first))
    assert id(third.buffers["k"]) in ids
    second.release()
    third.release()
    with slots.slot() as again, slots.slot() as more:
        assert {id(again.buffers["k"]), id(more.buffers["k"])} == ids


def test_the_decoder_writes_into_matching_caller_arrays_and_allocates_the_others() -> None:
    values = {"k": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(3, np.float32)}
    stream = encode_tensors(values, chunk_bytes=16)
    mine = {"k": np.full((4, 3), np.nan, np.float32), "b": np.zeros(5, np.float32)}
    decoder = StreamDecoder(stream.header, max_total_bytes=1 << 20, out=mine)
    for chunk in stream.chunks():
        decoder.feed(chunk)
    out = decoder.finish(stream.trailer())
    assert out["k"] is mine["k"]
    np.testing.assert_array_equal(mine["k"], values["k"])
    assert out["b"] is not mine["b"]  # wrong shape: a new array, the caller's left alone
    np.testing.assert_array_equal(out["b"], values["b"])
    np.testing.assert_array_equal(mine["b"], np.zeros(5, np.float32))


# --- the real service, one decode slot ----------------------------------------------------


@pytest.fixture
def aggregator(start_aggregator: AggregatorFactory, trainers: Trainers) -> RunningAggregator:
    running = start_aggregator(NO_EVAL)
    join_both(running, trainers)
    return running


def _model(aggregator: RunningAggregator) -> tuple[int, Weights]:
    _, version, weights = aggregator.engine.model()
    return version, {k: v.copy() for k, v in weights.items()}


def test_nan_in_the_last_chunk_is_refused_and_nothing_of_it_is_folded(
    aggregator: RunningAggregator, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    t1, t2 = trainers.t1, trainers.t2
    task1, task2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)
    poisoned = patterned_update(files, 3)
    last = list(poisoned)[-1]
    poisoned[last].reshape(-1)[-1] = np.inf  # the very last element of the stream
    version_before, model_before = _model(aggregator)
    with fedkit.rpc_error() as caught:
        t1.upload(poisoned, task1)
    code, details = fedkit.code_and_details(caught)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"tensor {last!r} contains 1 NaN or infinite values" in details
    assert fedkit.metric_value(aggregator.registry, REFUSED, reason="nan") == 1.0
    version_after, model_after = _model(aggregator)
    assert version_after == version_before
    for name, array in model_before.items():
        np.testing.assert_array_equal(model_after[name], array)
    # the poisoned values are still in the decode buffer: the next uploads overwrite them
    d1, d2 = patterned_update(files, 1), patterned_update(files, 5)
    t1.upload(d1, task1)
    t2.upload(d2, task2)
    version, model = _model(aggregator)
    assert version == 1
    for name, array in fedavg(files, [(T1_EXAMPLES, d1), (T2_EXAMPLES, d2)]).items():
        np.testing.assert_array_equal(model[name], array)


def test_two_uploads_over_one_decode_slot_both_land_with_the_exact_mean(
    aggregator: RunningAggregator, trainers: Trainers, files: fedkit.FederationFiles
) -> None:
    t1, t2 = trainers.t1, trainers.t2
    task1, task2 = t1.wait_for_task(TRAIN), t2.wait_for_task(TRAIN)
    d1, d2 = patterned_update(files, 2), patterned_update(files, 6)
    messages = fedkit.update_messages(t1.update_header(task1), d1)
    resume = threading.Event()

    def paused() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        yield from messages[:2]  # header and one chunk: the only decode slot is taken
        resume.wait(fedkit.RPC_TIMEOUT_SECONDS)
        yield from messages[2:]

    registry = aggregator.registry
    bytes_in = fedkit.metric_value(registry, "hfl_aggregator_update_bytes_total", direction="in")
    first = t1.stub.UploadUpdate.future(paused(), timeout=fedkit.RPC_TIMEOUT_SECONDS)
    try:
        fedkit.wait_until(
            lambda: (
                fedkit.metric_value(registry, "hfl_aggregator_update_bytes_total", direction="in")
                > bytes_in
            ),
            "the first upload's first chunk",
        )
        second: list[aggregator_pb2.UploadUpdateResponse] = []
        other = threading.Thread(target=lambda: second.append(t2.upload(d2, task2)))
        other.start()
        time.sleep(0.5)
        # the second upload waits for the slot: nothing of it was decoded or folded yet
        assert other.is_alive()
        assert not second
        assert not fedkit.metric_value(registry, "hfl_aggregator_updates_received_total")
    finally:
        resume.set()
    got_first = first.result()
    other.join(fedkit.RPC_TIMEOUT_SECONDS)
    assert len(second) == 1
    dispositions = {got_first.disposition, second[0].disposition}
    assert dispositions == {
        aggregator_pb2.UPDATE_DISPOSITION_PENDING,
        aggregator_pb2.UPDATE_DISPOSITION_APPLIED,
    }
    version, model = _model(aggregator)
    assert version == 1
    for name, array in fedavg(files, [(T1_EXAMPLES, d1), (T2_EXAMPLES, d2)]).items():
        np.testing.assert_array_equal(model[name], array)


def test_a_clipped_async_update_comes_back_from_the_journal_clipped(tmp_path: Path) -> None:
    plan = async_plan(buffer_size=2, staleness="constant")
    # an update of all v has norm v * sqrt(6): 4.0 is clipped to 1.0, 1.0 is within
    plan = replace(plan, update=replace(plan.update, max_norm=float(np.sqrt(6.0)), clip=True))
    state = tmp_path / "state"
    fed = Fed(plan, state)
    fed.join("a")
    fed.join("b")
    assert fed.send("a", 4.0).journaled
    del fed  # crash with the clipped update only in the journal

    resumed = Fed(plan, state)
    resumed.join("a")
    resumed.join("b")
    assert resumed.send("b", 1.0).applied_version == 1
    # (clip(4) = 1 + 1) / 2, not (4 + 1) / 2
    assert resumed.b() == pytest.approx(1.0, rel=1e-6)
