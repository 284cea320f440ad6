"""Local training of one trainer: FedAvg-family deltas, FedSGD gradients, evaluation.

Two modes, matching the aggregator's strategies:

**Local epochs (FedAvg, FedProx).** :meth:`LocalTrainer.train_delta` starts
from the global weights, runs ``epochs`` passes over the local partition and
returns ``delta = local - global`` for *every* variable of the model, the
BatchNorm moving statistics included (they travel and are averaged like the
rest; see :mod:`hfl_trainer.models`). ``num_examples`` is the size of the
partition (the FedAvg weight n_k of McMahan et al. 2017), not multiplied by the
number of epochs.

**Per-step gradients (FedSGD, the reference parameter-server workflow).**
:meth:`LocalTrainer.compute_gradient` returns the gradient of the loss on one
batch for the **trainable variables only** (``models.trainable_spec`` is the
spec of that update); the aggregator applies its server optimizer to the
trainable subset only. Moving statistics have no gradient: the batch's
forward pass in training mode updates them, and their new values come back
separately in ``GradientResult.non_trainable``. The recommended protocol is
that the aggregator replaces each global non-trainable variable by the
example-weighted mean of the values the trainers report (FedAvg of the
statistics). If they are not sent, the global moving statistics keep their
initial values (mean 0, variance 1) and evaluating a BatchNorm model (the
ResNets) with them gives poor accuracy; ``small_cnn`` has no BatchNorm and no
non-trainable variables.

The optimizer state (momentum, Adam moments, the step counter) is reset at the
start of every round: each round is a fresh local solve from the new global
point, which is what FedAvg and FedProx analyse, and stale momentum from a
previous global point would push the model in an outdated direction.

A LocalTrainer owns its model and is not thread-safe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from hfl_common.errors import InvalidArgumentError
from hfl_trainer import data as data_lib
from hfl_trainer.data import Dataset
from hfl_trainer.models import get_weights, set_weights
from hfl_trainer.progress import BatchProgress

logger = logging.getLogger(__name__)

OptimizerName = Literal["sgd", "adam"]
# Momentum of the local SGD optimizer (He et al. 2016 train CIFAR ResNets with
# SGD and momentum 0.9; it is also the reference workflow's setting).
SGD_MOMENTUM = 0.9
_EVAL_BATCH_SIZE = 256


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of one round of local epochs.

    ``loss`` and ``accuracy`` are the means over the examples of the last local
    epoch, measured on the training batches as they were trained (data loss
    only: neither the proximal term nor weight decay). ``examples_per_second``
    counts every example of every epoch over the wall time of the training
    loop (the first round includes compiling the train step).
    """

    delta: dict[str, np.ndarray]
    num_examples: int
    loss: float
    accuracy: float
    examples_per_second: float
    steps: int


@dataclass(frozen=True, eq=False)
class GradientResult:
    """Gradient of the loss on one batch (FedSGD).

    ``gradients`` holds the trainable variables only (``models.trainable_spec``
    order); ``non_trainable`` holds the values of the non-trainable variables
    after the batch's forward pass in training mode (empty without BatchNorm).
    """

    gradients: dict[str, np.ndarray]
    non_trainable: dict[str, np.ndarray]
    num_examples: int
    loss: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def _make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=SGD_MOMENTUM)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise InvalidArgumentError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")


class LocalTrainer:
    """Trains ``model`` on ``dataset_partition`` (its training split; its test split evaluates).

    The steps are ``tf.function``-compiled graphs over a ``tf.data`` pipeline
    (``benchmarks/bench_trainer_throughput.py`` compares them with
    ``Model.fit``). ``jit_compile=True`` compiles them with XLA as well; on a
    2-core CPU that ranged from no gain to about 30% for ResNet-20 (run the
    benchmark with ``--jit`` on the target machine). XLA generates machine
    code at run time, which an SGX enclave only permits with executable heap
    pages (EDMM), so it is off by default, like Keras' own default on CPU.
    """

    def __init__(
        self,
        model: keras.Model,
        dataset_partition: Dataset,
        batch_size: int,
        learning_rate: float,
        optimizer: OptimizerName = "sgd",
        seed: int = 0,
        eval_batch_size: int = _EVAL_BATCH_SIZE,
        jit_compile: bool = False,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size is {batch_size}; it must be at least 1")
        if not learning_rate > 0.0:
            raise InvalidArgumentError(f"learning_rate {learning_rate} must be positive")
        num_train = int(dataset_partition.y_train.shape[0])
        if num_train == 0:
            raise InvalidArgumentError(
                f"the partition of dataset {dataset_partition.name!r} holds no training examples"
            )
        model_input = tuple(model.input_shape[1:])
        if model_input != tuple(dataset_partition.input_shape):
            raise InvalidArgumentError(
                f"model {model.name!r} takes inputs of shape {model_input} but dataset "
                f"{dataset_partition.name!r} has {tuple(dataset_partition.input_shape)}"
            )
        self._model = model
        self._data = dataset_partition
        self._batch_size = batch_size
        self._seed = seed
        self._num_train = num_train
        self._steps_per_epoch = math.ceil(num_train / batch_size)

        self._optimizer = _make_optimizer(optimizer, learning_rate)
        self._optimizer.build(model.trainable_variables)
        self._optimizer_initial = [np.array(v.numpy()) for v in self._optimizer.variables]

        self._train_ds = data_lib.train_pipeline(dataset_partition, batch_size, seed)
        self._eval_ds = data_lib.eval_pipeline(dataset_partition, eval_batch_size)
        # FedProx anchor: the global values of the trainable variables.
        self._anchors = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
            for v in model.trainable_variables
        ]
        self._loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self._correct_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self._count = tf.Variable(0.0, dtype=tf.float64, trainable=False)

        x_spec = tf.TensorSpec([None, *dataset_partition.input_shape], tf.float32)
        y_spec = tf.TensorSpec([None], tf.int32)
        mu_spec = tf.TensorSpec([], tf.float32)
        train_signature = [x_spec, y_spec, mu_spec]
        self._train_step = tf.function(
            self._make_train_step(proximal=False),
            input_signature=train_signature,
            jit_compile=jit_compile,
        )
        self._train_step_prox = tf.function(
            self._make_train_step(proximal=True),
            input_signature=train_signature,
            jit_compile=jit_compile,
        )
        self._eval_step = tf.function(
            self._eval_step_impl, input_signature=[x_spec, y_spec], jit_compile=jit_compile
        )
        self._grad_step = tf.function(
            self._grad_step_impl, input_signature=[x_spec, y_spec], jit_compile=jit_compile
        )

    @property
    def model(self) -> keras.Model:
        return self._model

    @property
    def num_examples(self) -> int:
        return self._num_train

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    # ------------------------------------------------------------------ compiled steps

    def _objective(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        logits = self._model(x, training=True)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        data_loss = tf.reduce_mean(per_example)
        total = data_loss
        regularization = self._model.losses
        if regularization:
            total = total + tf.add_n(regularization)
        return total, data_loss, logits

    def _make_train_step(self, proximal: bool) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], Any]:
        model = self._model
        optimizer = self._optimizer
        anchors = self._anchors

        def step(x: tf.Tensor, y: tf.Tensor, mu: tf.Tensor) -> None:
            trainable = model.trainable_variables
            with tf.GradientTape() as tape:
                total, data_loss, logits = self._objective(x, y)
                if proximal:
                    # FedProx, Li et al. 2020, "Federated Optimization in
                    # Heterogeneous Networks", eq. (2): (mu/2) * ||w - w_global||^2.
                    distance = tf.add_n(
                        [
                            tf.reduce_sum(tf.square(w.value - a))
                            for w, a in zip(trainable, anchors, strict=True)
                        ]
                    )
                    total = total + 0.5 * mu * distance
            gradients = tape.gradient(total, trainable)
            optimizer.apply(gradients, trainable)
            batch = tf.cast(tf.shape(y)[0], tf.float64)
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            correct = tf.reduce_sum(tf.cast(tf.equal(predictions, y), tf.float64))
            self._loss_sum.assign_add(tf.cast(data_loss, tf.float64) * batch)
            self._correct_sum.assign_add(correct)
            self._count.assign_add(batch)

        return step

    def _eval_step_impl(self, x: tf.Tensor, y: tf.Tensor) -> None:
        logits = self._model(x, training=False)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        self._loss_sum.assign_add(tf.reduce_sum(tf.cast(per_example, tf.float64)))
        self._correct_sum.assign_add(tf.reduce_sum(tf.cast(tf.equal(predictions, y), tf.float64)))
        self._count.assign_add(tf.cast(tf.shape(y)[0], tf.float64))

    def _grad_step_impl(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        trainable = self._model.trainable_variables
        with tf.GradientTape() as tape:
            total, data_loss, _ = self._objective(x, y)
        return data_loss, tape.gradient(total, trainable)

    def _reset_sums(self) -> None:
        self._loss_sum.assign(0.0)
        self._correct_sum.assign(0.0)
        self._count.assign(0.0)

    def _reset_optimizer(self) -> None:
        for variable, initial in zip(
            self._optimizer.variables, self._optimizer_initial, strict=True
        ):
            variable.assign(initial)

    # ------------------------------------------------------------------ public API

    def train_delta(
        self,
        global_weights: Mapping[str, np.ndarray],
        epochs: int,
        proximal_mu: float = 0.0,
        on_batch: Callable[[BatchProgress], None] | None = None,
    ) -> TrainResult:
        """Run ``epochs`` local epochs from ``global_weights``; return ``local - global``.

        ``proximal_mu > 0`` adds FedProx's proximal term (mu/2)*||w - w_global||^2
        over the trainable variables to the loss. ``on_batch`` is called after
        every step with counts only (no tensor is read back, so it costs no
        device synchronisation).
        """
        if epochs < 1:
            raise InvalidArgumentError(f"epochs is {epochs}; a round needs at least 1 local epoch")
        if proximal_mu < 0.0 or not math.isfinite(proximal_mu):
            raise InvalidArgumentError(f"proximal_mu {proximal_mu} must be finite and non-negative")
        set_weights(self._model, global_weights)
        reference = get_weights(self._model)
        self._reset_optimizer()
        proximal = proximal_mu > 0.0
        if proximal:
            for anchor, variable in zip(
                self._anchors, self._model.trainable_variables, strict=True
            ):
                anchor.assign(variable.value)
        step_fn = self._train_step_prox if proximal else self._train_step
        mu = tf.constant(proximal_mu, tf.float32)

        steps = 0
        examples = 0
        loss = accuracy = 0.0
        start = time.perf_counter()
        for epoch in range(epochs):
            self._reset_sums()
            seen = 0
            for step, (x, y) in enumerate(self._train_ds, start=1):
                step_fn(x, y, mu)
                seen += int(y.shape[0])
                if on_batch is not None:
                    on_batch(BatchProgress(epoch, epochs, step, self._steps_per_epoch, seen))
            steps += self._steps_per_epoch
            examples += seen
            count = float(self._count.numpy())
            loss = float(self._loss_sum.numpy()) / count
            accuracy = float(self._correct_sum.numpy()) / count
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss):
            raise InvalidArgumentError(
                f"local training diverged: loss is {loss} after {steps} steps; "
                "lower the learning rate"
            )

        local = get_weights(self._model)
        delta = {name: local[name] - reference[name] for name in local}
        result = TrainResult(
            delta=delta,
            num_examples=self._num_train,
            loss=loss,
            accuracy=accuracy,
            examples_per_second=examples / max(elapsed, 1e-9),
            steps=steps,
        )
        logger.debug(
            "local round: %d epochs, %d steps, loss %.4f, accuracy %.4f, %.1f examples/s",
            epochs,
            steps,
            loss,
            accuracy,
            result.examples_per_second,
        )
        return result

    def batch_indices(self, step_index: int) -> np.ndarray:
        """Indices (into the partition's training split) of FedSGD batch ``step_index``.

        Batches walk through epochs: epoch ``step_index // steps_per_epoch`` is a
        permutation of the partition seeded by ``(seed, epoch)``, cut into
        ``batch_size`` batches (the last one may be smaller).
        """
        if step_index < 0:
            raise InvalidArgumentError(f"step_index is {step_index}; it must be non-negative")
        epoch, batch = divmod(step_index, self._steps_per_epoch)
        order = np.random.default_rng([self._seed, epoch]).permutation(self._num_train)
        return order[batch * self._batch_size : (batch + 1) * self._batch_size]

    def compute_gradient(
        self, weights: Mapping[str, np.ndarray], step_index: int
    ) -> GradientResult:
        """Gradient of the loss (data loss plus weight decay) on batch ``step_index``.

        ``weights`` is the full global mapping (``models.model_spec``). The
        batch is the training batch :meth:`batch_indices` names, with the
        training augmentation of the dataset (seeded by ``(seed, step_index)``).
        """
        indices = self.batch_indices(step_index)
        set_weights(self._model, weights)
        x, y = data_lib.train_batch(self._data, indices, seed=self._seed * 1_000_003 + step_index)
        data_loss, gradients = self._grad_step(x, y)
        names = [v.path for v in self._model.trainable_variables]
        non_trainable = {v.path: np.array(v.numpy()) for v in self._model.non_trainable_variables}
        return GradientResult(
            gradients={
                name: np.asarray(g.numpy()) for name, g in zip(names, gradients, strict=True)
            },
            non_trainable=non_trainable,
            num_examples=int(indices.shape[0]),
            loss=float(data_loss.numpy()),
        )

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> EvalResult:
        """Loss and accuracy of ``weights`` on the held-out split (inference mode)."""
        set_weights(self._model, weights)
        self._reset_sums()
        for x, y in self._eval_ds:
            self._eval_step(x, y)
        count = float(self._count.numpy())
        if count == 0:
            raise InvalidArgumentError(f"dataset {self._data.name!r} has no held-out examples")
        return EvalResult(
            loss=float(self._loss_sum.numpy()) / count,
            accuracy=float(self._correct_sum.numpy()) / count,
            num_examples=int(count),
        )
