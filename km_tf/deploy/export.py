"""Exporting task packs: a template and its plan once, a pack per task.

    base ──export_template──> <name>_<preset>.tflite + .kmplan   (once)
    task file ──export_pack──> <task>_<preset>.kmpack            (per task)

The template is the converter's export of the base with a head of
`classes` outputs (the most any task may have). Its plan records where each
convolution's kernel and bias, the head and (int8) every activation's
quantization parameters live in the file, and the base values the applier
needs. `build_plan` finds each layer by the bytes it must hold, computed by
the applier's own arithmetic from the base: a layer the converter wrote in
any other way than `km_tf/deploy/applier.py` computes is refused, so an
applied pack cannot silently differ from a conversion.

A pack holds the task's modulators, its folded BatchNorm (when BatchNorm
trains per task), its head and (int8) its activation quantization
parameters, taken from the converter's export of the task. `export_pack`
applies every pack it writes and compares the result with that export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from km_tf.convert import bake, modulation_options
from km_tf.deploy import applier, formats
from km_tf.deploy.locate import (Layout, TensorBytes, first_difference,
                                 read_layout)
from km_tf.errors import ExportError, UnsupportedLayerError
from km_tf.export.graph import read_graph
from km_tf.export.pipeline import convert
from km_tf.export.presets import (QUANT_FLOAT16, QUANT_INT8, QUANT_NONE,
                                  Preset, get_preset)
from km_tf.files import write_atomically
from km_tf.layers import KM_LAYERS
from km_tf.models import replace_head
from km_tf.restore import restore_task
from km_tf.walk import BATCHNORM_TYPES, is_convolution, walk_layers

# The template's weight type per preset quantization.
WEIGHT_TYPES = {QUANT_NONE: "float32", QUANT_FLOAT16: "float16",
                QUANT_INT8: "int8"}
# How a pack stores (modulators, folded BatchNorm, head kernel) per
# template weight type: float32 packs reproduce the trained task exactly;
# float16 and int8 templates round weights anyway, and their packs are
# smaller (BUILD.md, "Task packs").
PACK_TYPES = {"float32": ("float32", "float32", "float32"),
              "float16": ("float16", "float16", "float16"),
              "int8": ("int8", "float16", "int8")}
TEMPLATE_HEAD_SEED = 1234
_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


@dataclasses.dataclass(frozen=True)
class TemplateFiles:
    """A template on disk: the `.tflite`, its plan and its description.

    Attributes:
        tflite_path: The template `.tflite`.
        plan_path: Its `.kmplan`.
        info_path: `<stem>.template.json`: preset, classes, sizes.
        preset: The export preset it was converted with.
        plan: The parsed plan.
    """

    tflite_path: Path
    plan_path: Path
    info_path: Path
    preset: Preset
    plan: formats.Plan

    @classmethod
    def load(cls, tflite_path: str | os.PathLike) -> "TemplateFiles":
        """Reads a template written by `export_template`.

        Raises:
            ExportError: Its plan or description is missing.
        """
        tflite_path = Path(tflite_path)
        plan_path = tflite_path.with_suffix(".kmplan")
        info_path = tflite_path.with_suffix(".template.json")
        for path in (tflite_path, plan_path, info_path):
            if not path.is_file():
                raise ExportError(
                    f"{path} is missing: pass a template .tflite written by "
                    "tflite/export_packs.py, with its .kmplan and "
                    ".template.json next to it.")
        info = json.loads(info_path.read_text())
        plan = formats.read_plan(plan_path.read_bytes())
        applier.check_template(tflite_path.read_bytes(), plan)
        return cls(tflite_path, plan_path, info_path,
                   get_preset(info["preset"], info["io_type"]), plan)

    @property
    def template_bytes(self) -> bytes:
        """The template file's bytes."""
        return self.tflite_path.read_bytes()


@dataclasses.dataclass(frozen=True)
class PackResult:
    """What `export_pack` wrote and measured.

    Attributes:
        pack_path: The `.kmpack`.
        reference_tflite: The converter's export of the task the pack
            carries (what applying the pack reproduces).
        report: Sizes and checks (JSON-ready).
    """

    pack_path: Path
    reference_tflite: bytes
    report: dict[str, Any]


def folded_batchnorm(layer: keras.layers.BatchNormalization
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm layer as `(m, o)`: `y = x * m + o`, float32.

    Computed with the op the TFLite converter folds BatchNorm with,
    `gamma * rsqrt(variance + epsilon)` in TensorFlow, so a kernel times `m`
    is bit for bit the converter's folded kernel.
    """
    mean = np.asarray(layer.moving_mean, np.float32)
    variance = np.asarray(layer.moving_variance, np.float32)
    gamma = (np.asarray(layer.gamma, np.float32) if layer.scale
             else np.ones_like(mean))
    beta = (np.asarray(layer.beta, np.float32) if layer.center
            else np.zeros_like(mean))
    multiplier = (tf.math.rsqrt(variance + np.float32(layer.epsilon))
                  * gamma).numpy()
    return multiplier, (beta - mean * multiplier).astype(np.float32)


def set_folded_batchnorm(layer: keras.layers.BatchNormalization,
                         multiplier: np.ndarray, offset: np.ndarray) -> None:
    """Writes `(m, o)` into a BatchNorm layer so that the converter folds
    exactly `m` and `o`: gamma `m`, beta `o`, mean 0 and a variance `v`
    with `v + epsilon == 1` in float32 (`rsqrt(1) == 1`)."""
    if not (layer.scale and layer.center):
        raise UnsupportedLayerError(
            f"BatchNorm layer {layer.name!r} has no gamma or beta (scale or "
            "center is off); a task pack cannot carry its per-task values. "
            "Keep the base's BatchNorm (batchnorm='freeze').")
    epsilon = np.float32(layer.epsilon)
    variance = np.float32(1.0) - epsilon
    while variance + epsilon > np.float32(1.0):
        variance = np.nextafter(variance, np.float32(0.0))
    while variance + epsilon < np.float32(1.0):
        variance = np.nextafter(variance, np.float32(2.0))
    layer.set_weights([np.asarray(multiplier, np.float32),
                       np.asarray(offset, np.float32),
                       np.zeros_like(multiplier, np.float32),
                       np.full_like(multiplier, variance, np.float32)])


def conv_batchnorms(model: keras.Model) -> dict[str, Any]:
    """Each convolution's BatchNorm: the layer that alone consumes it, or
    None (the converter folds a BatchNorm only there)."""
    pairs = {}
    for _, layer in walk_layers(model):
        if not is_convolution(layer):
            continue
        consumers = [node.operation for node in layer._outbound_nodes]
        pairs[layer.name] = (consumers[0] if len(consumers) == 1
                             and isinstance(consumers[0], BATCHNORM_TYPES)
                             else None)
    return pairs


def _head_layer(model: keras.Model) -> keras.layers.Dense:
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise UnsupportedLayerError(
            f"The last layer of {model.name!r} is {type(head).__name__} "
            f"{head.name!r}; task packs need a Dense classifier head as the "
            "model's last layer.")
    if not head.use_bias:
        raise UnsupportedLayerError(
            f"Head {head.name!r} of {model.name!r} has no bias; task packs "
            "need a Dense head with a bias (use_bias=True), which the "
            "template patches per task.")
    return head


def check_classes(task_classes: int, template_classes: int) -> None:
    """Refuses a task with more classes than the template's head holds."""
    if task_classes > template_classes:
        raise ExportError(
            f"The task has {task_classes} classes; the template's head holds "
            f"{template_classes}. Export a template with "
            f"--classes={task_classes} or more, and its packs.")


def padded_head_model(model: keras.Model, classes: int,
                      kernel: np.ndarray | None = None,
                      bias: np.ndarray | None = None) -> keras.Model:
    """A copy of a plain model whose Dense head has `classes` outputs.

    The head's own outputs come first; the extra ones get zero weights (0
    outputs, ignored by the device). `kernel`/`bias` replace the head's
    values when given (the template's seeded head).
    """
    head = _head_layer(model)
    own_kernel, own_bias = (head.get_weights() if kernel is None
                            else (kernel, bias))
    n = own_kernel.shape[1]
    check_classes(n, classes)
    padded = replace_head(
        model, classes,
        classifier_activation=keras.activations.serialize(head.activation))
    full_kernel = np.zeros((own_kernel.shape[0], classes), np.float32)
    full_kernel[:, :n] = own_kernel
    full_bias = np.zeros(classes, np.float32)
    full_bias[:n] = own_bias
    padded.layers[-1].set_weights([full_kernel, full_bias])
    return padded


def template_model(base: keras.Model, classes: int) -> keras.Model:
    """The base with a seeded random head of `classes` outputs.

    Random (not zero) head weights keep every buffer of the template
    distinct, so the converter shares none of them between tensors.
    """
    features = _head_layer(base).input.shape[-1]
    rng = np.random.default_rng(TEMPLATE_HEAD_SEED)
    kernel = rng.normal(0.0, 0.05, (features, classes)).astype(np.float32)
    bias = rng.normal(0.0, 0.05, classes).astype(np.float32)
    return padded_head_model(base, classes, kernel, bias)


def export_template(base: keras.Model, preset: Preset | str,
                    output_dir: str | os.PathLike, name: str, *,
                    classes: int,
                    calibration_data: np.ndarray | None = None,
                    plan_kernels: str = "float32") -> TemplateFiles:
    """Converts the base once and writes the template, its plan and info.

    Args:
        base: The plain base network (a classifier with a Dense head).
        preset: `float32`, `float16`, `int8`, `micro` or `edgetpu`.
        output_dir: Folder for `<name>_<preset>.tflite`, `.kmplan` and
            `.template.json`.
        name: File name stem.
        classes: The template head's width: the most classes a task pack
            for it may have.
        calibration_data: Float model inputs; required by integer presets
            (the template's own calibration is overwritten by each pack).
        plan_kernels: What the plan holds of the base kernels:
            `"float32"` (exact mode: the applier reproduces the converter),
            `"residual"` (int8 templates: one int8 residual per weight that
            refines the template's own weight 254-fold; the plan is as large
            as the template's weights) or `"none"` (the applier starts from
            the template's rounded weights). See `km_tf.deploy.formats`.

    Returns:
        The `TemplateFiles`.

    Raises:
        ExportError: A preset packs cannot serve, or a base the converter
            rewrites beyond what the applier computes.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    weight_type = _weight_type(preset)
    if classes < 1:
        raise ExportError(f"--classes must be >= 1; got {classes}.")
    model = template_model(base, classes)
    template = convert(model, preset, calibration_data)
    plan = build_plan(model, template, weight_type,
                      plan_kernels=plan_kernels)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = output_dir / f"{name}_{preset.name}"
    files = TemplateFiles(stem.with_suffix(".tflite"),
                          stem.with_suffix(".kmplan"),
                          stem.with_suffix(".template.json"), preset, plan)
    plan_bytes = formats.write_plan(plan)
    write_atomically(str(files.tflite_path), template)
    write_atomically(str(files.plan_path), plan_bytes)
    write_atomically(str(files.info_path), json.dumps({
        "preset": preset.name, "io_type": preset.io_type,
        "weight_type": weight_type, "classes": classes,
        "tflite": files.tflite_path.name, "tflite_bytes": len(template),
        "plan": files.plan_path.name, "plan_bytes": len(plan_bytes),
        "plan_kernels": plan.kernels, "layers": len(plan.layers),
        "fingerprint": plan.fingerprint.hex()}, indent=2).encode())
    return files


def _weight_type(preset: Preset) -> str:
    if preset.quantization not in WEIGHT_TYPES:
        raise ExportError(
            f"Preset {preset.name!r} ({preset.summary}) cannot take task "
            f"packs: its weights are quantized while the model runs. Use "
            f"one of float32, float16, int8, micro, edgetpu.")
    return WEIGHT_TYPES[preset.quantization]


def activation_tensors(layout: Layout) -> list[TensorBytes]:
    """The tensors whose quantization parameters are per task: every
    quantized tensor that is not a constant."""
    return [t for t in layout.tensors if t.scale_count and not t.constant]


def build_plan(model: keras.Model, template: bytes, weight_type: str, *,
               plan_kernels: str = "float32") -> formats.Plan:
    """Maps every convolution and the head of `model` into `template`.

    Each layer's kernel and bias are found by the exact bytes the applier
    computes for the base (identity modulator, the base's BatchNorm), so a
    plan exists only when the applier reproduces the converter.

    Raises:
        ExportError: A layer whose bytes the template does not hold (the
            converter merged it with a neighbour), or a buffer shared by
            several tensors.
    """
    if plan_kernels not in formats.PLAN_KERNELS:
        raise ExportError(f"Unknown plan kernels {plan_kernels!r}; choose "
                          f"one of {formats.PLAN_KERNELS}.")
    if plan_kernels == "residual" and weight_type != "int8":
        raise ExportError(
            f"Residual plans refine int8 weights; this template stores "
            f"{weight_type} weights. Use --plan_kernels=float32 or none.")
    layout = read_layout(template)
    activations = activation_tensors(layout)
    activation_index = {t.index: i for i, t in enumerate(activations)}
    batchnorms = conv_batchnorms(model)
    layers, used = [], set()
    slots = {id(layer): slot for slot, (_, layer) in enumerate(
        (p, l) for p, l in walk_layers(model) if l.weights)}
    for path, layer in walk_layers(model):
        if not is_convolution(layer):
            continue
        if type(layer) not in (keras.layers.Conv2D,
                               keras.layers.DepthwiseConv2D):
            raise UnsupportedLayerError(
                f"Layer {path!r} is a {type(layer).__name__}; task packs "
                "patch Conv2D and DepthwiseConv2D kernels only.")
        if any(rate != 1 for rate in layer.dilation_rate):
            raise UnsupportedLayerError(
                f"Layer {path!r} is dilated (dilation_rate="
                f"{layer.dilation_rate}); TFLite lowers it to SPACE_TO_BATCH "
                "+ CONV_2D + BATCH_TO_SPACE + ADD, whose bias a task pack "
                "cannot patch. Task packs need dilation_rate=1; export "
                "per-task .tflite files (tflite/export.py) for this base.")
        layer_plan = _locate_layer(layer, slots[id(layer)],
                                   batchnorms[layer.name], template, layout,
                                   weight_type, activation_index, used)
        if plan_kernels != "float32":
            layer_plan = dataclasses.replace(
                layer_plan, base_kernel=None,
                kernel_residual=(_kernel_residual(template, layer_plan)
                                 if plan_kernels == "residual" else None))
        layers.append(layer_plan)
    head = _locate_head(_head_layer(model), template, layout, weight_type,
                        activation_index, used)
    for index in used:
        buffer = layout.tensors[index].buffer
        if layout.buffer_users.get(buffer, 0) != 1:
            raise ExportError(
                f"The converter stored the weights of tensor {index} once for "
                f"{layout.buffer_users[buffer]} tensors (identical values), "
                "so patching one would change the others. Re-train or "
                "perturb the base so its layers differ.")
    features = _head_layer(model).input.shape[-1]
    return formats.Plan(
        hashlib.sha256(template).digest(), len(template),
        formats.crc32(template), weight_type, tuple(layers), head,
        _head_layer(model).units, int(features),
        tuple((t.scale_offset, t.zero_point_offset) for t in activations))


def _kernel_residual(template: bytes, layer: formats.LayerPlan
                     ) -> np.ndarray:
    """int8 residuals `r` with `(q + r / 254) * scale` closest to the folded
    base kernel, for each weight `q` of an int8 template (template layout).
    """
    folded, _ = applier.folded_layer(template, "int8", layer,
                                     formats.LayerPack(2, 1, None, None))
    exact = applier.template_layout(layer, folded).astype(np.float64)
    q = np.frombuffer(template, np.int8, layer.kernel_size,
                      layer.kernel_offset).reshape(layer.template_shape)
    scales = np.frombuffer(template, "<f4", layer.cout,
                           layer.kernel_scale_offset).astype(np.float64)
    axis = 3 if layer.kind == formats.KIND_DEPTHWISE else 0
    shape = [1] * 4
    shape[axis] = -1
    steps = (exact / scales.reshape(shape) - q) * formats.RESIDUAL_STEPS
    return np.clip(np.round(steps), -127, 127).astype(np.int8)


def _find_constant(layout: Layout, template: bytes, data: bytes,
                   candidates: Sequence[int]) -> int | None:
    for index in candidates:
        tensor = layout.constant_source(index)
        region = template[tensor.data_offset:
                          tensor.data_offset + tensor.data_bytes]
        if region == data:
            return index
    return None


def _locate_layer(layer, slot: int, batchnorm, template: bytes,
                  layout: Layout, weight_type: str,
                  activation_index: dict[int, int],
                  used: set[int]) -> formats.LayerPlan:
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    kernel = np.asarray(layer.kernel, np.float32)
    cout = int(np.prod(kernel.shape[2:])) if depthwise else kernel.shape[3]
    if batchnorm is not None:
        multiplier, offset = folded_batchnorm(batchnorm)
    else:
        multiplier = np.ones(cout, np.float32)
        offset = np.zeros(cout, np.float32)
    conv_bias = (np.asarray(layer.bias, np.float32) if layer.use_bias
                 else np.zeros(cout, np.float32))
    plan = formats.LayerPlan(
        formats.KIND_DEPTHWISE if depthwise else formats.KIND_CONV,
        tuple(int(d) for d in kernel.shape), cout, slot, 0, 0, 0, 0,
        formats.NO_ACTIVATION, multiplier, offset, conv_bias, kernel)
    folded, bias = applier.folded_layer(
        b"", weight_type, plan, formats.LayerPack(2, 1, None, None))
    channel_axis = 3 if depthwise else 0
    ops = [op for op in layout.ops if op.name in _CONV_OPS]
    candidates = [op.inputs[1] for op in ops]
    template_kernel = applier.template_layout(plan, folded)
    kernel_bytes = applier.encode_weights(weight_type, template_kernel, bias,
                                          channel_axis, 1.0).kernel.tobytes()
    found = _find_constant(layout, template, kernel_bytes, candidates)
    if found is None:
        raise ExportError(
            f"Layer {layer.name!r}: the template holds no kernel equal to its "
            "BatchNorm-folded base kernel, so the converter rewrote it "
            "further (e.g. merged the input Rescaling into a VALID-padded "
            "first convolution). Task packs cannot patch this base; use "
            "padding='same' in that layer, or per-task .tflite files.")
    op = ops[candidates.index(found)]
    kernel_tensor = layout.constant_source(found)
    input_tensor = layout.tensors[op.inputs[0]]
    activation = activation_index.get(input_tensor.index,
                                      formats.NO_ACTIVATION)
    input_scale = (float(np.frombuffer(template, "<f4", 1,
                                       input_tensor.scale_offset)[0])
                   if input_tensor.scale_count else None)
    bias_tensor = (layout.constant_source(op.inputs[2])
                   if len(op.inputs) > 2 and op.inputs[2] >= 0 else None)
    bias_bytes = applier.encode_weights(weight_type, template_kernel, bias,
                                        channel_axis,
                                        input_scale).bias.tobytes()
    if bias_tensor is None:
        if np.any(bias):
            raise ExportError(f"Layer {layer.name!r} has a bias the template "
                              "does not hold.")
    elif template[bias_tensor.data_offset:bias_tensor.data_offset
                  + bias_tensor.data_bytes] != bias_bytes:
        raise ExportError(
            f"Layer {layer.name!r}: the template's bias differs from its "
            "BatchNorm-folded base bias; the converter rewrote the layer "
            "beyond BatchNorm folding. Task packs cannot patch this base.")
    used.add(kernel_tensor.index)
    if bias_tensor is not None:
        used.add(bias_tensor.index)
    return dataclasses.replace(
        plan, kernel_offset=kernel_tensor.data_offset,
        kernel_scale_offset=kernel_tensor.scale_offset,
        bias_offset=bias_tensor.data_offset if bias_tensor else 0,
        bias_scale_offset=bias_tensor.scale_offset if bias_tensor else 0,
        input_activation=activation)


def _locate_head(head: keras.layers.Dense, template: bytes, layout: Layout,
                 weight_type: str, activation_index: dict[int, int],
                 used: set[int]) -> formats.HeadPlan:
    kernel, bias = (np.asarray(w, np.float32) for w in head.get_weights())
    ops = [op for op in layout.ops if op.name == "FULLY_CONNECTED"]
    for op in ops:
        weights = layout.constant_source(op.inputs[1])
        input_tensor = layout.tensors[op.inputs[0]]
        input_scale = (float(np.frombuffer(template, "<f4", 1,
                                           input_tensor.scale_offset)[0])
                       if input_tensor.scale_count else None)
        encoded = applier.encode_weights(
            weight_type, np.ascontiguousarray(kernel.T), bias, 0, input_scale)
        kernel_bytes, bias_bytes = (encoded.kernel.tobytes(),
                                    encoded.bias.tobytes())
        bias_tensor = layout.constant_source(op.inputs[2])
        if (template[weights.data_offset:weights.data_offset
                     + weights.data_bytes] == kernel_bytes
                and template[bias_tensor.data_offset:bias_tensor.data_offset
                             + bias_tensor.data_bytes] == bias_bytes):
            used.update((weights.index, bias_tensor.index))
            return formats.HeadPlan(
                weights.data_offset, weights.scale_offset,
                bias_tensor.data_offset, bias_tensor.scale_offset,
                activation_index.get(input_tensor.index,
                                     formats.NO_ACTIVATION))
    raise ExportError(
        f"The template holds no FULLY_CONNECTED layer equal to head "
        f"{head.name!r}; task packs need the converter to keep the Dense "
        "head as one op.")


def export_pack(base: keras.Model, task_path: str | os.PathLike,
                template: TemplateFiles, output_dir: str | os.PathLike,
                name: str, *, calibration_data: np.ndarray | None = None,
                pack_types: tuple[str, str, str] | None = None,
                heldout: np.ndarray | None = None) -> PackResult:
    """Writes `<name>_<preset>.kmpack` for one task file.

    The pack's values are rounded as it stores them (`PACK_TYPES`); the
    task with those values is converted like any export (an int8 template
    takes its activation quantization from that conversion), the pack is
    applied to the template and the result compared with the conversion:
    byte for byte when the plan holds the base kernels, by output agreement
    on `heldout` otherwise.

    Args:
        base: The plain base network the template was exported from.
        task_path: A task file of that base (`km_tf.save_task`).
        template: The template (`export_template` / `TemplateFiles.load`).
        output_dir: Folder for the pack.
        name: File name stem (the task's name).
        calibration_data: Float inputs from the task's training data
            (integer presets).
        pack_types: Storage of (modulators, folded BatchNorm, head kernel):
            `"float32"`, `"float16"` or `"int8"` each; default by the
            template's weight type (`PACK_TYPES`).
        heldout: Float inputs to compare the applied model with the trained
            task on (top-1 agreement in the report); None skips.

    Returns:
        A `PackResult`.

    Raises:
        km_tf.TaskFileError: The task file does not fit the base.
        ExportError / UnsupportedLayerError: A task packs cannot carry (a
            head that is not one Dense layer, more classes than the
            template, BatchNorm that trains where the converter cannot fold
            it), or an applied pack that differs from the conversion.
    """
    plan = template.plan
    pack_types = pack_types or PACK_TYPES[plan.weight_type]
    task = restore_task(base, task_path)
    # The trained task, before the pack's rounding: only the agreement
    # report needs it.
    trained = bake(task) if heldout is not None else None
    pack = _pack_values(task, plan, pack_types)
    deployed = padded_head_model(bake(task), plan.classes)
    reference = convert(deployed, template.preset, calibration_data)
    template_bytes = template.template_bytes
    if read_graph(reference).signature() != read_graph(
            template_bytes).signature():
        raise ExportError(
            f"The converter's export of task {name!r} is not structured like "
            "the template (another base, or identical weights the converter "
            "stored once). Export the template from this task's base.")
    if plan.weight_type == "int8":
        pack = dataclasses.replace(pack, activations=tuple(
            _quantization(reference, tensor)
            for tensor in activation_tensors(read_layout(reference))))
    data = formats.write_pack(pack, modulator_type=pack_types[0],
                              batchnorm_type=pack_types[1],
                              head_type=pack_types[2])
    applied = applier.apply_pack(template_bytes, plan, data)
    difference = first_difference(applied, reference)
    exact = plan.has_base_kernels
    if exact and difference is not None:
        raise ExportError(
            f"Applying the pack of task {name!r} does not reproduce the "
            f"converter's export: {difference}. The converter changed how it "
            "writes weights; please report this with the base and task files.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pack_path = output_dir / f"{name}_{template.preset.name}.kmpack"
    write_atomically(str(pack_path), data)
    report: dict[str, Any] = {
        "name": name, "pack": pack_path.name, "pack_bytes": len(data),
        "task_tflite_bytes": len(reference),
        "pack_to_tflite": len(data) / len(reference),
        "classes": pack.classes, "template_classes": plan.classes,
        "storage": dict(zip(("modulators", "batchnorm", "head"),
                            pack_types)),
        "batchnorm_in_pack": any(layer.batchnorm is not None
                                 for layer in pack.layers),
        "plan_kernels": plan.kernels,
        "applied_equals_conversion": difference is None,
    }
    if heldout is not None:
        report["agreement"] = agreement_report(trained, reference, applied,
                                               heldout, pack.classes)
    return PackResult(pack_path, reference, report)


def _pack_values(task: keras.Model, plan: formats.Plan,
                 pack_types: tuple[str, str, str]) -> formats.Pack:
    """The task's per-task values as the pack stores them; writes the
    rounded values back into `task` (the deployed task)."""
    modulator_type, batchnorm_type, head_type = pack_types
    head = _head_layer(task)
    kernel, bias = (np.asarray(w, np.float32) for w in head.get_weights())
    check_classes(kernel.shape[1], plan.classes)
    if not np.any(bias):
        raise ExportError(
            f"The task's head bias ({head.name!r}) is all zero: an untrained "
            "head? The converter leaves a zero bias out, so the task's "
            ".tflite would not have the template's structure. Train the task "
            "before packing it.")
    options = modulation_options(task)
    convs = [layer for _, layer in walk_layers(task) if is_convolution(layer)]
    if len(convs) != len(plan.layers) or any(
            tuple(conv.base_kernel.shape if isinstance(conv, KM_LAYERS)
                  else conv.kernel.shape) != layer.kernel_shape
            for conv, layer in zip(convs, plan.layers)):
        raise ExportError(
            "The task's convolutions do not match the template's: the task "
            "was trained on another base. Export a template from its base.")
    batchnorms = conv_batchnorms(task)
    per_task_bn = options["batchnorm"] == "train"
    paired = {id(bn) for bn in batchnorms.values() if bn is not None}
    unpaired = [layer.name for _, layer in walk_layers(task)
                if isinstance(layer, BATCHNORM_TYPES)
                and id(layer) not in paired]
    if per_task_bn and unpaired:
        raise UnsupportedLayerError(
            f"BatchNorm layers {unpaired[:3]} do not directly follow a "
            "convolution, so the converter keeps them as separate ops a pack "
            "cannot patch, and this task trains BatchNorm. Train the task "
            "with --batchnorm=freeze to use task packs.")
    layers = []
    for conv, layer_plan in zip(convs, plan.layers):
        modulator = None
        unit_axes, hidden = 2, 1
        if isinstance(conv, KM_LAYERS):
            weights = conv.modulator.get_weights()
            rounded = [formats.round_trip(w, modulator_type)
                       for w in weights]
            conv.modulator.set_weights(rounded)
            modulator = (rounded[0], rounded[1][:, 0], rounded[2],
                         rounded[3][:, 0])
            unit_axes, hidden = conv.modulator.unit_axes, rounded[0].shape[0]
        batchnorm = None
        bn = batchnorms[conv.name]
        if per_task_bn and bn is not None:
            if not layer_plan.bias_offset:
                raise ExportError(
                    f"Layer {conv.name!r} has no bias in the template: the "
                    "base's BatchNorm after it folds to a zero bias (an "
                    "untrained base?), which the converter leaves out, so "
                    "this task's per-task BatchNorm has nowhere to go. "
                    "Pretrain the base, or train tasks with "
                    "--batchnorm=freeze.")
            batchnorm = tuple(formats.round_trip(v, batchnorm_type)
                              for v in folded_batchnorm(bn))
            set_folded_batchnorm(bn, *batchnorm)
        layers.append(formats.LayerPack(unit_axes, hidden, modulator,
                                        batchnorm))
    kernel = formats.round_trip(kernel, head_type)
    head.set_weights([kernel, bias])
    return formats.Pack(plan.fingerprint, int(kernel.shape[1]), kernel, bias,
                        tuple(layers))


def _quantization(model_bytes: bytes, tensor: TensorBytes
                  ) -> tuple[float, int]:
    scale = np.frombuffer(model_bytes, "<f4", 1, tensor.scale_offset)[0]
    zero_point = np.frombuffer(model_bytes, "<i8", 1,
                               tensor.zero_point_offset)[0]
    return float(scale), int(zero_point)


def top1_agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """How often `outputs`' top class is a top class of `reference`.

    Quantized outputs tie often (two classes at the same int8 value); any
    of the tied classes is the reference's answer, and `argmax` would pick
    one of them arbitrarily.
    """
    chosen = np.argmax(outputs, axis=-1)
    picked = np.take_along_axis(reference, chosen[:, None], axis=-1)[:, 0]
    return float(np.mean(picked == reference.max(axis=-1)))


def agreement_report(trained: keras.Model, reference: bytes, applied: bytes,
                     inputs: np.ndarray, classes: int) -> dict[str, Any]:
    """Top-1 agreement of the applied model with the trained task (float
    Keras) and with the converter's export, on the task's own classes."""
    from km_tf.export.litert import LiteRTModel

    inputs = np.asarray(inputs, np.float32)
    trained_top1 = np.argmax(trained.predict(inputs, verbose=0), axis=-1)
    outputs = {label: LiteRTModel(model).predict(inputs)[:, :classes]
               for label, model in (("applied", applied),
                                    ("reference", reference))}
    applied_top1 = np.argmax(outputs["applied"], axis=-1)
    return {
        "samples": int(len(inputs)),
        "applied_vs_trained_top1": float(np.mean(applied_top1
                                                 == trained_top1)),
        "applied_vs_conversion_top1": top1_agreement(outputs["applied"],
                                                     outputs["reference"]),
        "applied_vs_conversion_max_abs": float(np.max(np.abs(
            outputs["applied"] - outputs["reference"]))),
    }
