"""The streaming mean fold and the encrypted spill store."""

from __future__ import annotations

import gc
import os
import stat
import tracemalloc
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfl_aggregator.accumulate import (
    InMemoryUpdates,
    MeanAccumulator,
    SpillIntegrityError,
    SpillStore,
    Weights,
    model_layout,
)
from hfl_common.errors import FailedPreconditionError, InvalidArgumentError


def random_model(rng: np.random.Generator, dtype: type = np.float32) -> Weights:
    return {
        "conv/kernel": rng.standard_normal((3, 3, 2, 4)).astype(dtype),
        "conv/bias": rng.standard_normal(4).astype(dtype),
        "dense/kernel": rng.standard_normal((16, 5)).astype(dtype),
    }


# ------------------------------------------------------------- MeanAccumulator


def test_mean_accumulator_equals_numpy_average() -> None:
    rng = np.random.default_rng(0)
    updates = [random_model(rng) for _ in range(6)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0, 11.0]
    acc = MeanAccumulator(updates[0])
    for update, weight in zip(updates, weights, strict=True):
        acc.add(update, weight)
    mean = acc.mean()
    assert acc.count == 6
    assert acc.total_weight == 29.0
    for name in updates[0]:
        expected = np.average(np.stack([u[name] for u in updates]), axis=0, weights=weights)
        assert mean[name].dtype == np.float32
        np.testing.assert_allclose(mean[name], expected, rtol=1e-5, atol=1e-6)


def test_float64_sum_matches_numpy_average_to_double_precision() -> None:
    rng = np.random.default_rng(1)
    updates = [random_model(rng, np.float64) for _ in range(4)]
    acc = MeanAccumulator(model_layout(updates[0]), sum_dtype=np.float64)
    for update in updates:
        acc.add(update, 2.5)
    expected = np.mean(np.stack([u["dense/kernel"] for u in updates]), axis=0)
    np.testing.assert_allclose(acc.mean()["dense/kernel"], expected, rtol=1e-13)


def test_accumulator_accepts_a_layout_list() -> None:
    layout: list[tuple[str, tuple[int, ...], npt.DTypeLike]] = [
        ("w", (2,), "float32"),
        ("step", (), np.int64),
    ]
    acc = MeanAccumulator(layout)
    acc.add({"w": np.array([1.0, 2.0], np.float32), "step": np.array(4)}, 1)
    acc.add({"w": np.array([3.0, 4.0], np.float32), "step": np.array(7)}, 1)
    mean = acc.mean()
    np.testing.assert_allclose(mean["w"], [2.0, 3.0])  # (1 + 3) / 2, (2 + 4) / 2
    assert mean["step"].dtype == np.int64
    assert int(mean["step"]) == 6  # (4 + 7) / 2 = 5.5, rounded half to even -> 6


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    weights=st.lists(st.floats(0.01, 1e4), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_update_shape_and_weights_average_like_numpy(
    shape: tuple[int, ...], weights: list[float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    updates = [rng.standard_normal(shape) for _ in weights]
    acc = MeanAccumulator({"t": np.zeros(shape)}, sum_dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        acc.add({"t": update}, weight)
    expected = np.average(np.stack(updates), axis=0, weights=weights)
    np.testing.assert_allclose(acc.mean()["t"], expected, rtol=1e-9, atol=1e-12)


def test_mean_of_no_updates_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="no updates to average"):
        MeanAccumulator({"w": np.zeros(2)}).mean()


def test_update_of_the_wrong_shape_is_refused() -> None:
    acc = MeanAccumulator({"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(
        InvalidArgumentError, match=r"update tensor 'w' has shape \(3, 2\), the model's is \(2, 3\)"
    ):
        acc.add({"w": np.zeros((3, 2), np.float32)}, 1)


def test_update_with_an_extra_tensor_is_refused() -> None:
    acc = MeanAccumulator({"w": np.zeros(2)})
    with pytest.raises(InvalidArgumentError, match=r"tensors \['x'\] that the model does not have"):
        acc.add({"w": np.zeros(2), "x": np.zeros(1)}, 1)


def test_non_positive_weight_is_refused() -> None:
    acc = MeanAccumulator({"w": np.zeros(2)})
    with pytest.raises(InvalidArgumentError, match="weight must be finite and > 0, got 0"):
        acc.add({"w": np.zeros(2)}, 0)


def test_accumulator_is_closed_after_mean() -> None:
    acc = MeanAccumulator({"w": np.zeros(2)})
    acc.add({"w": np.ones(2)}, 1)
    first = acc.mean()
    assert acc.mean() is first
    with pytest.raises(FailedPreconditionError, match="already averaged"):
        acc.add({"w": np.ones(2)}, 1)


def test_in_memory_updates_refuse_an_empty_round() -> None:
    with pytest.raises(InvalidArgumentError, match="the round received none"):
        InMemoryUpdates([])


# ------------------------------------------------------------------ SpillStore


def distinctive_update() -> Weights:
    # Values whose float32 bytes are easy to search for in a file.
    return {
        "a": np.arange(1000, 1256, dtype=np.float32).reshape(16, 16) * 1.5,
        "b": np.full(100, 123456.789, dtype=np.float64),
    }


def test_spill_files_hold_no_plaintext_and_decrypt_exactly(tmp_path: Path) -> None:
    update = distinctive_update()
    other = {n: -a for n, a in update.items()}
    with SpillStore(update, tmp_path, segment_bytes=256) as store:
        store.add(update, 5)
        store.add(other, 7)
        files = sorted(store.directory.iterdir())
        assert files == [store.path_of(0), store.path_of(1)]
        for path in files:
            data = path.read_bytes()
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            for array in (*update.values(), *other.values()):
                raw = array.tobytes()
                assert raw[:16] not in data
                assert raw[-16:] not in data
        assert store.weights() == [5.0, 7.0]
        np.testing.assert_array_equal(store.read(1)["a"], other["a"])
        np.testing.assert_array_equal(store.stacked("b"), np.stack([update["b"], other["b"]]))
        assert store.stacked("a").dtype == np.float32
        got = list(store.updates())
        assert [w for _, w in got] == [5.0, 7.0]
        np.testing.assert_array_equal(got[0][0]["a"], update["a"])
        # (5 * x + 7 * -x) / 12 = -x / 6
        np.testing.assert_allclose(store.mean()["b"], update["b"] / -6.0)


def test_tampered_spill_file_is_detected(tmp_path: Path) -> None:
    update = distinctive_update()
    with SpillStore(update, tmp_path) as store:
        store.add(update, 1)
        path = store.path_of(0)
        data = bytearray(path.read_bytes())
        data[100] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(SpillIntegrityError, match="failed authentication in tensor 'a'"):
            store.read(0)


def test_swapped_spill_files_are_detected(tmp_path: Path) -> None:
    update = distinctive_update()
    with SpillStore(update, tmp_path) as store:
        store.add(update, 1)
        store.add({n: a * 2 for n, a in update.items()}, 1)
        first, second = store.path_of(0), store.path_of(1)
        first_bytes = first.read_bytes()
        first.write_bytes(second.read_bytes())
        second.write_bytes(first_bytes)
        with pytest.raises(SpillIntegrityError, match="of update 0 failed authentication"):
            store.stacked("a")


def test_truncated_or_missing_spill_file_is_detected(tmp_path: Path) -> None:
    update = distinctive_update()
    with SpillStore(update, tmp_path) as store:
        store.add(update, 1)
        store.add(update, 1)
        store.path_of(0).write_bytes(store.path_of(0).read_bytes()[:-1])
        with pytest.raises(SpillIntegrityError, match=r"has \d+ bytes, expected \d+"):
            store.read(0)
        store.path_of(1).unlink()
        with pytest.raises(SpillIntegrityError, match="of update 1 is missing"):
            store.read(1)


def test_closing_the_store_deletes_its_files(tmp_path: Path) -> None:
    update = distinctive_update()
    store = SpillStore(update, tmp_path)
    store.add(update, 1)
    directory = store.directory
    assert directory.parent == tmp_path
    assert store.path_of(0).exists()
    store.close()
    assert not directory.exists()
    with pytest.raises(FailedPreconditionError, match="the spill store was closed"):
        store.read(0)


def test_spill_store_refuses_an_update_of_another_model(tmp_path: Path) -> None:
    with SpillStore({"w": np.zeros(3, np.float32)}, tmp_path) as store:
        with pytest.raises(InvalidArgumentError, match=r"update lacks tensors \['w'\]"):
            store.add({"v": np.zeros(3, np.float32)}, 1)
        assert store.count == 0
        assert list(store.directory.iterdir()) == []


# -------------------------------------------------------------------- memory


def peak_fold_bytes(template: Weights, n: int) -> int:
    """Peak traced bytes while folding n updates of the template's layout."""
    rng = np.random.default_rng(n)
    gc.collect()
    tracemalloc.start()
    try:
        acc = MeanAccumulator(template)
        for _ in range(n):
            update = {
                name: rng.standard_normal(a.shape, dtype=np.float32) for name, a in template.items()
            }
            acc.add(update, 10)
            del update
        acc.mean()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fold_memory_does_not_grow_with_the_number_of_updates() -> None:
    # An ~8 MB float32 model in four tensors: the peak is sum + one update + a
    # constant scratch, whatever the number of updates folded.
    template = {
        "t0": np.zeros((512, 1024), np.float32),
        "t1": np.zeros((256, 1024), np.float32),
        "t2": np.zeros((1024, 1024), np.float32),
        "t3": np.zeros(1000, np.float32),
    }
    model_bytes = sum(a.nbytes for a in template.values())
    peak_2 = peak_fold_bytes(template, 2)
    peak_8 = peak_fold_bytes(template, 8)
    assert peak_8 - peak_2 <= 256 * 1024
    # sum (1x) + the update being built (1x) + scratch (2 MiB float32 block)
    assert peak_8 <= 2 * model_bytes + 3 * 1024 * 1024
