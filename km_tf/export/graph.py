"""Reading a `.tflite` flatbuffer: ops, tensors, IO details, float ops.

Everything here looks at the model file itself (via the TFLite schema), so
reports and checks see exactly what a device will load.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

_OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
_TYPE_NAMES = {code: name.lower()
               for name, code in vars(schema.TensorType).items()
               if not name.startswith("_")}
FLOAT_TYPES = ("float32", "float16", "float64", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a TFLite graph.

    Attributes:
        index: Tensor index in the subgraph.
        name: Tensor name.
        dtype: Lower-case TFLite type name (`"int8"`, `"float32"`, ...).
        shape: Static shape (a dynamic dimension reads 1 here).
        shape_signature: Shape with -1 for dynamic dimensions.
        scales: Quantization scales (empty when not quantized).
        zero_points: Quantization zero points.
        constant: True when the tensor holds weights (a non-empty buffer).
    """

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    constant: bool

    @property
    def is_float(self) -> bool:
        """True for a floating-point tensor."""
        return self.dtype in FLOAT_TYPES

    @property
    def is_static(self) -> bool:
        """True when no dimension is dynamic."""
        return all(dim >= 0 for dim in self.shape_signature)

    def io_summary(self) -> dict[str, Any]:
        """A JSON-ready summary for reports (scale/zero point if per-tensor)."""
        summary = {"name": self.name, "dtype": self.dtype,
                   "shape": list(self.shape_signature or self.shape)}
        if len(self.scales) == 1:
            summary["scale"] = self.scales[0]
            summary["zero_point"] = self.zero_points[0]
        return summary


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One operator, in execution order."""

    index: int
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Graph:
    """The main subgraph of a `.tflite` model.

    Attributes:
        ops: Operators in execution order.
        tensors: All tensors, by index.
        inputs: Model input tensors.
        outputs: Model output tensors.
        num_subgraphs: Subgraph count (control flow adds subgraphs).
    """

    ops: tuple[OpInfo, ...]
    tensors: tuple[TensorInfo, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    num_subgraphs: int

    @property
    def op_names(self) -> list[str]:
        """Operator names in execution order."""
        return [op.name for op in self.ops]

    @property
    def op_counts(self) -> dict[str, int]:
        """How often each operator occurs."""
        return dict(sorted(collections.Counter(self.op_names).items()))

    def ops_on_path(self) -> list[OpInfo]:
        """Ops that lie on some path from a model input to a model output."""
        forward = {t.index for t in self.inputs}
        reached = []
        for op in self.ops:
            if forward.intersection(op.inputs):
                forward.update(op.outputs)
                reached.append(op)
        backward = {t.index for t in self.outputs}
        on_path = []
        for op in reversed(reached):
            if backward.intersection(op.outputs):
                backward.update(op.inputs)
                on_path.append(op)
        return on_path[::-1]

    def float_ops_on_path(self) -> list[str]:
        """`"OP#index"` for every op on the IO path touching a float tensor.

        An integer-only model (int8 kernels and activations, integer IO)
        returns an empty list.
        """
        return [f"{op.name}#{op.index}" for op in self.ops_on_path()
                if any(self.tensors[i].is_float
                       for i in (*op.inputs, *op.outputs) if i >= 0)]

    def signature(self) -> list[tuple[Any, ...]]:
        """The op graph without weights: ops, wiring, shapes and types.

        Two tasks baked onto the same base give equal signatures.
        """
        def describe(index: int) -> tuple[Any, ...]:
            if index < 0:
                return ("none",)
            tensor = self.tensors[index]
            return (index, tensor.dtype, tensor.shape_signature)

        return [(op.name, tuple(map(describe, op.inputs)),
                 tuple(map(describe, op.outputs))) for op in self.ops]


def _tensor_info(index: int, tensor: Any, buffers: list[Any]) -> TensorInfo:
    quant = tensor.quantization
    scales = tuple(float(s) for s in (quant.scale if quant is not None
                                       and quant.scale is not None else ()))
    zero_points = tuple(int(z) for z in (quant.zeroPoint if quant is not None
                                          and quant.zeroPoint is not None
                                          else ()))
    shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None
                                   else ()))
    signature = (tuple(int(d) for d in tensor.shapeSignature)
                 if tensor.shapeSignature is not None else shape)
    buffer = buffers[tensor.buffer] if tensor.buffer < len(buffers) else None
    constant = buffer is not None and (
        (buffer.data is not None and len(buffer.data) > 0)
        or bool(getattr(buffer, "size", 0)))
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(
        tensor.name)
    return TensorInfo(index, name, _TYPE_NAMES.get(tensor.type, "unknown"),
                      shape, signature, scales, zero_points, constant)


def _op_name(opcode: Any) -> str:
    code = max(opcode.builtinCode, opcode.deprecatedBuiltinCode)
    if code == schema.BuiltinOperator.CUSTOM:
        custom = opcode.customCode
        return "CUSTOM:" + (custom.decode() if isinstance(custom, bytes)
                            else str(custom))
    return _OP_NAMES.get(code, f"BUILTIN_{code}")


def read_graph(model_bytes: bytes) -> Graph:
    """Parses a `.tflite` flatbuffer into a `Graph` (its first subgraph).

    Raises:
        ValueError: The bytes are not a TFLite model.
    """
    if len(model_bytes) < 8 or model_bytes[4:8] != b"TFL3":
        raise ValueError("Not a TFLite flatbuffer (missing 'TFL3' identifier).")
    model = schema.ModelT.InitFromObj(
        schema.Model.GetRootAsModel(bytearray(model_bytes), 0))
    subgraph = model.subgraphs[0]
    buffers = list(model.buffers or [])
    tensors = tuple(_tensor_info(i, t, buffers)
                    for i, t in enumerate(subgraph.tensors or []))
    ops = tuple(
        OpInfo(i, _op_name(model.operatorCodes[op.opcodeIndex]),
               tuple(int(x) for x in (op.inputs if op.inputs is not None
                                      else ())),
               tuple(int(x) for x in (op.outputs if op.outputs is not None
                                      else ())))
        for i, op in enumerate(subgraph.operators or []))
    return Graph(ops=ops, tensors=tensors,
                 inputs=tuple(tensors[i] for i in subgraph.inputs),
                 outputs=tuple(tensors[i] for i in subgraph.outputs),
                 num_subgraphs=len(model.subgraphs))


def quantize(x: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """Float model input -> the tensor's dtype (quantized if integer)."""
    if not tensor.scales or tensor.is_float:
        return np.asarray(x, dtype=np.float32)
    dtype = np.dtype(tensor.dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / tensor.scales[0]
                 + tensor.zero_points[0])
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """A tensor's values -> float32 (dequantized if integer)."""
    if not tensor.scales or tensor.is_float:
        return np.asarray(q, dtype=np.float32)
    return ((np.asarray(q, np.float32) - tensor.zero_points[0])
            * tensor.scales[0]).astype(np.float32)
