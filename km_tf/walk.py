"""Walking the layers of (possibly nested) Keras models, and their roles.

`modulate`, `bake` and the task files all see a model the same way: a flat,
ordered list of leaf layers (nested functional / sequential models are
entered), each with a path such as `"mobilenetv2_1.00_224/Conv1"`, and each
with one role for Kernel Modulation.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv
from keras.src.models.functional import Functional

from km_tf.layers import KM_LAYERS

# Keras has no public base classes for these; the private paths are stable
# across Keras 3 releases and pinned in requirements.txt.
CONV_BASES = (BaseConv, BaseConvTranspose, BaseDepthwiseConv,
              BaseSeparableConv)
BATCHNORM_TYPES = (keras.layers.BatchNormalization,)

ROLE_MODULATED = "modulated"
ROLE_BATCHNORM = "batchnorm"
ROLE_HEAD = "head"
ROLE_FROZEN = "frozen"


def is_container(layer: keras.layers.Layer) -> bool:
    """True for functional and sequential models used as layers."""
    return isinstance(layer, (keras.Sequential, Functional))


def walk_layers(model: keras.Model, prefix: str = ""
                ) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yields `(path, layer)` for every leaf layer, entering nested models.

    Args:
        model: A functional or sequential Keras model.
        prefix: Path prefix of `model`'s layers.

    Yields:
        `(path, layer)` in the model's layer order; the path joins the names
        of the enclosing nested models and the layer with "/".
    """
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if is_container(layer):
            yield from walk_layers(layer, prefix=f"{path}/")
        else:
            yield path, layer


def weighted_layers(model: keras.Model
                    ) -> list[tuple[int, str, keras.layers.Layer]]:
    """The leaf layers that hold weights, numbered in walk order.

    The number (a layer's *slot*) identifies a layer by its place in the
    network, whatever its name: `modulate` and `bake` keep every slot, and
    a model rebuilt in code or loaded from a file numbers its layers the
    same way, while auto-generated names (`dense` / `dense_1`) differ.

    Returns:
        `(slot, path, layer)` for every leaf layer with weights.
    """
    return [(slot, path, layer) for slot, (path, layer) in enumerate(
        (path, layer) for path, layer in walk_layers(model) if layer.weights)]


def is_convolution(layer: keras.layers.Layer) -> bool:
    """True for every Keras convolution layer (KM or plain, any rank)."""
    return isinstance(layer, CONV_BASES)


def layer_role(layer: keras.layers.Layer) -> str:
    """The part a layer plays in a modulated model.

    Returns:
        `"modulated"` for KM convolutions, `"batchnorm"` for BatchNorm layers
        that train per task, `"head"` for other trainable layers with
        weights, and `"frozen"` for the rest (base layers and layers without
        weights).
    """
    if isinstance(layer, KM_LAYERS):
        return ROLE_MODULATED
    if not layer.trainable or not layer.weights:
        return ROLE_FROZEN
    if isinstance(layer, BATCHNORM_TYPES):
        return ROLE_BATCHNORM
    if is_convolution(layer):
        return ROLE_FROZEN
    return ROLE_HEAD
