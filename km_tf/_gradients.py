"""The custom gradients behind a KM layer's training memory (private).

Two `tf.custom_gradient` functions that `km_tf.layers` uses, kept apart so
that `layers.py` reads as Keras layers:

- `modulate_kernel`: the modulator's forward pass, with a hand-written
  backward pass that recomputes the MLP instead of keeping it alive.
- `convolve_kernel_gradient_first`: a convolution whose backward pass
  computes the kernel gradient before the input gradient, so the input
  activation is freed before an activation-sized gradient is allocated.

BUILD.md ("Training cost") has the measurements behind both.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


@tf.autograph.experimental.do_not_convert
@tf.custom_gradient
def modulate_kernel(kernel, hidden_kernel, hidden_bias, output_kernel,
                    output_bias):
    """`kernel * (1 + g(kernel / std))`, recomputing `g` in the backward pass.

    The forward pass is the plain two-layer MLP of `KernelModulator`. The
    gradient is written out by hand so that nothing of the MLP's forward pass
    (the normalised units, the hidden activations, the gain) has to stay in
    memory until the backward pass: it is recomputed from the frozen kernel,
    which is alive anyway, one layer at a time. Under a tape, a modulated
    layer then holds no more than its modulated kernel, which is what makes a
    KM training step lighter than full fine-tuning with Adam (BUILD.md).

    The base kernel is frozen by design and gets no gradient (`None`).

    Args:
        kernel: The float32 base kernel, any shape whose leading axes form
            units of `hidden_kernel.shape[1]` weights.
        hidden_kernel: `(hidden, unit_size)`.
        hidden_bias: `(hidden, 1)`.
        output_kernel: `(unit_size, hidden)`.
        output_bias: `(unit_size, 1)`.

    Returns:
        The modulated kernel, shaped like `kernel`, and its gradient function.
    """
    unit_size = hidden_kernel.shape[1]
    scale = tf.math.reduce_std(kernel) + 1e-12  # A scalar: kept.

    def units_and_hidden(kernel):
        units = tf.reshape(kernel, (unit_size, -1))
        normalized = units / scale
        return units, normalized, tf.tanh(
            tf.matmul(hidden_kernel, normalized) + hidden_bias)

    units, _, hidden = units_and_hidden(kernel)
    gain = tf.matmul(output_kernel, hidden) + output_bias
    modulated = tf.reshape(units * (1.0 + gain), tf.shape(kernel))

    def grad(upstream):
        # Without this dependency the graph executor would run the
        # recomputation as soon as the forward pass starts, for every layer
        # at once, and keep it all alive: exactly what it is meant to avoid.
        with tf.control_dependencies([upstream]):
            kernel_now = tf.identity(kernel)
        units, normalized, hidden = units_and_hidden(kernel_now)
        gain_grad = tf.reshape(upstream, tf.shape(units)) * units
        pre_tanh_grad = tf.matmul(output_kernel, gain_grad,
                                  transpose_a=True) * (1.0 - tf.square(hidden))
        return (
            None,
            tf.matmul(pre_tanh_grad, normalized, transpose_b=True),
            tf.reduce_sum(pre_tanh_grad, axis=1, keepdims=True),
            tf.matmul(gain_grad, hidden, transpose_b=True),
            tf.reduce_sum(gain_grad, axis=1, keepdims=True),
        )

    return modulated, grad


def convolve_kernel_gradient_first(convolve: Callable, inputs, kernel):
    """`convolve(inputs, kernel)`, whose backward pass frees `inputs` early.

    A convolution's backward pass computes two gradients from the same
    upstream gradient: the kernel's, which reads the layer's input
    activation, and the input's, which allocates a tensor as large as that
    activation. TensorFlow's executor runs whichever it meets first, and
    when the input gradient comes first both activation-sized tensors are
    alive at once. This function makes the input gradient wait for the
    kernel gradient (a control dependency), so the activation can go before
    its gradient is allocated. On MobileNetV2 at 224 px, batch 32, that is
    what keeps the peak of a KM step below full fine-tuning's (BUILD.md).

    Only in graph mode (`tf.function`, Keras `fit`): there the gradients are
    built as ops and the forward convolution that `tf.GradientTape` records
    for them inside the backward pass is never run (nothing reads it).
    Eagerly it would run, so eager calls convolve plainly.

    Args:
        convolve: `(inputs, kernel) -> outputs`, e.g. `ops.conv` with a
            layer's strides and padding; differentiable by TensorFlow.
        inputs: The layer's input.
        kernel: The kernel (here the modulated kernel).

    Returns:
        `convolve(inputs, kernel)`.
    """
    if tf.executing_eagerly():
        return convolve(inputs, kernel)

    @tf.autograph.experimental.do_not_convert
    @tf.custom_gradient
    def ordered(inputs, kernel):
        def grad(upstream):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([inputs, kernel])
                outputs = convolve(inputs, kernel)
            kernel_grad = tape.gradient(outputs, kernel, upstream)
            with tf.control_dependencies([kernel_grad]):
                inputs_grad = tape.gradient(outputs, inputs, upstream)
            return inputs_grad, kernel_grad

        return convolve(inputs, kernel), grad

    return ordered(inputs, kernel)
