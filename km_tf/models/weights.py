"""Weight loading and BatchNorm settings shared by every model builder."""

import os
from typing import Callable

import keras

from km_tf.errors import ModelFileError, WeightsUnavailableError
from km_tf.files import existing_file


def application_trunk(
    constructor: Callable[..., keras.Model],
    inputs,
    *,
    weights: str | None = None,
    **options,
) -> keras.Model:
    """Builds a `keras.applications` network without its classifier top.

    The network is built on `inputs` (Keras' `input_tensor=`), so a model
    that starts with an input and a normalisation layer stays one flat
    model. A failed ImageNet download (no network, blocked proxy, corrupt
    cache) is turned into a `WeightsUnavailableError` that says how to go
    on offline. Argument errors from Keras (`ValueError`, e.g. an `alpha`
    that has no ImageNet weights) pass through unchanged.

    Args:
        constructor: A `keras.applications` function, e.g.
            `keras.applications.MobileNetV2`.
        inputs: 4-D KerasTensor `(batch, height, width, 3)` the first layer
            reads (a `keras.Input`, or a layer's output on one).
        weights: `"imagenet"` or `None`.
        **options: Other constructor arguments (`alpha`, ...).

    Returns:
        The trunk `keras.Model` (`include_top=False`, no pooling) from the
        `keras.Input` behind `inputs`.

    Example:
    >>> application_trunk(keras.applications.MobileNetV2,
    ...                   keras.Input((96, 96, 3)), alpha=0.35)
    """
    try:
        return constructor(
            input_tensor=inputs,
            include_top=False,
            weights=weights,
            **options,
        )
    except ValueError:
        raise
    except Exception as error:
        if weights != "imagenet":
            raise
        raise WeightsUnavailableError(
            f"Could not fetch the ImageNet weights of "
            f"{constructor.__name__} ({error}). This machine may be offline. "
            "Pass `weights=` the path of a local `.keras` or `.weights.h5` "
            "file (e.g. a base pretrained here), or `weights=None` to start "
            "from random weights; or copy Keras' cached weights file "
            "(`~/.keras/models/`) from a machine with network access."
        ) from error


def load_base(path: str | os.PathLike) -> keras.Model:
    """Loads a base network saved with `model.save("base.keras")`.

    The one loader of base files for every program (training, evaluation,
    tuning, export); call it inside a `tf.distribute` scope to place the
    variables there.

    Raises:
        FileNotFoundError: No file at `path`.
        ModelFileError: The file is not a loadable Keras model.
    """
    path = existing_file(
        path, "Base model", "Pass the .keras file the tasks were trained on "
        "(written by apps/train.py --mode=pretrain, or by model.save()).")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for bad files.
        raise ModelFileError(
            f"Cannot load base model {path!r} as a Keras model ({error}). "
            "Pass a .keras file written by model.save().") from error


def load_weights(model: keras.Model, path: str) -> None:
    """Loads a local `.keras` (full model) or `.weights.h5` file into a model.

    The file must hold weights of the same architecture (same builder,
    `alpha` and `num_classes`).

    Args:
        model: The freshly built model.
        path: Path ending in `.keras` or `.weights.h5`.

    Example:
    >>> load_weights(model, "runs/base/mobilenet_v2.keras")
    """
    path = os.fspath(path)
    if not path.endswith((".keras", ".weights.h5")):
        raise ValueError(
            f"Unsupported weights file {path!r}: pass a `.keras` model file "
            "or a `.weights.h5` weights file, `'imagenet'` or `None`."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"Weights file {path!r} does not exist.")
    model.load_weights(path)


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Sets the moving-average momentum of every BatchNormalization layer.

    Keras reads `momentum` when a training step is traced and writes it in
    `get_config()`, so setting the attribute on a freshly built model is
    enough and survives saving. Nested models are visited.

    Args:
        model: The model to edit in place (before it is compiled or trained).
        momentum: New momentum in `[0, 1)`.

    Returns:
        How many layers were changed.

    Example:
    >>> set_batchnorm_momentum(keras.applications.MobileNetV2(weights=None),
    ...                        0.9)
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"`bn_momentum` must be in [0, 1); got {momentum}.")
    changed = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            changed += set_batchnorm_momentum(layer, momentum)
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)
            changed += 1
    return changed
