"""A Keras model as a function of its variable values, differentiable in all.

Meta-learning differentiates through weight updates, so a model has to run
on weights that are tensors (`initial - rate * gradient`), not on its
variables. Keras' `model.stateless_call(trainable, non_trainable, x)` does
that for most layers, but not for a KM convolution's base kernel:
`KernelModulatedConv2D` computes its modulated kernel with a hand-written
gradient (`km_tf._gradients.modulate_kernel`) that treats the base kernel
as frozen, so a meta-gradient would get no gradient for it, and that
gradient is not differentiable a second time in the kernel either.

BatchNorm in training mode has a subtler flaw: TensorFlow's `tf.nn.moments`
(which Keras uses) computes the variance around `stop_gradient(mean)`. That
leaves first derivatives exact (the variance's derivative in the mean is
zero) but drops a term of the second: second-order MAML gradients through
it are off (by about 1% on the tiny network of tests/test_meta.py, against
finite differences).

`run_model` is `stateless_call` with those two differences: it walks the
functional graph as `keras.Model.call` does (`Functional._run_through_graph`,
with Keras' own `training` plumbing), computes each KM convolution with
plain TensorFlow ops (`modulate_kernel_differentiably`) and each BatchNorm
in training mode with plain moments (`_batch_normalization`), so every
weight, base kernels included, has exact first- and second-order
gradients.

Variable values are given as an `{id(variable): tensor}` mapping; variables
not in it keep their current values. Layer updates (BatchNorm moving
statistics, random seed states) are returned, never assigned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import keras
import tensorflow as tf
from keras.src.models.functional import operation_fn

from km_tf.layers import KM_LAYERS
from km_tf.walk import BATCHNORM_TYPES, is_container

ValueOf = Callable[[keras.Variable], tf.Tensor]


def modulate_kernel_differentiably(kernel, hidden_kernel, hidden_bias,
                                   output_kernel, output_bias):
    """`kernel * (1 + g(kernel / std(kernel)))` in plain TensorFlow ops.

    The same function as `KernelModulator` (`km_tf._gradients.
    modulate_kernel`), but differentiable to any order in every argument,
    the base kernel included (its standard deviation too). Computed in
    float64 when the kernel is float64, else in float32.

    Args:
        kernel: The base kernel; leading axes form units of
            `hidden_kernel.shape[1]` weights.
        hidden_kernel: `(hidden, unit_size)`.
        hidden_bias: `(hidden, 1)`.
        output_kernel: `(unit_size, hidden)`.
        output_bias: `(unit_size, 1)`.

    Returns:
        The modulated kernel, shaped like `kernel`, in that dtype.
    """
    dtype = tf.float64 if kernel.dtype == tf.float64 else tf.float32
    kernel, hidden_kernel, hidden_bias, output_kernel, output_bias = (
        tf.cast(t, dtype) for t in (kernel, hidden_kernel, hidden_bias,
                                     output_kernel, output_bias))
    unit_size = hidden_kernel.shape[1]
    scale = tf.math.reduce_std(kernel) + 1e-12
    units = tf.reshape(kernel, (unit_size, -1))
    hidden = tf.tanh(tf.matmul(hidden_kernel, units / scale) + hidden_bias)
    gain = tf.matmul(output_kernel, hidden) + output_bias
    return tf.reshape(units * (1.0 + gain), tf.shape(kernel))


def run_model(model: keras.Model, values: Mapping[int, tf.Tensor],
              inputs, *, training: bool, momentum: float | None = None
              ) -> tuple[Any, dict[int, tf.Tensor]]:
    """Runs `model` on given variable values, without touching its state.

    Args:
        model: A built functional or sequential model (nested ones are
            entered); KM and plain layers alike.
        values: `{id(variable): tensor}` for the variables to replace; any
            variable left out reads its current value. KM layers use their
            tensors as given, so these may be of another float dtype than
            their variables (e.g. float64 modulator weights for a gradient
            check); other layers cast them to the variable's dtype, as
            `stateless_call` does.
        inputs: The model's input (RGB pixels in [0, 255] for km_tf
            models); cast to the input's dtype.
        training: Keras' `training` flag for every layer: `True` makes
            BatchNorm use (and update) batch statistics and dropout drop.
        momentum: In training mode, the momentum of every BatchNorm
            layer's moving statistics in place of the layer's own; `0.0`
            makes the returned statistics the batch's own moments (e.g. a
            support set's). `None`: each layer's `momentum`.

    Returns:
        `(outputs, updates)`: the model's outputs, and `{id(variable):
        value}` for every variable the call assigned (BatchNorm moving
        statistics and seed states in training mode); no variable changes.

    Raises:
        ValueError: `momentum` is given, and a BatchNorm layer in training
            mode uses renorm or synchronized moments (Keras runs those with
            their own momentum).
    """
    by_id = {id(v): v for v in model.variables}
    mapping = [(by_id[key], value) for key, value in values.items()
               if key in by_id]

    def value_of(variable: keras.Variable) -> tf.Tensor:
        given = values.get(id(variable))
        return given if given is not None else tf.convert_to_tensor(variable)

    if model.inputs:
        inputs = tf.cast(inputs, model.inputs[0].dtype)
    with _RecordingScope(state_mapping=mapping) as scope:
        outputs = _call(model, inputs, _Pass(training, momentum), value_of)
    return outputs, {key: scope.get_current_value(variable)
                     for key, variable in scope.assigned.items()}


class _RecordingScope(keras.StatelessScope):
    """A `StatelessScope` that remembers which variables were assigned."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.assigned: dict[int, keras.Variable] = {}

    def add_update(self, update) -> None:
        super().add_update(update)
        variable, _ = update
        self.assigned[id(variable)] = variable


@dataclasses.dataclass(frozen=True)
class _Pass:
    """How every layer of one `run_model` call runs."""

    training: bool
    momentum: float | None = None


def _call(model: keras.Model, inputs, how: _Pass, value_of: ValueOf):
    """`model(inputs, training=how.training)` with differentiable KM
    layers."""
    if isinstance(model, keras.Sequential):
        outputs = inputs
        for layer in model.layers:
            outputs = _operation(layer, how, value_of)(outputs)
        return outputs
    return model._run_through_graph(
        inputs, operation_fn=lambda op: _operation(op, how, value_of))


def _operation(op, how: _Pass, value_of: ValueOf) -> Callable:
    """The callable that stands for one graph node."""
    if isinstance(op, KM_LAYERS):
        return lambda inputs, **kwargs: _modulated_convolution(
            op, inputs, value_of)
    if is_container(op):
        return lambda inputs, **kwargs: _call(op, inputs, how, value_of)
    keras_op = operation_fn(op, training=how.training)
    if how.training and _normalizes_with_batch_moments(op):
        momentum = op.momentum if how.momentum is None else how.momentum

        def batch_normalization(inputs, **kwargs):
            if kwargs.get("mask") is None:
                return _batch_normalization(op, inputs, value_of, momentum)
            if how.momentum is not None:
                raise ValueError(
                    f"BatchNorm layer {op.name!r} gets a mask, which only "
                    "Keras' own layer honours: run_model cannot give it "
                    "another momentum (leave `momentum` as None).")
            return keras_op(inputs, **kwargs)
        return batch_normalization
    if (how.training and how.momentum is not None
            and isinstance(op, BATCHNORM_TYPES) and op.trainable):
        raise ValueError(
            f"BatchNorm layer {op.name!r} uses renorm or synchronized "
            "moments, which Keras runs with the layer's own momentum: "
            "run_model cannot give it another (leave `momentum` as None).")
    return keras_op


def _normalizes_with_batch_moments(op) -> bool:
    """Whether `op` is a BatchNorm layer that `_batch_normalization` runs in
    training mode: a trainable one without renorm or cross-replica
    (synchronized) moments, which stay Keras' own."""
    return (isinstance(op, BATCHNORM_TYPES) and op.trainable
            and not op.renorm and not op.synchronized)


def _batch_normalization(layer, inputs, value_of: ValueOf, momentum: float):
    """What a BatchNorm layer computes in training mode, with moments
    differentiable to any order.

    The variance is `mean((x - mean(x))**2)` with the gradient flowing
    through both means (`tf.nn.moments` stops it at the inner one). The
    moving statistics are assigned as Keras' layer assigns them (to the
    enclosing `StatelessScope`), with `momentum` (the layer's own, unless
    `run_model` was given another).
    """
    dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    inputs = tf.cast(inputs, dtype)
    axes = layer._reduction_axes
    mean = tf.reduce_mean(inputs, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(inputs - mean), axes, keepdims=True)

    def parameter(variable):
        return tf.reshape(tf.cast(value_of(variable), dtype), mean.shape)

    for moving, batch in ((layer.moving_mean, mean),
                          (layer.moving_variance, variance)):
        current = tf.cast(value_of(moving), dtype)
        moving.assign(current * momentum + tf.reshape(
            batch, current.shape) * (1.0 - momentum))
    outputs = tf.nn.batch_normalization(
        inputs, mean, variance,
        offset=parameter(layer.beta) if layer.center else None,
        scale=parameter(layer.gamma) if layer.scale else None,
        variance_epsilon=layer.epsilon)
    return tf.cast(outputs, layer.compute_dtype)


def _modulated_convolution(layer, inputs, value_of: ValueOf):
    """What a KM layer's `call` computes, from the given values.

    The layer's own convolution, bias and activation; only the kernel is
    `modulate_kernel_differentiably`'s. The layer's ordering of the
    convolution's gradients (`_gradients.convolve_kernel_gradient_first`,
    a memory saving on large inputs) is left out: its custom gradient is
    not written to be differentiated twice.
    """
    modulator = layer.modulator
    kernel = modulate_kernel_differentiably(
        value_of(layer.base_kernel),
        *(value_of(w) for w in (modulator.hidden_kernel,
                                modulator.hidden_bias,
                                modulator.output_kernel,
                                modulator.output_bias)))
    dtype = layer.compute_dtype
    outputs = layer._convolve(tf.cast(inputs, dtype), tf.cast(kernel, dtype))
    if layer.use_bias:
        bias = tf.cast(value_of(layer.bias), dtype)
        outputs = outputs + tf.reshape(bias, layer._bias_shape())
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs
