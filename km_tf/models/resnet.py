"""ResNet backbones: basic-block ResNet18/34 written here, ResNet50 from Keras.

ResNet18/34 follow He et al. (2016), table 1: a 7x7/2 stem conv and 3x3/2 max
pool, then four stages of basic blocks (two 3x3 convs; a 1x1 projection
shortcut where the shape changes), channels_last, `Conv2D(use_bias=False)` +
`BatchNormalization` + `ReLU`. Keras ships no ImageNet weights for them, and
they expect inputs in `[-1, 1]` (mode `"tf"`, like the MobileNets; the
`input_normalization` layer of `km_tf.models.build_base` makes them).
`alpha` scales every conv's width (1.0 = the paper). `resnet50` is
`keras.applications.ResNet50` (bottleneck blocks, no `alpha`), which expects
caffe-style inputs (mode `"caffe"`: BGR, mean subtracted; in km_tf models
the swap is folded into `conv1_conv`, see `km_tf.models.fold_channel_swap`).

Each is called as `trunk(inputs, *, [alpha], weights=None)` on a 4-D
KerasTensor and returns the trunk without pooling or head.

Example:
>>> trunk = resnet18(keras.Input((64, 64, 3)), alpha=0.5)
"""

import functools

import keras
from keras import layers

from km_tf.models.weights import application_trunk

# Filters of the four stages at alpha=1 (He et al., table 1).
STAGE_FILTERS = (64, 128, 256, 512)
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET34_BLOCKS = (3, 4, 6, 3)
_BN_EPSILON = 1.001e-5  # as keras.applications.ResNet50


def basic_resnet(
    inputs,
    blocks_per_stage: tuple[int, ...],
    *,
    alpha: float = 1.0,
    weights: str | None = None,
    name: str = "resnet",
) -> keras.Model:
    """Builds a basic-block ResNet trunk.

    Args:
        inputs: 4-D KerasTensor `(batch, height, width, 3)` the stem conv
            reads (a `keras.Input`, or a layer's output on one).
        blocks_per_stage: Number of basic blocks in each of the four stages.
        alpha: Width multiplier on every conv.
        weights: Must be `None`.
        name: Model name.

    Returns:
        A functional `keras.Model` from the `keras.Input` behind `inputs`,
        ending after the last stage (no pooling).

    Example:
    >>> basic_resnet(keras.Input((32, 32, 3)), (1, 1, 1, 1), alpha=0.25)
    """
    if weights is not None:
        raise ValueError(
            f"Keras ships no ImageNet weights for {name}. Pass `weights=None`"
            " here and load a local `.keras` / `.weights.h5` file with "
            "`km_tf.models.build_model(..., weights=path)`."
        )
    if alpha <= 0:
        raise ValueError(f"`alpha` must be positive; got {alpha}.")
    x = _conv_bn(inputs, _width(64, alpha), 7, 2, "conv1")
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(
        x
    )
    for stage, (filters, blocks) in enumerate(
        zip(STAGE_FILTERS, blocks_per_stage), start=2
    ):
        for block in range(1, blocks + 1):
            stride = 2 if block == 1 and stage > 2 else 1
            x = _basic_block(
                x, _width(filters, alpha), stride, f"conv{stage}_block{block}"
            )
    (source,) = keras.utils.get_source_inputs(inputs)
    return keras.Model(source, x, name=name)


def _basic_block(x, filters: int, stride: int, name: str):
    """Two 3x3 conv-BN pairs plus an identity or 1x1 projection shortcut."""
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_0")
    else:
        shortcut = x
    y = _conv_bn(x, filters, 3, stride, f"{name}_1")
    y = layers.ReLU(name=f"{name}_1_relu")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def _conv_bn(x, filters: int, kernel_size: int, stride: int, name: str):
    """`Conv2D(use_bias=False)` followed by `BatchNormalization`."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=False,
        name=f"{name}_conv",
    )(x)
    return layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(
        x
    )


def _width(filters: int, alpha: float) -> int:
    """Scales a filter count by `alpha`, keeping at least 8 filters."""
    return max(8, int(round(filters * alpha)))


resnet18 = functools.partial(
    basic_resnet, blocks_per_stage=RESNET18_BLOCKS, name="resnet18"
)
resnet34 = functools.partial(
    basic_resnet, blocks_per_stage=RESNET34_BLOCKS, name="resnet34"
)
resnet50 = functools.partial(application_trunk, keras.applications.ResNet50)
