"""Faults in the middle of a round, against a real aggregator over mutual RA-TLS.

A trainer's upload cut mid-stream by a TCP proxy, stalled mid-stream by it (the proxy
stops forwarding without closing), a trainer process SIGKILLed in the middle of its
upload: each is refused or dropped, nothing of it reaches the model, and the round goes
on with the others to the exact FedAvg of the updates that did arrive.
"""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from hfl_aggregator.main import RunningAggregator
from hfl_attestation.service import RunningAttestationService
from hfl_common.api import aggregator_pb2
from hfl_common.server import CallLimits, StreamLimits
from tests import fedkit
from tests.aggregator.conftest import (  # noqa: F401 (fixtures)
    AggregatorFactory,
    Trainers,
    attestation,
    files,
    start_aggregator,
    trainers,
)
from tests.chaos.proxy import ControlledProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

Weights = dict[str, npt.NDArray[Any]]
TRAIN = aggregator_pb2.TASK_KIND_TRAIN


def delta(template: Weights, value: float) -> Weights:
    return {k: np.full(v.shape, value, v.dtype) for k, v in template.items()}


def refused(aggregator: RunningAggregator, reason: str) -> float:
    return fedkit.metric_value(
        aggregator.registry, "hfl_aggregator_updates_refused_total", reason=reason
    )


def slowly(
    messages: list[aggregator_pb2.UploadUpdateRequest],
) -> Iterator[aggregator_pb2.UploadUpdateRequest]:
    """One message at a time (each in its own TLS record), as a slow link sends them."""
    for message in messages:
        yield message
        time.sleep(0.05)


def fedavg(base: Weights, updates: list[tuple[int, Weights]]) -> Weights:
    total = sum(n for n, _ in updates)
    return {
        k: (w + sum(n * d[k] for n, d in updates) / np.float32(total)).astype(w.dtype)
        for k, w in base.items()
    }


def test_an_upload_cut_mid_stream_by_a_proxy_is_refused_and_the_round_completes_exactly(
    start_aggregator: AggregatorFactory,  # noqa: F811
    trainers: Trainers,  # noqa: F811
) -> None:
    aggregator = start_aggregator(fedkit.PlanSpec(rounds=2, evaluate_every=100))
    host, port = aggregator.target.rsplit(":", 1)
    proxy = ControlledProxy(host, int(port))
    try:
        cut, direct = trainers.t2, trainers.t1
        cut.connect(proxy.target, aggregator.plan).join()
        direct.connect(aggregator.target, aggregator.plan).join()
        task_c, task_d = cut.wait_for_task(TRAIN), direct.wait_for_task(TRAIN)
        _, base = direct.download()

        proxy.cut_after_more(700)  # after the header, inside the chunks (~1,200 bytes)
        refused_before = refused(aggregator, "stream")
        header = cut.update_header(task_c)
        messages = fedkit.update_messages(header, delta(base, 0.75), chunk_bytes=16)
        with fedkit.rpc_error() as caught:
            cut.stub.UploadUpdate(slowly(messages), timeout=fedkit.RPC_TIMEOUT_SECONDS)
        code, details = fedkit.code_and_details(caught)
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), details
        # The aggregator saw a stream that ended mid-update, and refused it.
        fedkit.wait_until(
            lambda: refused(aggregator, "stream") == refused_before + 1, "the refusal count"
        )
        # Nothing of the cut upload is in the model or counted in the round.
        _, version, weights = aggregator.engine.model()
        assert version == 0
        for name, array in base.items():
            np.testing.assert_array_equal(weights[name], array)
        snapshot = aggregator.engine.snapshot()
        assert [r.updates for r in snapshot.rounds if r.round == 1] in ([0], [])

        # The same trainer sends its update again over a fresh connection; the round
        # closes on exactly the two updates that arrived whole.
        proxy.forward()
        cut.connect(proxy.target, aggregator.plan).join()
        task_c = cut.wait_for_task(TRAIN)
        cut.upload(delta(base, 0.25), task_c)
        direct.upload(delta(base, -0.5), task_d)
        fedkit.wait_until(lambda: aggregator.engine.model()[1] == 1, "model version 1")
        expected = fedavg(
            base, [(cut.num_examples, delta(base, 0.25)), (direct.num_examples, delta(base, -0.5))]
        )
        _, _, weights = aggregator.engine.model()
        for name, array in expected.items():
            np.testing.assert_array_equal(weights[name], array)
    finally:
        proxy.close()


def stream_cuts(aggregator: RunningAggregator, reason: str) -> float:
    """Upload streams the server cut by a stream deadline (reason stream_idle/stream_max)."""
    return fedkit.metric_value(
        aggregator.registry,
        "hfl_grpc_refusals_total",
        service="hfl.v1.AggregatorService",
        method="UploadUpdate",
        reason=reason,
    )


def test_an_upload_stalled_mid_stream_frees_the_only_slot_at_its_idle_deadline(
    start_aggregator: AggregatorFactory,  # noqa: F811
    trainers: Trainers,  # noqa: F811
) -> None:
    # One upload slot; a stream silent for 2 s is cut; a trainer not heard from for 4 s is
    # lost; the round needs one update and its deadline (120 s) is far beyond the test.
    spec = fedkit.PlanSpec(
        rounds=2,
        min_trainers=2,
        min_updates=1,
        evaluate_every=100,
        liveness_seconds=4.0,
        round_timeout_seconds=120.0,
    )
    limits = CallLimits(streams=StreamLimits(idle_seconds=2.0, max_seconds=120.0))
    aggregator = start_aggregator(spec, call_limits=limits)
    host, port = aggregator.target.rsplit(":", 1)
    proxy = ControlledProxy(host, int(port))
    release = threading.Event()
    try:
        stalled, direct = trainers.t2, trainers.t1
        stalled.connect(proxy.target, aggregator.plan).join()
        direct.connect(aggregator.target, aggregator.plan).join()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waits = [pool.submit(t.wait_for_task, TRAIN, timeout=60) for t in (stalled, direct)]
            task_s, task_d = (w.result() for w in waits)
        _, base = direct.download()

        # The stalled trainer sends its header and half its chunks, then the proxy stops
        # forwarding (the connection stays open): the aggregator holds the upload slot,
        # reading a stream that says nothing more.
        messages = fedkit.update_messages(
            stalled.update_header(task_s), delta(base, 0.75), chunk_bytes=16
        )
        half = len(messages) // 2
        sent_half = threading.Event()

        def stalling() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
            for message in messages[:half]:
                yield message
                time.sleep(0.02)
            time.sleep(0.5)  # let the proxy pass those on before it stalls
            proxy.stall()
            sent_half.set()
            for message in messages[half:]:  # swallowed by the proxy
                yield message
            release.wait(60)

        def upload_stalled() -> grpc.StatusCode | None:
            try:
                stalled.stub.UploadUpdate(stalling(), timeout=60)
            except grpc.RpcError as exc:
                return exc.code()
            return None

        cuts_before = stream_cuts(aggregator, "stream_idle")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stalled_call = pool.submit(upload_stalled)
            assert sent_half.wait(30), "the stalled upload never got going"
            # The other trainer's upload needs the only slot: it goes through once the
            # stalled stream was cut at its idle deadline, not before.
            response = direct.upload(delta(base, -0.5), task_d)
            assert response.disposition != aggregator_pb2.UPDATE_DISPOSITION_UNSPECIFIED
            assert stream_cuts(aggregator, "stream_idle") == cuts_before + 1
            release.set()
            proxy.close()  # the stalled client hears its connection go
            assert stalled_call.result(timeout=60) is not None

        # Liveness drops the stalled trainer; the round closes on the one whole update,
        # long before its 120 s deadline, and nothing of the stalled half is in it.
        fedkit.wait_until(lambda: aggregator.engine.model()[1] == 1, "model version 1", timeout=60)
        expected = fedavg(base, [(direct.num_examples, delta(base, -0.5))])
        _, _, weights = aggregator.engine.model()
        for name, array in expected.items():
            np.testing.assert_array_equal(weights[name], array)
        first = next(r for r in aggregator.engine.snapshot().rounds if r.round == 1)
        assert first.updates == 1
    finally:
        release.set()
        proxy.close()


def test_a_trainer_sigkilled_mid_upload_is_dropped_by_liveness_and_the_round_goes_on(
    start_aggregator: AggregatorFactory,  # noqa: F811
    trainers: Trainers,  # noqa: F811
    attestation: RunningAttestationService,  # noqa: F811
    files: fedkit.FederationFiles,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Three trainers sampled; the round needs two updates; a trainer not heard from for
    # 3 s is lost. The round deadline (120 s) is far beyond what the test waits.
    spec = fedkit.PlanSpec(
        rounds=2,
        min_trainers=3,
        min_updates=2,
        evaluate_every=100,
        liveness_seconds=3.0,
        round_timeout_seconds=120.0,
    )
    aggregator = start_aggregator(spec)
    t1, t2 = trainers.t1, trainers.t2
    for t in (t1, t2):
        t.connect(aggregator.target, aggregator.plan).join()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.chaos.uploader",
            str(files.directory),
            attestation.target,
            aggregator.target,
            str(files.write_plan(spec)),
            "trainer-killed",
        ],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "uploader.log").open("w"),
        text=True,
    )
    try:
        try:
            # Both poll at once: a trainer that stopped polling for 3 s would be lost
            # while the other waits for the uploader to start (slow on a loaded machine).
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                waits = [pool.submit(t.wait_for_task, TRAIN, timeout=120) for t in (t1, t2)]
                task1, task2 = (w.result() for w in waits)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; the uploader: {(tmp_path / 'uploader.log').read_text()[-3000:]}"
            ) from None
        _, base = t1.download()
        before = refused(aggregator, "stream")
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "MIDWAY", f"the uploader said {line!r}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()

    # The half-sent update is refused, never counted.
    fedkit.wait_until(lambda: refused(aggregator, "stream") == before + 1, "the refusal count")
    assert aggregator.engine.model()[1] == 0
    t1.upload(delta(base, 0.25), task1)
    t2.upload(delta(base, -0.5), task2)
    # Liveness drops the killed trainer: the round closes on the two updates long before
    # its 120 s deadline.
    fedkit.wait_until(lambda: aggregator.engine.model()[1] == 1, "model version 1", timeout=60)
    expected = fedavg(
        base, [(t1.num_examples, delta(base, 0.25)), (t2.num_examples, delta(base, -0.5))]
    )
    _, _, weights = aggregator.engine.model()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array)
    first = next(r for r in aggregator.engine.snapshot().rounds if r.round == 1)
    assert first.updates == 2
