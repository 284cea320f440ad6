"""`hfl new DIR` (a federation project to own) and `hfl evaluate` (a model taken home).

`hfl new DIR` writes a small project that runs as it is (`hfl run --project DIR`, on
scikit-learn's bundled wine table until it is given data directories) and that the
user then makes their own: model.py builds the Keras model, data.py loads this
party's data, plan.toml names both and their parameters. See README, "Your own
model and data".

`hfl evaluate MODEL` loads an exported model (model.keras, with the provenance.json
beside it saying which data function and parameters the federation used) and
evaluates it on local data: the project's data function (`--project`) or a
built-in loader on `--data-dir`.
"""

from __future__ import annotations

import argparse
import json
import keyword
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hfl_common.errors import ConfigError, InvalidArgumentError

_INIT = '''"""{name}: a federation project (model.py, data.py, plan.toml).

Every party runs this same code; it is measured into each trainer's identity, so
review it together and agree on it before signing the policy (see hfl's README,
"Your own model and data").
"""
'''

_MODEL = '''"""The model every party trains: a function returning a Keras model.

hfl calls build(input_shape, num_classes, **[model.params]) with Python's random
module seeded, so every party builds the same initial model. Output logits (no
softmax): hfl trains with softmax cross-entropy on logits. Give every layer a fixed
name: the names are how weights travel between parties.
"""

import keras


def build(input_shape, num_classes, hidden=32, dropout=0.0):
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = keras.layers.Dense(hidden, activation="relu", name="hidden1")(inputs)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden2")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="{name}")
'''

_DATA = '''"""This party's data: a function returning (train, evaluation) splits.

hfl calls load(data_dir, **[data.params]), where data_dir is this party's own data
directory (the trainer's --data-dir; None in a local simulation without one), and
passes input_shape, num_classes or seed too if the function names them. Return
((x_train, y_train), (x_test, y_test)) as numpy arrays (labels 0..num_classes-1),
or two tf.data.Datasets of (x, y). hfl checks shapes, labels and NaN before the
first round. Nothing may be downloaded.
"""

import numpy as np

from hfl_trainer.loaders import table


def load(data_dir, *, label="label", num_classes, input_shape, seed):
    if data_dir is not None:
        # A CSV or Parquet table with a label column (train.csv + test.csv, or one
        # table of which 20% is held out); the columns are checked against the plan.
        data = table(data_dir, label=label, num_classes=num_classes, input_shape=input_shape)
        return (data.x_train, data.y_train), (data.x_test, data.y_test)
    # No data directory: scikit-learn's bundled wine table (178 wines, 13 features,
    # 3 cultivars), for a first run. Replace with your own data.
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    x, y = load_wine(return_X_y=True)
    x = np.log1p(x).astype(np.float32)  # a fixed transform every party applies alike
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)
'''

_PLAN = """# The federation plan of {name}: what every party agrees to run. Its SHA-256
# (values, not formatting) is bound into the aggregator's attestation evidence.
# `hfl run --project {name}` adds the initial weights built by model.py.

[federation]
name = "{name}"
rounds = 15
seed = 0

[model]
entry = "{name}.model:build"
input_shape = [13]
num_classes = 3

[model.params]
hidden = 32

[data]
entry = "{name}.data:load"
# local simulation only (no --party-data): how one table is split between trainers
partition = "iid"

[data.params]
label = "label"

[training]
local_epochs = 2
batch_size = 16
learning_rate = 0.01
optimizer = "adam"

[strategy]
name = "fedavg"

# Which trainers take the final model home (labels, or "*" for every trainer).
[export]
receivers = ["*"]
"""

_README = """# {name}

A federation project for hfl: `model.py` builds the model, `data.py` loads one
party's data, `plan.toml` names both.

    hfl run --project {name}                                  # on the bundled wine table
    hfl run --project {name} --party-data a/ --party-data b/  # each trainer its own CSV
    hfl evaluate runs/latest/models/trainer-1 --project {name}

Keep data out of this directory: every file here is measured into the trainers'
enclave identity.
"""


def scaffold(directory: Path) -> list[Path]:
    """Write a new project into `directory` (which must not exist or be empty)."""
    name = directory.resolve().name
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(
            f"{directory}: a project's directory name is its Python package name; "
            f"{name!r} is not an identifier (try {_identifier(name)!r})"
        )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} already exists and is not empty; give a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "__init__.py": _INIT,
        "model.py": _MODEL,
        "data.py": _DATA,
        "plan.toml": _PLAN,
        "README.md": _README,
    }
    written = []
    for file, template in files.items():
        path = directory / file
        path.write_text(template.replace("{name}", name))
        written.append(path)
    return written


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"p_{cleaned}"


def new_main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="hfl new",
        description="Write a federation project you own: model.py, data.py and plan.toml.",
    )
    p.add_argument("directory", type=Path, help="the project directory (its name is the package)")
    ns = p.parse_args(argv)
    written = scaffold(ns.directory)
    print(f"wrote {', '.join(str(w) for w in written)}")
    print(f"next: hfl run --project {ns.directory}")
    return 0


# ----------------------------------------------------------------------------- evaluate


def evaluate_main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="hfl evaluate",
        description="Evaluate a model a federation exported (model.keras + provenance.json) "
        "on local data, with the data function its plan named.",
    )
    p.add_argument("model", type=Path, help="model.keras or the directory holding it")
    p.add_argument("--project", type=Path, help="the federation project the model comes from")
    p.add_argument("--data-dir", type=Path, help="the local data directory to evaluate on")
    p.add_argument(
        "--split", choices=("test", "train", "all"), default="test",
        help="which split the data function returns to evaluate on (default test)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    ns = p.parse_args(argv)
    result = evaluate(ns.model, ns.project, ns.data_dir, ns.split)
    if ns.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  on "
            f"{result['examples']} {ns.split} examples ({result['data']})"
        )
    return 0


def evaluate(
    model_path: Path, project: Path | None, data_dir: Path | None, split: str
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of an exported model on local data."""
    from hfl_cli.local import _native_stderr_silenced

    directory = model_path if model_path.is_dir() else model_path.parent
    provenance_path = directory / "provenance.json"
    try:
        provenance = json.loads(provenance_path.read_text())
        model_plan = provenance["plan"]["model"]
        data_plan = provenance["plan"]["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgumentError(
            f"{provenance_path}: not a readable provenance file of an exported model ({exc})"
        ) from None
    with _native_stderr_silenced():
        import numpy as np

        from hfl_trainer.export import load_exported
        from hfl_trainer.project import load_entry_data

        model = load_exported(model_path, project)
        dataset = load_entry_data(
            data_plan["entry"],
            data_plan.get("params", {}),
            data_dir,
            input_shape=tuple(model_plan["input_shape"]),
            num_classes=int(model_plan["num_classes"]),
        )
        from hfl_trainer.data import preprocess_batch

        parts = {
            "test": [(dataset.x_test, dataset.y_test)],
            "train": [(dataset.x_train, dataset.y_train)],
            "all": [(dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)],
        }[split]
        x = np.concatenate([a for a, _ in parts])
        y = np.concatenate([b for _, b in parts]).astype(np.int64)
        logits = np.asarray(model.predict(preprocess_batch(dataset, x), verbose=0), np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return {
        "accuracy": accuracy,
        "loss": loss if math.isfinite(loss) else None,
        "examples": len(y),
        "split": split,
        "data": f"{data_plan['entry']}" + (f" on {data_dir}" if data_dir else ""),
        "model": str(model_path),
        "weights_sha256": provenance.get("weights_sha256"),
    }
