"""The diagnosis model: a small MLP over the 30 measurements of a biopsy.

The first layer is a BatchNormalization: it learns the scale of each feature
from the data (its moving statistics are averaged across hospitals like the
weights), so no hospital has to publish its feature means. Output: two logits
(malignant, benign).
"""

from __future__ import annotations

import keras


def build(
    input_shape: tuple[int, ...], num_classes: int, hidden: int = 16, dropout: float = 0.0
) -> keras.Model:
    inputs = keras.Input(shape=tuple(input_shape), name="measurements")
    x = keras.layers.BatchNormalization(momentum=0.9, name="scale")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden1")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden2")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="breast_cancer_mlp")
