"""Fixtures for end-to-end aggregator tests: one simulated platform, policy and attestation
service per session; a fresh in-process aggregator per test; two attested trainers and an
operator shared by the session (each test connects them to its own aggregator).

Nothing is mocked: quotes are verified by dcap-qvl, every call is mutual RA-TLS on
127.0.0.1, and the aggregator is the one `hfl_aggregator.main.build_aggregator` builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hfl_aggregator.main import RunningAggregator
from hfl_attestation.service import RunningAttestationService
from hfl_common.server import CallLimits
from tests import fedkit

# Examples per trainer: FedAvg weights 3/4 and 1/4, so weighted means of multiples of 1/4
# are exact in float32.
T1_EXAMPLES = 24
T2_EXAMPLES = 8

AggregatorFactory = Callable[..., RunningAggregator]


@dataclass(frozen=True)
class Trainers:
    t1: fedkit.TestTrainer
    t2: fedkit.TestTrainer


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> fedkit.FederationFiles:
    return fedkit.prepare_files(tmp_path_factory.mktemp("federation"))


@pytest.fixture(scope="session")
def attestation(files: fedkit.FederationFiles) -> Iterator[RunningAttestationService]:
    service = fedkit.start_attestation(files)
    yield service
    service.stop(0)


@pytest.fixture(scope="session")
def trainers(
    files: fedkit.FederationFiles, attestation: RunningAttestationService
) -> Iterator[Trainers]:
    t1 = fedkit.TestTrainer.attest(
        files, attestation.target, label="trainer-a", num_examples=T1_EXAMPLES
    )
    t2 = fedkit.TestTrainer.attest(
        files, attestation.target, label="trainer-b", num_examples=T2_EXAMPLES
    )
    yield Trainers(t1, t2)
    t1.close()
    t2.close()


@pytest.fixture(scope="session")
def operator(
    files: fedkit.FederationFiles, attestation: RunningAttestationService
) -> Iterator[fedkit.OperatorClient]:
    client = fedkit.OperatorClient.obtain(files, attestation.target)
    yield client
    client.close()


@pytest.fixture
def start_aggregator(
    files: fedkit.FederationFiles, attestation: RunningAttestationService, tmp_path: Path
) -> Iterator[AggregatorFactory]:
    """Start in-process aggregators for this test (each in its own state dir); all are
    stopped at teardown. Call with a PlanSpec (default PlanSpec())."""
    started: list[RunningAggregator] = []

    def start(
        spec: fedkit.PlanSpec | None = None,
        *,
        state_dir: Path | None = None,
        header_timeout_seconds: float = 10.0,
        call_limits: CallLimits | None = None,
    ) -> RunningAggregator:
        plan = files.write_plan(spec)
        state = state_dir or tmp_path / f"aggregator-{len(started)}"
        aggregator = fedkit.start_aggregator(
            files,
            plan,
            state,
            attestation.target,
            registry=CollectorRegistry(),
            header_timeout_seconds=header_timeout_seconds,
            call_limits=call_limits,
        )
        started.append(aggregator)
        return aggregator

    yield start
    for aggregator in started:
        aggregator.stop(0)
