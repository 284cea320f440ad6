"""Federation projects: the user's own model and data functions, resolved and checked.

A project is a directory the user owns (``hfl new DIR`` writes one)::

    myproject/
        __init__.py
        model.py     def build(input_shape, num_classes, **params) -> keras.Model
        data.py      def load(data_dir, **params) -> ((x_train, y_train), (x_test, y_test))
        plan.toml    [model] entry = "myproject.model:build"   [model.params] ...
                     [data]  entry = "myproject.data:load"     [data.params]  ...

The directory is imported as the package named like it (only it: its parent does
not go on ``sys.path``), so ``"myproject.model:build"`` is an ordinary entry point.
The built-in models and datasets are entry points of the same kind
(``hfl_common.config.BUILTIN_MODEL_ENTRIES`` / ``BUILTIN_DATA_ENTRIES``) and go
through the same code.

Entry functions get what they ask for: the model function gets ``input_shape`` and
``num_classes`` positionally, then the plan's ``[model.params]`` as keywords, and
``seed`` if its signature takes it. The data function gets ``data_dir`` (this
party's own data directory, or None) positionally, the plan's ``[data.params]``,
and any of ``input_shape``, ``num_classes``, ``seed``, ``num_partitions``,
``synthetic_examples`` that its signature names.

Everything a user can get wrong (an entry that does not import, a function that
raises or returns the wrong thing, a model that does not match the plan's initial
weights, data of the wrong shape, labels out of range, NaN features) is a
:class:`ProjectError`: one line naming the file and the fix, raised before the
trainer attests or joins anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import keyword
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hfl_common.config import FederationPlan, ModelPlan
from hfl_common.errors import ConfigError, HflError
from hfl_trainer import data as data_lib
from hfl_trainer.data import Dataset

log = logging.getLogger(__name__)

# Keyword arguments hfl offers a data function, besides the plan's [data.params].
DATA_CONTEXT = ("input_shape", "num_classes", "seed", "num_partitions", "synthetic_examples")

_RETURN_HINT = (
    "return ((x_train, y_train), (x_test, y_test)) as numpy arrays or two tf.data.Datasets "
    "of (x, y)"
)


class ProjectError(ConfigError):
    """The project's code or data is unusable; the message names the file and the fix."""


# ----------------------------------------------------------------------------- import


def use_project(directory: Path) -> str:
    """Make ``directory`` importable as the package named like it; return that name.

    Only the project itself becomes importable (not its siblings). Calling it again
    for the same directory is a no-op; a name already taken by another module (a
    project called ``keras``) is refused.
    """
    directory = directory.resolve()
    if not directory.is_dir():
        raise ProjectError(f"project directory {directory} does not exist")
    name = directory.name
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ProjectError(
            f"{directory}: the project's directory name {name!r} is its package name, so it "
            "must be a Python identifier; rename the directory (e.g. my_project)"
        )
    existing = sys.modules.get(name)
    if existing is not None:
        paths = [Path(p).resolve() for p in getattr(existing, "__path__", [])]
        if directory in paths:
            return name
        raise ProjectError(
            f"{directory}: the package name {name!r} is already taken by {existing!r}; "
            "rename the project directory"
        )
    found = importlib.util.find_spec(name)
    if found is not None:
        locations = [Path(p).resolve() for p in found.submodule_search_locations or []]
        if directory in locations:
            return name  # the same directory is importable already (it is in the cwd)
        raise ProjectError(
            f"{directory}: the package name {name!r} is already an installed module; "
            "rename the project directory"
        )
    init = directory / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name,
        init if init.is_file() else None,
        submodule_search_locations=[str(directory)],
    )
    if spec is None:  # pragma: no cover (a directory always gives a spec)
        raise ProjectError(f"{directory}: cannot be imported as a package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ProjectError(f"{init}: fails to import: {_exc_line(exc)}") from exc
    log.info("project %s imported from %s", name, directory)
    return name


def resolve(entry: str, what: str) -> Callable[..., Any]:
    """The function an entry point ``"package.module:function"`` names.

    ``what`` says which plan key named it (``"[model] entry"``) for the error.
    """
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise ProjectError(f'{what} {entry!r} must look like "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = (
            f"give --project DIR (the project directory named {module_name.split('.')[0]!r})"
            if exc.name == module_name.split(".")[0]
            else "check the module name, or install what it imports"
        )
        raise ProjectError(
            f"{what} {entry!r}: module {module_name!r} does not import ({_exc_line(exc)}); {hint}"
        ) from exc
    except SyntaxError as exc:
        raise ProjectError(
            f"{exc.filename}:{exc.lineno}: syntax error ({exc.msg}); fix the file "
            f"({what} {entry!r})"
        ) from exc
    except Exception as exc:
        raise ProjectError(
            f"{_module_file(module_name)}: fails to import: {_exc_line(exc)}; fix the file "
            f"({what} {entry!r})"
        ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ProjectError(
            f"{_file_of(module)}: has no function {attr!r} ({what} {entry!r}); define it "
            "or correct the entry"
        )
    if not callable(fn):
        raise ProjectError(
            f"{_file_of(module)}: {attr!r} is a {type(fn).__name__}, not a function "
            f"({what} {entry!r})"
        )
    return fn  # type: ignore[no-any-return]


def _module_file(module_name: str) -> str:
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return module_name
    return spec.origin if spec is not None and spec.origin else module_name


def _file_of(obj: Any) -> str:
    try:
        return inspect.getsourcefile(obj) or getattr(obj, "__file__", "") or repr(obj)
    except TypeError:
        return getattr(obj, "__file__", None) or repr(obj)


def _exc_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _call(fn: Callable[..., Any], entry: str, what: str, *args: Any, **kwargs: Any) -> Any:
    """Call an entry point; a signature that does not fit, or an exception, is one line."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as exc:
        raise ProjectError(
            f"{_file_of(fn)}: {entry} cannot be called with the plan's parameters "
            f"({_exc_line(exc)}); make its signature match {what}"
        ) from exc
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    try:
        return fn(*args, **kwargs)
    except HflError:
        raise  # hfl's own loaders already name the file and the fix
    except Exception as exc:
        raise ProjectError(
            f"{_file_of(fn)}: {entry} raised {_exc_line(exc)}; fix the function or its "
            f"parameters in {what}"
        ) from exc


# ----------------------------------------------------------------------------- model


def build(model: ModelPlan, seed: int) -> keras.Model:
    """Build the plan's model through its entry point, with deterministic initial weights.

    Keras draws its initialisers' seeds from Python's ``random`` module; it is seeded
    by ``seed`` for the duration of the build (see :mod:`hfl_trainer.models`).
    """
    from hfl_trainer.models import check_unique_paths, seeded_python_random

    fn = resolve(model.entry, "[model] entry")
    kwargs: dict[str, Any] = dict(model.params)
    if _accepts(fn, "seed") and "seed" not in kwargs:
        kwargs["seed"] = seed
    with seeded_python_random(seed):
        built = _call(
            fn, model.entry, "[model.params]", tuple(model.input_shape), model.num_classes, **kwargs
        )
    where = f"{_file_of(fn)}: {model.entry}"
    if not isinstance(built, keras.Model):
        raise ProjectError(
            f"{where} returned a {type(built).__name__}, not a keras.Model; return the model "
            "(compiled or not)"
        )
    try:
        inputs = tuple(built.input_shape[1:])
        outputs = tuple(built.output_shape[1:])
    except (AttributeError, ValueError) as exc:
        raise ProjectError(
            f"{where} returned a model without a fixed input; build it with keras.Input(shape="
            f"{tuple(model.input_shape)}) ({_exc_line(exc)})"
        ) from exc
    if inputs != tuple(model.input_shape):
        raise ProjectError(
            f"{where} returned a model taking inputs of shape {inputs}, but the plan's "
            f"[model] input_shape is {list(model.input_shape)}; use the input_shape argument"
        )
    if outputs != (model.num_classes,):
        raise ProjectError(
            f"{where} returned a model with outputs of shape {outputs}; it must output "
            f"{model.num_classes} logits (the plan's num_classes), no softmax"
        )
    check_unique_paths(built)
    return built


def check_initial_weights(model: keras.Model, plan: ModelPlan) -> None:
    """The model's variables must be exactly those of the plan's initial weights.

    The first difference is named, with the fix: for a project, the file whose
    function built the model and how to make matching initial weights.
    """
    from hfl_common.codec import check_specs, specs_of
    from hfl_common.config import BUILTIN_MODEL_ENTRIES
    from hfl_trainer.models import get_weights, load_weights_file

    initial = load_weights_file(plan.initial_weights)
    if BUILTIN_MODEL_ENTRIES.get(plan.name) == plan.entry:
        what = (
            f"the plan's model {plan.name} does not match its initial weights "
            f"{plan.initial_weights.name}"
        )
    else:
        what = (
            f"{entry_file(plan.entry)}: the model {plan.entry} builds does not match the "
            f"plan's initial weights {plan.initial_weights.name} (make them again from this "
            "code, as hfl run --project does, and have the parties agree on the new plan)"
        )
    check_specs(specs_of(initial), specs_of(get_weights(model)), what)


def entry_file(entry: str) -> str:
    """The source file of an entry point's function (for messages)."""
    return _file_of(resolve(entry, "entry"))


# ----------------------------------------------------------------------------- data


def load_data(
    plan: FederationPlan,
    data_dir: Path | None,
    *,
    index: int = 0,
    num_partitions: int = 1,
) -> Dataset:
    """This party's data through the plan's data entry point, checked before any round.

    With ``num_partitions > 1`` (the local simulation only) the training split is
    partitioned (IID or Dirichlet, as the plan says) and this is partition ``index``;
    a real party trains on everything in its own ``data_dir``.
    """
    dataset = load_entry_data(
        plan.data.entry,
        plan.data.params,
        data_dir,
        input_shape=tuple(plan.model.input_shape),
        num_classes=plan.model.num_classes,
        seed=plan.seed,
        num_partitions=num_partitions,
        synthetic_examples=plan.data.synthetic_examples,
    )
    if num_partitions > 1:
        if not 0 <= index < num_partitions:
            raise ConfigError(f"--trainer-index {index} must be in [0, {num_partitions})")
        indices = data_lib.partition(
            dataset.y_train,
            num_partitions,
            index,
            scheme="dirichlet" if plan.data.partition == "dirichlet" else "iid",
            alpha=plan.data.dirichlet_alpha,
            seed=plan.seed,
        )
        dataset = dataset.with_train_indices(indices)
    return dataset


def load_entry_data(
    entry: str,
    params: Mapping[str, Any],
    data_dir: Path | None,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    num_partitions: int = 1,
    synthetic_examples: int = 512,
) -> Dataset:
    """Call a data entry point and return its validated :class:`Dataset`."""
    fn = resolve(entry, "[data] entry")
    offered: dict[str, Any] = {
        "input_shape": tuple(input_shape),
        "num_classes": num_classes,
        "seed": seed,
        "num_partitions": num_partitions,
        "synthetic_examples": synthetic_examples,
    }
    kwargs: dict[str, Any] = dict(params)
    for name, value in offered.items():
        if name not in kwargs and _named(fn, name):
            kwargs[name] = value
    result = _call(fn, entry, "[data.params]", data_dir, **kwargs)
    source = f"{_file_of(fn)}: {entry}" + (f" on {data_dir}" if data_dir is not None else "")
    dataset = as_dataset(result, source, tuple(input_shape), num_classes)
    validate(dataset, source, tuple(input_shape), num_classes)
    return dataset


def _named(fn: Callable[..., Any], name: str) -> bool:
    # Context values go only to functions that name them (not to a bare **kwargs,
    # which receives the plan's parameters).
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def as_dataset(result: Any, source: str, input_shape: tuple[int, ...], num_classes: int) -> Dataset:
    """Turn what a data function returned into a :class:`Dataset` (not yet validated)."""
    if isinstance(result, Dataset):
        return dataclasses.replace(
            result,
            y_train=_labels(np.asarray(result.y_train), source, "training"),
            y_test=_labels(np.asarray(result.y_test), source, "evaluation"),
        )
    splits: tuple[Any, Any]
    if isinstance(result, Mapping) and {"x_train", "y_train", "x_test", "y_test"} <= set(result):
        splits = ((result["x_train"], result["y_train"]), (result["x_test"], result["y_test"]))
    elif isinstance(result, tuple | list) and len(result) == 2:
        splits = (result[0], result[1])
    else:
        raise ProjectError(f"{source} returned a {type(result).__name__}; {_RETURN_HINT}")
    arrays = [
        _split_arrays(split, name, source, len(input_shape))
        for split, name in zip(splits, ("training", "evaluation"), strict=True)
    ]
    (x_train, y_train), (x_test, y_test) = arrays
    for name, x in (("training", x_train), ("evaluation", x_test)):
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise ProjectError(
                f"{source}: {name} examples have shape {tuple(x.shape[1:])} but the plan's "
                f"[model] input_shape is {list(input_shape)}; reshape the data or fix the plan"
            )
    for name, x, y in (("training", x_train, y_train), ("evaluation", x_test, y_test)):
        if y.shape != (x.shape[0],):
            raise ProjectError(
                f"{source}: the {name} split has {x.shape[0]} examples but labels of shape "
                f"{tuple(y.shape)}; give one integer label per example"
            )
    return Dataset(
        x_train=x_train,
        y_train=_labels(y_train, source, "training"),
        x_test=x_test,
        y_test=_labels(y_test, source, "evaluation"),
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        name=source.rsplit(": ", maxsplit=1)[-1],
    )


def _split_arrays(
    split: Any, name: str, source: str, feature_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(split, tf.data.Dataset):
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for element in split.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) != 2:
                raise ProjectError(
                    f"{source}: the {name} tf.data.Dataset yields {type(element).__name__}, "
                    "not (x, y) pairs"
                )
            x, y = np.asarray(element[0]), np.asarray(element[1])
            if x.ndim == feature_rank:  # one example per element
                x, y = x[np.newaxis], y.reshape(1)
            xs.append(x)
            ys.append(y.reshape(-1))
        if not xs:
            raise ProjectError(f"{source}: the {name} tf.data.Dataset is empty")
        try:
            return np.concatenate(xs), np.concatenate(ys)
        except ValueError as exc:
            raise ProjectError(
                f"{source}: the {name} tf.data.Dataset yields examples of different shapes "
                f"({_exc_line(exc)})"
            ) from exc
    if isinstance(split, tuple | list) and len(split) == 2:
        try:
            x = np.asarray(split[0])
            y = np.asarray(split[1])
        except (ValueError, TypeError) as exc:
            raise ProjectError(
                f"{source}: the {name} split is not a pair of arrays ({_exc_line(exc)})"
            ) from exc
        if x.ndim == 0:
            raise ProjectError(f"{source}: the {name} features are a scalar; {_RETURN_HINT}")
        return x, y
    raise ProjectError(f"{source}: the {name} split is a {type(split).__name__}; {_RETURN_HINT}")


def _labels(y: np.ndarray, source: str, name: str) -> np.ndarray:
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        finite = np.isfinite(y)
        if finite.all() and np.array_equal(y, np.round(y)):
            return y.astype(np.int64)
        bad = int(np.flatnonzero(~finite | (y != np.round(y)))[0])
        raise ProjectError(
            f"{source}: {name} label {y[bad].item()!r} of example {bad} is not a class number; "
            "labels are integers 0..num_classes-1"
        )
    raise ProjectError(
        f"{source}: {name} labels have dtype {y.dtype}; labels are integers 0..num_classes-1 "
        "(map class names to numbers in the data function)"
    )


def validate(dataset: Dataset, source: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Check a party's data before the first round; the first problem is one line."""
    if tuple(dataset.input_shape) != tuple(input_shape):
        raise ProjectError(
            f"{source}: examples have shape {tuple(dataset.input_shape)} but the plan's "
            f"[model] input_shape is {list(input_shape)}"
        )
    if dataset.num_classes != num_classes:
        raise ProjectError(
            f"{source}: the data has {dataset.num_classes} classes but the plan's [model] "
            f"num_classes is {num_classes}"
        )
    for name, x, y in (
        ("training", dataset.x_train, dataset.y_train),
        ("evaluation", dataset.x_test, dataset.y_test),
    ):
        if x.shape[0] == 0:
            what = "nothing to train on" if name == "training" else "hold out some examples"
            raise ProjectError(f"{source}: the {name} split is empty ({what})")
        if x.dtype.kind not in "iufb":
            raise ProjectError(
                f"{source}: {name} features have dtype {x.dtype}; features must be numeric"
            )
        if x.dtype.kind == "f":
            finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                values = x[row].reshape(-1)
                kind = "NaN" if np.isnan(values).any() else "an infinite value"
                position = int(np.flatnonzero(~np.isfinite(values))[0])
                raise ProjectError(
                    f"{source}: {name} example {row} has {kind} in its features (feature "
                    f"{position}); clean or impute the data before training"
                )
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if bad.size:
            raise ProjectError(
                f"{source}: {name} label {int(y[bad[0]])} of example {int(bad[0])} is outside "
                f"0..{num_classes - 1} (the plan's num_classes is {num_classes})"
            )
