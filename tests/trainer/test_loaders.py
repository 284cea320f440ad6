"""Built-in loaders of a party's own directory: tables, image folders, .npz.

Real files on disk (CSV written by the csv module, Parquet by pyarrow, PNGs encoded by
TensorFlow); every mismatch with the plan is one line naming the file and the column.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from hfl_trainer.data import DataError
from hfl_trainer.loaders import image_folder, npz, table

HEADER = ["age", "dose", "outcome"]
ROWS = [[50, 1.5, "good"], [61, 2.0, "bad"], [47, 0.5, "good"], [70, 3.0, "bad"]] * 5


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def load_table(directory: Path, **params: object) -> object:
    options: dict[str, object] = {
        "label": "outcome",
        "classes": ["good", "bad"],
        "num_classes": 2,
        "input_shape": (2,),
    }
    options.update(params)
    return table(directory, **options)  # type: ignore[arg-type]


def test_csv_table_with_named_classes_is_split_and_mapped(tmp_path: Path) -> None:
    write_csv(tmp_path / "records.csv", HEADER, ROWS)

    data = table(
        tmp_path, label="outcome", classes=["good", "bad"], num_classes=2, input_shape=(2,)
    )

    assert data.x_train.shape == (16, 2)
    assert data.x_test.shape == (4, 2)
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    # "bad" rows are the ones with age 61 or 70: class 1.
    np.testing.assert_array_equal(y, np.isin(x[:, 0], [61, 70]).astype(np.int64))


def test_train_and_test_files_are_the_splits_and_features_follow_the_plans_order(
    tmp_path: Path,
) -> None:
    write_csv(tmp_path / "train.csv", HEADER, ROWS[:3])
    write_csv(tmp_path / "test.csv", HEADER, ROWS[3:4])

    data = table(
        tmp_path,
        label="outcome",
        features=["dose", "age"],
        classes=["good", "bad"],
        num_classes=2,
        input_shape=(2,),
    )

    np.testing.assert_array_equal(data.x_train[0], [1.5, 50.0])
    np.testing.assert_array_equal(data.x_test, [[3.0, 70.0]])
    np.testing.assert_array_equal(data.y_train, [0, 1, 0])


def test_parquet_table_reads_like_the_csv(tmp_path: Path) -> None:
    write_csv(tmp_path / "csv" / "train.csv", HEADER, ROWS[:8])
    write_csv(tmp_path / "csv" / "test.csv", HEADER, ROWS[8:])
    for split, rows in (("train", ROWS[:8]), ("test", ROWS[8:])):
        columns = list(zip(*rows, strict=True))
        frame = pa.table({name: list(col) for name, col in zip(HEADER, columns, strict=True)})
        (tmp_path / "parquet").mkdir(exist_ok=True)
        pq.write_table(frame, tmp_path / "parquet" / f"{split}.parquet")

    from_csv = table(tmp_path / "csv", label="outcome", classes=["good", "bad"], num_classes=2,
                     input_shape=(2,))  # fmt: skip
    from_parquet = table(tmp_path / "parquet", label="outcome", classes=["good", "bad"],
                         num_classes=2, input_shape=(2,))  # fmt: skip

    np.testing.assert_array_equal(from_csv.x_train, from_parquet.x_train)
    np.testing.assert_array_equal(from_csv.y_test, from_parquet.y_test)


def test_parquet_string_feature_is_named_as_not_numeric(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"age": ["old", "young"], "dose": [1.0, 2.0], "outcome": [0, 1]}),
        tmp_path / "records.parquet",
    )

    with pytest.raises(DataError) as exc:
        table(tmp_path, label="outcome", num_classes=2, input_shape=(2,))

    assert str(exc.value) == (
        f"{tmp_path / 'records.parquet'}: column 'age' row 1 holds 'old', not a number; "
        "features must be numeric"
    )


@pytest.mark.parametrize(
    ("header", "rows", "params", "expected"),
    [
        (
            ["age", "dose", "result"],
            ROWS,
            {},
            "{file}: no label column 'outcome' (the plan's [data.params] label); its columns are "
            "age, dose, result",
        ),
        (
            HEADER,
            ROWS,
            {"features": ["age", "weight"]},
            "{file}: no column 'weight', which the plan's [data.params] features names",
        ),
        (
            HEADER,
            [[50, "high", "good"], *ROWS],
            {},
            "{file}: column 'dose' row 1 holds 'high', not a number; features must be numeric",
        ),
        (
            HEADER,
            [[50, "", "good"], *ROWS],
            {},
            "{file}: column 'dose' is empty in row 1; impute or drop the row",
        ),
        (
            HEADER,
            [*ROWS, [50, 1.0, "unknown"]],
            {},
            "{file}: label column 'outcome' row 21 holds 'unknown', not one of the plan's "
            "classes ['good', 'bad']",
        ),
        (
            HEADER,
            [[50, 1.0, 3], *ROWS],
            {"classes": None},
            "{file}: label column 'outcome' row 1 holds '3', outside 0..1 (the plan's "
            "num_classes is 2)",
        ),
        (
            ["age", "outcome"],
            [[50, "good"], [60, "bad"]],
            {},
            "{file}: 1 feature columns but the plan's [model] input_shape is [2]; list the "
            "features in [data.params] features or fix the shape",
        ),
    ],
    ids=[
        "no-label",
        "missing-feature",
        "not-numeric",
        "empty-cell",
        "unknown-class",
        "label-range",
        "column-count",
    ],
)
def test_table_schema_mismatch_is_one_line_naming_the_column(
    tmp_path: Path,
    header: list[str],
    rows: list[list[object]],
    params: dict[str, object],
    expected: str,
) -> None:
    file = write_csv(tmp_path / "records.csv", header, rows)

    with pytest.raises(DataError) as exc:
        load_table(tmp_path, **params)

    assert str(exc.value) == expected.format(file=file)


def test_classes_that_disagree_with_num_classes_are_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "records.csv", HEADER, ROWS)

    with pytest.raises(DataError, match=r"classes lists 3 names but the plan's \[model\] num"):
        load_table(tmp_path, classes=["good", "bad", "ugly"])


def test_directory_without_a_table_says_what_to_put_there(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no table found; put train\.csv and test\.csv"):
        load_table(tmp_path)


def _png(path: Path, value: int, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size, 1), value, dtype=np.uint8)
    path.write_bytes(tf.io.encode_png(image).numpy())


def test_image_folder_reads_one_sub_folder_per_class(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / "cats" / f"{i}.png", 10)
        _png(tmp_path / "dogs" / f"{i}.png", 250)

    data = image_folder(tmp_path, num_classes=2, input_shape=(4, 4, 1), eval_fraction=0.2)

    assert data.x_train.shape == (8, 4, 4, 1)
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    np.testing.assert_allclose(x[:, 0, 0, 0], np.where(y == 0, 10 / 255, 250 / 255), rtol=1e-6)


def test_image_of_another_size_than_the_plan_says_how_to_fix(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", 1)
    _png(tmp_path / "b" / "0.png", 2, size=6)

    with pytest.raises(DataError) as exc:
        image_folder(tmp_path, num_classes=2, input_shape=(4, 4, 1))

    assert str(exc.value) == (
        f"{tmp_path / 'b' / '0.png'}: image is 6x6 but the plan's input_shape is 4x4; resize "
        "the images or set [data.params] resize = true"
    )
    resized = image_folder(tmp_path / ".", num_classes=2, input_shape=(4, 4, 1), resize=True,
                           eval_fraction=0.5)  # fmt: skip
    assert resized.x_train.shape[1:] == (4, 4, 1)


def test_image_folder_with_the_wrong_number_of_classes_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _png(tmp_path / name / "0.png", 1)

    with pytest.raises(DataError, match=r"3 classes \(a, b, c\) but the plan's \[model\] num"):
        image_folder(tmp_path, num_classes=2, input_shape=(4, 4, 1))


def test_npz_loads_its_four_arrays_and_names_a_missing_one(tmp_path: Path) -> None:
    x = np.ones((4, 3), np.float32)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=[0, 1, 0, 1], x_test=x[:2], y_test=[1, 0])
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=[0, 1, 0, 1])

    data = npz(tmp_path, num_classes=2, input_shape=(3,))
    with pytest.raises(DataError) as exc:
        npz(tmp_path, file="partial.npz", num_classes=2, input_shape=(3,))

    np.testing.assert_array_equal(data.y_test, [1, 0])
    assert str(exc.value) == (
        f"{tmp_path / 'partial.npz'}: lacks x_test, y_test (it needs x_train, y_train, x_test, "
        "y_test)"
    )


def test_loader_without_a_data_directory_says_to_give_one() -> None:
    with pytest.raises(DataError, match="give the trainer --data-dir DIR"):
        table(None, label="y", num_classes=2, input_shape=(2,))
