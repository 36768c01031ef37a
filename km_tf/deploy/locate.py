"""Where each tensor's bytes live inside a `.tflite` flatbuffer.

A plan records byte offsets into the template: the data of constant tensors
(kernels, biases) and the quantization scale / zero point vectors of
quantized tensors. This module reads them off the flatbuffer's tables with
TensorFlow's generated schema reader (server side only).
"""

from __future__ import annotations

import dataclasses

from tensorflow.lite.python import schema_py_generated as schema

from km_tf.errors import ExportError

_OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
_TYPE_NAMES = {code: name.lower()
               for name, code in vars(schema.TensorType).items()
               if not name.startswith("_")}
# Field slots (vtable offsets) of the schema's tables.
_BUFFER_DATA = 4
_QUANT_SCALE, _QUANT_ZERO_POINT = 8, 10


@dataclasses.dataclass(frozen=True)
class TensorBytes:
    """One tensor and where its bytes are.

    Attributes:
        index: Tensor index in the main subgraph.
        dtype: Lower-case TFLite type name.
        shape: The tensor's shape.
        buffer: Its buffer index.
        data_offset: Byte offset of its constant data (0: not a constant).
        data_bytes: Length of that data.
        scale_offset: Byte offset of its quantization scales (0: none).
        scale_count: How many scales.
        zero_point_offset: Byte offset of its zero points (int64).
    """

    index: int
    dtype: str
    shape: tuple[int, ...]
    buffer: int
    data_offset: int
    data_bytes: int
    scale_offset: int
    scale_count: int
    zero_point_offset: int

    @property
    def constant(self) -> bool:
        """True for a tensor with data in the file (weights)."""
        return self.data_bytes > 0


@dataclasses.dataclass(frozen=True)
class OpBytes:
    """One operator: its builtin name and tensor indices."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The main subgraph of a `.tflite` file, with byte offsets."""

    ops: tuple[OpBytes, ...]
    tensors: tuple[TensorBytes, ...]
    buffer_users: dict[int, int]

    def constant_source(self, index: int) -> TensorBytes:
        """The constant behind an op input: the tensor itself, or the
        float16 constant a DEQUANTIZE op widens (float16 models)."""
        tensor = self.tensors[index]
        if tensor.constant:
            return tensor
        for op in self.ops:
            if op.name == "DEQUANTIZE" and index in op.outputs:
                source = self.tensors[op.inputs[0]]
                if source.constant:
                    return source
        raise ExportError(
            f"Tensor {index} of the template is computed, not stored: the "
            "converter did not keep this layer's weights as constants.")


def _vector(table, slot: int) -> tuple[int, int]:
    field = table._tab.Offset(slot)
    if not field:
        return 0, 0
    return table._tab.Vector(field), table._tab.VectorLen(field)


def read_layout(model_bytes: bytes) -> Layout:
    """Parses a `.tflite` file's main subgraph with byte offsets.

    Raises:
        ExportError: Not a TFLite file, several subgraphs, or weights stored
            outside the flatbuffer (models over 2 GB).
    """
    if len(model_bytes) < 8 or model_bytes[4:8] != b"TFL3":
        raise ExportError("Not a TFLite flatbuffer (no 'TFL3' identifier).")
    data = bytearray(model_bytes)
    model = schema.Model.GetRootAs(data, 0)
    if model.SubgraphsLength() != 1:
        raise ExportError(
            f"The template has {model.SubgraphsLength()} subgraphs; task "
            "packs need a single-graph model (no control flow).")
    subgraph = model.Subgraphs(0)
    buffers = []
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        if buffer.Offset():
            raise ExportError(
                "The template stores weights outside its flatbuffer (a model "
                "over 2 GB); task packs need inline weights.")
        buffers.append(_vector(buffer, _BUFFER_DATA))
    tensors = []
    users: dict[int, int] = {}
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        start, length = buffers[tensor.Buffer()]
        scale_at = count = zero_at = 0
        quant = tensor.Quantization()
        if quant is not None:
            scale_at, count = _vector(quant, _QUANT_SCALE)
            zero_at, _ = _vector(quant, _QUANT_ZERO_POINT)
        if length:
            users[tensor.Buffer()] = users.get(tensor.Buffer(), 0) + 1
        tensors.append(TensorBytes(
            i, _TYPE_NAMES.get(tensor.Type(), "unknown"),
            tuple(int(d) for d in tensor.ShapeAsNumpy())
            if tensor.ShapeLength() else (), tensor.Buffer(), start, length,
            scale_at, count, zero_at))
    ops = []
    for i in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = _OP_NAMES.get(max(code.BuiltinCode(),
                                 code.DeprecatedBuiltinCode()), "CUSTOM")
        ops.append(OpBytes(
            name, tuple(int(x) for x in op.InputsAsNumpy())
            if op.InputsLength() else (),
            tuple(int(x) for x in op.OutputsAsNumpy())
            if op.OutputsLength() else ()))
    return Layout(tuple(ops), tuple(tensors), users)


def first_difference(first: bytes, second: bytes) -> str | None:
    """Where two `.tflite` files compute differently, or None.

    Compares what a runtime executes: ops and their wiring, every tensor's
    type and shape, every constant's bytes and every quantization scale and
    zero point. Tensor names are left out: the converter derives them from
    Keras layer names, which carry per-process suffixes (`dense_1`).
    """
    layouts = read_layout(first), read_layout(second)
    if [(op.name, op.inputs, op.outputs) for op in layouts[0].ops] != [
            (op.name, op.inputs, op.outputs) for op in layouts[1].ops]:
        return "the ops or their wiring differ"
    if len(layouts[0].tensors) != len(layouts[1].tensors):
        return "the tensor counts differ"

    def region(data: bytes, offset: int, length: int) -> bytes:
        return data[offset:offset + length]

    for a, b in zip(layouts[0].tensors, layouts[1].tensors):
        if (a.dtype, a.shape, a.data_bytes, a.scale_count) != (
                b.dtype, b.shape, b.data_bytes, b.scale_count):
            return f"tensor {a.index} differs in type, shape or size"
        for what, length, at_a, at_b in (
                ("data", a.data_bytes, a.data_offset, b.data_offset),
                ("scales", 4 * a.scale_count, a.scale_offset,
                 b.scale_offset),
                ("zero points", 8 * a.scale_count, a.zero_point_offset,
                 b.zero_point_offset)):
            if region(first, at_a, length) != region(second, at_b, length):
                return f"tensor {a.index}'s {what} differ"
    return None
