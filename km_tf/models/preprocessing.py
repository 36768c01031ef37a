"""Input normalisation that each base network expects.

Images reach `normalize` as float RGB in `[0, 255]`. The mode names are the
ones `keras.applications.imagenet_utils.preprocess_input` uses, so the
constants (ImageNet means and standard deviations) live in Keras only:

- `"tf"`: scale to `[-1, 1]` (MobileNets; the ResNet18/34 written here).
- `"torch"`: scale to `[0, 1]`, then subtract the ImageNet mean and divide by
  its standard deviation, per channel.
- `"caffe"`: RGB -> BGR, then subtract the ImageNet mean per channel, no
  scaling (`keras.applications.ResNet50`).
"""

import keras

NORMALIZATIONS = ("tf", "torch", "caffe")


def normalize(images, mode: str):
    """Normalises float RGB images in `[0, 255]` the way a base expects.

    Args:
        images: Float tensor `(..., height, width, 3)` with values in
            `[0, 255]` (eager or inside a `tf.data` map).
        mode: One of `NORMALIZATIONS`; see the module docstring. Get the mode
            of a model with `km_tf.models.normalization_for(name)`.

    Returns:
        The normalised float tensor, same shape.

    Example:
    >>> normalize(tf.fill([2, 2, 3], 255.0), "tf")[0, 0]  # -> [1., 1., 1.]
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown normalization {mode!r}; expected one of "
            f"{NORMALIZATIONS}."
        )
    return keras.applications.imagenet_utils.preprocess_input(
        images, data_format="channels_last", mode=mode
    )
