"""Central DP end to end: real aggregator, real mutual RA-TLS, attested trainers.

A trainer that agreed to other DP settings refuses the aggregator (its attested plan
hash differs) before sending anything; a central-DP federation runs its rounds and shows
epsilon in the round records, the status snapshot, GetStatus and the Prometheus gauge.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from hfl_aggregator import privacy as dp
from hfl_attestation.service import RunningAttestationService
from hfl_common.api import aggregator_pb2
from hfl_common.config import load_plan
from hfl_common.errors import PermissionDeniedError
from tests import fedkit

from .conftest import Trainers

TRAIN = aggregator_pb2.TASK_KIND_TRAIN


def write_dp_plan(files: fedkit.FederationFiles, privacy: str, rounds: int = 2) -> Path:
    """A fedkit plan with a [privacy] section, beside the initial weights."""
    spec = fedkit.PlanSpec(rounds=rounds, evaluate_every=100, round_timeout_seconds=30)
    text = spec.toml(files.initial_weights.name, files.initial_weights_sha256) + privacy
    path = files.directory / f"plan-dp-{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml"
    path.write_text(text)
    return path


CENTRAL = """
[privacy]
delta = 1e-5
max_epsilon = 50.0
[privacy.central]
noise_multiplier = {z}
clip_norm = 0.5
"""


def test_trainer_refuses_an_aggregator_whose_plan_has_other_dp_settings(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: Trainers,
    tmp_path: Path,
) -> None:
    attested = write_dp_plan(files, CENTRAL.format(z=1.0))
    agreed = write_dp_plan(files, CENTRAL.format(z=0.5))  # less noise than the trainer agreed
    aggregator = fedkit.start_aggregator(files, attested, tmp_path / "agg", attestation.target)
    try:
        with pytest.raises(PermissionDeniedError) as err:
            trainers.t1.connect(aggregator.target, agreed)
        assert "attested plan hash" in str(err.value)
        assert load_plan(attested).sha256_hex in str(err.value)
        assert load_plan(agreed).sha256_hex in str(err.value)
        assert aggregator.engine.snapshot().trainers == ()  # nothing reached it
        # the same trainer accepts the aggregator when the DP settings agree
        trainers.t1.connect(aggregator.target, attested)
    finally:
        aggregator.stop(0)


def test_central_dp_federation_reports_epsilon_everywhere(
    files: fedkit.FederationFiles,
    attestation: RunningAttestationService,
    trainers: Trainers,
    operator: fedkit.OperatorClient,
    tmp_path: Path,
) -> None:
    plan_path = write_dp_plan(files, CENTRAL.format(z=1.0))
    aggregator = fedkit.start_aggregator(files, plan_path, tmp_path / "agg", attestation.target)
    try:
        for t in (trainers.t1, trainers.t2):
            t.connect(aggregator.target, plan_path)
            t.join()
        for round_number in (1, 2):
            for t in (trainers.t1, trainers.t2):
                task = t.wait_for_task(TRAIN)
                assert task.round == round_number
                t.upload(fedkit.constant_update(files.weights, 0.25), task)
        trainers.t1.wait_for_task(aggregator_pb2.TASK_KIND_EVALUATE)
        _, model = trainers.t1.download()

        expected = [dp.compute_epsilon(1.0, [(dp.Sampling(2, 2), k)], 1e-5) for k in (1, 2)]
        snap = aggregator.engine.snapshot()
        assert snap.privacy is not None
        assert snap.privacy.mode == "central"
        assert snap.privacy.epsilon == pytest.approx(expected[1].epsilon)
        assert [r.dp_epsilon for r in snap.rounds] == pytest.approx([e.epsilon for e in expected])
        assert [r.dp_noise_stddev for r in snap.rounds] == [0.5, 0.5]
        gauge = fedkit.metric_value(aggregator.registry, "hfl_aggregator_dp_epsilon")
        assert gauge == pytest.approx(expected[1].epsilon)
        # GetStatus (operator role, over RA-TLS) carries the same epsilon.
        operator.connect(aggregator.target)
        status = operator.status()
        assert [r.round for r in status.rounds] == [1, 2]
        assert [r.dp_epsilon for r in status.rounds] == pytest.approx([e.epsilon for e in expected])
        assert status.HasField("privacy")
        assert status.privacy.mode == "central"
        assert status.privacy.epsilon == pytest.approx(expected[1].epsilon)
        assert status.privacy.rounds_accounted == 2
        assert status.privacy.delta == pytest.approx(1e-5)
        assert status.privacy.max_epsilon == 50.0
        assert status.privacy.clip_norm == 0.5
        # The model moved by noise of std z * C / 2 = 0.25 per coordinate and round, not
        # by the clipped updates alone: far from the noiseless result.
        delta = np.concatenate(
            [(model[k] - files.weights[k]).ravel().astype(np.float64) for k in model]
        )
        clip_only = 2 * 0.5 / np.sqrt(delta.size)  # two rounds of the clipped mean
        assert float(np.std(delta)) > 0.1
        assert not np.allclose(delta, clip_only, atol=0.05)
    finally:
        aggregator.stop(0)
