"""The sealed checkpoint, streamed: every tensor comes back bit for bit, nothing is in
clear, and an old, foreign, truncated or other-plan checkpoint is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hfl_aggregator.checkpoint import Checkpoint, CheckpointStore
from hfl_common.errors import ConfigError
from hfl_common.sealing import SimulatedSealingKeys, UnsealError, write_sealed

KEYS = SimulatedSealingKeys(b"platform-secret", b"\x33" * 32)
PLAN = "ab" * 32


def checkpoint() -> Checkpoint:
    rng = np.random.default_rng(1)
    big = rng.standard_normal((300, 1100)).astype(np.float32)  # more than one 1 MiB record
    return Checkpoint(
        plan_sha256=PLAN,
        model_version=7,
        completed_rounds=6,
        weights={
            "conv/kernel": big,
            "dense/bias": rng.standard_normal(10),  # float64
            "step": np.array(12, dtype=np.int64),  # 0-d
            "empty": np.zeros((0, 4), dtype=np.float32),
            "strided": big[:, ::2],  # not contiguous
            "big_endian": np.arange(5, dtype=">f4"),
        },
        strategy_state={"m/conv/kernel": np.full((3, 3), 0.5, dtype=np.float32)},
        history=[{"round": 6, "state": "completed", "train_loss": 0.25}],
    )


def test_every_tensor_and_the_round_state_come_back_bit_for_bit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEYS)
    saved = checkpoint()
    store.save(saved)
    loaded = store.load(PLAN)
    assert loaded is not None
    assert (loaded.model_version, loaded.completed_rounds) == (7, 6)
    assert loaded.history == saved.history
    for got, want in (
        (loaded.weights, saved.weights),
        (loaded.strategy_state, saved.strategy_state),
    ):
        assert list(got) == list(want)
        for name, array in want.items():
            assert got[name].dtype == array.dtype, name
            assert got[name].shape == array.shape, name
            assert got[name].tobytes() == array.tobytes(), name
    raw = store.path.read_bytes()
    assert saved.weights["conv/kernel"][0].tobytes() not in raw
    assert b"conv/kernel" not in raw  # the metadata is sealed too


def test_a_new_save_replaces_the_old_one_and_removes_stale_temporaries(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEYS)
    store.save(checkpoint())
    stale = tmp_path / ".checkpoint.sealed.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint from a crash")
    newer = Checkpoint(PLAN, 8, 7, {"w": np.ones(3, np.float32)}, {})
    store.save(newer)
    loaded = store.load(PLAN)
    assert loaded is not None
    assert loaded.model_version == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.sealed"]


def test_a_checkpoint_of_another_plan_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEYS)
    store.save(checkpoint())
    with pytest.raises(ConfigError, match="belongs to plan abababababababab"):
        store.load("cd" * 32)


def test_a_format_1_checkpoint_is_refused_with_what_to_do(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEYS)
    write_sealed(KEYS, "hfl-aggregator-checkpoint-v1", store.path, b"an old sealed npz")
    with pytest.raises(ConfigError, match=r"format 1.*move it away"):
        store.load(PLAN)


def test_a_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEYS)
    store.save(checkpoint())
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsealError, match="truncated"):
        store.load(PLAN)


def test_another_enclave_cannot_load_it(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, KEYS).save(checkpoint())
    other = CheckpointStore(tmp_path, SimulatedSealingKeys(b"platform-secret", b"\x44" * 32))
    with pytest.raises(UnsealError, match="different enclave identity"):
        other.load(PLAN)


def test_an_object_array_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEYS)
    bad = Checkpoint(PLAN, 1, 1, {"w": np.array([object()])}, {})
    with pytest.raises(ConfigError, match="only plain numeric arrays"):
        store.save(bad)
    assert not store.path.exists()
