"""The final model goes home: model.keras and provenance.json that say what it is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hfl_common.api import aggregator_pb2
from hfl_common.config import parse_plan
from hfl_common.errors import InvalidArgumentError
from hfl_trainer.export import export_model, load_exported, privacy_provenance, weights_sha256
from hfl_trainer.models import build_model, get_weights, weights_npz_bytes
from hfl_trainer.privacy import local_epsilon
from hfl_trainer.training import EvalResult

PLAN = """
[federation]
name = "export-test"
rounds = 3
[model]
name = "{model}"
input_shape = {shape}
num_classes = 10
initial_weights = "w.npz"
initial_weights_sha256 = "{sha}"
"""


@pytest.mark.parametrize(
    ("model_name", "shape"),
    [("small_cnn", (8, 8, 1)), ("resnet20", (8, 8, 3))],
    ids=["small_cnn", "resnet20-custom-layer"],
)
def test_exported_model_loads_back_with_the_final_weights(
    tmp_path: Path, model_name: str, shape: tuple[int, ...]
) -> None:
    plan = parse_plan(PLAN.format(model=model_name, shape=list(shape), sha="ab" * 32))
    model = build_model(model_name, shape, 10, seed=0)
    final = {k: v + 0.01 for k, v in get_weights(build_model(model_name, shape, 10, 1)).items()}
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)

    exported = export_model(
        tmp_path / "out",
        model,
        final,
        plan=plan,
        label="trainer-1",
        rounds_completed=3,
        model_version=3,
        aggregator_mrenclave="cd" * 32,
        evaluation=EvalResult(loss=0.5, accuracy=0.9, num_examples=7),
    )
    loaded = load_exported(tmp_path / "out")

    reference = build_model(model_name, shape, 10, seed=0)
    for v in reference.weights:
        v.assign(final[v.path])
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    assert exported.weights_sha256 == hashlib.sha256(weights_npz_bytes(final)).hexdigest()
    assert exported.weights_sha256 == weights_sha256(get_weights(loaded))


def test_provenance_names_plan_rounds_metrics_measurement_and_hashes(tmp_path: Path) -> None:
    plan = parse_plan(PLAN.format(model="small_cnn", shape=[8, 8, 1], sha="ab" * 32))
    model = build_model("small_cnn", (8, 8, 1), 10, seed=0)
    weights = get_weights(model)

    exported = export_model(
        tmp_path,
        model,
        weights,
        plan=plan,
        label="trainer-2",
        rounds_completed=3,
        model_version=4,
        aggregator_mrenclave="cd" * 32,
        evaluation=EvalResult(loss=0.25, accuracy=0.875, num_examples=8),
    )
    provenance = json.loads(exported.provenance.read_text())

    assert provenance["plan"]["sha256"] == plan.sha256_hex
    assert provenance["plan"]["model"]["entry"] == "hfl_trainer.models:small_cnn"
    assert provenance["rounds_completed"] == 3
    assert provenance["model_version"] == 4
    assert provenance["trainer"] == "trainer-2"
    assert provenance["aggregator_mrenclave"] == "cd" * 32
    assert provenance["final_metrics"]["accuracy"] == 0.875
    assert provenance["weights_sha256"] == weights_sha256(weights)
    keras_bytes = (tmp_path / "model.keras").read_bytes()
    assert provenance["model_file_sha256"] == hashlib.sha256(keras_bytes).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "provenance.json"]
    assert provenance["privacy"] == {"mode": "none"}


CENTRAL_DP = """
[privacy]
delta = 1e-5
max_epsilon = 20.0
[privacy.central]
noise_multiplier = 1.5
clip_norm = 0.5
"""


def test_provenance_states_the_epsilon_the_aggregator_accounted(tmp_path: Path) -> None:
    plan = parse_plan(PLAN.format(model="small_cnn", shape=[8, 8, 1], sha="ab" * 32) + CENTRAL_DP)
    # What the aggregator's DONE task carries (Task.privacy).
    final = aggregator_pb2.PrivacyStatus(
        mode="central",
        epsilon=3.25,
        delta=1e-5,
        epsilon_rdp=3.5,
        epsilon_pld=float("nan"),
        rounds_accounted=3,
        max_epsilon=20.0,
        clip_norm=0.5,
        stop_reason="privacy budget reached: ...",
        noise_multiplier=1.5,
        relation="add_or_remove_one",
    )
    model = build_model("small_cnn", (8, 8, 1), 10, seed=0)

    exported = export_model(
        tmp_path,
        model,
        get_weights(model),
        plan=plan,
        label="trainer-1",
        rounds_completed=3,
        model_version=3,
        aggregator_mrenclave="cd" * 32,
        evaluation=None,
        privacy=privacy_provenance(plan, final),
    )
    privacy = json.loads(exported.provenance.read_text())["privacy"]

    assert privacy["mode"] == "central"
    assert (privacy["epsilon"], privacy["delta"], privacy["rounds_accounted"]) == (3.25, 1e-5, 3)
    assert privacy["epsilon_pld"] is None  # NaN is not JSON: not computed
    assert privacy["stop_reason"].startswith("privacy budget reached")
    assert (privacy["noise_multiplier"], privacy["clip_norm"], privacy["max_epsilon"]) == (
        1.5,
        0.5,
        20.0,
    )
    assert "attested aggregator" in privacy["source"]


def test_client_dp_without_an_aggregator_ledger_states_this_trainers_own_epsilon() -> None:
    plan = parse_plan(
        PLAN.format(model="small_cnn", shape=[8, 8, 1], sha="ab" * 32)
        + "[privacy]\nclip_norm = 1.0\nnoise_multiplier = 2.0\ndelta = 1e-5\n"
    )

    privacy = privacy_provenance(plan, None, own_releases=4)

    assert privacy["mode"] == "client"
    assert privacy["epsilon"] == pytest.approx(local_epsilon(2.0, 4, 1e-5).epsilon)
    assert privacy["rounds_accounted"] == 4
    assert "this trainer's own" in privacy["source"]


def test_loading_where_no_model_was_exported_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no exported model here"):
        load_exported(tmp_path)
