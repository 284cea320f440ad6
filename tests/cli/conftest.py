"""A live federation shared by the command-line tests: the attestation service, the
aggregator and one trainer as processes (the plan wants two trainers, so the federation
waits at round 0 with one trainer joined: a stable state for Status and grpcurl)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hfl_cli.local import PlanOptions
from tests.cli import clikit


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[clikit.LocalFederation]:
    directory = tmp_path_factory.mktemp("live")
    with clikit.LocalFederation.start(directory, PlanOptions(trainers=2, rounds=3)) as fed:
        fed.start_trainer(0)
        fed.write_endpoints()
        fed.operator()
        clikit.wait_until(lambda: len(fed.status().trainers) == 1, "trainer-1 to join", timeout=120)
        yield fed
