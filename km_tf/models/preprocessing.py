"""Input normalisation: inside the models, or in a `tf.data` pipeline.

Every model that `km_tf.models` builds takes RGB pixels in `[0, 255]` and
normalises them itself, with a standard `keras.layers.Rescaling` layer named
`INPUT_NORMALIZATION_NAME` right after its input (a saved `.keras` needs no
km_tf code, and an int8 `.tflite` with uint8 input takes raw camera bytes).
The mode names are the ones of
`keras.applications.imagenet_utils.preprocess_input`:

- `"tf"`: scale to `[-1, 1]` (MobileNets; the ResNet18/34 written here).
- `"torch"`: scale to `[0, 1]`, then subtract the ImageNet mean and divide by
  its standard deviation, per channel.
- `"caffe"`: RGB -> BGR, then subtract the ImageNet mean per channel, no
  scaling (`keras.applications.ResNet50`). In a model, the layer subtracts
  the mean in RGB order and the RGB -> BGR swap is folded into the
  convolutions that read the input (`fold_channel_swap`): reversing a conv
  kernel's input-channel axis is exact, zero padding included.

`normalize` does the same in a pipeline, for models without in-model
normalisation (`km_tf.data.load(normalization=...)`). `add_preprocessing`
gives such a model (e.g. `keras.applications.ResNet50(weights="imagenet")`)
the layer; `input_normalization` tells which mode a model has inside.
"""

import keras
import numpy as np
from keras import layers

NORMALIZATIONS = ("tf", "torch", "caffe")
# Modes whose networks read BGR; in a model, their swap lives in the convs.
BGR_MODES = ("caffe",)
INPUT_NORMALIZATION_NAME = "input_normalization"
INPUT_NAME = "pixels"
# ImageNet statistics in RGB order, as keras.applications.imagenet_utils.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # "torch", of pixels / 255
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN = (123.68, 116.779, 103.939)  # "caffe", of pixels in [0, 255]
# Weightless layers that keep each channel apart, through which the input
# may reach the convs that `fold_channel_swap` edits.
_CHANNELWISE_LAYERS = (
    layers.InputLayer,
    layers.ZeroPadding2D,
    layers.Cropping2D,
)


def normalize(images, mode: str):
    """Normalises float RGB images in `[0, 255]` the way a base expects.

    For pipelines that feed models without in-model normalisation; models
    built by `km_tf.models` take the pixels themselves.

    Args:
        images: Float tensor `(..., height, width, 3)` with values in
            `[0, 255]` (eager or inside a `tf.data` map).
        mode: One of `NORMALIZATIONS`; see the module docstring.

    Returns:
        The normalised float tensor, same shape.

    Example:
    >>> normalize(tf.fill([2, 2, 3], 255.0), "tf")[0, 0]  # -> [1., 1., 1.]
    """
    _check_mode(mode)
    return keras.applications.imagenet_utils.preprocess_input(
        images, data_format="channels_last", mode=mode
    )


def rescaling_parameters(mode: str) -> tuple[float | list, float | list]:
    """Returns the `(scale, offset)` of a mode's `Rescaling` layer on RGB.

    Args:
        mode: One of `NORMALIZATIONS`.

    Returns:
        Plain Python floats or 3-lists (JSON-friendly): the layer computes
        `pixels * scale + offset`. For `"caffe"` the mean is subtracted in
        RGB order; the BGR swap is not part of the layer.

    Example:
    >>> rescaling_parameters("tf")  # (0.00784..., -1.0)
    """
    _check_mode(mode)
    if mode == "tf":
        return 1.0 / 127.5, -1.0
    if mode == "torch":
        return (
            [1.0 / (255.0 * s) for s in IMAGENET_STD],
            [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
        )
    return 1.0, [-m for m in CAFFE_MEAN]


def input_size(model: keras.Model, *, expected: int | None = None,
               what: str = "image_size") -> tuple[int, int]:
    """The `(height, width)` a model takes, checked against a setting.

    Args:
        model: A model with one fixed-size image input.
        expected: A square size someone asked for (e.g. a flag), or None.
        what: How to name that setting in the error (e.g.
            `"--image_size"`).

    Returns:
        The model's input height and width.

    Raises:
        ValueError: The model's input has no fixed size, or `expected`
            differs from it.

    Example:
    >>> input_size(base, expected=32, what="--image_size")  # (32, 32)
    """
    shape = tuple(model.input_shape[1:3])
    if len(model.input_shape) != 4 or None in shape:
        raise ValueError(
            f"Model {model.name!r} takes inputs of shape {model.input_shape}; "
            "km-tf needs images of a fixed size, (batch, height, width, 3).")
    if expected is not None and (expected, expected) != shape:
        raise ValueError(
            f"{what}={expected} contradicts the base, which takes "
            f"{shape[0]}x{shape[1]} images. Drop {what} (the base's size is "
            f"used) or pass {what}={shape[0]}.")
    return shape


def normalization_layer(mode: str) -> layers.Rescaling:
    """Builds the layer that normalises RGB pixels in `[0, 255]` in a model.

    A standard `keras.layers.Rescaling` named `INPUT_NORMALIZATION_NAME`, so
    saved models load without km_tf. For `"caffe"` it only subtracts the
    mean (RGB order): the model's first convs must read RGB, i.e. carry the
    swap folded in (`fold_channel_swap`) if their weights were trained on
    BGR.

    Args:
        mode: One of `NORMALIZATIONS`.

    Returns:
        An unbuilt `Rescaling` layer.

    Example:
    >>> pixels = keras.Input((96, 96, 3))
    >>> x = normalization_layer("tf")(pixels)  # in [-1, 1]
    """
    scale, offset = rescaling_parameters(mode)
    return layers.Rescaling(
        scale, offset=offset, name=INPUT_NORMALIZATION_NAME
    )


def input_normalization(model: keras.Model) -> str | None:
    """Returns the mode of the normalisation a model does on its input.

    Looks at the one layer that reads the model's input (inside a nested
    model when that layer is one) and recognises a `Rescaling` layer by its
    scale and offset, whatever its name.

    Args:
        model: A functional or sequential model with one image input.

    Returns:
        One of `NORMALIZATIONS` when the model takes RGB pixels in
        `[0, 255]`; `None` when it normalises in none of these ways (feed it
        inputs normalised in the pipeline, e.g. `km_tf.data.load(
        normalization=...)`).

    Example:
    >>> input_normalization(km_tf.models.build_model("resnet50", 3))
    'caffe'
    """
    layer = _first_layer(model)
    if isinstance(layer, keras.Model):
        return input_normalization(layer)
    if isinstance(layer, layers.Rescaling):
        return _rescaling_mode(layer)
    return None


def fold_channel_swap(model: keras.Model) -> tuple[str, ...]:
    """Makes the convs that read a model's input read RGB instead of BGR.

    Reverses, in place, the input-channel axis of the kernel of every
    `Conv2D` that the input reaches, directly or through weightless layers
    that keep channels apart (`ZeroPadding2D`, `Cropping2D`, the
    `INPUT_NORMALIZATION_NAME` layer, nested models). This is exact:
    `conv(K, bgr(x)) == conv(K[:, :, ::-1, :], x)`, zero padding included;
    so a network trained on caffe inputs `bgr(x) - mean_bgr` gives the same
    outputs on `x - mean_rgb` afterwards. Applying it twice undoes it.

    Args:
        model: Functional or sequential model; edited in place.

    Returns:
        The names of the convs whose kernels were reversed.

    Raises:
        ValueError: The input reaches a layer where the swap cannot be
            folded (e.g. a `DepthwiseConv2D`, whose output channels would be
            permuted, a `Dense`, a merge, a grouped conv, or the output);
            nothing is changed then.

    Example:
    >>> base = keras.applications.ResNet50(weights="imagenet")
    >>> fold_channel_swap(base)  # ('conv1_conv',): base now reads RGB
    """
    convs = _convs_reading_input(model)
    for conv in convs:
        kernel = conv._kernel if hasattr(conv, "_kernel") else conv.kernel
        kernel.assign(np.flip(keras.ops.convert_to_numpy(kernel), axis=2))
    return tuple(conv.name for conv in convs)


def add_preprocessing(model: keras.Model, mode: str) -> keras.Model:
    """Returns a copy of a model that takes RGB pixels in `[0, 255]`.

    For bases that expect normalised inputs, e.g.
    `keras.applications.MobileNetV2(weights="imagenet")` (`"tf"`) or
    `ResNet50(weights="imagenet")` (`"caffe"`): the copy is one flat
    functional model, `keras.Input(name="pixels")` -> the mode's
    `normalization_layer` -> the model's layers with its weights (nested
    models stay nested). For `"caffe"` the BGR swap is folded into the first
    convs (`fold_channel_swap`). The original model is not changed.

    Args:
        model: Functional or sequential model with one `(h, w, 3)` input,
            channels last, that expects inputs normalised with `mode`.
        mode: One of `NORMALIZATIONS`.

    Returns:
        The new `keras.Model`, with the name of `model`.

    Raises:
        ValueError: `model` already normalises its input, the mode is
            unknown, or (`"caffe"`) the swap cannot be folded.

    Example:
    >>> base = keras.applications.ResNet50(weights="imagenet")
    >>> pixels_base = add_preprocessing(base, "caffe")
    >>> pixels_base(images_uint8.astype("float32"))
    """
    _check_mode(mode)
    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    if not hasattr(model, "_run_through_graph"):
        raise ValueError(
            f"add_preprocessing needs a functional or sequential model; "
            f"{model.name!r} is a subclassed {type(model).__name__}. Build it "
            "as a functional model, or feed it normalised inputs: "
            f"`km_tf.data.load(..., normalization={mode!r})`."
        )
    _check_takes_normalized_inputs(model)
    source = model.inputs[0]
    pixels = keras.Input(
        batch_shape=source.shape, dtype=source.dtype, name=INPUT_NAME
    )
    normalized = normalization_layer(mode)(pixels)

    def call_on_normalized(layer, *args, **kwargs):
        args, kwargs = keras.tree.map_structure(
            lambda x: normalized if x is pixels else x, (args, kwargs)
        )
        return layer(*args, **kwargs)

    copy = keras.models.clone_model(
        model,
        input_tensors=keras.tree.pack_sequence_as(model.input, [pixels]),
        call_function=call_on_normalized,
    )
    copy.set_weights(model.get_weights())
    if mode in BGR_MODES:
        fold_channel_swap(copy)
    return copy


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown normalization {mode!r}; expected one of "
            f"{NORMALIZATIONS}."
        )


def _check_takes_normalized_inputs(model: keras.Model) -> None:
    """Raises if the layer reading the input already rescales it."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise ValueError(
            f"add_preprocessing needs a model with one image input "
            f"(batch, height, width, 3); {model.name!r} has inputs "
            f"{[tuple(t.shape) for t in model.inputs]}."
        )
    mode = input_normalization(model)
    layer = _first_layer(model)
    while isinstance(layer, keras.Model):
        layer = _first_layer(layer)
    if mode is not None or isinstance(
        layer, (layers.Rescaling, layers.Normalization)
    ):
        raise ValueError(
            f"Model {model.name!r} already normalises its input (layer "
            f"{layer.name!r}, mode {mode!r}); it takes pixels as it is. "
            "Pass add_preprocessing a model that expects normalised inputs."
        )


def _first_layer(model: keras.Model):
    """The one layer that reads the model's single input, or `None`."""
    if len(getattr(model, "inputs", None) or ()) != 1:
        return None  # several inputs, or a subclassed model (no graph)
    readers = _readers(model, {id(model.inputs[0])})
    return readers[0][0] if len(readers) == 1 else None


def _readers(model: keras.Model, tensor_ids: set[int]) -> list:
    """`(layer, node)` pairs of `model` whose node reads one of the tensors."""
    found = []
    for layer in model.layers:
        for node in layer._inbound_nodes:
            if any(id(t) in tensor_ids for t in node.input_tensors):
                found.append((layer, node))
    return found


def _rescaling_mode(layer: layers.Rescaling) -> str | None:
    """The mode whose scale and offset a `Rescaling` layer has, or `None`."""
    scale = np.broadcast_to(np.asarray(layer.scale, "float64"), (3,))
    offset = np.broadcast_to(np.asarray(layer.offset, "float64"), (3,))
    for mode in NORMALIZATIONS:
        expected_scale, expected_offset = rescaling_parameters(mode)
        if np.allclose(scale, expected_scale, rtol=1e-4) and np.allclose(
            offset, expected_offset, rtol=1e-4, atol=1e-4
        ):
            return mode
    return None


def _convs_reading_input(model: keras.Model) -> list:
    """The `Conv2D` layers the input reaches through channel-wise layers."""
    carrying = {id(t) for t in model.inputs}  # tensors holding input channels
    convs = []
    for layer in model.layers:
        for node in layer._inbound_nodes:
            if not any(id(t) in carrying for t in node.input_tensors):
                continue
            if _is_channelwise(layer):
                carrying.update(id(t) for t in node.output_tensors)
            elif isinstance(layer, keras.Model):
                convs.extend(_convs_reading_input(layer))
            else:
                _check_foldable(layer, model)
                convs.append(layer)
    if any(id(t) in carrying for t in model.outputs):
        raise ValueError(
            f"The input of {model.name!r} reaches its output without a conv; "
            "a channel swap cannot be folded into it."
        )
    return convs


def _is_channelwise(layer) -> bool:
    if isinstance(layer, _CHANNELWISE_LAYERS):
        return True
    return (
        isinstance(layer, layers.Rescaling)
        and layer.name == INPUT_NORMALIZATION_NAME
    )


def _check_foldable(layer, model: keras.Model) -> None:
    """Raises unless reversing the layer's kernel input axis is exact."""
    if isinstance(layer, layers.DepthwiseConv2D):
        reason = (
            "a DepthwiseConv2D keeps each input channel in its own output "
            "channels, so a swap would permute its outputs"
        )
    elif not isinstance(layer, layers.Conv2D):
        reason = f"it is a {type(layer).__name__}, not a Conv2D"
    elif layer.groups != 1 or layer.data_format != "channels_last":
        reason = "it is a grouped or channels-first Conv2D"
    elif getattr(layer, "lora_enabled", False) or len(layer.weights) > 2:
        reason = "it holds weights besides its kernel and bias"
    elif len(layer._inbound_nodes) != 1:
        reason = "it is also called on other tensors"
    else:
        return
    raise ValueError(
        f"Cannot fold the RGB -> BGR swap of {model.name!r} into layer "
        f"{layer.name!r}: {reason}. Only Conv2D layers (behind ZeroPadding2D "
        "or Cropping2D) may read the input; otherwise normalise in the "
        "pipeline instead: `km_tf.data.load(normalization='caffe')`."
    )
