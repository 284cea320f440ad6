"""Built-in loaders for a party's own data directory: tables, image folders, NumPy files.

Each is an entry point a plan names like a project's own data function
(``[data] dataset = "table"`` is ``entry = "hfl_trainer.loaders:table"``), with its
options in ``[data.params]``. Each reads only the directory it is given (the
party's own, mounted into its enclave), downloads nothing, and checks what it reads
against the plan: a mismatch is one :class:`~hfl_trainer.data.DataError` naming the
file and, for tables, the column.

Where a directory holds ``train.*`` and ``test.*`` (or ``train/`` and ``test/``),
those are the training and evaluation splits. Where it holds one table (or one
folder per class), a seeded stratified ``eval_fraction`` of it is held out.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from hfl_trainer.data import DataError, Dataset

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _directory(data_dir: Path | None, loader: str) -> Path:
    if data_dir is None:
        raise DataError(
            f"the {loader} loader reads this party's own data directory; give the trainer "
            "--data-dir DIR"
        )
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"{path}: data directory does not exist")
    return path


def _split(
    x: np.ndarray, y: np.ndarray, eval_fraction: float, seed: int, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"{source}: eval_fraction {eval_fraction} must lie between 0 and 1")
    if x.shape[0] < 2:
        raise DataError(f"{source}: {x.shape[0]} example(s) cannot be split into train and eval")
    counts = np.unique(y, return_counts=True)[1]
    stratify = y if counts.min() >= 2 else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=eval_fraction, stratify=stratify, random_state=seed
    )
    return x_train, y_train, x_test, y_test


# ----------------------------------------------------------------------------- tables


def table(
    data_dir: Path | None,
    *,
    label: str,
    features: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    eval_fraction: float = 0.2,
    split_seed: int = 0,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> Dataset:
    """A CSV or Parquet table with a label column.

    ``label`` names the label column; ``features`` the feature columns, in the order
    the model takes them (default: every other column, in file order). Feature
    columns must be numeric. Labels are integers 0..num_classes-1, or, with
    ``classes``, names mapped to their position in that list. The directory holds
    ``train.csv`` + ``test.csv`` (or ``.parquet``), or a single table from which
    ``eval_fraction`` is held out (stratified, seeded by ``split_seed``).
    """
    directory = _directory(data_dir, "table")
    if classes is not None and len(classes) != num_classes:
        raise DataError(
            f"[data.params] classes lists {len(classes)} names but the plan's [model] "
            f"num_classes is {num_classes}"
        )
    files = _table_files(directory)
    columns = None if features is None else list(features)
    loaded: list[tuple[np.ndarray, np.ndarray]] = []
    for path in files:
        x, y, names = _read_table(path, label, columns, classes, num_classes)
        columns = names
        loaded.append((x, y))
    assert columns is not None
    if (len(columns),) != tuple(input_shape):
        raise DataError(
            f"{files[0]}: {len(columns)} feature columns but the plan's [model] input_shape is "
            f"{list(input_shape)}; list the features in [data.params] features or fix the shape"
        )
    if len(loaded) == 2:
        (x_train, y_train), (x_test, y_test) = loaded
    else:
        x_train, y_train, x_test, y_test = _split(
            *loaded[0], eval_fraction, split_seed, str(files[0])
        )
    log.info(
        "table %s: %d training and %d evaluation rows, %d features",
        directory,
        len(y_train),
        len(y_test),
        len(columns),
    )
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        input_shape=(len(columns),),
        name=f"table {directory}",
    )


def _table_files(directory: Path) -> list[Path]:
    for suffix in TABLE_SUFFIXES:
        train, test = directory / f"train{suffix}", directory / f"test{suffix}"
        if train.is_file() and test.is_file():
            return [train, test]
        if train.is_file() != test.is_file():
            missing = test if train.is_file() else train
            raise DataError(f"{missing}: missing (train{suffix} and test{suffix} come together)")
    tables = sorted(p for p in directory.iterdir() if p.suffix in TABLE_SUFFIXES)
    if len(tables) == 1:
        return tables
    if not tables:
        raise DataError(
            f"{directory}: no table found; put train.csv and test.csv (or .parquet), or one "
            "table, in it"
        )
    raise DataError(
        f"{directory}: holds {len(tables)} tables ({', '.join(p.name for p in tables)}); "
        "name them train and test, or keep one"
    )


def _read_table(
    path: Path,
    label: str,
    features: list[str] | None,
    classes: Sequence[str] | None,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    header, columns = _read_parquet(path) if path.suffix == ".parquet" else _read_csv(path)
    if label not in header:
        raise DataError(
            f"{path}: no label column {label!r} (the plan's [data.params] label); its columns "
            f"are {', '.join(header[:12])}{' ...' if len(header) > 12 else ''}"
        )
    wanted = [c for c in header if c != label] if features is None else features
    for column in wanted:
        if column not in header:
            raise DataError(
                f"{path}: no column {column!r}, which the plan's [data.params] features names"
            )
    if not wanted:
        raise DataError(f"{path}: no feature column besides the label {label!r}")
    rows = len(columns[label])
    if rows == 0:
        raise DataError(f"{path}: the table has no rows")
    x = np.empty((rows, len(wanted)), dtype=np.float32)
    for j, column in enumerate(wanted):
        x[:, j] = _numeric_column(path, column, columns[column])
    y = _label_column(path, label, columns[label], classes, num_classes)
    return x, y, list(wanted)


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[Any]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (a header row is required)")
            header = [h.strip() for h in header]
            if len(set(header)) != len(header):
                raise DataError(f"{path}: the header names a column twice")
            columns: dict[str, list[Any]] = {h: [] for h in header}
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: line {line} has {len(row)} fields, the header {len(header)}"
                    )
                for h, value in zip(header, row, strict=True):
                    columns[h].append(value.strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    return header, columns


def _read_parquet(path: Path) -> tuple[list[str], dict[str, list[Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    columns: dict[str, list[Any]] = {}
    for name, column in zip(data.column_names, data.columns, strict=True):
        kind = column.type
        if not (
            pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)
            or pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_dictionary(kind)
        ):
            columns[name] = [_Unsupported(str(kind))] * len(column)
        else:
            columns[name] = column.to_pylist()
    return list(data.column_names), columns


class _Unsupported:
    def __init__(self, kind: str) -> None:
        self.kind = kind


def _numeric_column(path: Path, column: str, values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float32)
    for i, value in enumerate(values):
        if isinstance(value, _Unsupported):
            raise DataError(
                f"{path}: column {column!r} has type {value.kind}; features must be numeric"
            )
        if value is None or value == "":
            raise DataError(
                f"{path}: column {column!r} is empty in row {i + 1}; impute or drop the row"
            )
        if isinstance(value, bool):
            out[i] = float(value)
            continue
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: column {column!r} row {i + 1} holds {value!r}, not a number; "
                "features must be numeric"
            ) from None
    return out


def _label_column(
    path: Path, label: str, values: list[Any], classes: Sequence[str] | None, num_classes: int
) -> np.ndarray:
    y = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, _Unsupported):
            raise DataError(f"{path}: label column {label!r} has type {value.kind}")
        if classes is not None:
            text = str(value)
            if text not in classes:
                raise DataError(
                    f"{path}: label column {label!r} row {i + 1} holds {text!r}, not one of "
                    f"the plan's classes {list(classes)}"
                )
            y[i] = list(classes).index(text)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: label column {label!r} row {i + 1} holds {value!r}, not a class "
                "number; give [data.params] classes to map names to numbers"
            ) from None
        if number != int(number) or not 0 <= number < num_classes:
            raise DataError(
                f"{path}: label column {label!r} row {i + 1} holds {value!r}, outside "
                f"0..{num_classes - 1} (the plan's num_classes is {num_classes})"
            )
        y[i] = int(number)
    return y


# ----------------------------------------------------------------------------- images


def image_folder(
    data_dir: Path | None,
    *,
    classes: Sequence[str] | None = None,
    eval_fraction: float = 0.2,
    split_seed: int = 0,
    resize: bool = False,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> Dataset:
    """Images in one sub-folder per class, scaled to [0, 1].

    ``data_dir/train/<class>/`` and ``data_dir/test/<class>/``, or ``data_dir/<class>/``
    from which ``eval_fraction`` is held out. Classes are ``classes`` in that order
    (default: the sub-folder names, sorted). Images must have the plan's
    ``input_shape`` (height, width, channels) unless ``resize`` is true.
    """
    directory = _directory(data_dir, "image folder")
    if len(input_shape) != 3:
        raise DataError(
            f"images need a [model] input_shape of [height, width, channels], got "
            f"{list(input_shape)}"
        )
    roots = [directory / "train", directory / "test"]
    split = not all(r.is_dir() for r in roots)
    if split:
        roots = [directory]
    names = list(classes) if classes is not None else _class_folders(roots[0])
    if len(names) != num_classes:
        raise DataError(
            f"{roots[0]}: {len(names)} classes ({', '.join(names)}) but the plan's [model] "
            f"num_classes is {num_classes}"
        )
    loaded = [_read_images(root, names, input_shape, resize) for root in roots]
    if split:
        x_train, y_train, x_test, y_test = _split(
            *loaded[0], eval_fraction, split_seed, str(directory)
        )
    else:
        (x_train, y_train), (x_test, y_test) = loaded
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        name=f"images {directory}",
    )


def _class_folders(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class sub-folders (one folder of images per class)")
    return names


def _read_images(
    root: Path, classes: Sequence[str], shape: tuple[int, ...], resize: bool
) -> tuple[np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = []
    ys: list[int] = []
    height, width, channels = shape
    for k, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (class {name!r} of the plan)")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                image = tf.io.decode_image(
                    path.read_bytes(), channels=channels, expand_animations=False
                ).numpy()
            except (tf.errors.InvalidArgumentError, OSError) as exc:
                raise DataError(f"{path}: not a readable image ({exc})") from None
            if image.shape[:2] != (height, width):
                if not resize:
                    raise DataError(
                        f"{path}: image is {image.shape[0]}x{image.shape[1]} but the plan's "
                        f"input_shape is {height}x{width}; resize the images or set "
                        "[data.params] resize = true"
                    )
                image = tf.image.resize(image, (height, width)).numpy()
            xs.append(np.asarray(image, dtype=np.float32) / 255.0)
            ys.append(k)
    if not xs:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


# ----------------------------------------------------------------------------- npz


def npz(
    data_dir: Path | None,
    *,
    file: str = "data.npz",
    num_classes: int,
    input_shape: tuple[int, ...],
) -> Dataset:
    """A NumPy ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` (no pickles)."""
    directory = _directory(data_dir, "npz")
    path = directory / file
    if not path.is_file():
        raise DataError(f"{path}: missing (the plan's [data.params] file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive]
            if missing:
                raise DataError(
                    f"{path}: lacks {', '.join(missing)} (it needs x_train, y_train, x_test, "
                    "y_test)"
                )
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz without pickles ({exc})") from None
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"{path}: x_{split} holds examples of shape {tuple(x.shape[1:])} but the plan's "
                f"[model] input_shape is {list(input_shape)}"
            )
        if arrays[f"y_{split}"].shape != (x.shape[0],):
            raise DataError(
                f"{path}: y_{split} has shape {arrays[f'y_{split}'].shape} for {x.shape[0]} "
                "examples; give one label per example"
            )
    return Dataset(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        name=f"npz {path}",
    )
