"""Conv-4: the four-block ConvNet of few-shot learning (Vinyals et al., 2016).

The standard backbone of MAML (Finn et al., 2017), ProtoNets and their
successors on Omniglot and mini-ImageNet: four blocks of a 3x3 convolution
(64 filters at `alpha=1`), BatchNorm, ReLU and 2x2 max pooling. Small enough
to meta-train on a CPU, which is why `km-meta-train` uses it for quick runs.

Two deviations from the papers, both so that one builder serves every input
size: the pools pad (`"same"`), so inputs down to 8x8 pixels keep a 1x1
map after the fourth block (28 px: 14, 7, 4, 2), and `km_tf.models.build_model`
tops the trunk with global average pooling instead of flattening (a 64-wide
feature at any size; MAML's Omniglot net flattens a 1x1 map, which is the
same). The convolutions have no bias (BatchNorm follows each), like the
other trunks here; KM modulates all four.

It is called as `conv4(inputs, *, alpha=1.0, weights=None)` on a 4-D
KerasTensor, like the other trunks, and expects inputs in `[-1, 1]` (mode
`"tf"`; `km_tf.models.build_base` puts the normalisation layer in front).

Example:
>>> trunk = conv4(keras.Input((28, 28, 3)), alpha=0.5)  # 32 filters
"""

import keras
from keras import layers

BLOCKS = 4
FILTERS = 64  # Per convolution at alpha=1 (32 is mini-ImageNet's MAML).
_BN_EPSILON = 1e-3


def conv4(inputs, *, alpha: float = 1.0, weights: str | None = None,
          name: str = "conv4") -> keras.Model:
    """Builds the Conv-4 trunk.

    Args:
        inputs: 4-D KerasTensor `(batch, height, width, 3)` the first
            convolution reads (a `keras.Input`, or a layer's output on one).
        alpha: Width multiplier: `round(64 * alpha)` filters per
            convolution, at least 8.
        weights: Must be `None` (there are no published weights).
        name: Model name.

    Returns:
        A flat functional `keras.Model` from the `keras.Input` behind
        `inputs`, ending after the fourth block (no global pooling).

    Raises:
        ValueError: `weights` given, or a non-positive `alpha`.
    """
    if weights is not None:
        raise ValueError(
            "Conv-4 has no published weights. Pass `weights=None` here and "
            "load a local `.keras` / `.weights.h5` file with "
            "`km_tf.models.build_model(..., weights=path)`.")
    if alpha <= 0:
        raise ValueError(f"`alpha` must be positive; got {alpha}.")
    filters = max(8, int(round(FILTERS * alpha)))
    x = inputs
    for block in range(1, BLOCKS + 1):
        prefix = f"block{block}"
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          name=f"{prefix}_conv")(x)
        x = layers.BatchNormalization(epsilon=_BN_EPSILON,
                                      name=f"{prefix}_bn")(x)
        x = layers.ReLU(name=f"{prefix}_relu")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"{prefix}_pool")(x)
    (source,) = keras.utils.get_source_inputs(inputs)
    return keras.Model(source, x, name=name)
