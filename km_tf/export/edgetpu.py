"""Static Edge TPU compatibility check and the `edgetpu_compiler` command.

The Edge TPU compiler only ships from Coral's own package repository, so it
cannot run here. This module checks a `.tflite` file against the compiler's
documented model requirements instead (https://coral.ai/docs/edgetpu/
models-intro/#model-requirements and #supported-operations):

  * every tensor is 8-bit quantized (int8/uint8; int32 only for biases and
    shape operands, which the converter emits that way);
  * tensor sizes are constant at compile time (no dynamic dimension);
  * activation tensors have at most 3 dimensions, or only the innermost 3
    are > 1 (weights, e.g. 4-D conv filters, are exempt);
  * only supported ops. The compiler maps ops in order and cuts the graph
    once: the first op it cannot map, and every op after it, runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from km_tf.export.graph import Graph, OpInfo

# Ops the Edge TPU compiler can map, with their documented limitations
# (Coral "Supported operations" table). Limitations are reported, not
# checked, except where this module checks them itself.
EDGETPU_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "No fused activation function.",
    "CONCATENATION": "No fused activation function; a constant input must be "
                     "all zeros and the only other input.",
    "CONV_2D": "Same dilation in x and y.",
    "DEPTHWISE_CONV_2D": "Same dilation in x and y.",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "Default weight format only; 1-D output.",
    "HARD_SWISH": "",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "MAXIMUM": "",
    "MAX_POOL_2D": "No fused activation function.",
    "MEAN": "No reduction over the batch dimension; a z-reduction needs a "
            "multiple of 4 channels.",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "No packing in the batch dimension.",
    "PAD": "No padding in the batch dimension.",
    "PRELU": "Alpha must be 1-dimensional.",
    "QUANTIZE": "",
    "REDUCE_MAX": "Not over the batch dimension.",
    "REDUCE_MIN": "Not over the batch dimension.",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "Some reshapes of large tensors are not mapped.",
    "RESIZE_BILINEAR": "3-D input/output; may stay on CPU to keep precision.",
    "RESIZE_NEAREST_NEIGHBOR": "3-D input/output; may stay on CPU.",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "1-D input, at most 16,000 elements.",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "No splitting in the batch dimension.",
    "SQUARED_DIFFERENCE": "",
    "SQUEEZE": "",
    "STRIDED_SLICE": "Strides of 1 only (no ellipsis/new-axis masks).",
    "SUB": "",
    "SUM": "Not over the batch dimension.",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}
EIGHT_BIT = ("int8", "uint8")
MAX_RANK = 3


@dataclasses.dataclass(frozen=True)
class EdgeTpuReport:
    """Result of the static Edge TPU check.

    Attributes:
        fully_mapped: True when every op is expected to run on the Edge TPU.
        issues: Model-wide problems (non-8-bit, dynamic or high-rank tensors).
        ops: Per op: index, name, where it runs ("edgetpu"/"cpu"), why.
        cpu_ops: `"OP#index"` of the ops expected to fall back to the CPU.
    """

    fully_mapped: bool
    issues: tuple[str, ...]
    ops: tuple[dict[str, Any], ...]
    cpu_ops: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for reports."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


def _op_problems(op: OpInfo, graph: Graph) -> list[str]:
    problems = []
    if op.name not in EDGETPU_OPS:
        problems.append(f"{op.name} is not a supported Edge TPU op")
    for index in (*op.inputs, *op.outputs):
        if index < 0:
            continue
        tensor = graph.tensors[index]
        if tensor.dtype not in EIGHT_BIT and not (
                tensor.dtype == "int32" and tensor.constant):
            problems.append(f"tensor {tensor.name!r} is {tensor.dtype}, not "
                            "8-bit")
        if not tensor.is_static:
            problems.append(f"tensor {tensor.name!r} has a dynamic shape "
                            f"{list(tensor.shape_signature)}")
        outer = tensor.shape[:-MAX_RANK]
        if not tensor.constant and any(dim > 1 for dim in outer):
            problems.append(f"tensor {tensor.name!r} has shape "
                            f"{list(tensor.shape)}: only the innermost "
                            f"{MAX_RANK} dimensions may exceed 1")
    return problems


def check_edgetpu(graph: Graph) -> EdgeTpuReport:
    """Checks a TFLite graph against the Edge TPU's documented requirements.

    Args:
        graph: From `km_tf.export.graph.read_graph`.

    Returns:
        An `EdgeTpuReport`; ops from the first incompatible one on are
        reported as falling back to the CPU.
    """
    issues = []
    if graph.num_subgraphs > 1:
        issues.append(f"{graph.num_subgraphs} subgraphs: the compiler maps "
                      "only the first")
    for tensor in (*graph.inputs, *graph.outputs):
        if tensor.dtype not in EIGHT_BIT:
            issues.append(f"model IO tensor {tensor.name!r} is "
                          f"{tensor.dtype}; export with the 'edgetpu' preset")
        if not tensor.is_static:
            issues.append(f"model IO tensor {tensor.name!r} has a dynamic "
                          "shape; export with the 'edgetpu' preset")
    ops, cpu_ops, on_cpu = [], [], False
    for op in graph.ops:
        problems = _op_problems(op, graph)
        if problems and not on_cpu:
            on_cpu = True
            reason = "; ".join(problems)
        elif on_cpu:
            reason = "after the first unmapped op (the graph is cut once)"
            if problems:
                reason += "; " + "; ".join(problems)
        else:
            reason = EDGETPU_OPS[op.name] or "supported"
        ops.append({"index": op.index, "op": op.name,
                    "runs_on": "cpu" if on_cpu else "edgetpu",
                    "reason": reason})
        if on_cpu:
            cpu_ops.append(f"{op.name}#{op.index}")
    return EdgeTpuReport(fully_mapped=not cpu_ops and not issues,
                         issues=tuple(dict.fromkeys(issues)),
                         ops=tuple(ops), cpu_ops=tuple(cpu_ops))


def compiler_command(tflite_path: str, output_dir: str) -> str:
    """The `edgetpu_compiler` command line to run on a machine that has it.

    `-s` prints the compiler's own per-op mapping table, to compare with
    this module's static check; `-o` sets the output directory (the result
    is `<name>_edgetpu.tflite`).
    """
    return (f"edgetpu_compiler -s -o {shlex.quote(str(output_dir))} "
            f"{shlex.quote(str(tflite_path))}")
