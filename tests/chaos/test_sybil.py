"""Sybil: one enrolled party brings a second trainer identity (a fresh enclave key costs
nothing) while its first is active. The attestation service certifies both (the party's
key signed both enrolments), the aggregator admits only one active trainer per party.
Real attestation service, real aggregator, mutual RA-TLS on loopback."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from hfl_common.api import aggregator_pb2
from hfl_common.attest_client import (
    ServiceCredentials,
    bootstrap_attestation_service,
    obtain_certificate,
)
from hfl_common.enrolment import PartySigner, public_key_text
from hfl_common.errors import error_info
from hfl_common.ratls import EnclaveKey
from hfl_common.runtime import Enclave
from hfl_common.tee import SimulatedProvider
from hfl_common.tee.identities import service_identity
from tests import fedkit

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def party_trainer(
    files: fedkit.FederationFiles, target: str, party: PartySigner, label: str
) -> fedkit.TestTrainer:
    """A genuine trainer enclave with a fresh key, enrolled by `party`."""
    key_file = files.directory / f"{label}.party.pem"
    key_file.write_bytes(party.private_pem())
    key_file.chmod(0o600)
    options = replace(
        files.enclave_options("trainer", files.directory / label),
        party=party.party,
        party_key=key_file,
    )
    enclave = Enclave.open(options, None)
    with bootstrap_attestation_service(target, enclave.verifier) as pinned:
        key = EnclaveKey.generate()
        provider = SimulatedProvider(
            files.platform(), service_identity("trainer", files.platform())
        )
        issued = obtain_certificate(pinned, key, provider, "trainer", label, party=party)
    return fedkit.TestTrainer(ServiceCredentials(key, issued), enclave.verifier, label=label)


def test_a_second_trainer_of_one_party_is_refused_while_the_first_is_active(
    tmp_path: Path,
) -> None:
    files = fedkit.prepare_files(tmp_path / "federation")
    acme, other = PartySigner.generate("acme"), PartySigner.generate("other")
    files.policy.write_text(
        files.policy.read_text()
        + "".join(
            f'\n[parties.{p.party}]\npublic_key = "{public_key_text(p.key)}"\n'
            for p in (acme, other)
        )
    )
    attestation = fedkit.start_attestation(files, tmp_path / "attestation")
    plan = files.write_plan(fedkit.PlanSpec(rounds=2, min_trainers=2, evaluate_every=100))
    aggregator = fedkit.start_aggregator(
        files, plan, tmp_path / "aggregator", attestation.target, registry=CollectorRegistry()
    )
    trainers: list[fedkit.TestTrainer] = []
    try:
        first = party_trainer(files, attestation.target, acme, "acme-1")
        sybil = party_trainer(files, attestation.target, acme, "acme-2")
        honest = party_trainer(files, attestation.target, other, "other-1")
        trainers += [first, sybil, honest]
        first.connect(aggregator.target, plan).join()
        with fedkit.rpc_error() as caught:
            sybil.connect(aggregator.target, plan).join()
        code, details = fedkit.code_and_details(caught)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "party 'party:acme' already has 1 active" in details
        info = error_info(caught[0])
        assert info is not None
        assert info.reason == "PARTY_LIMIT"
        # The Sybil identity does not count toward min_trainers: no round yet.
        assert first.get_task(0).kind == aggregator_pb2.TASK_KIND_WAIT
        honest.connect(aggregator.target, plan).join()
        assert first.wait_for_task(aggregator_pb2.TASK_KIND_TRAIN).round == 1
        # Once the first has left, the party may bring another trainer.
        first.leave()
        sybil.join()
    finally:
        for t in trainers:
            t.close()
        aggregator.stop(0)
        attestation.stop(0)
