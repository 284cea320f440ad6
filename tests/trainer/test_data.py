"""Loaders, partitioning and input pipelines of the trainer's local data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hfl_common.errors import InvalidArgumentError
from hfl_trainer import data
from hfl_trainer.data import DataError

RECORDS_PER_BATCH = 20


def _cifar_arrays(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Six batches (five training, one test) of channel-major rows and labels."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, 256, size=(RECORDS_PER_BATCH, 3072), dtype=np.uint8),
            rng.integers(0, 10, size=RECORDS_PER_BATCH).astype(np.int64),
        )
        for _ in range(6)
    ]


def _batch_names(suffix: str) -> list[str]:
    return [f"data_batch_{i}{suffix}" for i in range(1, 6)] + [f"test_batch{suffix}"]


def _write_python_batches(
    folder: Path, batches: list[tuple[np.ndarray, np.ndarray]], protocol: int = 2
) -> None:
    folder.mkdir(parents=True)
    for name, (rows, labels) in zip(_batch_names(""), batches, strict=True):
        entry = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": rows,
            b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
        }
        # Protocol 2 by default, as the official (Python 2 cPickle) files.
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))


def _write_binary_batches(folder: Path, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    folder.mkdir(parents=True)
    for name, (rows, labels) in zip(_batch_names(".bin"), batches, strict=True):
        records = np.concatenate([labels.astype(np.uint8)[:, None], rows], axis=1)
        (folder / name).write_bytes(records.tobytes())


def test_digits_are_scaled_8x8x1_with_a_fixed_stratified_split() -> None:
    first = data.load_digits()
    second = data.load_digits()

    assert first.input_shape == (8, 8, 1)
    assert first.x_train.shape[1:] == (8, 8, 1)
    assert first.x_train.shape[0] + first.x_test.shape[0] == 1797
    assert first.x_test.shape[0] == 450
    assert first.x_train.min() >= 0.0
    assert first.x_train.max() == 1.0
    np.testing.assert_array_equal(first.y_test, second.y_test)
    test_share = np.bincount(first.y_test, minlength=10) / np.bincount(
        np.concatenate([first.y_train, first.y_test]), minlength=10
    )
    assert np.all(np.abs(test_share - 0.25) < 0.02)


def test_both_cifar_formats_give_identical_arrays_in_hwc_layout(tmp_path: Path) -> None:
    batches = _cifar_arrays()
    _write_python_batches(tmp_path / "py" / "cifar-10-batches-py", batches)
    _write_binary_batches(tmp_path / "bin" / "cifar-10-batches-bin", batches)

    from_python = data.load_cifar10(tmp_path / "py")
    from_binary = data.load_cifar10(tmp_path / "bin" / "cifar-10-batches-bin")

    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_python, field), getattr(from_binary, field))
    assert from_python.x_train.shape == (5 * RECORDS_PER_BATCH, 32, 32, 3)
    assert from_python.x_train.dtype == np.uint8
    assert from_python.preprocessing == "cifar"
    # Channel-major rows: byte k*1024 + r*32 + c is channel k of pixel (r, c).
    rows, labels = batches[2]
    image = from_binary.x_train[2 * RECORDS_PER_BATCH + 7]
    assert image[5, 9, 0] == rows[7, 0 * 1024 + 5 * 32 + 9]
    assert image[5, 9, 2] == rows[7, 2 * 1024 + 5 * 32 + 9]
    assert from_binary.y_train[2 * RECORDS_PER_BATCH + 7] == labels[7]
    np.testing.assert_array_equal(from_python.y_test, batches[5][1])


def test_python_batches_pickled_by_python3_protocol4_load_too(tmp_path: Path) -> None:
    batches = _cifar_arrays(seed=1)
    _write_python_batches(tmp_path / "cifar-10-batches-py", batches, protocol=4)

    loaded = data.load_cifar10(tmp_path)

    np.testing.assert_array_equal(loaded.y_train[:RECORDS_PER_BATCH], batches[0][1])
    assert loaded.x_test[3, 0, 1, 1] == batches[5][0][3, 1024 + 1]


def test_missing_cifar_batch_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    _write_binary_batches(folder, _cifar_arrays())
    (folder / "data_batch_3.bin").unlink()

    with pytest.raises(DataError, match=r"data_batch_3\.bin: missing") as info:
        data.load_cifar10(tmp_path)
    assert str(folder / "data_batch_3.bin") in str(info.value)


def test_truncated_binary_batch_names_file_and_size(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    _write_binary_batches(folder, _cifar_arrays())
    (folder / "data_batch_3.bin").write_bytes(b"\0" * 30000)

    with pytest.raises(DataError) as info:
        data.load_cifar10(folder)
    assert str(info.value) == (
        f"{folder / 'data_batch_3.bin'}: size 30000 is not a multiple of the 3073-byte record"
    )
    assert isinstance(info.value, InvalidArgumentError)


def test_out_of_range_label_is_named(tmp_path: Path) -> None:
    batches = _cifar_arrays()
    batches[5][1][4] = 12
    _write_binary_batches(tmp_path / "cifar-10-batches-bin", batches)

    with pytest.raises(DataError, match=r"test_batch\.bin: label 12 of record 4 is outside 0\.\.9"):
        data.load_cifar10(tmp_path)


def test_missing_or_empty_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: CIFAR-10 data directory does not exist"):
        data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no CIFAR-10 batches found; expected data_batch_1"):
        data.load_cifar10(tmp_path)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_python_batch_with_a_foreign_global_is_refused_without_running_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_python_batches(folder, _cifar_arrays())
    marker = tmp_path / "pwned"
    payload = {b"data": _RunsCommand(marker), b"labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR-10 python batch: global "):
        data.load_cifar10(folder)
    assert not marker.exists()


def test_python_batch_with_an_object_array_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_python_batches(folder, _cifar_arrays())
    payload = {b"data": np.array([b"x", 1], dtype=object), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(DataError, match=r"test_batch: not a CIFAR-10 python batch: dtype"):
        data.load_cifar10(folder)


def test_python_batch_with_wrong_row_size_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = _cifar_arrays()
    batches[0] = (batches[0][0][:, :3000], batches[0][1])
    _write_python_batches(folder, batches)

    with pytest.raises(
        DataError, match=r"data_batch_1: 'data' rows have 3000 bytes, expected 3072"
    ):
        data.load_cifar10(folder)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_deterministic_disjoint_and_complete(scheme: str) -> None:
    y = np.random.default_rng(0).integers(0, 10, size=1000)
    parts = [
        data.partition(y, 4, k, scheme=scheme, alpha=0.5, seed=11)  # type: ignore[arg-type]
        for k in range(4)
    ]
    again = data.partition(y, 4, 2, scheme=scheme, alpha=0.5, seed=11)  # type: ignore[arg-type]
    other_seed = data.partition(y, 4, 2, scheme=scheme, alpha=0.5, seed=12)  # type: ignore[arg-type]

    np.testing.assert_array_equal(parts[2], again)
    assert not np.array_equal(parts[2], other_seed)
    merged = np.concatenate(parts)
    assert merged.size == y.size
    np.testing.assert_array_equal(np.sort(merged), np.arange(y.size))
    assert all(part.size >= 1 for part in parts)


def test_iid_partitions_are_balanced() -> None:
    y = np.arange(103) % 10
    sizes = [data.partition(y, 4, k, seed=0).size for k in range(4)]

    assert sorted(sizes) == [25, 26, 26, 26]


def test_dirichlet_with_small_alpha_is_label_skewed() -> None:
    y = np.repeat(np.arange(10), 200)

    def dominant_share(scheme: str, alpha: float) -> float:
        shares = []
        for k in range(5):
            labels = y[data.partition(y, 5, k, scheme=scheme, alpha=alpha, seed=3)]  # type: ignore[arg-type]
            shares.append(np.bincount(labels, minlength=10).max() / labels.size)
        return float(np.mean(shares))

    assert dominant_share("iid", 1.0) < 0.15
    assert dominant_share("dirichlet", 0.05) > 0.4


def test_partition_arguments_are_checked() -> None:
    y = np.zeros(10, dtype=np.int64)
    with pytest.raises(InvalidArgumentError, match=r"partition index 3 is outside 0\.\.2"):
        data.partition(y, 3, 3)
    with pytest.raises(InvalidArgumentError, match=r"10 examples cannot fill 20 partitions"):
        data.partition(y, 20, 0)
    with pytest.raises(InvalidArgumentError, match=r"Dirichlet alpha 0\.0 must be positive"):
        data.partition(y, 2, 0, scheme="dirichlet", alpha=0.0)
    with pytest.raises(InvalidArgumentError, match=r"unknown partition scheme 'shards'"):
        data.partition(y, 2, 0, scheme="shards")  # type: ignore[arg-type]


def test_synthetic_data_is_seeded_and_shaped() -> None:
    first = data.synthetic(100, (4, 4, 3), 5, seed=1)
    second = data.synthetic(100, (4, 4, 3), 5, seed=1)

    assert first.x_train.shape == (75, 4, 4, 3)
    assert first.x_test.shape == (25, 4, 4, 3)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    assert set(np.unique(first.y_train)) <= set(range(5))


def _uint8_cifar_like(n: int) -> data.Dataset:
    rng = np.random.default_rng(5)
    return data.Dataset(
        x_train=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, size=n),
        x_test=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, size=n),
        num_classes=10,
        input_shape=(32, 32, 3),
        name="cifar-like",
        preprocessing="cifar",
    )


def test_cifar_training_pipeline_augments_and_standardizes_reproducibly() -> None:
    dataset = _uint8_cifar_like(16)

    first = [x.numpy() for x, _ in data.train_pipeline(dataset, 8, seed=4)]
    second = [x.numpy() for x, _ in data.train_pipeline(dataset, 8, seed=4)]

    assert [b.shape for b in first] == [(8, 32, 32, 3), (8, 32, 32, 3)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    images = np.concatenate(first)
    # Zero-padding and cropping change pixels, yet every image is standardised.
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    originals = tf.image.per_image_standardization(dataset.x_train.astype(np.float32)).numpy()
    unchanged = sum(
        any(np.allclose(image, original, atol=1e-5) for original in originals) for image in images
    )
    # A crop at offset (4, 4) without a flip is the identity: 1 in 162 draws.
    assert unchanged <= 2


def test_cifar_evaluation_pipeline_only_standardizes_in_order() -> None:
    dataset = _uint8_cifar_like(10)

    batches = list(data.eval_pipeline(dataset, 4))

    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    expected = tf.image.per_image_standardization(dataset.x_test.astype(np.float32)).numpy()
    np.testing.assert_allclose(images, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(labels, dataset.y_test)


def test_dataset_rejects_inconsistent_splits() -> None:
    with pytest.raises(DataError, match=r"train split has 3 images but 2 labels"):
        data.Dataset(
            x_train=np.zeros((3, 2, 2, 1), np.float32),
            y_train=np.zeros(2, np.int64),
            x_test=np.zeros((1, 2, 2, 1), np.float32),
            y_test=np.zeros(1, np.int64),
            num_classes=2,
            input_shape=(2, 2, 1),
            name="bad",
        )
