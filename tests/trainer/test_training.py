"""Local training on real TensorFlow: deltas, FedProx, FedSGD gradients, evaluation, progress."""

from __future__ import annotations

import io
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from hfl_common.errors import InvalidArgumentError
from hfl_trainer import models
from hfl_trainer.data import Dataset, load_digits, partition, synthetic
from hfl_trainer.progress import BatchProgress, ProgressReporter
from hfl_trainer.training import LocalTrainer, TrainResult


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def _digits_trainer(digits: Dataset, **kwargs: object) -> LocalTrainer:
    part = digits.with_train_indices(partition(digits.y_train, 2, 0, seed=0))
    model = models.build_model("small_cnn", part.input_shape, part.num_classes, seed=0)
    options: dict[str, object] = {"batch_size": 32, "learning_rate": 0.05, "seed": 0}
    options.update(kwargs)
    return LocalTrainer(model, part, **options)  # type: ignore[arg-type]


def _norm(tensors: dict[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))
    )


def test_train_delta_improves_the_held_out_loss(digits: Dataset) -> None:
    trainer = _digits_trainer(digits)
    initial = models.get_weights(trainer.model)
    before = trainer.evaluate(initial)

    result = trainer.train_delta(initial, epochs=2)

    after = trainer.evaluate({k: v + result.delta[k] for k, v in initial.items()})
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > before.accuracy
    assert result.num_examples == trainer.num_examples
    assert result.steps == 2 * trainer.steps_per_epoch
    assert 0.0 < result.accuracy <= 1.0
    assert result.examples_per_second > 0.0


def test_delta_is_local_minus_global_for_every_variable(digits: Dataset) -> None:
    trainer = _digits_trainer(digits, optimizer="adam", learning_rate=0.01)
    initial = models.get_weights(trainer.model)

    result = trainer.train_delta(initial, epochs=1)

    local = models.get_weights(trainer.model)
    assert list(result.delta) == list(initial)
    for name, value in initial.items():
        np.testing.assert_allclose(value + result.delta[name], local[name], rtol=0, atol=1e-6)
    assert _norm(result.delta) > 0.0


def test_fedprox_with_a_huge_mu_keeps_weights_near_global(digits: Dataset) -> None:
    trainer = _digits_trainer(digits, learning_rate=0.01)
    initial = models.get_weights(trainer.model)

    free = trainer.train_delta(initial, epochs=1)
    anchored = trainer.train_delta(initial, epochs=1, proximal_mu=100.0)

    assert _norm(anchored.delta) < 0.2 * _norm(free.delta)


def test_invalid_round_arguments_are_rejected(digits: Dataset) -> None:
    trainer = _digits_trainer(digits)
    weights = models.get_weights(trainer.model)

    with pytest.raises(InvalidArgumentError, match=r"epochs is 0; a round needs at least 1"):
        trainer.train_delta(weights, epochs=0)
    with pytest.raises(InvalidArgumentError, match=r"proximal_mu -1\.0 must be finite"):
        trainer.train_delta(weights, epochs=1, proximal_mu=-1.0)
    del weights["logits/bias"]
    with pytest.raises(InvalidArgumentError, match=r"weights lack variable 'logits/bias'"):
        trainer.train_delta(weights, epochs=1)


def test_trainer_refuses_a_model_that_does_not_fit_the_data(digits: Dataset) -> None:
    model = models.build_model("small_cnn", (16, 16, 1), 10, seed=0)

    with pytest.raises(
        InvalidArgumentError,
        match=r"model 'small_cnn' takes inputs of shape \(16, 16, 1\) but dataset 'digits' "
        r"has \(8, 8, 1\)",
    ):
        LocalTrainer(model, digits, batch_size=8, learning_rate=0.1)


def test_on_batch_sees_every_step_of_every_epoch(digits: Dataset) -> None:
    trainer = _digits_trainer(digits)
    seen: list[BatchProgress] = []

    trainer.train_delta(models.get_weights(trainer.model), epochs=2, on_batch=seen.append)

    assert len(seen) == 2 * trainer.steps_per_epoch
    assert seen[-1] == BatchProgress(
        epoch=1,
        epochs=2,
        step=trainer.steps_per_epoch,
        steps_per_epoch=trainer.steps_per_epoch,
        examples_seen=trainer.num_examples,
    )


def test_gradient_matches_a_manual_tape_computation(digits: Dataset) -> None:
    trainer = _digits_trainer(digits)
    weights = models.get_weights(trainer.model)
    step = trainer.steps_per_epoch + 3  # second epoch: a fresh permutation

    result = trainer.compute_gradient(weights, step)

    indices = trainer.batch_indices(step)
    assert result.num_examples == indices.size == 32
    reference = models.build_model("small_cnn", (8, 8, 1), 10, seed=99)
    models.set_weights(reference, weights)
    x = tf.constant(trainer_data(digits).x_train[indices])
    y = tf.constant(trainer_data(digits).y_train[indices])
    with tf.GradientTape() as tape:
        logits = reference(x, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    expected = tape.gradient(loss, reference.trainable_variables)
    assert list(result.gradients) == [name for name, _, _ in models.trainable_spec(reference)]
    for variable, gradient in zip(reference.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(
            result.gradients[variable.path], gradient.numpy(), rtol=1e-4, atol=1e-6
        )
    assert result.loss == pytest.approx(float(loss), rel=1e-5)
    assert result.non_trainable == {}


def trainer_data(digits: Dataset) -> Dataset:
    return digits.with_train_indices(partition(digits.y_train, 2, 0, seed=0))


def test_gradient_batches_cover_the_partition_once_per_epoch(digits: Dataset) -> None:
    trainer = _digits_trainer(digits)

    epoch0 = np.concatenate([trainer.batch_indices(s) for s in range(trainer.steps_per_epoch)])
    again = trainer.batch_indices(2)

    np.testing.assert_array_equal(np.sort(epoch0), np.arange(trainer.num_examples))
    np.testing.assert_array_equal(again, epoch0[64:96])
    assert not np.array_equal(trainer.batch_indices(trainer.steps_per_epoch), epoch0[:32])


def test_evaluate_matches_the_model_predictions(digits: Dataset) -> None:
    trainer = _digits_trainer(digits)
    weights = models.get_weights(trainer.model)

    result = trainer.evaluate(weights)

    logits = trainer.model(tf.constant(digits.x_test), training=False).numpy().astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(len(digits.y_test)), digits.y_test].mean()
    expected_accuracy = float((logits.argmax(axis=1) == digits.y_test).mean())
    assert result.num_examples == digits.y_test.size
    assert result.loss == pytest.approx(expected_loss, rel=1e-4)
    assert result.accuracy == pytest.approx(expected_accuracy)


def test_resnet_delta_and_gradient_carry_batchnorm_statistics() -> None:
    rng = np.random.default_rng(0)
    cifar_like = Dataset(
        x_train=rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, size=24),
        x_test=rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, size=8),
        num_classes=10,
        input_shape=(32, 32, 3),
        name="cifar-like",
        preprocessing="cifar",
    )
    model = models.build_model("resnet20", (32, 32, 3), 10, seed=0)
    trainer = LocalTrainer(model, cifar_like, batch_size=12, learning_rate=0.05, seed=0)
    initial = models.get_weights(model)

    result = trainer.train_delta(initial, epochs=1)
    gradient = trainer.compute_gradient(initial, 0)

    assert np.abs(result.delta["stem_bn/moving_mean"]).max() > 0.0
    assert set(gradient.gradients) == {name for name, _, _ in models.trainable_spec(model)}
    assert "stem_bn/moving_mean" not in gradient.gradients
    assert set(gradient.non_trainable) == {v.path for v in model.non_trainable_variables}
    assert not np.array_equal(
        gradient.non_trainable["stem_bn/moving_mean"], initial["stem_bn/moving_mean"]
    )


def _result() -> TrainResult:
    return TrainResult(
        delta={}, num_examples=100, loss=0.25, accuracy=0.9, examples_per_second=1234.0, steps=4
    )


def test_progress_at_a_terminal_draws_bars_and_a_round_line() -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream, interactive=True)

    for step in (1, 2):
        reporter.on_batch(BatchProgress(0, 1, step, 2, 32 * step))
    reporter.round_finished(3, _result())

    text = stream.getvalue()
    assert "\repoch 1/1 [" in text
    assert "] 2/2 " in text
    assert "round 3: loss 0.2500  accuracy 90.00%  1,234 examples/s" in text


def test_progress_without_a_terminal_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream)

    with caplog.at_level(logging.INFO, logger="hfl_trainer.progress"):
        reporter.on_batch(BatchProgress(0, 1, 1, 1, 32))
        reporter.round_finished(3, _result())

    assert not reporter.interactive
    assert stream.getvalue() == ""
    (record,) = caplog.records
    assert record.getMessage().startswith("round 3 finished: loss=0.2500 accuracy=0.9000")
    assert record.__dict__["examples_per_second"] == 1234.0


def test_synthetic_data_is_learnable() -> None:
    data = synthetic(400, (8, 8, 1), 4, seed=2)
    model = models.build_model("small_cnn", (8, 8, 1), 4, seed=0)
    trainer = LocalTrainer(model, data, batch_size=32, learning_rate=0.01, optimizer="adam")

    result = trainer.train_delta(models.get_weights(model), epochs=3)

    assert result.accuracy > 0.9


def test_xla_compiled_steps_follow_the_same_trajectory(digits: Dataset) -> None:
    graph = _digits_trainer(digits)
    xla = _digits_trainer(digits, jit_compile=True)
    initial = models.get_weights(graph.model)

    expected = graph.train_delta(initial, epochs=1)
    result = xla.train_delta(initial, epochs=1)

    assert result.loss == pytest.approx(expected.loss, rel=1e-2)
    for name, value in expected.delta.items():
        np.testing.assert_allclose(result.delta[name], value, atol=2e-3, err_msg=name)
    assert xla.evaluate(initial).loss == pytest.approx(graph.evaluate(initial).loss, rel=1e-4)
