"""The task-pack applier: template `.tflite` + plan + pack -> task `.tflite`.

Runs where only numpy (and, to serve, `ai-edge-litert`) is installed: a
phone-side service, a Raspberry Pi, a Coral Dev Board. It computes each
layer's modulated kernel from the base kernel and the pack's modulator,
folds BatchNorm, quantizes exactly as the TFLite converter does, and writes
the results over a copy of the template's bytes (`tflite/packs/FORMAT.md`
gives the arithmetic; `tflite/packs/km_apply.c` is the same in C99). The
flatbuffer's structure never changes, so XNNPACK, TFLite Micro and the Edge
TPU compiler see ordinary constant weights.

Example (what a device does to switch tasks):
>>> model = apply_pack(template_bytes, plan_bytes, pack_bytes)
>>> interpreter = ai_edge_litert.interpreter.Interpreter(model_content=model)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from km_tf.deploy.formats import (KIND_DEPTHWISE, RESIDUAL_STEPS,
                                  LayerPack, LayerPlan, Pack, Plan, crc32,
                                  read_pack, read_plan)
from km_tf.errors import PackError
from km_tf.files import existing_file, write_atomically

# The converter widens a per-channel range below this to it (an all-zero
# channel gets the scale 5e-7 / 127).
MIN_QUANTIZATION_RANGE = 5e-7
_INT8_MAX = 127
_INT32 = np.iinfo(np.int32)


def apply_pack(template: bytes, plan: bytes | Plan, pack: bytes) -> bytes:
    """The task's `.tflite` bytes: the template with the pack's weights.

    Args:
        template: The template `.tflite` file's bytes.
        plan: Its `.kmplan` bytes (or the parsed `Plan`).
        pack: The task's `.kmpack` bytes.

    Returns:
        The task model, a `.tflite` flatbuffer of the template's size.

    Raises:
        PackError: A wrong, truncated or corrupt file, or files that do not
            belong together (the message says which and how to fix it).
            Everything is checked before anything is computed.
    """
    plan = read_plan(plan) if not isinstance(plan, Plan) else plan
    check_template(template, plan)
    task = read_pack(pack, plan)
    output = bytearray(template)
    writer = _TemplateWriter(output, plan, task)
    for layer, values in zip(plan.layers, task.layers):
        kernel, bias = folded_layer(template, plan.weight_type, layer, values)
        writer.weights(template_layout(layer, kernel), bias,
                       channel_axis=3 if layer.kind == KIND_DEPTHWISE else 0,
                       offsets=(layer.kernel_offset, layer.kernel_scale_offset,
                                layer.bias_offset, layer.bias_scale_offset),
                       input_activation=layer.input_activation)
    head_kernel, head_bias = padded_head(task, plan.classes)
    head = plan.head
    writer.weights(head_kernel, head_bias, channel_axis=0,
                   offsets=(head.weight_offset, head.weight_scale_offset,
                            head.bias_offset, head.bias_scale_offset),
                   input_activation=head.input_activation)
    for (scale_at, zero_at), (scale, zero_point) in zip(plan.activations,
                                                        task.activations):
        writer.put(scale_at, np.asarray([scale], "<f4"))
        writer.put(zero_at, np.asarray([zero_point], "<i8"))
    return bytes(output)


def apply_pack_files(template_path: str | os.PathLike,
                     plan_path: str | os.PathLike,
                     pack_path: str | os.PathLike,
                     output_path: str | os.PathLike) -> Path:
    """`apply_pack` on files; writes the task `.tflite` atomically.

    Nothing is written when a file is refused.

    Returns:
        The output path.
    """
    fix = "Pass the files tflite/export_packs.py wrote."
    paths = [existing_file(path, what, fix) for path, what in (
        (template_path, "Template"), (plan_path, "Plan"),
        (pack_path, "Task pack"))]
    template, plan, pack = (Path(path).read_bytes() for path in paths)
    write_atomically(str(output_path), apply_pack(template, plan, pack))
    return Path(output_path)


def pack_classes(plan: bytes | Plan, pack: bytes) -> int:
    """How many of the applied model's outputs are the task's classes."""
    plan = read_plan(plan) if not isinstance(plan, Plan) else plan
    return read_pack(pack, plan).classes


def check_template(template: bytes, plan: Plan) -> None:
    """Refuses a template that is not the one the plan was written for."""
    if (len(template) != plan.template_bytes
            or crc32(template) != plan.template_crc32
            or hashlib.sha256(template).digest() != plan.fingerprint):
        raise PackError(
            f"The template ({len(template):,} bytes) is not the one this plan "
            f"was written for ({plan.template_bytes:,} bytes, SHA-256 "
            f"{plan.fingerprint.hex()[:16]}...). Use the .tflite that "
            "tflite/export_packs.py wrote next to the .kmplan.")


def base_kernel(template: bytes, weight_type: str,
                layer: LayerPlan) -> np.ndarray:
    """The layer's float32 base kernel in Keras layout.

    From the plan when it holds the base kernels (exact mode); otherwise
    the template's own folded kernel, dequantized (refined by the plan's
    residuals when it has them) and divided by the base's BatchNorm
    multiplier (compact mode).
    """
    if layer.base_kernel is not None:
        return layer.base_kernel
    count = layer.kernel_size
    if weight_type == "int8":
        q = _read(template, layer.kernel_offset, np.int8, count)
        scales = _read(template, layer.kernel_scale_offset, "<f4", layer.cout)
        if layer.kernel_residual is None:
            stored = _per_channel(layer, q.astype(np.float32), scales)
        else:  # (q + r / 254) * scale in float64, as km_apply.c.
            refined = (q.reshape(layer.template_shape).astype(np.float64)
                       + layer.kernel_residual.astype(np.float64)
                       / RESIDUAL_STEPS)
            stored = _per_channel(layer, refined,
                                  scales.astype(np.float64)).astype(
                                      np.float32)
    else:
        dtype = "<f4" if weight_type == "float32" else "<f2"
        stored = _read(template, layer.kernel_offset, dtype, count).astype(
            np.float32).reshape(layer.template_shape)
    unfolded = _per_channel(layer, stored, layer.base_multiplier,
                            divide=True)
    return _keras_layout(layer, unfolded)


def modulated_kernel(kernel: np.ndarray, unit_axes: int,
                     modulator: tuple[np.ndarray, ...]) -> np.ndarray:
    """`W * (1 + g(W / std(W)))` in float64, rounded once to float32.

    The same arithmetic as `KernelModulatedConv2D.modulated_kernel`, which
    `km_tf.bake` writes.
    """
    hidden_kernel, hidden_bias, output_kernel, output_bias = (
        np.asarray(w, np.float64) for w in modulator)
    units = np.asarray(kernel, np.float64).reshape(
        int(np.prod(kernel.shape[:unit_axes])), -1)
    scale = np.std(units) + 1e-12
    hidden = np.tanh(hidden_kernel @ (units / scale) + hidden_bias[:, None])
    gain = output_kernel @ hidden + output_bias[:, None]
    return (units * (1.0 + gain)).astype(np.float32).reshape(kernel.shape)


def folded_layer(template: bytes, weight_type: str, layer: LayerPlan,
                 values: LayerPack) -> tuple[np.ndarray, np.ndarray]:
    """The layer's float32 kernel (Keras layout) and bias, BatchNorm folded
    in as the converter folds it: `kernel * m`, `bias * m + o`."""
    kernel = base_kernel(template, weight_type, layer)
    if values.modulator is not None:
        kernel = modulated_kernel(kernel, values.unit_axes, values.modulator)
    multiplier, offset = values.batchnorm or (layer.base_multiplier,
                                              layer.base_offset)
    folded = (kernel.reshape(-1, layer.cout) * multiplier).reshape(
        kernel.shape)
    return folded, layer.conv_bias * multiplier + offset


def padded_head(task: Pack, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The head in template layout `[classes, features]`, zero rows after
    the task's own classes (their outputs are 0 and ignored)."""
    kernel = np.zeros((classes, task.head_kernel.shape[0]), np.float32)
    kernel[:task.classes] = task.head_kernel.T
    bias = np.zeros(classes, np.float32)
    bias[:task.classes] = task.head_bias
    return kernel, bias


def quantize_per_channel(kernel: np.ndarray, channel_axis: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and float32 scales, one per output channel, as the
    TFLite converter computes them: symmetric, `scale = max |w| / 127`,
    `q = round(w * (1 / scale))` with the product in float32 (dividing, in
    float64 or float32, rounds a few near-ties of MobileNetV2 the other
    way; BUILD.md, "Task packs")."""
    moved = np.moveaxis(kernel, channel_axis, 0)
    peak = np.abs(moved.reshape(len(moved), -1)).max(axis=1).astype(
        np.float64)
    scales = (np.maximum(peak, MIN_QUANTIZATION_RANGE) / _INT8_MAX).astype(
        np.float32)
    shape = [1] * kernel.ndim
    shape[channel_axis] = -1
    inverse = (np.float32(1.0) / scales).reshape(shape)
    q = _round_half_away(kernel.astype(np.float32) * inverse)
    return np.clip(q, -_INT8_MAX, _INT8_MAX).astype(np.int8), scales


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """Float32 values to the nearest integer, ties away from zero (C's
    `round()`; exact in float64, which holds every float32 plus 0.5)."""
    values = np.asarray(values, np.float64)
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


@dataclasses.dataclass(frozen=True)
class EncodedWeights:
    """A layer's kernel and bias as a template of one weight type holds
    them (scales: int8 only)."""

    kernel: np.ndarray
    bias: np.ndarray
    kernel_scales: np.ndarray | None = None
    bias_scales: np.ndarray | None = None


def encode_weights(weight_type: str, kernel: np.ndarray, bias: np.ndarray,
                   channel_axis: int, input_scale: float | None = None
                   ) -> EncodedWeights:
    """Float32 kernel (template layout) and bias -> the stored values.

    float32 as is, float16 rounded to nearest even, int8 quantized per
    channel with an int32 bias of scale `kernel scale * input scale`, as
    the TFLite converter writes them (`tflite/packs/FORMAT.md`).
    """
    if weight_type != "int8":
        dtype = "<f4" if weight_type == "float32" else "<f2"
        return EncodedWeights(kernel.astype(dtype), bias.astype(dtype))
    if input_scale is None:
        raise PackError("An int8 template needs each layer's input scale; "
                        "export the template and its plan again.")
    q, scales = quantize_per_channel(kernel, channel_axis)
    bias_scales = (scales * np.float32(input_scale)).astype(np.float32)
    bias_q = _round_half_away(np.asarray(bias, np.float32)
                              * (np.float32(1.0) / bias_scales))
    return EncodedWeights(
        q, np.clip(bias_q, _INT32.min, _INT32.max).astype("<i4"),
        scales.astype("<f4"), bias_scales.astype("<f4"))


class _TemplateWriter:
    """Writes values over the template copy at the plan's offsets."""

    def __init__(self, output: bytearray, plan: Plan, task: Pack) -> None:
        self.output = output
        self.weight_type = plan.weight_type
        self.task = task

    def put(self, offset: int, values: np.ndarray) -> None:
        data = values.tobytes()
        if offset <= 0 or offset + len(data) > len(self.output):
            raise PackError(
                f"The plan points outside the template (offset {offset:,}, "
                f"{len(data):,} bytes, template {len(self.output):,} bytes); "
                "export the template and its plan again.")
        self.output[offset:offset + len(data)] = data

    def weights(self, kernel: np.ndarray, bias: np.ndarray, *,
                channel_axis: int, offsets: tuple[int, int, int, int],
                input_activation: int) -> None:
        kernel_at, kernel_scale_at, bias_at, bias_scale_at = offsets
        input_scale = (self.task.activations[input_activation][0]
                       if self.weight_type == "int8" else None)
        encoded = encode_weights(self.weight_type, kernel, bias,
                                 channel_axis, input_scale)
        self.put(kernel_at, encoded.kernel)
        if encoded.kernel_scales is not None:
            self.put(kernel_scale_at, encoded.kernel_scales)
        if bias_at:  # 0: the template has no bias (no BatchNorm, no bias).
            self.put(bias_at, encoded.bias)
            if encoded.bias_scales is not None:
                self.put(bias_scale_at, encoded.bias_scales)


def _read(data: bytes, offset: int, dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    if offset <= 0 or offset + dtype.itemsize * count > len(data):
        raise PackError(
            f"The plan points outside the template (offset {offset:,}); "
            "export the template and its plan again.")
    return np.frombuffer(data, dtype, count, offset)


def _per_channel(layer: LayerPlan, kernel: np.ndarray, factors: np.ndarray,
                 divide: bool = False) -> np.ndarray:
    """Template-layout kernel times (or divided by) per-channel factors."""
    axis = 3 if layer.kind == KIND_DEPTHWISE else 0
    shape = [1] * 4
    shape[axis] = -1
    factors = np.asarray(factors).reshape(shape)
    kernel = kernel.reshape(layer.template_shape)
    return kernel / factors if divide else kernel * factors


def template_layout(layer: LayerPlan, kernel: np.ndarray) -> np.ndarray:
    """Keras layout -> TFLite layout (`[cout, kh, kw, cin]`, depthwise
    `[1, kh, kw, cin * multiplier]`)."""
    if layer.kind == KIND_DEPTHWISE:
        return kernel.reshape(layer.template_shape)
    return np.ascontiguousarray(np.transpose(kernel, (3, 0, 1, 2)))


def _keras_layout(layer: LayerPlan, kernel: np.ndarray) -> np.ndarray:
    if layer.kind == KIND_DEPTHWISE:
        return kernel.reshape(layer.kernel_shape)
    return np.ascontiguousarray(np.transpose(kernel, (1, 2, 3, 0)))
