"""TensorFlow Lite Micro: C array, op check, real-interpreter runs, boards.

The `tflite-micro` Python interpreter crashes the whole process (segfault or
abort) when its tensor arena is too small or a model is unusable, so every
run here happens in a child process (`_micro_worker.py`, run as a script); a
crash comes back as a `MicroRuntimeError` naming the cause and the fix. The
child imports only numpy and `tflite_micro`, never TensorFlow, so it starts
fast.

Arena bytes are measured with TFLM's `RecordingMicroAllocator` on this
64-bit host; 32-bit MCUs need slightly less (smaller pointers and structs).
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from km_tf.errors import MicroArenaTooSmallError, MicroRuntimeError
from km_tf.export.graph import read_graph

# The child process that runs TFLite Micro (a script, see above).
_WORKER = Path(__file__).with_name("_micro_worker.py")

# TFLite builtin op -> `tflite::MicroMutableOpResolver` method that adds it
# (tensorflow/lite/micro/micro_mutable_op_resolver.h). An op missing here has
# no TFLM kernel and fails to load on a microcontroller.
MICRO_OP_RESOLVERS: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv", "ELU": "AddElu", "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather", "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad",
    "PADV2": "AddPadV2", "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable", "REDUCE_MAX": "AddReduceMax",
    "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound", "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin",
    "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth", "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum",
    "SVDF": "AddSvdf", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv", "UNPACK": "AddUnpack",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
}

# Extra arena a firmware should reserve beyond the measured bytes.
ARENA_MARGIN_BYTES = 1024
_MEASURE_ARENA_MIN_BYTES = 16 * 1024 * 1024
_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_ALLOC_FAILED = re.compile(r"Failed to (allocate|resize)[^\n]*")
_WORKER_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Board:
    """A microcontroller's memory budget.

    Attributes:
        name: Short name (the `--boards` flag value).
        description: The board or part it stands for.
        ram_bytes: SRAM available for the tensor arena.
        flash_bytes: Flash available for the model array.
    """

    name: str
    description: str
    ram_bytes: int
    flash_bytes: int


BOARDS: dict[str, Board] = {
    board.name: board
    for board in (
        Board("m4-256k", "Cortex-M4F, 256 KB RAM / 1 MB flash "
              "(e.g. Arduino Nano 33 BLE Sense)", 256 * 1024, 1024 * 1024),
        Board("m7-512k", "Cortex-M7, 512 KB RAM / 2 MB flash "
              "(e.g. STM32H743 class)", 512 * 1024, 2 * 1024 * 1024),
        Board("rp2040", "Raspberry Pi Pico, 264 KB RAM / 2 MB flash",
              264 * 1024, 2 * 1024 * 1024),
        Board("esp32s3", "ESP32-S3, 512 KB SRAM / 8 MB flash", 512 * 1024,
              8 * 1024 * 1024),
    )
}
DEFAULT_BOARDS = ("m4-256k",)


@dataclasses.dataclass(frozen=True)
class MicroRun:
    """Outputs and memory use of one TFLite Micro run.

    Attributes:
        outputs: Raw output tensor values, one row per input sample.
        arena_used_bytes: Arena bytes the RecordingMicroAllocator reported.
        arena_size_bytes: Arena size the interpreter was given.
    """

    outputs: np.ndarray
    arena_used_bytes: int
    arena_size_bytes: int


def unsupported_micro_ops(op_names: Sequence[str]) -> list[str]:
    """The ops in `op_names` that TFLite Micro has no built-in kernel for."""
    return sorted({op for op in op_names if op not in MICRO_OP_RESOLVERS})


def _check_micro_model(model_bytes: bytes) -> None:
    """Refuses what TFLM cannot run correctly, before it crashes on it."""
    graph = read_graph(model_bytes)
    unsupported = unsupported_micro_ops(graph.op_names)
    if unsupported:
        raise MicroRuntimeError(
            f"TFLite Micro has no kernel for ops {unsupported}. Replace those "
            "layers in the base network; export with the 'micro' preset.")
    dynamic = [t.name for t in graph.inputs if not t.is_static]
    if dynamic:
        # Seen here: an int8 model with a dynamic batch ran in TFLM but gave
        # outputs far from LiteRT's; another aborted at load (BUILD.md).
        raise MicroRuntimeError(
            f"Input(s) {dynamic} have a dynamic dimension; TFLite Micro needs "
            "static shapes. Export with the 'micro' preset (batch 1).")


def run_micro(model_bytes: bytes, inputs: np.ndarray,
              arena_bytes: int | None = None) -> MicroRun:
    """Runs a model in the real TFLite Micro interpreter, one sample a time.

    Args:
        model_bytes: A `.tflite` flatbuffer with a batch-1 input.
        inputs: Input tensor values (already quantized), shape `(n, ...)`;
            each row is fed as a batch of 1.
        arena_bytes: Tensor arena size; None gives a generous arena (for
            measuring).

    Returns:
        A `MicroRun` with the outputs and the measured arena bytes.

    Raises:
        MicroArenaTooSmallError: `arena_bytes` cannot hold the model.
        MicroRuntimeError: The model has a dynamic input shape or ops TFLM
            lacks, or TFLM failed to load or run it.
    """
    _check_micro_model(model_bytes)
    if arena_bytes is None:
        arena_bytes = max(_MEASURE_ARENA_MIN_BYTES, 10 * len(model_bytes))
    with tempfile.TemporaryDirectory(prefix="km_tf_micro_") as tmp:
        model_path = Path(tmp, "model.tflite")
        model_path.write_bytes(model_bytes)
        np.save(Path(tmp, "inputs.npy"), np.asarray(inputs))
        proc = subprocess.run(
            [sys.executable, "-P", str(_WORKER), tmp, str(arena_bytes)],
            capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S,
            check=False)
        log = (proc.stderr or "") + (proc.stdout or "")
        if proc.returncode != 0:
            failed = _ALLOC_FAILED.search(log)
            if failed:
                raise MicroArenaTooSmallError(
                    f"The TFLite Micro tensor arena of {arena_bytes} bytes is "
                    f"too small for this model (TFLM: {failed.group(0)!r}). "
                    "Measure the need with km_tf.export.micro.run_micro() (its "
                    "arena_used_bytes, without arena_bytes) and "
                    "give at least that many bytes.")
            tail = "\n".join(log.strip().splitlines()[-15:])
            raise MicroRuntimeError(
                "The TFLite Micro interpreter failed on this model (exit "
                f"status {proc.returncode}). Export with the 'micro' preset "
                "(batch-1 int8, TFLM built-in ops only). Interpreter log:\n"
                f"{tail}")
        used = _ARENA_TOTAL.search(log)
        if not used:
            raise MicroRuntimeError(
                "TFLite Micro ran but printed no arena allocation report; "
                f"log:\n{log[-2000:]}")
        outputs = np.load(Path(tmp, "outputs.npy"))
    return MicroRun(outputs=outputs, arena_used_bytes=int(used.group(1)),
                    arena_size_bytes=arena_bytes)


def arena_budget(arena_used_bytes: int) -> int:
    """Arena size to reserve in firmware: measured, rounded up, plus margin."""
    return math.ceil(arena_used_bytes / 1024) * 1024 + ARENA_MARGIN_BYTES


def board_fit(arena_bytes: int, flash_bytes: int,
              boards: Sequence[str] = DEFAULT_BOARDS) -> list[dict]:
    """Whether a model fits each named board's RAM and flash budgets.

    Args:
        arena_bytes: Tensor arena the model needs (RAM).
        flash_bytes: Model array size (flash). The TFLM runtime and the
            application also need flash and RAM; the headroom must hold them.
        boards: Names in `BOARDS`.

    Raises:
        ValueError: An unknown board name.
    """
    unknown = [name for name in boards if name not in BOARDS]
    if unknown:
        raise ValueError(f"Unknown board(s) {unknown}; choose from "
                         f"{sorted(BOARDS)}.")
    fits = []
    for name in boards:
        board = BOARDS[name]
        fits.append({
            "board": name, "description": board.description,
            "ram_bytes": board.ram_bytes, "flash_bytes": board.flash_bytes,
            "arena_bytes": arena_bytes, "model_bytes": flash_bytes,
            "ram_headroom_bytes": board.ram_bytes - arena_bytes,
            "flash_headroom_bytes": board.flash_bytes - flash_bytes,
            "fits": (arena_bytes <= board.ram_bytes
                     and flash_bytes <= board.flash_bytes),
        })
    return fits


def _c_identifier(symbol: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", symbol):
        raise ValueError(f"C symbol {symbol!r} is not a valid C identifier.")
    return symbol


def c_array_sources(model_bytes: bytes, *, header_name: str,
                    op_names: Sequence[str], arena_bytes: int,
                    symbol: str = "model",
                    io_quantization: dict | None = None) -> tuple[str, str]:
    """The text of a C source and header holding the model as an array.

    The source defines `const unsigned char <symbol>[]` (16-byte aligned, as
    TFLM requires) and `const unsigned int <symbol>_len`; the header declares
    them with C linkage and adds `KM_MODEL_*` macros for a TFLM `main`: the
    arena size to reserve, the op count and a macro that registers exactly the
    model's ops on a `tflite::MicroMutableOpResolver`.

    Args:
        model_bytes: The `.tflite` flatbuffer.
        header_name: File name of the header (the source includes it).
        op_names: The model's ops (each must be a TFLM built-in).
        arena_bytes: Arena size for `KM_MODEL_ARENA_BYTES`.
        symbol: C name of the array.
        io_quantization: Optional `{"input_scale": ..., "input_zero_point":
            ..., "output_scale": ..., "output_zero_point": ...}` macros.

    Returns:
        `(source_text, header_text)`.
    """
    symbol = _c_identifier(symbol)
    unsupported = unsupported_micro_ops(op_names)
    if unsupported:
        raise ValueError(f"Ops {unsupported} have no TFLite Micro kernel; "
                         "export with the 'micro' preset.")
    ops = sorted(set(op_names))
    guard = re.sub(r"[^A-Za-z0-9]", "_", header_name).upper() + "_"
    register = " \\\n".join(
        f"    (resolver).{MICRO_OP_RESOLVERS[op]}();" for op in ops)
    quant_lines = "".join(
        f"#define KM_MODEL_{key.upper()} {value!r}\n"
        for key, value in (io_quantization or {}).items())
    header = f"""\
// Generated by km_tf.export.micro: a TFLite model as a C array. Do not edit.
#ifndef {guard}
#define {guard}

#ifdef __cplusplus
extern "C" {{
#endif

extern const unsigned char {symbol}[];
extern const unsigned int {symbol}_len;

#ifdef __cplusplus
}}
#endif

#define KM_MODEL_DATA {symbol}
#define KM_MODEL_DATA_LEN {symbol}_len
#define KM_MODEL_BYTES {len(model_bytes)}
// Tensor arena measured with the TFLite Micro interpreter, plus a margin.
#define KM_MODEL_ARENA_BYTES {arena_bytes}
{quant_lines}// Ops used by the model: {", ".join(ops)}.
#define KM_MODEL_OP_COUNT {len(ops)}
#define KM_MODEL_REGISTER_OPS(resolver) \\
  do {{ \\
{register} \\
  }} while (0)

#endif  // {guard}
"""
    rows = [", ".join(f"0x{b:02x}" for b in model_bytes[i:i + 12])
            for i in range(0, len(model_bytes), 12)]
    body = ",\n  ".join(rows)
    source = f"""\
// Generated by km_tf.export.micro: a TFLite model as a C array. Do not edit.
#include "{header_name}"

#if defined(__GNUC__) || defined(__clang__)
#define KM_MODEL_ALIGN __attribute__((aligned(16)))
#elif defined(__cplusplus)
#define KM_MODEL_ALIGN alignas(16)
#else
#define KM_MODEL_ALIGN _Alignas(16)
#endif

KM_MODEL_ALIGN const unsigned char {symbol}[] = {{
  {body}
}};
const unsigned int {symbol}_len = {len(model_bytes)};
"""
    return source, header
