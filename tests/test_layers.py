"""KernelModulatedConv2D / KernelModulatedDepthwiseConv2D behave like Keras'."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from km_tf import layers as km_layers
from km_tf.layers import (KernelModulatedConv2D, KernelModulatedDepthwiseConv2D,
                          KernelModulator)
from km_tf._gradients import modulate_kernel

CONV_CASES = {
    "strided_3x3": dict(filters=6, kernel_size=3, strides=2, padding="same"),
    "dilated_valid": dict(filters=5, kernel_size=3, dilation_rate=2,
                          padding="valid"),
    "pointwise": dict(filters=7, kernel_size=1),
    "grouped": dict(filters=8, kernel_size=3, groups=2, padding="same"),
    "with_activation": dict(filters=4, kernel_size=(3, 5), activation="relu",
                            use_bias=True, bias_initializer="ones"),
}
DEPTHWISE_CASES = {
    "multiplier_2_same": dict(kernel_size=3, depth_multiplier=2,
                              padding="same"),
    "strided_valid": dict(kernel_size=3, strides=2, padding="valid"),
    "dilated": dict(kernel_size=3, dilation_rate=2, padding="same"),
}


def _twin_outputs(plain_class, km_class, config, inputs):
    plain = plain_class(**config)
    expected = plain(inputs)
    modulated = km_class(**config, hidden_units=8)
    modulated.build(inputs.shape)
    modulated.base_kernel.assign(plain.kernel)
    if plain.use_bias:
        modulated.bias.assign(plain.bias)
    return keras.ops.convert_to_numpy(expected), keras.ops.convert_to_numpy(
        modulated(inputs))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_identity_at_init_for_conv2d(case):
    inputs = np.random.default_rng(1).normal(size=(2, 11, 11, 4)).astype(
        "float32")
    expected, actual = _twin_outputs(keras.layers.Conv2D, KernelModulatedConv2D,
                                     CONV_CASES[case], inputs)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("case", sorted(DEPTHWISE_CASES))
def test_identity_at_init_for_depthwise(case):
    inputs = np.random.default_rng(2).normal(size=(2, 10, 10, 3)).astype(
        "float32")
    expected, actual = _twin_outputs(
        keras.layers.DepthwiseConv2D, KernelModulatedDepthwiseConv2D,
        DEPTHWISE_CASES[case], inputs)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("form,kernel_size,unit,width", [
    ("spatial", 3, 9, 5), ("spatial", 1, 1, 5),
    ("filter", 3, 9 * 4, 2), ("filter", 1, 4, 2),
    ("hybrid", 3, 9, 5), ("hybrid", 1, 4, 2),
])
def test_modulator_unit_follows_form(form, kernel_size, unit, width):
    layer = KernelModulatedConv2D(6, kernel_size, hidden_units=5,
                                  filter_units=2, form=form)
    layer.build((None, 8, 8, 4))
    assert layer.modulator.unit_size == unit
    assert tuple(layer.modulator.hidden_kernel.shape) == (width, unit)


@pytest.mark.parametrize("form", ["spatial", "filter", "hybrid"])
def test_depthwise_always_uses_spatial_units(form):
    layer = KernelModulatedDepthwiseConv2D(3, hidden_units=5, form=form,
                                           depth_multiplier=2)
    layer.build((None, 8, 8, 4))
    assert tuple(layer.modulator.hidden_kernel.shape) == (5, 9)


def test_modulator_rewrites_every_weight_once_trained():
    modulator = KernelModulator(hidden_units=4, unit_axes=2)
    kernel = keras.random.normal((3, 3, 2, 2), seed=3)
    modulator.build(kernel.shape)
    modulator.output_bias.assign(np.full((9, 1), 0.5, "float32"))
    np.testing.assert_allclose(modulator(kernel), 1.5 * kernel, rtol=1e-6)


def test_base_stays_frozen_when_layer_is_made_trainable():
    layer = KernelModulatedConv2D(4, 3, use_bias=True)
    layer.build((None, 8, 8, 3))
    layer.trainable = False
    layer.trainable = True
    names = sorted(v.name for v in layer.trainable_variables)
    assert names == ["hidden_bias", "hidden_kernel", "output_bias",
                     "output_kernel"]
    assert not layer.base_kernel.trainable and not layer.bias.trainable


def test_depthwise_base_stays_frozen():
    layer = KernelModulatedDepthwiseConv2D(3, use_bias=True)
    layer.build((None, 8, 8, 3))
    layer.trainable = True
    assert {v.name for v in layer.trainable_variables} == {
        "hidden_bias", "hidden_kernel", "output_bias", "output_kernel"}


@pytest.mark.parametrize("layer_class,config", [
    (KernelModulatedConv2D, dict(filters=3, kernel_size=3, strides=2,
                                 padding="same", hidden_units=7,
                                 form="filter", filter_units=3)),
    (KernelModulatedDepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2,
                                          hidden_units=5)),
])
def test_config_round_trips(layer_class, config):
    layer = layer_class(**config)
    clone = layer_class.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.hidden_units == config["hidden_units"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_units=0), "positive integer"),
    (dict(filter_units=-1), "filter_units"),
    (dict(form="channel"), "Unknown modulator form"),
    (dict(lora_rank=4), "LoRA"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KernelModulatedConv2D(4, 3, **kwargs)


def test_mixed_precision_keeps_modulator_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = KernelModulatedConv2D(4, 3)
    outputs = layer(np.ones((1, 6, 6, 3), "float32"))
    assert outputs.dtype == "float16"
    assert layer.kernel.dtype == "float16"
    assert all(v.dtype == "float32" for v in layer.modulator.weights)


def _ancestors(op) -> set:
    """Every op that `op` waits for, through data and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in ([t.op for t in current.inputs]
                       + list(current.control_inputs)):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _reference_modulation(kernel, hidden_kernel, hidden_bias, output_kernel,
                          output_bias):
    """The modulator written with plain ops, differentiated by autodiff."""
    units = tf.reshape(kernel, (hidden_kernel.shape[1], -1))
    hidden = tf.tanh(hidden_kernel @ (units / (tf.math.reduce_std(kernel)
                                               + 1e-12)) + hidden_bias)
    gain = output_kernel @ hidden + output_bias
    return tf.reshape(units * (1.0 + gain), kernel.shape)


def _random_modulator_weights(unit_size: int, hidden: int, seed: int):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(0, 0.5, shape), tf.float32) for shape in (
        (hidden, unit_size), (hidden, 1), (unit_size, hidden),
        (unit_size, 1))]


@pytest.mark.parametrize("kernel_shape, unit_axes", [
    ((3, 3, 4, 5), 2), ((1, 1, 6, 7), 3), ((3, 3, 8, 1), 2)])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_recomputing_gradient_equals_autodiff(kernel_shape, unit_axes,
                                              traced):
    kernel = tf.constant(np.random.default_rng(1).normal(
        0, 0.1, kernel_shape), tf.float32)
    unit_size = int(np.prod(kernel_shape[:unit_axes]))
    weights = _random_modulator_weights(unit_size, 3, seed=2)
    upstream = tf.constant(np.random.default_rng(3).normal(
        size=kernel_shape), tf.float32)

    def value_and_gradients(function):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            modulated = function(kernel, *weights)
            loss = tf.reduce_sum(modulated * upstream)
        return modulated, tape.gradient(loss, weights)

    if traced:
        value_and_gradients = tf.function(value_and_gradients)
    got, got_gradients = value_and_gradients(modulate_kernel)
    want, want_gradients = value_and_gradients(_reference_modulation)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for name, g, w in zip(("hidden_kernel", "hidden_bias", "output_kernel",
                           "output_bias"), got_gradients, want_gradients):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_gradient_recomputation_waits_for_the_upstream_gradient():
    """The backward pass recomputes the MLP only once its input gradient
    exists, so traced steps never hold every layer's hidden activations."""
    kernel = tf.ones((3, 3, 2, 2))
    weights = _random_modulator_weights(9, 4, seed=0)

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            tape.watch(weights)
            # The loss' gradient depends on the forward pass's output.
            loss = tf.reduce_sum(tf.square(modulate_kernel(kernel, *weights)))
        return tape.gradient(loss, weights)

    graph = gradients.get_concrete_function().graph
    tanh_ops = [op for op in graph.get_operations() if op.type == "Tanh"]
    assert len(tanh_ops) == 2  # The forward pass and its recomputation.

    forward, recomputed = sorted(
        tanh_ops, key=lambda op: len(_ancestors(op)))
    assert forward in _ancestors(recomputed)  # Via the upstream gradient.


LAYER_CASES = {
    **{f"conv_{name}": (KernelModulatedConv2D, config)
       for name, config in CONV_CASES.items()},
    **{f"depthwise_{name}": (KernelModulatedDepthwiseConv2D, config)
       for name, config in DEPTHWISE_CASES.items()},
}


def _trained_looking_layer(layer_class, config, input_shape):
    """A KM layer whose modulator is not the identity (as after training)."""
    layer = layer_class(**config, hidden_units=4)
    layer.build(input_shape)
    rng = np.random.default_rng(5)
    for weight in layer.modulator.weights:
        weight.assign(rng.normal(0, 0.3, weight.shape))
    return layer


def _loss_gradients(layer, inputs):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = tf.reduce_sum(tf.square(layer(inputs)))
    return tape.gradient(loss, [inputs, *layer.trainable_variables])


@pytest.fixture
def ordered_at_any_size(monkeypatch):
    """Order the gradients of small test inputs too."""
    monkeypatch.setattr(km_layers, "ORDERED_GRADIENTS_MIN_BYTES", 0)


@pytest.mark.parametrize("case,jit_compile", [
    *((case, False) for case in sorted(LAYER_CASES)),
    ("conv_strided_3x3", True), ("depthwise_multiplier_2_same", True)])
def test_traced_layer_gradients_equal_eager_ones(case, jit_compile,
                                                 ordered_at_any_size):
    """Traced calls order the convolution's gradients (kernel first); the
    gradients themselves are the plain ones computed eagerly. Also under
    XLA, which TPUs use."""
    layer_class, config = LAYER_CASES[case]
    inputs = tf.constant(np.random.default_rng(4).normal(
        size=(2, 11, 11, 4)), tf.float32)
    layer = _trained_looking_layer(layer_class, config, inputs.shape)
    eager = _loss_gradients(layer, inputs)
    traced = tf.function(_loss_gradients, jit_compile=jit_compile)(
        layer, inputs)
    assert len(traced) == 5
    for want, got in zip(eager, traced):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _input_gradient_ops(layer, inputs):
    """The ops that compute the returned input gradient (the graph also
    holds unused ones, which the runtime prunes)."""
    graph = tf.function(_loss_gradients).get_concrete_function(
        layer, inputs).graph
    return [op for op in _ancestors(graph.outputs[0].op) if op.type in (
        "Conv2DBackpropInput", "DepthwiseConv2dNativeBackpropInput")]


LARGE_INPUTS = (1, 64, 64, 32)  # 512 KiB per example: ordered by default.


@pytest.mark.parametrize("layer_class,config", [
    (KernelModulatedConv2D, CONV_CASES["strided_3x3"]),
    (KernelModulatedDepthwiseConv2D, DEPTHWISE_CASES["multiplier_2_same"]),
])
def test_input_gradient_waits_for_kernel_gradient(layer_class, config):
    """The layer's input activation can be freed (after the kernel gradient
    read it) before its gradient is allocated."""
    assert np.prod(LARGE_INPUTS[1:]) * 4 == km_layers.ORDERED_GRADIENTS_MIN_BYTES
    inputs = tf.ones(LARGE_INPUTS)
    layer = _trained_looking_layer(layer_class, config, inputs.shape)
    (input_gradient,) = _input_gradient_ops(layer, inputs)
    kernel_gradients = {op for op in _ancestors(input_gradient) if op.type in (
        "Conv2DBackpropFilter", "DepthwiseConv2dNativeBackpropFilter")}
    assert len(kernel_gradients) == 1


def _waits_for_a_kernel_gradient(layer, inputs) -> bool:
    (input_gradient,) = _input_gradient_ops(layer, inputs)
    return any(op.type == "Conv2DBackpropFilter"
               for op in _ancestors(input_gradient))


def test_frozen_layer_does_not_force_a_kernel_gradient():
    """Nothing trains the kernel of a frozen layer: its input gradient must
    not wait for (and so compute) a kernel gradient nobody reads."""
    inputs = tf.ones(LARGE_INPUTS)
    layer = _trained_looking_layer(KernelModulatedConv2D,
                                   CONV_CASES["strided_3x3"], inputs.shape)
    layer.trainable = False
    assert not _waits_for_a_kernel_gradient(layer, inputs)


def test_small_inputs_leave_both_gradients_free_to_run_side_by_side():
    """Tiny convolutions run faster with both gradients in parallel, and
    their activations are too small for the order to matter."""
    inputs = tf.ones((1, 63, 64, 32))  # Just under the threshold.
    layer = _trained_looking_layer(KernelModulatedConv2D,
                                   CONV_CASES["strided_3x3"], inputs.shape)
    assert not _waits_for_a_kernel_gradient(layer, inputs)
