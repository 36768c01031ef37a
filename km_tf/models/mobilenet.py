"""MobileNet trunks: thin wrappers over `keras.applications`.

Each is called as `trunk(inputs, *, alpha=1.0, weights=None)` on a 4-D
KerasTensor and returns the convolutional trunk (`include_top=False`, no
pooling) that `km_tf.models.build_model` tops with a fresh classifier head.
All expect inputs in `[-1, 1]` (mode `"tf"`), which `km_tf.models.build_base`
makes with its `input_normalization` layer in front; MobileNetV3's built-in
`Rescaling` layer (the same one) is left out so there is only that layer.

ImageNet weights exist for these widths (Keras raises for others):
MobileNet v1 alpha 0.25/0.5/0.75/1.0; v2 0.35/0.5/0.75/1.0/1.3/1.4;
v3 0.75/1.0. The input must be at least 32x32.

Example:
>>> trunk = mobilenet_v2(keras.Input((96, 96, 3)), alpha=0.35)
"""

import functools

import keras

from km_tf.models.weights import application_trunk

mobilenet_v1 = functools.partial(application_trunk, keras.applications.MobileNet)
mobilenet_v2 = functools.partial(
    application_trunk, keras.applications.MobileNetV2
)
mobilenet_v3_small = functools.partial(
    application_trunk,
    keras.applications.MobileNetV3Small,
    include_preprocessing=False,
)
mobilenet_v3_large = functools.partial(
    application_trunk,
    keras.applications.MobileNetV3Large,
    include_preprocessing=False,
)
