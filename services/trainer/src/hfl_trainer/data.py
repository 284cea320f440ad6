"""Local data of a trainer: loaders, partitioning and the tf.data input pipelines.

Nothing here downloads anything. The sources are:

- :func:`load_digits`: scikit-learn's bundled handwritten digits (8x8x1).
- :func:`load_cifar10`: CIFAR-10 from the directory an operator points to, in
  either of its standard distribution formats (python pickle batches or the
  binary batches), see https://www.cs.toronto.edu/~kriz/cifar.html.
- :func:`synthetic`: learnable random data for tests and benchmarks.

Images are kept compactly (CIFAR as uint8, 150 MB for the whole training set
rather than 600 MB as float32; enclave memory is precious) and converted in
the input pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits as sk_load_digits
from sklearn.model_selection import train_test_split

from hfl_common.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

Preprocessing = Literal["none", "cifar"]
PartitionScheme = Literal["iid", "dirichlet"]

# CIFAR-10 layout, from https://www.cs.toronto.edu/~kriz/cifar.html: 32x32x3
# images, each stored channel-major (1024 red, 1024 green, 1024 blue bytes,
# rows in order); the binary format prefixes each record with one label byte.
CIFAR_IMAGE_SHAPE = (32, 32, 3)
CIFAR_IMAGE_BYTES = 32 * 32 * 3
CIFAR_RECORD_BYTES = 1 + CIFAR_IMAGE_BYTES
CIFAR_NUM_CLASSES = 10
_CIFAR_TRAIN_BATCHES = 5
# The CIFAR training augmentation of He et al. 2016, section 4.2: 4 pixels
# padded on each side, a random 32x32 crop, a random horizontal flip.
_CIFAR_PAD = 4

# Held-out share and seed of the digits split (fixed, so every process agrees).
_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0
# scikit-learn's digits hold 4-bit grey levels 0..16.
_DIGITS_MAX_VALUE = 16.0


class DataError(InvalidArgumentError):
    """Local training data is missing or malformed; the message names the file."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled training and held-out split of one data source.

    ``preprocessing`` says what the input pipeline does with the images:
    ``"none"`` feeds them as they are (float32), ``"cifar"`` takes uint8 images
    and applies CIFAR augmentation (training) and per-image standardisation
    (training and evaluation).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    preprocessing: Preprocessing = "none"

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"dataset {self.name!r}: {split} split has {x.shape[0]} images "
                    f"but {y.shape[0]} labels"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"dataset {self.name!r}: {split} images have shape {tuple(x.shape[1:])}, "
                    f"expected {tuple(self.input_shape)}"
                )

    def with_train_indices(self, indices: np.ndarray) -> Dataset:
        """This dataset with the training split restricted to ``indices`` (test split kept)."""
        return dataclasses.replace(
            self, x_train=self.x_train[indices], y_train=self.y_train[indices]
        )


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits: 1797 images 8x8x1 scaled to [0, 1].

    A fixed stratified split holds out 25% (seed 0) for evaluation.
    """
    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / _DIGITS_MAX_VALUE)[..., np.newaxis]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        input_shape=(8, 8, 1),
        name="digits",
    )


def synthetic(
    num_examples: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    test_fraction: float = 0.25,
    noise: float = 1.0,
) -> Dataset:
    """Learnable random data: each class is a Gaussian around its own random mean."""
    if num_examples < 2 or num_classes < 2:
        raise InvalidArgumentError(
            f"synthetic data needs at least 2 examples and 2 classes, got {num_examples} "
            f"and {num_classes}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgumentError(
            f"test_fraction {test_fraction} must lie strictly between 0 and 1"
        )
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, size=(num_classes, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=num_examples, dtype=np.int64)
    x = means[y] + rng.normal(0.0, noise, size=(num_examples, *input_shape)).astype(np.float32)
    num_test = max(1, round(num_examples * test_fraction))
    return Dataset(
        x_train=x[num_test:],
        y_train=y[num_test:],
        x_test=x[:num_test],
        y_test=y[:num_test],
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        name="synthetic",
    )


# --------------------------------------------------------------------------- entry points
# The built-in datasets as entry points (hfl_common.config.BUILTIN_DATA_ENTRIES), called
# by hfl_trainer.project like a project's own data function.


def digits(data_dir: Path | None = None) -> Dataset:
    """Entry point ``hfl_trainer.data:digits``: the bundled digits (``data_dir`` unused)."""
    return load_digits()


def cifar10(data_dir: Path | None = None) -> Dataset:
    """Entry point ``hfl_trainer.data:cifar10``: CIFAR-10 batches from ``data_dir``."""
    if data_dir is None:
        raise DataError(
            "dataset cifar10 needs the trainer's --data-dir pointing at the CIFAR-10 batches "
            "(nothing is downloaded)"
        )
    return load_cifar10(data_dir)


def synthetic_data(
    data_dir: Path | None = None,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    synthetic_examples: int = 512,
    num_partitions: int = 1,
) -> Dataset:
    """Entry point ``hfl_trainer.data:synthetic_data``: ``synthetic_examples`` per party."""
    return synthetic(synthetic_examples * num_partitions, input_shape, num_classes, seed=seed)


# --------------------------------------------------------------------------- CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild a CIFAR batch and nothing else.

    A pickle can call any importable function, so loading an untrusted one with
    ``pickle.load`` runs arbitrary code. The CIFAR-10 python batches are dicts
    of bytes, str, ints, lists and one numpy uint8 array; dicts, lists, bytes,
    str and ints need no import at all (they are pickle opcodes), and a numpy
    array is rebuilt by exactly three globals: ``numpy.core.multiarray._reconstruct``
    (``numpy._core`` when pickled by numpy 2), ``numpy.ndarray`` and
    ``numpy.dtype``. Those are all this allows, and ``numpy.dtype`` only for
    plain numeric types, so no object array (whose items would be pickles
    again) can be built. The official files come from Python 2, whose strings
    load as bytes; a batch re-pickled by Python 3 with protocol 2 spells bytes
    as ``_codecs.encode(text, "latin1")``, so that is allowed too, for latin1
    only.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return _numeric_dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _numeric_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype[Any]:
    # A batch pickled by Python 2 (the official files) and read with
    # encoding="bytes" names its dtype as bytes.
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", errors="replace")
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"dtype {spec!r} is not allowed in a CIFAR batch")
    dtype = np.dtype(spec)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"dtype {spec!r} is not allowed in a CIFAR batch")
    return dtype


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"{path}: missing (CIFAR-10 python batches need data_batch_1..5 and test_batch)"
        )
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, expected a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: lacks the 'data' or 'labels' entry")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a 2-D uint8 array, got {_describe(data)}")
    if data.shape[1] != CIFAR_IMAGE_BYTES:
        raise DataError(
            f"{path}: 'data' rows have {data.shape[1]} bytes, expected {CIFAR_IMAGE_BYTES}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers: {exc}") from exc
    if y.shape != (data.shape[0],):
        raise DataError(f"{path}: {y.size} labels for {data.shape[0]} images")
    _check_labels(path, y)
    return _channel_major_to_hwc(data), y


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"{path}: missing (CIFAR-10 binary batches need data_batch_1.bin..data_batch_5.bin "
            "and test_batch.bin)"
        )
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES != 0:
        raise DataError(
            f"{path}: size {raw.size} is not a multiple of the {CIFAR_RECORD_BYTES}-byte record"
        )
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    y = records[:, 0].astype(np.int64)
    _check_labels(path, y)
    return _channel_major_to_hwc(records[:, 1:]), y


def _check_labels(path: Path, y: np.ndarray) -> None:
    bad = np.flatnonzero((y < 0) | (y >= CIFAR_NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"{path}: label {int(y[bad[0]])} of record {int(bad[0])} is outside "
            f"0..{CIFAR_NUM_CLASSES - 1}"
        )


def _channel_major_to_hwc(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _find_cifar_dir(
    data_dir: Path,
) -> tuple[Path, Callable[[Path], tuple[np.ndarray, np.ndarray]], str]:
    candidates = [data_dir, data_dir / "cifar-10-batches-py", data_dir / "cifar-10-batches-bin"]
    for folder in candidates:
        if (folder / "data_batch_1").is_file():
            return folder, _read_python_batch, ""
        if (folder / "data_batch_1.bin").is_file():
            return folder, _read_binary_batch, ".bin"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: CIFAR-10 data directory does not exist")
    raise DataError(
        f"{data_dir}: no CIFAR-10 batches found; expected data_batch_1 (python) or "
        "data_batch_1.bin (binary) in it or in its cifar-10-batches-py / "
        "cifar-10-batches-bin folder"
    )


def load_cifar10(data_dir: Path | str) -> Dataset:
    """CIFAR-10 from ``data_dir``: the batches folder itself or its parent.

    Both distribution formats are detected (python first when both are there):
    ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``: pickled dicts,
    read by a restricted unpickler) and ``cifar-10-batches-bin``
    (``data_batch_1.bin..5``, ``test_batch.bin``: 3073-byte records). Any missing
    or malformed file raises one :class:`DataError` naming it.
    """
    folder, read, suffix = _find_cifar_dir(Path(data_dir))
    train = [read(folder / f"data_batch_{i}{suffix}") for i in range(1, _CIFAR_TRAIN_BATCHES + 1)]
    x_test, y_test = read(folder / f"test_batch{suffix}")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    logger.info(
        "loaded CIFAR-10 from %s (%s format): %d training, %d test images",
        folder,
        "binary" if suffix else "python",
        len(y_train),
        len(y_test),
    )
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=CIFAR_NUM_CLASSES,
        input_shape=CIFAR_IMAGE_SHAPE,
        name="cifar10",
        preprocessing="cifar",
    )


# --------------------------------------------------------------------------- partitioning


def partition(
    y: np.ndarray,
    num_partitions: int,
    index: int,
    scheme: PartitionScheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 1,
) -> np.ndarray:
    """Sorted indices of the examples that partition ``index`` of ``num_partitions`` holds.

    Deterministic under ``seed``; the partitions are disjoint and cover every
    example, so ``num_partitions`` processes with the same arguments and
    different ``index`` split the data between them without talking.

    - ``"iid"``: a seeded permutation cut into near-equal parts.
    - ``"dirichlet"``: label skew after Hsu, Qi & Brown 2019, "Measuring the
      Effects of Non-Identical Data Distribution for Federated Visual
      Classification" (arXiv:1909.06335): for each class, proportions
      q ~ Dir(alpha * 1) over the partitions split that class's examples.
      Small ``alpha`` gives partitions dominated by few classes; large alpha
      approaches IID. Draws are repeated (deterministically) until every
      partition holds at least ``min_partition_size`` examples.
    """
    labels = np.asarray(y).reshape(-1)
    n = labels.shape[0]
    if num_partitions < 1:
        raise InvalidArgumentError(f"num_partitions is {num_partitions}; it must be at least 1")
    if not 0 <= index < num_partitions:
        raise InvalidArgumentError(f"partition index {index} is outside 0..{num_partitions - 1}")
    if n < num_partitions * max(1, min_partition_size):
        raise InvalidArgumentError(
            f"{n} examples cannot fill {num_partitions} partitions of at least "
            f"{max(1, min_partition_size)} example(s)"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
        return np.sort(parts[index])
    if scheme != "dirichlet":
        raise InvalidArgumentError(
            f"unknown partition scheme {scheme!r}; expected 'iid' or 'dirichlet'"
        )
    if not alpha > 0.0:
        raise InvalidArgumentError(f"Dirichlet alpha {alpha} must be positive")
    classes = np.unique(labels)
    max_attempts = 1000
    for _ in range(max_attempts):
        owners = np.empty(n, dtype=np.int64)
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                owners[chunk] = k
        sizes = np.bincount(owners, minlength=num_partitions)
        if sizes.min() >= min_partition_size:
            return np.flatnonzero(owners == index)
    raise InvalidArgumentError(
        f"no Dirichlet(alpha={alpha}) split of {n} examples into {num_partitions} partitions "
        f"gave every partition {min_partition_size} example(s) in {max_attempts} draws; "
        "raise alpha or lower min_partition_size"
    )


# --------------------------------------------------------------------------- tf.data


def _standardize(images: tf.Tensor) -> tf.Tensor:
    return tf.image.per_image_standardization(tf.cast(images, tf.float32))


def _cifar_augment(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    seeds = tf.random.experimental.stateless_split(tf.stack([seed, seed // 2 + 1]), num=2)
    padded = tf.pad(image, [[_CIFAR_PAD, _CIFAR_PAD], [_CIFAR_PAD, _CIFAR_PAD], [0, 0]])
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=seeds[0])
    flipped = tf.image.stateless_random_flip_left_right(cropped, seed=seeds[1])
    return _standardize(flipped), label


def train_pipeline(dataset: Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled training batches; every iteration of the result is a new epoch.

    The shuffle order and the augmentation draws are seeded, and reshuffled
    (deterministically) on each iteration. ``"cifar"`` preprocessing applies
    pad 4 + random 32x32 crop + random horizontal flip + per-image
    standardisation (He et al. 2016, section 4.2).
    """
    x = _pipeline_images(dataset, dataset.x_train)
    y = dataset.y_train.astype(np.int32)
    n = x.shape[0]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if dataset.preprocessing == "cifar":
        seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: _cifar_augment(xy[0], xy[1], s),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_pipeline(dataset: Dataset, batch_size: int) -> tf.data.Dataset:
    """Held-out batches in order; ``"cifar"`` preprocessing only standardises."""
    x = _pipeline_images(dataset, dataset.x_test)
    ds = tf.data.Dataset.from_tensor_slices((x, dataset.y_test.astype(np.int32)))
    ds = ds.batch(batch_size)
    if dataset.preprocessing == "cifar":
        ds = ds.map(lambda x, y: (_standardize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _pipeline_images(dataset: Dataset, x: np.ndarray) -> np.ndarray:
    # "cifar" images stay uint8 until the pipeline standardises them.
    if dataset.preprocessing == "cifar":
        return x
    return x.astype(np.float32, copy=False)


def train_batch(dataset: Dataset, indices: np.ndarray, seed: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The training examples ``indices`` as one batch, with the training preprocessing.

    Augmentation draws (``"cifar"``) are seeded by ``seed``.
    """
    x = _pipeline_images(dataset, dataset.x_train[indices])
    y = dataset.y_train[indices].astype(np.int32)
    if dataset.preprocessing != "cifar":
        return tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    ds = tf.data.Dataset.zip(
        (tf.data.Dataset.from_tensor_slices((x, y)), tf.data.Dataset.random(seed=seed))
    ).map(lambda xy, s: _cifar_augment(xy[0], xy[1], s))
    return ds.batch(len(indices)).get_single_element()  # type: ignore[no-any-return]


def preprocess_batch(dataset: Dataset, x: np.ndarray) -> tf.Tensor:
    """The evaluation preprocessing of ``dataset`` applied to a batch of images."""
    if dataset.preprocessing == "cifar":
        return _standardize(tf.convert_to_tensor(x))
    return tf.convert_to_tensor(x, dtype=tf.float32)
