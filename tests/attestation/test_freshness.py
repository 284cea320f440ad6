"""The attestation service's sealed state cannot be rolled back silently: its generation
is attested in its own certificate, and clients refuse one lower than they saw."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hfl_common.attest_client import bootstrap_attestation_service
from hfl_common.errors import PermissionDeniedError
from hfl_common.freshness import GenerationMemory, decode_generation, encode_generation

from .conftest import ServiceFactory, VerifierFactory


def test_each_start_raises_the_attested_generation_and_clients_remember_it(
    start_service: ServiceFactory, make_verifier: VerifierFactory, tmp_path: Path
) -> None:
    state = tmp_path / "ca-state"
    memory = GenerationMemory(tmp_path / "client" / "seen.json")
    for expected in (1, 2, 3):
        service = start_service(state_dir=state)
        assert service.generation == expected
        with bootstrap_attestation_service(
            f"127.0.0.1:{service.port}", make_verifier(), memory=memory
        ):
            pass
        assert memory.seen() == expected
        service.stop(0)


def test_a_rolled_back_state_is_refused_by_a_client_that_saw_a_newer_one(
    start_service: ServiceFactory, make_verifier: VerifierFactory, tmp_path: Path
) -> None:
    state = tmp_path / "ca-state"
    old_copy = tmp_path / "old-copy"
    memory = GenerationMemory(tmp_path / "client" / "seen.json")
    first = start_service(state_dir=state)
    first.stop(0)
    shutil.copytree(state, old_copy)  # the host keeps generation 1's sealed state
    for _ in range(2):
        later = start_service(state_dir=state)
        with bootstrap_attestation_service(
            f"127.0.0.1:{later.port}", make_verifier(), memory=memory
        ):
            pass
        later.stop(0)
    assert memory.seen() == 3
    shutil.rmtree(state)
    shutil.copytree(old_copy, state)  # ... and puts it back

    rolled_back = start_service(state_dir=state)
    assert rolled_back.generation == 2
    with pytest.raises(PermissionDeniedError) as caught:
        bootstrap_attestation_service(
            f"127.0.0.1:{rolled_back.port}", make_verifier(), memory=memory
        )
    assert "its state went back from generation 3 to 2" in str(caught.value)
    assert caught.value.reason == "attestation_rollback"
    # a client without memory (first contact) cannot tell, by design
    with bootstrap_attestation_service(f"127.0.0.1:{rolled_back.port}", make_verifier()):
        pass


def test_generation_encoding_round_trips_and_ignores_other_user_data() -> None:
    assert decode_generation(encode_generation(7).ljust(32, b"\x00")) == 7
    assert decode_generation(bytes(32)) is None
    assert decode_generation(b"HFLGEN0") is None
