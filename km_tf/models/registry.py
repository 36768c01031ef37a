"""The table of base networks: name -> trunk builder, input normalisation.

Every model built here is flat and takes RGB pixels in `[0, 255]`:
`keras.Input(name="pixels")` -> the `input_normalization` layer of its mode
(`km_tf.models.normalization_layer`) -> trunk -> (head).
"""

import dataclasses
import os
from typing import Callable

import keras

from km_tf.models import conv4
from km_tf.models import mobilenet
from km_tf.models import resnet
from km_tf.models.heads import add_head
from km_tf.models.preprocessing import BGR_MODES
from km_tf.models.preprocessing import INPUT_NAME
from km_tf.models.preprocessing import fold_channel_swap
from km_tf.models.preprocessing import normalization_layer
from km_tf.models.weights import load_weights
from km_tf.models.weights import set_batchnorm_momentum

# Momentum that BatchNorm layers get by default. Keras' MobileNets use 0.999,
# which needs thousands of steps before the moving statistics leave their
# initial values; a base pretrained here for a few hundred steps then scores
# chance in inference mode. 0.9 converges within ~50 steps and is harmless
# for fine-tuning ImageNet weights. Pass `bn_momentum=None` to keep Keras'.
DEFAULT_BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one base network.

    Attributes:
        trunk: `(inputs, *, weights, [alpha]) -> keras.Model`, built on a
            KerasTensor of inputs normalised with `normalization`.
        normalization: Mode of the trunk's inputs, i.e. of the
            normalisation layer that `build_base` puts in front of it (see
            `km_tf.models.preprocessing`).
        width_multiplier: Whether the trunk takes `alpha`.
    """

    trunk: Callable[..., keras.Model]
    normalization: str
    width_multiplier: bool = True


MODELS: dict[str, ModelSpec] = {
    "mobilenet_v1": ModelSpec(mobilenet.mobilenet_v1, "tf"),
    "mobilenet_v2": ModelSpec(mobilenet.mobilenet_v2, "tf"),
    "mobilenet_v3_small": ModelSpec(mobilenet.mobilenet_v3_small, "tf"),
    "mobilenet_v3_large": ModelSpec(mobilenet.mobilenet_v3_large, "tf"),
    "resnet18": ModelSpec(resnet.resnet18, "tf"),
    "resnet34": ModelSpec(resnet.resnet34, "tf"),
    "resnet50": ModelSpec(resnet.resnet50, "caffe", width_multiplier=False),
    # The few-shot learning backbone (MAML's): small, any size from 8 px.
    "conv4": ModelSpec(conv4.conv4, "tf"),
}
MODEL_NAMES = tuple(MODELS)


def get_spec(name: str) -> ModelSpec:
    """Returns the `ModelSpec` of a base network, or a clear error.

    Args:
        name: One of `MODEL_NAMES`.

    Returns:
        The `ModelSpec`.

    Example:
    >>> get_spec("resnet50").normalization  # 'caffe'
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}."
        ) from None


def normalization_for(name: str) -> str:
    """Returns the normalisation mode inside the models of a base network.

    Models from `build_base` / `build_model` take pixels in `[0, 255]` and
    normalise them with this mode's layer (`input_normalization(model)`
    returns it); feed them `km_tf.data.load(...)` without `normalization`.
    The mode is what the bare trunk expects.

    Args:
        name: One of `MODEL_NAMES`.

    Returns:
        `"tf"` ([-1, 1]) or `"caffe"`.

    Example:
    >>> normalization_for("mobilenet_v2")  # 'tf'
    """
    return get_spec(name).normalization


def build_base(
    name: str,
    *,
    image_size: int | tuple[int, int] = 224,
    alpha: float = 1.0,
    weights: str | os.PathLike | None = None,
    bn_momentum: float | None = DEFAULT_BN_MOMENTUM,
) -> keras.Model:
    """Builds the convolutional trunk of a base network (no pooling, no head).

    The trunk takes RGB pixels in `[0, 255]`: its input `"pixels"` feeds the
    `input_normalization` layer of `normalization_for(name)` (a
    `keras.layers.Rescaling`), which feeds the first conv. For `"caffe"`
    (ResNet50) the layer subtracts the ImageNet mean in RGB order; with
    `weights="imagenet"`, whose first conv was trained on BGR, the RGB ->
    BGR swap is then folded into that conv (`fold_channel_swap`), which is
    exact. Random weights need no fold (they learn on RGB).

    Args:
        name: One of `MODEL_NAMES`.
        image_size: Input height and width (int for square), at least 32
            (8 for conv4).
        alpha: Width multiplier (MobileNets, ResNet18/34, Conv-4); must be
            1.0 for ResNet50.
        weights: `"imagenet"` (Keras download; raises
            `WeightsUnavailableError` when offline), `None` (random), or a
            local `.keras` / `.weights.h5` file of this trunk (as built
            here, with the normalisation layer).
        bn_momentum: Momentum for every BatchNorm layer (see
            `DEFAULT_BN_MOMENTUM`); `None` keeps the Keras value.

    Returns:
        The trunk as a flat functional `keras.Model` with a 4-D output.

    Example:
    >>> trunk = build_base("mobilenet_v2", image_size=96, alpha=0.35)
    """
    spec = get_spec(name)
    options = {}
    if spec.width_multiplier:
        options["alpha"] = alpha
    elif alpha != 1.0:
        raise ValueError(f"{name} has no width multiplier; got alpha={alpha}.")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    pixels = keras.Input((*size, 3), name=INPUT_NAME)
    normalized = normalization_layer(spec.normalization)(pixels)
    trunk = spec.trunk(
        normalized,
        weights="imagenet" if weights == "imagenet" else None,
        **options,
    )
    if weights == "imagenet" and spec.normalization in BGR_MODES:
        fold_channel_swap(trunk)
    if bn_momentum is not None:
        set_batchnorm_momentum(trunk, bn_momentum)
    if weights not in ("imagenet", None):
        load_weights(trunk, weights)
    return trunk


def build_model(
    name: str,
    num_classes: int,
    *,
    image_size: int | tuple[int, int] = 224,
    alpha: float = 1.0,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.2,
    bn_momentum: float | None = DEFAULT_BN_MOMENTUM,
    classifier_activation: str | None = None,
) -> keras.Model:
    """Builds a base classifier: trunk + average pool + dropout + Dense head.

    The head is the Dense layer named `"head"`; it outputs logits unless
    `classifier_activation` is set. The model takes RGB pixels in
    `[0, 255]` and normalises them itself (see `build_base`); feed it
    `km_tf.data.load(...)` without `normalization`.

    Args:
        name: One of `MODEL_NAMES`.
        num_classes: Output classes.
        image_size: Input height and width (int for square), at least 32
            (8 for conv4).
        alpha: Width multiplier (not for ResNet50).
        weights: `"imagenet"` (trunk only; the head starts fresh), `None`, or
            a local `.keras` / `.weights.h5` file of this whole classifier
            (same `name`, `alpha` and `num_classes`).
        dropout: Dropout rate before the head; 0 leaves the layer out.
        bn_momentum: Momentum for every BatchNorm layer; `None` keeps Keras'.
        classifier_activation: Head activation; `None` gives logits.

    Returns:
        A flat functional `keras.Model` named `name`.

    Example:
    >>> model = build_model("mobilenet_v2", 5, image_size=32, alpha=0.35)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True))
    """
    trunk = build_base(
        name,
        image_size=image_size,
        alpha=alpha,
        weights="imagenet" if weights == "imagenet" else None,
        bn_momentum=bn_momentum,
    )
    model = add_head(
        trunk,
        num_classes,
        dropout=dropout,
        classifier_activation=classifier_activation,
        name=name,
    )
    if weights not in ("imagenet", None):
        load_weights(model, weights)
    return model
