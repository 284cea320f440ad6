"""Federation projects: entry points resolve like built-ins, and every mistake is one line.

Real TensorFlow and real project directories on disk (written per test); the package
name of each project is unique so the tests do not share imported modules.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hfl_common.config import FederationPlan, parse_plan
from hfl_common.errors import ConfigError, InvalidArgumentError
from hfl_trainer import project as project_lib
from hfl_trainer.models import build_model, get_weights, weights_npz_bytes
from hfl_trainer.project import ProjectError

_counter = itertools.count()

MODEL_PY = """
import keras

def build(input_shape, num_classes, hidden=8):
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    h = keras.layers.Dense(hidden, activation="relu", name="h")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(h))
"""

DATA_PY = """
import numpy as np

def load(data_dir, *, scale=1.0, seed, num_classes):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4)).astype("float32") * scale
    y = (x[:, 0] > 0).astype("int64") % num_classes
    return (x[:30], y[:30]), (x[30:], y[30:])
"""


def make_project(
    base: Path, model_py: str = MODEL_PY, data_py: str = DATA_PY, name: str | None = None
) -> Path:
    directory = base / (name or f"proj{next(_counter)}_{base.name[-8:].replace('-', '_')}")
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text("")
    (directory / "model.py").write_text(textwrap.dedent(model_py))
    (directory / "data.py").write_text(textwrap.dedent(data_py))
    return directory


def plan_for(
    project: Path,
    tmp: Path,
    *,
    model_entry: str | None = None,
    data_entry: str | None = None,
    input_shape: str = "[4]",
    num_classes: int = 2,
    data_params: str = "",
    weights_sha: str = "0" * 64,
) -> FederationPlan:
    name = project.name
    text = f"""
[federation]
rounds = 1

[model]
entry = "{model_entry or f"{name}.model:build"}"
input_shape = {input_shape}
num_classes = {num_classes}
initial_weights = "init.npz"
initial_weights_sha256 = "{weights_sha}"

[model.params]
hidden = 8

[data]
entry = "{data_entry or f"{name}.data:load"}"

[data.params]
{data_params}
"""
    return parse_plan(text, "plan.toml", base_dir=tmp)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- plans


def test_plan_hash_covers_entry_points_and_their_parameters(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    base = plan_for(project, tmp_path)
    other_params = plan_for(project, tmp_path, data_params="scale = 2.0")
    other_entry = plan_for(project, tmp_path, data_entry=f"{project.name}.data:other")

    assert base.model.entry == f"{project.name}.model:build"
    assert base.model.params == {"hidden": 8}
    assert other_params.data.params == {"scale": 2.0}
    assert len({base.sha256, other_params.sha256, other_entry.sha256}) == 3


def test_builtin_names_are_entry_points_and_keep_their_plan_hash() -> None:
    text = """
[federation]
rounds = 1
[model]
name = "small_cnn"
input_shape = [8, 8, 1]
num_classes = 10
initial_weights = "w.npz"
initial_weights_sha256 = "{sha}"
"""
    plan = parse_plan(text.format(sha="ab" * 32))

    assert plan.model.entry == "hfl_trainer.models:small_cnn"
    assert plan.data.entry == "hfl_trainer.data:digits"
    assert "entry" not in plan.canonical["model"]
    assert "entry" not in plan.canonical["data"]


def test_plan_with_both_a_builtin_name_and_an_entry_is_refused() -> None:
    text = """
[federation]
rounds = 1
[model]
name = "small_cnn"
entry = "x.model:build"
input_shape = [4]
num_classes = 2
initial_weights = "w.npz"
initial_weights_sha256 = "{sha}"
"""
    with pytest.raises(ConfigError, match=r"\[model\] entry and name are exclusive"):
        parse_plan(text.format(sha="ab" * 32), "plan.toml")


def test_malformed_entry_point_is_named_in_the_plan() -> None:
    text = """
[federation]
rounds = 1
[model]
entry = "no-colon-here"
input_shape = [4]
num_classes = 2
initial_weights = "w.npz"
initial_weights_sha256 = "{sha}"
"""
    with pytest.raises(ConfigError, match=r'plan.toml: \[model\] entry must look like "package'):
        parse_plan(text.format(sha="ab" * 32), "plan.toml")


def test_export_receivers_are_a_plan_setting_covered_by_its_hash() -> None:
    base = """
[federation]
rounds = 1
[model]
name = "small_cnn"
input_shape = [8, 8, 1]
num_classes = 10
initial_weights = "w.npz"
initial_weights_sha256 = "{sha}"
""".format(sha="ab" * 32)
    everyone = parse_plan(base)
    only_two = parse_plan(base + '[export]\nreceivers = ["trainer-2"]\n')

    assert everyone.export.receives("trainer-1")
    assert only_two.export.receives("trainer-2")
    assert not only_two.export.receives("trainer-1")
    assert everyone.sha256 != only_two.sha256


# ----------------------------------------------------------------------------- models


def test_builtin_model_through_its_entry_point_equals_build_model() -> None:
    plan = parse_plan(
        """
[federation]
rounds = 1
[model]
name = "small_cnn"
input_shape = [8, 8, 1]
num_classes = 10
initial_weights = "w.npz"
initial_weights_sha256 = "ab"
""".replace('"ab"', '"' + "ab" * 32 + '"')
    )
    via_entry = get_weights(project_lib.build(plan.model, seed=3))
    direct = get_weights(build_model("small_cnn", (8, 8, 1), 10, seed=3))

    assert weights_npz_bytes(via_entry) == weights_npz_bytes(direct)


def test_project_model_is_deterministic_under_the_seed(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path)

    first = weights_npz_bytes(get_weights(project_lib.build(plan.model, seed=1)))
    again = weights_npz_bytes(get_weights(project_lib.build(plan.model, seed=1)))
    other = weights_npz_bytes(get_weights(project_lib.build(plan.model, seed=2)))

    assert first == again
    assert first != other


def test_entry_whose_module_does_not_import_says_give_the_project(tmp_path: Path) -> None:
    plan = plan_for(tmp_path / "absent_project_xyz", tmp_path)

    with pytest.raises(ProjectError) as exc:
        project_lib.build(plan.model, seed=0)

    assert one_line(exc).startswith(
        "[model] entry 'absent_project_xyz.model:build': module 'absent_project_xyz.model' "
        "does not import"
    )
    assert "give --project DIR" in str(exc.value)


def test_syntax_error_in_model_py_names_the_file_and_line(tmp_path: Path) -> None:
    project = make_project(tmp_path, model_py="def build(:\n    pass\n")
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path)

    with pytest.raises(ProjectError) as exc:
        project_lib.build(plan.model, seed=0)

    assert one_line(exc).startswith(f"{project / 'model.py'}:1: syntax error")


def test_missing_function_names_the_file(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path, model_entry=f"{project.name}.model:make")

    with pytest.raises(ProjectError) as exc:
        project_lib.build(plan.model, seed=0)

    assert one_line(exc) == (
        f"{project / 'model.py'}: has no function 'make' ([model] entry "
        f"'{project.name}.model:make'); define it or correct the entry"
    )


def test_model_function_returning_something_else_is_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path, model_py="def build(input_shape, num_classes, hidden=1):\n"
                                              "    return [input_shape]\n")  # fmt: skip
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path)

    with pytest.raises(ProjectError) as exc:
        project_lib.build(plan.model, seed=0)

    assert one_line(exc) == (
        f"{project / 'model.py'}: {project.name}.model:build returned a list, not a "
        "keras.Model; return the model (compiled or not)"
    )


def test_model_with_another_input_shape_than_the_plan_is_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path, input_shape="[5]")
    fixed = MODEL_PY.replace("shape=tuple(input_shape)", "shape=(4,)")
    (project / "model.py").write_text(fixed)

    with pytest.raises(ProjectError) as exc:
        project_lib.build(plan.model, seed=0)

    assert "returned a model taking inputs of shape (4,), but the plan's [model] input_shape " \
        "is [5]" in one_line(exc)  # fmt: skip


def test_model_that_does_not_match_the_initial_weights_names_the_file_and_fix(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path)
    model = project_lib.build(plan.model, seed=0)
    weights = get_weights(model)
    weights["h/kernel"] = np.zeros((4, 9), np.float32)  # another hidden size
    (tmp_path / "init.npz").write_bytes(weights_npz_bytes(weights))

    with pytest.raises(InvalidArgumentError) as exc:
        project_lib.check_initial_weights(model, plan.model)

    line = one_line(exc)
    assert line.startswith(
        f"{project / 'model.py'}: the model {project.name}.model:build builds does not match "
        "the plan's initial weights init.npz (make them again from this code"
    ), line
    assert "'h/kernel'" in line


def test_project_named_like_an_installed_module_is_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path, name="keras")

    with pytest.raises(ProjectError) as exc:
        project_lib.use_project(project)

    assert "the package name 'keras' is already taken" in one_line(exc)


# ----------------------------------------------------------------------------- data


def test_data_function_gets_its_parameters_and_the_plan_context(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)
    plain = project_lib.load_data(plan_for(project, tmp_path), None)
    scaled = project_lib.load_data(plan_for(project, tmp_path, data_params="scale = 3.0"), None)

    assert plain.x_train.shape == (30, 4)
    np.testing.assert_allclose(scaled.x_train, 3.0 * plain.x_train, rtol=1e-6)


def test_simulation_partitions_the_training_split(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)
    plan = plan_for(project, tmp_path)

    parts = [project_lib.load_data(plan, None, index=i, num_partitions=2) for i in range(2)]

    assert sum(len(p.y_train) for p in parts) == 30
    assert all(len(p.y_test) == 10 for p in parts)


def test_data_function_that_raises_is_one_line_naming_the_file(tmp_path: Path) -> None:
    project = make_project(
        tmp_path, data_py="def load(data_dir):\n    raise ValueError('no\\nrecords')\n"
    )
    project_lib.use_project(project)

    with pytest.raises(ProjectError) as exc:
        project_lib.load_data(plan_for(project, tmp_path), None)

    assert one_line(exc) == (
        f"{project / 'data.py'}: {project.name}.data:load raised ValueError: no records; "
        "fix the function or its parameters in [data.params]"
    )


def test_data_function_given_an_unknown_parameter_says_so(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    project_lib.use_project(project)

    with pytest.raises(ProjectError) as exc:
        project_lib.load_data(plan_for(project, tmp_path, data_params="colour = 1"), None)

    assert "cannot be called with the plan's parameters" in one_line(exc)
    assert "colour" in str(exc.value)


def test_type_error_inside_a_data_function_is_reported_as_raised_not_as_signature(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path, data_py="def load(data_dir):\n    return len(3)\n")
    project_lib.use_project(project)

    with pytest.raises(ProjectError) as exc:
        project_lib.load_data(plan_for(project, tmp_path), None)

    assert f"{project.name}.data:load raised TypeError: object of type 'int' has no len()" in (
        one_line(exc)
    )


def _returning(tmp_path: Path, body: str) -> tuple[Path, FederationPlan]:
    code = "import numpy as np\nimport tensorflow as tf\n\ndef load(data_dir):\n" + textwrap.indent(
        textwrap.dedent(body), "    "
    )
    project = make_project(tmp_path, data_py=code)
    project_lib.use_project(project)
    return project, plan_for(project, tmp_path)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return 'nothing'", "returned a str; return ((x_train, y_train), (x_test, y_test))"),
        (
            "x = np.zeros((0, 4), 'float32')\nreturn (x, np.zeros(0)), (np.ones((2, 4)), [0, 1])",
            "the training split is empty (nothing to train on)",
        ),
        (
            "x = np.ones((3, 5), 'float32')\nreturn (x, [0, 1, 0]), (x, [0, 1, 0])",
            "training examples have shape (5,) but the plan's [model] input_shape is [4]",
        ),
        (
            "x = np.ones((3, 4), 'float32')\nreturn (x, [0, 2, 1]), (x, [0, 1, 0])",
            "training label 2 of example 1 is outside 0..1 (the plan's num_classes is 2)",
        ),
        (
            "x = np.ones((3, 4), 'float32')\nx[2, 3] = np.nan\nreturn (x, [0, 1, 0]), (x[:1], [0])",
            "training example 2 has NaN in its features (feature 3)",
        ),
        (
            "x = np.ones((3, 4), 'float32')\nreturn (x, [0, 1, 0]), (x[:0], np.zeros(0))",
            "the evaluation split is empty (hold out some examples)",
        ),
        (
            "x = np.ones((3, 4), 'float32')\nreturn (x, [0.5, 1, 0]), (x, [0, 1, 0])",
            "training label 0.5 of example 0 is not a class number",
        ),
    ],
    ids=["not-splits", "empty", "shape", "label-range", "nan", "no-eval", "float-label"],
)
def test_bad_data_is_one_clear_line_before_any_round(
    tmp_path: Path, body: str, expected: str
) -> None:
    project, plan = _returning(tmp_path, body)

    with pytest.raises(ProjectError) as exc:
        project_lib.load_data(plan, None)

    line = one_line(exc)
    assert line.startswith(f"{project / 'data.py'}: {project.name}.data:load"), line
    assert expected in line, line


def test_tf_data_datasets_batched_or_not_are_accepted(tmp_path: Path) -> None:
    _, plan = _returning(
        tmp_path,
        """
        x = np.arange(40, dtype='float32').reshape(10, 4)
        y = np.arange(10) % 2
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
        test = tf.data.Dataset.from_tensor_slices((x[:4], y[:4]))
        return train, test
        """,
    )

    data = project_lib.load_data(plan, None)

    np.testing.assert_array_equal(data.x_train, np.arange(40, dtype=np.float32).reshape(10, 4))
    np.testing.assert_array_equal(data.y_test, [0, 1, 0, 1])
