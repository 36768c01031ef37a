"""Kernel Modulation layers.

A kernel-modulated convolution holds the base kernel `W` frozen and a small
trainable `KernelModulator` that rewrites every weight of it:

    W' = W * (1 + g(W / std(W)))

where `g` is a two-layer MLP shared by all *kernel units* of the layer. A unit
is a slice of the kernel along its leading axes: a `kh x kw` spatial kernel
(one per input/output channel pair), or a whole output filter
(`kh x kw x cin`). The default "hybrid" form uses spatial units for kernels
with a spatial extent (3x3, depthwise) and filter units for pointwise (1x1)
kernels, where a spatial unit would be a single weight; BUILD.md gives the
measurements behind that choice. The MLP's output layer starts at zero, so a
freshly modulated layer computes exactly what the base layer computes.

The layers follow Keras' LoRA pattern (`keras/src/layers/convolutional/
base_conv.py`): the frozen weight lives in `_kernel`, and `kernel` is a property
that returns the modulated kernel, so the arguments, building and shape logic
of `Conv2D` / `DepthwiseConv2D` are reused untouched. `call()` is their
convolution, bias and activation, with the convolution's gradients ordered
(see Training memory).

Training memory: the modulator's gradient is hand-written
(`km_tf/_gradients.py: modulate_kernel`) and recomputes the MLP in the
backward pass, so a
modulated layer keeps only its modulated kernel for backpropagation. Full
fine-tuning keeps a gradient and two Adam slots per weight; a KM step keeps
about one extra kernel's worth. In traced steps the convolution computes its
kernel gradient before its input gradient where inputs are large
(`_gradients.convolve_kernel_gradient_first`), so the layer's input
activation is freed
before an activation-sized gradient is allocated (`bench/perf.py` measures
both methods).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from km_tf._gradients import convolve_kernel_gradient_first, modulate_kernel

MODULATOR_FORMS = ("hybrid", "spatial", "filter")
DEFAULT_FORM = "hybrid"
DEFAULT_HIDDEN_UNITS = 16
DEFAULT_FILTER_UNITS = 1
# Per-example input activations from this size on get their convolution's
# gradients ordered (`convolve_kernel_gradient_first`). Below it the memory
# at stake is small, and ordering costs time: tiny ops gain from running the
# two gradients side by side (MobileNetV2 at 32 px, batch 8: KM step 1.41x
# full fine-tuning ordered, 1.19x not, on 2 CPU cores; BUILD.md).
ORDERED_GRADIENTS_MIN_BYTES = 512 * 1024


def modulator_plan(kernel_shape: tuple[int, ...], form: str, *,
                   hidden_units: int, filter_units: int,
                   depthwise: bool) -> tuple[int, int]:
    """Which kernel unit a layer's modulator works on, and its hidden width.

    Args:
        kernel_shape: `(kh, kw, cin, cout)` (or `(kh, kw, cin, multiplier)`
            for a depthwise kernel).
        form: `"spatial"`: one unit per `kh x kw` spatial kernel, everywhere
            (a 1x1 kernel's unit is a single weight); `"filter"`: one unit
            per whole output filter `kh x kw x cin`; `"hybrid"`: spatial
            units where kernels have a spatial extent, filter units for
            pointwise (1x1) kernels. A depthwise filter is one spatial
            kernel, so depthwise layers always use spatial units.
        hidden_units: Hidden width of spatial-unit modulators.
        filter_units: Hidden width of filter-unit modulators.
        depthwise: Whether the kernel is a depthwise kernel.

    Returns:
        `(unit_axes, width)`: how many leading kernel axes make one unit, and
        the modulator's hidden width.
    """
    pointwise = kernel_shape[0] * kernel_shape[1] == 1
    filter_units_here = not depthwise and (
        form == "filter" or (form == "hybrid" and pointwise))
    if filter_units_here:
        return 3, filter_units
    return 2, hidden_units


def check_modulator_options(hidden_units: int, form: str,
                            filter_units: int = DEFAULT_FILTER_UNITS) -> None:
    """Raises a ValueError naming a bad modulator size or form."""
    for name, value in (("hidden_units", hidden_units),
                        ("filter_units", filter_units)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer; got {value!r}.")
    if form not in MODULATOR_FORMS:
        raise ValueError(
            f"Unknown modulator form {form!r}. Use one of {MODULATOR_FORMS}."
        )


@keras.saving.register_keras_serializable(package="km_tf")
class KernelModulator(keras.layers.Layer):
    """A tiny MLP that rewrites every weight of one convolution kernel.

    The kernel is viewed as a matrix of shape `(unit_size, num_units)`, where
    a unit is the block of the first `unit_axes` axes (e.g. one 3x3 spatial
    kernel). Every unit `w` goes through the same MLP:

        g(w) = V tanh(U w / s + c) + d,    w' = w * (1 + g(w))

    with `s` the standard deviation of the whole kernel. `V` and `d` start at
    zero, so the modulator is the identity at initialisation. Weights are
    always float32, also under mixed precision.

    Args:
        hidden_units: Width of the hidden layer: the modulator's size knob.
        unit_axes: How many leading kernel axes form one unit.
        **kwargs: Base layer keyword arguments (`name`, ...).

    Input shape:
        A kernel tensor of rank >= `unit_axes + 1`.

    Output shape:
        Same as the input.

    Example:
    >>> modulator = KernelModulator(hidden_units=8, unit_axes=2)
    >>> kernel = keras.random.normal((3, 3, 4, 5))
    >>> bool(ops.all(modulator(kernel) == kernel))
    True
    """

    def __init__(self, hidden_units: int = DEFAULT_HIDDEN_UNITS,
                 unit_axes: int = 2, **kwargs: Any) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        check_modulator_options(hidden_units, DEFAULT_FORM)
        self.hidden_units = hidden_units
        self.unit_axes = unit_axes

    def build(self, kernel_shape: tuple[int, ...]) -> None:
        if len(kernel_shape) <= self.unit_axes:
            raise ValueError(
                f"A kernel of shape {tuple(kernel_shape)} has no axes left after"
                f" the {self.unit_axes} unit axes."
            )
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        self.unit_size = math.prod(self.kernel_shape[: self.unit_axes])
        self.hidden_kernel = self.add_weight(
            name="hidden_kernel",
            shape=(self.hidden_units, self.unit_size),
            initializer=keras.initializers.GlorotUniform(),
        )
        self.hidden_bias = self.add_weight(
            name="hidden_bias",
            shape=(self.hidden_units, 1),
            initializer=keras.initializers.RandomUniform(-1.0, 1.0),
        )
        self.output_kernel = self.add_weight(
            name="output_kernel",
            shape=(self.unit_size, self.hidden_units),
            initializer="zeros",
        )
        self.output_bias = self.add_weight(
            name="output_bias", shape=(self.unit_size, 1), initializer="zeros"
        )

    def call(self, kernel):
        return modulate_kernel(
            ops.cast(kernel, "float32"),
            *(tf.convert_to_tensor(weight) for weight in (
                self.hidden_kernel, self.hidden_bias, self.output_kernel,
                self.output_bias)))

    def compute_output_shape(self, kernel_shape):
        return kernel_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(hidden_units=self.hidden_units, unit_axes=self.unit_axes)
        return config


class _KernelModulatedMixin:
    """What both KM convolutions share: the modulator, freezing, saving."""

    _layer_kind: str
    plain_class: type  # The Keras layer this one modulates (and bakes into).

    def _init_modulator(self, hidden_units: int, form: str,
                        filter_units: int) -> None:
        check_modulator_options(hidden_units, form, filter_units)
        self.hidden_units = hidden_units
        self.filter_units = filter_units
        self.form = form

    def _build_modulator(self) -> None:
        unit_axes, width = modulator_plan(
            tuple(self._kernel.shape), self.form,
            hidden_units=self.hidden_units, filter_units=self.filter_units,
            depthwise=self._layer_kind == "depthwise")
        self.modulator = KernelModulator(hidden_units=width,
                                         unit_axes=unit_axes, name="modulator")
        self.modulator.build(self._kernel.shape)
        self._freeze_base()

    def _freeze_base(self) -> None:
        """The base kernel and bias never train, whatever `trainable` says."""
        if getattr(self, "_kernel", None) is not None:
            self._kernel.trainable = False
            if self.bias is not None:
                self.bias.trainable = False

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        keras.layers.Layer.trainable.fset(self, value)
        self._freeze_base()

    @property
    def base_kernel(self):
        """The frozen kernel of the base network."""
        return self._kernel

    @property
    def kernel(self):
        """The modulated kernel, in the layer's compute dtype."""
        if not self.built:
            raise AttributeError(
                "You must build the layer before accessing `kernel`."
            )
        return ops.cast(self.modulator(self._kernel), self.compute_dtype)

    def call(self, inputs):
        kernel = self.kernel
        if self._orders_gradients(inputs):
            outputs = convolve_kernel_gradient_first(self._convolve, inputs,
                                                     kernel)
        else:
            outputs = self._convolve(inputs, kernel)
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias,
                                                   self._bias_shape()))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs

    def _orders_gradients(self, inputs) -> bool:
        """Whether the backward pass computes the kernel gradient first: for
        a training modulator and large inputs (`ORDERED_GRADIENTS_MIN_BYTES`
        per example; unknown sizes count as large)."""
        if not (self.trainable and self.modulator.trainable):
            return False
        example_shape = tuple(inputs.shape[1:])
        if None in example_shape:
            return True
        return (math.prod(example_shape) * tf.as_dtype(inputs.dtype).size
                >= ORDERED_GRADIENTS_MIN_BYTES)

    def _bias_shape(self) -> tuple[int, ...]:
        if self.data_format == "channels_last":
            return (1,) * (self.rank + 1) + (-1,)
        return (1, -1) + (1,) * self.rank

    def _convolve(self, inputs, kernel):
        """The plain Keras convolution of `inputs` with `kernel`."""
        raise NotImplementedError

    def modulated_kernel(self):
        """The modulated kernel as `bake()` writes it: float32, computed in
        float64 and rounded once.

        The device-side pack applier (`km_tf/deploy/applier.py`,
        `tflite/packs/km_apply.c`) does the same float64 arithmetic, so the
        kernels it computes on a device equal `bake`'s bit for bit
        (`tflite/packs/FORMAT.md`).
        """
        modulator = self.modulator
        weights = (modulator.hidden_kernel, modulator.hidden_bias,
                   modulator.output_kernel, modulator.output_bias)
        return tf.cast(modulate_kernel(
            *(tf.cast(tf.convert_to_tensor(w), tf.float64)
              for w in (self._kernel, *weights))), tf.float32)

    # Save the frozen kernel (not the modulated one, as BaseConv would for
    # LoRA); the modulator's weights are saved as the sublayer's own state.
    def save_own_variables(self, store) -> None:
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store) -> None:
        keras.layers.Layer.load_own_variables(self, store)

    def _modulator_config(self) -> dict[str, Any]:
        return {"hidden_units": self.hidden_units, "form": self.form,
                "filter_units": self.filter_units}


@keras.saving.register_keras_serializable(package="km_tf")
class KernelModulatedConv2D(_KernelModulatedMixin, keras.layers.Conv2D):
    """2D convolution whose frozen kernel is rewritten by a kernel modulator.

    Behaves exactly like `keras.layers.Conv2D` (strides, padding, dilation,
    groups, bias, activation) but the weights it convolves with are
    `KernelModulator(kernel)`. Only the modulator trains; the base kernel and
    bias are frozen and stay frozen when `trainable` is set.

    Args:
        filters: As in `Conv2D`.
        kernel_size: As in `Conv2D`.
        hidden_units: Hidden width of modulators over spatial kernel units.
        form: `"hybrid"` (default), `"spatial"` or `"filter"`: which kernel
            units the modulator works on (see `modulator_plan`).
        filter_units: Hidden width of modulators over whole-filter units
            (pointwise kernels in the hybrid form).
        **kwargs: Every other `Conv2D` argument.

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last).

    Output shape:
        4D tensor `(batch, new_rows, new_cols, filters)`.

    Example:
    >>> layer = KernelModulatedConv2D(8, 3, strides=2, padding="same")
    >>> layer(keras.ops.zeros((1, 16, 16, 3))).shape
    (1, 8, 8, 8)
    """

    _layer_kind = "conv"
    plain_class = keras.layers.Conv2D

    def __init__(self, filters: int, kernel_size, *,
                 hidden_units: int = DEFAULT_HIDDEN_UNITS,
                 form: str = DEFAULT_FORM,
                 filter_units: int = DEFAULT_FILTER_UNITS,
                 **kwargs: Any) -> None:
        if kwargs.get("lora_rank"):
            raise ValueError(
                "KernelModulatedConv2D does not combine with LoRA: drop "
                "`lora_rank` (the modulator already adapts the kernel)."
            )
        kwargs.pop("lora_rank", None)
        kwargs.pop("lora_alpha", None)
        super().__init__(filters, kernel_size, **kwargs)
        self._init_modulator(hidden_units, form, filter_units)

    def build(self, input_shape) -> None:
        super().build(input_shape)
        self._build_modulator()

    def _convolve(self, inputs, kernel):
        return self.convolution_op(inputs, kernel)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("lora_rank", None)
        config.pop("lora_alpha", None)
        config.update(self._modulator_config())
        return config


@keras.saving.register_keras_serializable(package="km_tf")
class KernelModulatedDepthwiseConv2D(_KernelModulatedMixin,
                                     keras.layers.DepthwiseConv2D):
    """Depthwise convolution whose frozen kernel is rewritten by a modulator.

    Behaves exactly like `keras.layers.DepthwiseConv2D` (depth_multiplier,
    strides, padding, dilation, bias, activation); see
    `KernelModulatedConv2D` for the modulation.

    Args:
        kernel_size: As in `DepthwiseConv2D`.
        hidden_units: Hidden width of the modulator MLP.
        form: Accepted for symmetry with `KernelModulatedConv2D`; every form
            is the same for a depthwise kernel, whose filters are single
            spatial kernels.
        filter_units: Unused by depthwise kernels (see `form`).
        **kwargs: Every other `DepthwiseConv2D` argument.

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last).

    Output shape:
        4D tensor `(batch, new_rows, new_cols, channels * depth_multiplier)`.

    Example:
    >>> layer = KernelModulatedDepthwiseConv2D(3, depth_multiplier=2)
    >>> layer(keras.ops.zeros((1, 8, 8, 4))).shape
    (1, 6, 6, 8)
    """

    _layer_kind = "depthwise"
    plain_class = keras.layers.DepthwiseConv2D

    def __init__(self, kernel_size, *,
                 hidden_units: int = DEFAULT_HIDDEN_UNITS,
                 form: str = DEFAULT_FORM,
                 filter_units: int = DEFAULT_FILTER_UNITS,
                 **kwargs: Any) -> None:
        super().__init__(kernel_size, **kwargs)
        self._init_modulator(hidden_units, form, filter_units)

    # DepthwiseConv2D.build assigns `self.kernel`; keep that weight as the
    # frozen `_kernel` so that `kernel` can serve the modulated one.
    @_KernelModulatedMixin.kernel.setter
    def kernel(self, value) -> None:
        self._kernel = value

    def build(self, input_shape) -> None:
        super().build(input_shape)
        self._build_modulator()

    def _convolve(self, inputs, kernel):
        return ops.depthwise_conv(
            inputs, kernel, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(self._modulator_config())
        return config


KM_LAYERS = (KernelModulatedConv2D, KernelModulatedDepthwiseConv2D)
