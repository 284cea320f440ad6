"""Model zoo of the trainer and the weight mapping that travels on the wire.

Every model outputs **logits** (no softmax); the trainer's loss is the softmax
cross-entropy on logits, which is the same model as a softmax head trained
with categorical cross-entropy, but numerically safer.

Weights on the wire are an ordered mapping ``name -> np.ndarray`` holding every
variable of the model, trainable *and* non-trainable (BatchNormalization's
moving mean and variance included), in ``model.weights`` order. The names are
Keras 3 variable paths (``"stage1_block0_conv1/kernel"``). Every layer of every
model built here carries a fixed name, so two processes that build the same
model get identical names, shapes and order; :func:`model_spec` is that
contract in data form.

Non-trainable variables travel in a FedAvg delta like the rest: the aggregator
averages ``local - global`` of the BatchNorm moving statistics with the same
example weights as the trainable variables, which is FedAvg of the statistics.
For per-step gradients (FedSGD) see :mod:`hfl_trainer.training`.

Initialisation is deterministic under ``seed``: the models are built with
Keras' default initialisers, whose seeds Keras draws from Python's ``random``
module when a layer is created; :func:`build_model` seeds that module for the
duration of the build only and restores its state afterwards (so do not
build models while another thread draws from ``random``). With integer
seeds Keras' TensorFlow backend uses stateless random ops, so the values are
identical across processes and machines (same TensorFlow build).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import random
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from hfl_common.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

MODEL_NAMES = ("small_cnn", "resnet20", "resnet56", "resnet50")

# He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2:
# the CIFAR-10 networks have 6n+2 layers, n residual blocks of two 3x3 convs
# per stage, 3 stages with 16, 32, 64 filters; ResNet-20 is n=3, ResNet-56 n=9.
_CIFAR_RESNET_BLOCKS = {"resnet20": 3, "resnet56": 9}
_CIFAR_RESNET_FILTERS = (16, 32, 64)
# Same paper, section 4.2: weight decay 1e-4. Keras' L2(l) adds l * sum(w^2) to
# the loss, whose gradient 2*l*w equals a weight decay of 2*l, hence 5e-5.
_CIFAR_RESNET_L2 = 5e-5
# Same paper: BatchNormalization as in Ioffe & Szegedy; Keras defaults
# (momentum 0.99) converge slowly on short federated rounds, so we use 0.9
# (the value of the TensorFlow / PyTorch reference CIFAR ResNets).
_BN_MOMENTUM = 0.9

# Fixed timestamp for the entries of the initial-weights .npz, so the file (and
# the SHA-256 the federation plan pins) depends only on the weights. 1980-01-01
# is the earliest date the ZIP format can represent (APPNOTE 4.4.6).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

WeightSpec = list[tuple[str, tuple[int, ...], str]]


@contextlib.contextmanager
def seeded_python_random(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` for a block and restore its previous state after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Entry point ``hfl_trainer.models:small_cnn`` (the plan's ``name = "small_cnn"``)."""
    _check_dimensions(input_shape, num_classes)
    return _small_cnn(tuple(input_shape), num_classes)


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Entry point ``hfl_trainer.models:resnet20``."""
    _check_dimensions(input_shape, num_classes)
    return _cifar_resnet(
        "resnet20", tuple(input_shape), num_classes, _CIFAR_RESNET_BLOCKS["resnet20"]
    )


def resnet56(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Entry point ``hfl_trainer.models:resnet56``."""
    _check_dimensions(input_shape, num_classes)
    return _cifar_resnet(
        "resnet56", tuple(input_shape), num_classes, _CIFAR_RESNET_BLOCKS["resnet56"]
    )


def resnet50(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Entry point ``hfl_trainer.models:resnet50`` (Keras' ResNet50 with a logits head)."""
    _check_dimensions(input_shape, num_classes)
    return keras.applications.ResNet50(
        weights=None,
        include_top=True,
        input_shape=tuple(input_shape),
        classes=num_classes,
        classifier_activation=None,
        name="resnet50",
    )


def _check_dimensions(input_shape: tuple[int, ...], num_classes: int) -> None:
    if num_classes < 2:
        raise InvalidArgumentError(f"num_classes is {num_classes}; a classifier needs at least 2")
    if not input_shape or any(d <= 0 for d in input_shape):
        raise InvalidArgumentError(f"input_shape {input_shape} must be non-empty and positive")


_BUILTINS = {
    "small_cnn": small_cnn,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet50": resnet50,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> keras.Model:
    """Build one of :data:`MODEL_NAMES` with deterministic initial weights.

    Each is also the entry point ``hfl_trainer.models:<name>`` that a plan's
    ``[model] name`` stands for (:mod:`hfl_trainer.project` builds any entry).

    - ``small_cnn``: conv 3x3/16 -> conv 3x3/32 -> max-pool 2 -> dense, for
      8x8x1 digits (works for any small image).
    - ``resnet20`` / ``resnet56``: the CIFAR ResNets of He et al. 2016
      (section 4.2) with **option A** shortcuts: where a stage halves the
      resolution and doubles the filters, the shortcut subsamples with stride
      2 and pads the new channels with zeros (parameter-free, as in the
      paper's CIFAR experiments, 0.27M / 0.85M parameters).
    - ``resnet50``: ``keras.applications.ResNet50(weights=None, classes=...)``,
      the reference configuration, with a logits head.
    """
    build = _BUILTINS.get(name)
    if build is None:
        raise InvalidArgumentError(
            f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}"
        )
    with seeded_python_random(seed):
        model = build(input_shape, num_classes)
    check_unique_paths(model)
    logger.debug(
        "built model %s input=%s classes=%d params=%d",
        name,
        input_shape,
        num_classes,
        model.count_params(),
    )
    return model


def _small_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


@keras.saving.register_keras_serializable(package="hfl")
class ZeroPadShortcut(keras.layers.Layer):  # type: ignore[misc]
    """Option A shortcut of He et al. 2016: stride-2 subsampling, zero-padded channels."""

    def __init__(self, out_channels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_channels = out_channels

    def call(self, x: Any) -> Any:
        x = x[:, ::2, ::2, :]
        extra = self.out_channels - x.shape[-1]
        before = extra // 2
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, extra - before]])

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        b, h, w, _ = input_shape
        return (
            b,
            None if h is None else (h + 1) // 2,
            None if w is None else (w + 1) // 2,
            self.out_channels,
        )

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config["out_channels"] = self.out_channels
        return config


def _cifar_resnet(
    name: str, input_shape: tuple[int, ...], num_classes: int, blocks: int
) -> keras.Model:
    layers = keras.layers

    def conv(filters: int, strides: int, layer_name: str) -> keras.layers.Layer:
        return layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=keras.regularizers.L2(_CIFAR_RESNET_L2),
            name=layer_name,
        )

    def bn(layer_name: str) -> keras.layers.Layer:
        return layers.BatchNormalization(momentum=_BN_MOMENTUM, name=layer_name)

    inputs = keras.Input(shape=input_shape, name="image")
    x = conv(_CIFAR_RESNET_FILTERS[0], 1, "stem_conv")(inputs)
    x = bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(_CIFAR_RESNET_FILTERS):
        for block in range(blocks):
            prefix = f"stage{stage + 1}_block{block}"
            downsample = stage > 0 and block == 0
            shortcut = x
            y = conv(filters, 2 if downsample else 1, f"{prefix}_conv1")(x)
            y = bn(f"{prefix}_bn1")(y)
            y = layers.ReLU(name=f"{prefix}_relu1")(y)
            y = conv(filters, 1, f"{prefix}_conv2")(y)
            y = bn(f"{prefix}_bn2")(y)
            if downsample:
                shortcut = ZeroPadShortcut(filters, name=f"{prefix}_shortcut")(shortcut)
            x = layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = layers.ReLU(name=f"{prefix}_out")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(
        num_classes,
        kernel_regularizer=keras.regularizers.L2(_CIFAR_RESNET_L2),
        name="logits",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def check_unique_paths(model: keras.Model) -> None:
    seen: set[str] = set()
    for v in model.weights:
        if v.path in seen:
            raise InvalidArgumentError(
                f"model {model.name!r} has two variables named {v.path!r}; "
                "every layer needs a unique fixed name"
            )
        seen.add(v.path)


def model_spec(model: keras.Model) -> WeightSpec:
    """``[(name, shape, dtype)]`` of every variable, in wire order."""
    return [(v.path, tuple(int(d) for d in v.shape), str(v.dtype)) for v in model.weights]


def trainable_spec(model: keras.Model) -> WeightSpec:
    """The trainable subset of :func:`model_spec`, in the same relative order.

    This is the spec of a FedSGD gradient update (see
    :meth:`hfl_trainer.training.LocalTrainer.compute_gradient`).
    """
    return [(v.path, tuple(int(d) for d in v.shape), str(v.dtype)) for v in model.trainable_weights]


def get_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """Copies of every variable's value, ordered as :func:`model_spec`."""
    return {v.path: np.array(v.numpy(), copy=True) for v in model.weights}


def set_weights(model: keras.Model, weights: Mapping[str, np.ndarray]) -> None:
    """Assign a full weight mapping to ``model``.

    Everything is checked before anything is assigned: the names must be
    exactly those of :func:`model_spec` (any order), each shape must match and
    each dtype must be floating point (it is cast to the variable's dtype, so
    a float16 array decoded from the wire is accepted). The first mismatch, in
    wire order, raises :class:`InvalidArgumentError` naming the variable.
    """
    variables = model.weights
    expected = {v.path for v in variables}
    for v in variables:
        if v.path not in weights:
            raise InvalidArgumentError(
                f"weights lack variable {v.path!r} of shape {tuple(v.shape)} "
                f"required by model {model.name!r}"
            )
        value = np.asarray(weights[v.path])
        if tuple(value.shape) != tuple(v.shape):
            raise InvalidArgumentError(
                f"variable {v.path!r} has shape {tuple(value.shape)} but model "
                f"{model.name!r} expects {tuple(v.shape)}"
            )
        if value.dtype.kind != "f":
            raise InvalidArgumentError(
                f"variable {v.path!r} has dtype {value.dtype} but a floating-point "
                f"dtype is required (model dtype {v.dtype})"
            )
    for name in weights:
        if name not in expected:
            raise InvalidArgumentError(
                f"weights hold variable {name!r} unknown to model {model.name!r}"
            )
    for v in variables:
        v.assign(np.asarray(weights[v.path], dtype=v.dtype))


def weights_npz_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    """Serialise weights as a reproducible ``.npz``: same weights, same bytes.

    ``np.savez`` stamps each entry with the current time, so its SHA-256 would
    change from one run to the next; this writes the same format (readable by
    ``np.load(path, allow_pickle=False)``, keys are the variable names, in
    order) with a fixed timestamp and no compression.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, value in weights.items():
            array = np.ascontiguousarray(value)
            if array.dtype.hasobject:
                raise InvalidArgumentError(f"variable {name!r} has object dtype; refusing to save")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            entry = io.BytesIO()
            np.lib.format.write_array(entry, array, allow_pickle=False)
            archive.writestr(info, entry.getvalue())
    return buffer.getvalue()


def initial_weights_file(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int, path: Path | str
) -> str:
    """Write the initial weights of a model to ``path`` (.npz); return its SHA-256 hex.

    The federation plan pins this digest and the aggregator (which has no
    TensorFlow) starts from the file. The bytes depend only on the weights.
    """
    model = build_model(name, input_shape, num_classes, seed)
    data = weights_npz_bytes(get_weights(model))
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    digest = hashlib.sha256(data).hexdigest()
    logger.info("wrote initial weights of %s (seed %d) to %s sha256=%s", name, seed, target, digest)
    return digest


def load_weights_file(path: Path | str) -> dict[str, np.ndarray]:
    """Read a weights ``.npz`` (no pickles allowed), keeping the stored order."""
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(f"{path}: not a readable weights .npz: {exc}") from exc
