"""The model zoo and the weight mapping that travels on the wire (real Keras)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfl_common.errors import InvalidArgumentError
from hfl_trainer import models
from hfl_trainer.data import load_digits, synthetic
from hfl_trainer.training import LocalTrainer


def test_same_seed_builds_identical_names_shapes_and_values() -> None:
    first = models.build_model("resnet20", (32, 32, 3), 10, seed=7)
    second = models.build_model("resnet20", (32, 32, 3), 10, seed=7)

    assert models.model_spec(first) == models.model_spec(second)
    a, b = models.get_weights(first), models.get_weights(second)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_different_seeds_give_different_initial_weights() -> None:
    a = models.get_weights(models.build_model("small_cnn", (8, 8, 1), 10, seed=1))
    b = models.get_weights(models.build_model("small_cnn", (8, 8, 1), 10, seed=2))

    assert list(a) == list(b)
    assert not np.array_equal(a["conv1/kernel"], b["conv1/kernel"])


def test_small_cnn_names_are_fixed_keras_paths() -> None:
    model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)

    assert models.model_spec(model) == [
        ("conv1/kernel", (3, 3, 1, 16), "float32"),
        ("conv1/bias", (16,), "float32"),
        ("conv2/kernel", (3, 3, 16, 32), "float32"),
        ("conv2/bias", (32,), "float32"),
        ("logits/kernel", (4 * 4 * 32, 10), "float32"),
        ("logits/bias", (10,), "float32"),
    ]


def test_cifar_resnets_carry_batchnorm_statistics_and_the_paper_sizes() -> None:
    resnet20 = models.build_model("resnet20", (32, 32, 3), 10, seed=0)
    resnet56 = models.build_model("resnet56", (32, 32, 3), 10, seed=0)

    names = [name for name, _, _ in models.model_spec(resnet20)]
    trainable = [name for name, _, _ in models.trainable_spec(resnet20)]
    assert len(names) == len(set(names))
    assert "stem_bn/moving_mean" in names
    assert "stem_bn/moving_variance" in names
    assert "stem_bn/moving_mean" not in trainable
    assert set(trainable) < set(names)
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters, ResNet-56 0.85M.
    assert 0.26e6 < resnet20.count_params() < 0.28e6
    assert 0.84e6 < resnet56.count_params() < 0.87e6
    # Option A shortcuts are parameter-free: no projection convolution exists.
    assert not any("shortcut" in name for name in names)


def test_unknown_model_name_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown model 'vgg16'; expected one of"):
        models.build_model("vgg16", (32, 32, 3), 10, seed=0)


def test_get_set_weights_round_trip_restores_every_variable() -> None:
    source = models.build_model("resnet20", (32, 32, 3), 10, seed=1)
    target = models.build_model("resnet20", (32, 32, 3), 10, seed=2)
    weights = models.get_weights(source)
    weights["stem_bn/moving_mean"] = np.full((16,), 0.5, np.float32)

    models.set_weights(target, weights)

    restored = models.get_weights(target)
    for name, value in weights.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_set_weights_casts_float16_from_the_wire() -> None:
    model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)
    half = {k: v.astype(np.float16) for k, v in models.get_weights(model).items()}

    models.set_weights(model, half)

    after = models.get_weights(model)
    assert after["conv1/kernel"].dtype == np.float32
    np.testing.assert_array_equal(after["conv1/kernel"], half["conv1/kernel"].astype(np.float32))


def test_set_weights_names_a_missing_variable_and_assigns_nothing() -> None:
    model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)
    before = models.get_weights(model)
    weights = {k: v + 1.0 for k, v in before.items()}
    del weights["conv2/bias"]

    with pytest.raises(
        InvalidArgumentError,
        match=r"weights lack variable 'conv2/bias' of shape \(32,\) required by model 'small_cnn'",
    ):
        models.set_weights(model, weights)
    np.testing.assert_array_equal(models.get_weights(model)["conv1/kernel"], before["conv1/kernel"])


def test_set_weights_names_the_first_shape_mismatch() -> None:
    model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)
    weights = models.get_weights(model)
    weights["conv2/kernel"] = np.zeros((3, 3, 16, 8), np.float32)
    weights["logits/bias"] = np.zeros((5,), np.float32)

    with pytest.raises(
        InvalidArgumentError,
        match=r"variable 'conv2/kernel' has shape \(3, 3, 16, 8\) but model 'small_cnn' "
        r"expects \(3, 3, 16, 32\)",
    ):
        models.set_weights(model, weights)


def test_set_weights_rejects_an_unknown_name_and_integer_dtype() -> None:
    model = models.build_model("small_cnn", (8, 8, 1), 10, seed=0)
    extra = dict(models.get_weights(model))
    extra["conv9/kernel"] = np.zeros((1,), np.float32)
    with pytest.raises(
        InvalidArgumentError, match=r"weights hold variable 'conv9/kernel' unknown to model"
    ):
        models.set_weights(model, extra)

    ints = dict(models.get_weights(model))
    ints["conv1/bias"] = np.zeros((16,), np.int32)
    with pytest.raises(
        InvalidArgumentError, match=r"variable 'conv1/bias' has dtype int32 but a floating-point"
    ):
        models.set_weights(model, ints)


def test_initial_weights_file_is_reproducible_and_matches_the_model(tmp_path: Path) -> None:
    first = tmp_path / "a.npz"
    second = tmp_path / "b.npz"

    digest = models.initial_weights_file("small_cnn", (8, 8, 1), 10, 3, first)
    again = models.initial_weights_file("small_cnn", (8, 8, 1), 10, 3, second)

    assert digest == again
    assert digest == hashlib.sha256(first.read_bytes()).hexdigest()
    assert first.read_bytes() == second.read_bytes()
    expected = models.get_weights(models.build_model("small_cnn", (8, 8, 1), 10, seed=3))
    with np.load(first, allow_pickle=False) as archive:
        assert archive.files == list(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(archive[name], value)
    assert list(models.load_weights_file(first)) == list(expected)


@pytest.mark.slow
def test_initial_weights_digest_is_the_same_in_another_process(tmp_path: Path) -> None:
    here = models.initial_weights_file("resnet20", (32, 32, 3), 10, 5, tmp_path / "here.npz")
    script = (
        "import sys; from hfl_trainer.models import initial_weights_file; "
        "print(initial_weights_file('resnet20', (32, 32, 3), 10, 5, sys.argv[1]))"
    )

    there = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "there.npz")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )

    assert there.stdout.strip().splitlines()[-1] == here


def test_load_weights_file_names_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip")

    with pytest.raises(InvalidArgumentError, match=r"broken\.npz: not a readable weights \.npz"):
        models.load_weights_file(path)


def test_small_cnn_reaches_95_percent_on_digits_with_brief_central_training() -> None:
    digits = load_digits()
    model = models.build_model("small_cnn", digits.input_shape, digits.num_classes, seed=0)
    trainer = LocalTrainer(model, digits, batch_size=32, learning_rate=0.05, seed=0)

    initial = models.get_weights(model)
    result = trainer.train_delta(initial, epochs=6)
    trained = {name: value + result.delta[name] for name, value in initial.items()}

    evaluation = trainer.evaluate(trained)
    assert evaluation.num_examples == digits.y_test.shape[0]
    assert evaluation.accuracy >= 0.95


@pytest.mark.slow
def test_resnet50_builds_for_cifar_input_and_takes_one_training_step() -> None:
    model = models.build_model("resnet50", (32, 32, 3), 10, seed=0)
    spec = models.model_spec(model)
    assert spec[0] == ("conv1_conv/kernel", (7, 7, 3, 64), "float32")
    assert spec[-1] == ("predictions/bias", (10,), "float32")
    assert len(spec) == 320
    assert any(name.endswith("/moving_variance") for name, _, _ in spec)

    data = synthetic(10, (32, 32, 3), 10, seed=0, test_fraction=0.2)
    trainer = LocalTrainer(model, data, batch_size=8, learning_rate=0.01, seed=0)
    start = models.get_weights(model)
    result = trainer.train_delta(start, epochs=1)

    assert result.steps == 1
    assert np.isfinite(result.loss)
    assert list(result.delta) == [name for name, _, _ in spec]
    assert np.abs(result.delta["predictions/kernel"]).max() > 0.0
    assert np.abs(result.delta["conv1_bn/moving_mean"]).max() > 0.0
