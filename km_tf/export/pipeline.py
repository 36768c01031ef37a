"""The export pipeline: a baked model -> `.tflite` + checks + reports.

`load_baked_task` (base + task file -> plain Keras model), `convert` (one
preset, `km_tf.export.presets`), `parity` (float vs `.tflite`) and
`export_model`, which wires them with the TFLite Micro run
(`km_tf.export.micro`) and the Edge TPU check (`km_tf.export.edgetpu`) and
writes every file atomically (temporary file + rename). Calibration and
held-out data come from a dataset spec or an `.npz` (`km_tf.export.data`).

Example:
>>> baked = load_baked_task("base.keras", "birds.kmtask")
>>> result = export_model(baked, "int8", "out/", name="birds",
...                       calibration_data=x_train, heldout=(x_test, y_test))
>>> print(result.report_text)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from km_tf.convert import bake
from km_tf.errors import ExportError
from km_tf.export.data import check_heldout, check_inputs
from km_tf.export.edgetpu import check_edgetpu, compiler_command
from km_tf.export.graph import Graph, read_graph
from km_tf.export.presets import (DEFAULT_CALIBRATION_SAMPLES, QUANT_DYNAMIC,
                                  QUANT_FLOAT16, QUANT_INT8, Preset,
                                  get_preset)
from km_tf.layers import KM_LAYERS
from km_tf.export.litert import LiteRTModel
from km_tf.export.micro import (DEFAULT_BOARDS, arena_budget, board_fit,
                         c_array_sources, run_micro)
from km_tf.models import input_normalization, load_base
from km_tf.restore import restore_task
from km_tf.files import existing_file, write_atomically
from km_tf.walk import walk_layers

# Held-out samples used for parity when the caller does not say.
DEFAULT_PARITY_SAMPLES = 500
# Samples run through TFLite Micro to compare it with LiteRT.
MICRO_CHECK_SAMPLES = 32

_TF_IO_TYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        tflite_path: The `.tflite` file.
        report_path: The JSON report.
        text_report_path: The readable report.
        report: The report as a dict (what the JSON holds).
        extra_paths: Other files (C source and header for `micro`).
    """

    tflite_path: Path
    report_path: Path
    text_report_path: Path
    report: dict[str, Any]
    extra_paths: tuple[Path, ...] = ()

    @property
    def report_text(self) -> str:
        """The readable report."""
        return format_report(self.report)


def load_baked_task(base: keras.Model | str | os.PathLike,
                    task_path: str | os.PathLike) -> keras.Model:
    """Base + task file -> the task's plain (baked) Keras model.

    `km_tf.bake(km_tf.restore_task(base, task_path))`, with the base loaded
    from its file when given a path.

    Args:
        base: The base network, or the path of its `.keras` file.
        task_path: A task file written by `km_tf.save_task`.

    Returns:
        A plain Keras model with the task's head and modulated kernels.

    Raises:
        FileNotFoundError: The base or the task file is missing.
        km_tf.TaskFileError: The task file is corrupt or made for another
            base.
    """
    task_path = existing_file(task_path, "Task file", "Pass a file written "
                               "by km_tf.save_task (e.g. by apps/train.py).")
    if not isinstance(base, keras.Model):
        base = load_base(base)
    return bake(restore_task(base, task_path))


def static_batch_model(model: keras.Model) -> keras.Model:
    """The same model (shared weights) with its batch size fixed to 1."""
    inputs = keras.Input(batch_shape=(1, *model.input_shape[1:]),
                         name=model.inputs[0].name.split(":")[0])
    return keras.Model(inputs, model(inputs, training=False),
                       name=f"{model.name}_batch1")


def _check_single_io(model: keras.Model) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"Model {model.name!r} has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs; export supports one image input "
            "and one output (a classifier).")


def _calibration_samples(model: keras.Model, data: np.ndarray | None,
                         count: int, preset: Preset) -> np.ndarray:
    if data is None or len(data) == 0:
        raise ExportError(
            f"Preset {preset.name!r} quantizes activations to int8 and needs "
            "calibration data: pass calibration_data (images from the task's "
            "training data, shaped like the model input), e.g. "
            "--calibration_data=SPEC with the task's dataset spec "
            "(digits:5-9, folder:PATH, tfds:NAME), or "
            "--calibration_dataset=train.npz.")
    data = check_inputs(data, model, "Calibration data")
    if count < 1:
        raise ExportError(f"calibration_samples must be >= 1; got {count}.")
    order = np.random.default_rng(0).permutation(len(data))[:count]
    return data[np.sort(order)].astype(np.float32)


def anchor_pixel_range(samples: np.ndarray) -> np.ndarray:
    """Calibration samples whose range is exactly the pixel range [0, 255].

    The converter quantizes the model input over the range it sees in
    calibration. For a model that takes pixels (normalization inside), a
    range of exactly [0, 255] gives the input scale 1 and zero point -128
    (int8) / 0 (uint8): the `.tflite` then takes raw camera bytes with no
    arithmetic on the device. One value of the first sample is set to 0 and
    one to 255, which leaves every other range practically unchanged.

    Args:
        samples: Float32 model inputs in [0, 255].

    Returns:
        A copy with the first sample's first two values set to 0 and 255.
    """
    anchored = np.array(samples, dtype=np.float32, copy=True)
    first = anchored[0].reshape(-1)
    first[0], first[1] = 0.0, 255.0
    anchored[0] = first.reshape(anchored[0].shape)
    return anchored


def convert(model: keras.Model, preset: Preset | str,
            calibration_data: np.ndarray | None = None,
            calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES) -> bytes:
    """Converts a plain (baked) Keras model to a `.tflite` flatbuffer.

    Args:
        model: A plain Keras model (e.g. from `km_tf.bake`), one input and one
            output.
        preset: A `Preset` or a preset name (see `km_tf.export.presets`).
        calibration_data: Float model inputs from the task's training data;
            required by the int8 presets.
        calibration_samples: How many of them calibrate the quantization.

    Returns:
        The `.tflite` flatbuffer.

    Raises:
        ExportError: Missing or malformed calibration data (see
            `km_tf.export.data.check_inputs`: dtype, shape, finite values,
            pixel range), a model with several inputs/outputs, or a model
            still holding KM layers.
        ValueError: An unknown preset.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    _check_single_io(model)
    if any(isinstance(layer, KM_LAYERS) for _, layer in walk_layers(model)):
        raise ExportError(
            f"Model {model.name!r} still holds kernel-modulated layers: call "
            "km_tf.bake(model) first, so the kernels are constants in the "
            ".tflite file.")
    samples = None
    if preset.needs_calibration:
        samples = _calibration_samples(model, calibration_data,
                                       calibration_samples, preset)
        if input_normalization(model) is not None:
            samples = anchor_pixel_range(samples)
    source = static_batch_model(model) if preset.static_batch else model
    converter = tf.lite.TFLiteConverter.from_keras_model(source)
    if preset.quantization in (QUANT_FLOAT16, QUANT_DYNAMIC, QUANT_INT8):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if preset.quantization == QUANT_FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
    if preset.quantization == QUANT_INT8:
        converter.representative_dataset = lambda: (
            [sample[None]] for sample in samples)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = _TF_IO_TYPES[preset.io_type]
        converter.inference_output_type = _TF_IO_TYPES[preset.io_type]
    logging.info("Converting %s with preset %r%s.", model.name, preset.name,
                 f" ({len(samples)} calibration samples)"
                 if samples is not None else "")
    return converter.convert()


def _top1(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).reshape(len(logits), -1).argmax(axis=1)


def parity(model: keras.Model, tflite_model: LiteRTModel, x: np.ndarray,
           y: np.ndarray | None = None) -> dict[str, Any]:
    """Float Keras model vs its `.tflite` on held-out data.

    Returns:
        `samples`, `top1_agreement`, and with labels `float_accuracy`,
        `tflite_accuracy` and `accuracy_drop` (in points, float - tflite).
    """
    float_out = model.predict(x, batch_size=64, verbose=0)
    lite_out = tflite_model.predict(x)
    float_top1, lite_top1 = _top1(float_out), _top1(lite_out)
    result = {"samples": int(len(x)),
              "top1_agreement": float(np.mean(float_top1 == lite_top1))}
    if y is not None:
        y = np.asarray(y).reshape(-1)
        result["float_accuracy"] = float(np.mean(float_top1 == y))
        result["tflite_accuracy"] = float(np.mean(lite_top1 == y))
        result["accuracy_drop_points"] = 100.0 * (
            result["float_accuracy"] - result["tflite_accuracy"])
    return result


def _agreement(first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and max |difference| of two raw (integer) outputs."""
    diff = np.abs(first.astype(np.int64) - second.astype(np.int64))
    return {"samples": int(len(first)),
            "top1_agreement": float(np.mean(_top1(first) == _top1(second))),
            "max_abs_diff_quantized": int(diff.max())}


def _micro_section(model_bytes: bytes, graph: Graph, lite: LiteRTModel,
                   samples: np.ndarray, output_dir: Path, name: str,
                   boards: Sequence[str], c_symbol: str
                   ) -> tuple[dict[str, Any], tuple[Path, ...]]:
    logging.info("Running %s in the TFLite Micro interpreter.", name)
    xq = lite.quantize_input(samples)
    micro_run = run_micro(model_bytes, xq)
    budget = arena_budget(micro_run.arena_used_bytes)
    inp, out = graph.inputs[0], graph.outputs[0]
    source, header = c_array_sources(
        model_bytes, header_name=f"{name}_model_data.h",
        op_names=graph.op_names, arena_bytes=budget, symbol=c_symbol,
        io_quantization={"input_scale": inp.scales[0],
                         "input_zero_point": inp.zero_points[0],
                         "output_scale": out.scales[0],
                         "output_zero_point": out.zero_points[0]})
    c_path = output_dir / f"{name}_model_data.c"
    h_path = output_dir / f"{name}_model_data.h"
    write_atomically(str(h_path), header.encode())
    write_atomically(str(c_path), source.encode())
    section = {
        "arena_used_bytes": micro_run.arena_used_bytes,
        "arena_budget_bytes": budget,
        "flash_bytes": len(model_bytes),
        "boards": board_fit(budget, len(model_bytes), boards),
        "c_source": c_path.name, "c_header": h_path.name,
        "c_symbol": c_symbol,
        # LiteRT's default (XNNPACK/optimized) kernels may round differently
        # from TFLM's reference kernels; its reference kernels should not.
        "micro_vs_litert": _agreement(micro_run.outputs, lite.run_raw(xq)),
        "micro_vs_litert_reference_kernels": _agreement(
            micro_run.outputs,
            LiteRTModel(model_bytes, reference_kernels=True).run_raw(xq)),
    }
    return section, (c_path, h_path)


def export_model(model: keras.Model, preset: Preset | str,
                 output_dir: str | os.PathLike, name: str, *,
                 calibration_data: np.ndarray | None = None,
                 calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
                 heldout: tuple[np.ndarray, np.ndarray | None] | None = None,
                 parity_samples: int = DEFAULT_PARITY_SAMPLES,
                 boards: Sequence[str] = DEFAULT_BOARDS,
                 c_symbol: str = "model",
                 source: dict[str, str] | None = None) -> ExportResult:
    """Converts a baked model and writes the `.tflite`, extras and reports.

    Writes `<name>_<preset>.tflite`, `<name>_<preset>.report.json` and
    `.report.txt`; `micro` adds `<name>_<preset>_model_data.{c,h}`.

    Args:
        model: A plain (baked) Keras model.
        preset: A `Preset` or preset name.
        output_dir: Existing or new folder for the files.
        name: File name stem (e.g. the task name).
        calibration_data: Float inputs from the task's training data
            (required by the int8 presets).
        calibration_samples: How many calibrate the quantization.
        heldout: `(x, y)` held-out data for the parity check (`y` may be
            None); None skips parity. `micro` also runs some of `x` in
            TFLite Micro (calibration data when None).
        parity_samples: At most this many held-out samples are compared.
        boards: Board names (`km_tf.export.micro.BOARDS`) to check `micro` against.
        c_symbol: C name of the model array (`micro`).
        source: Provenance recorded in the report (e.g. base/task paths).

    Returns:
        An `ExportResult`.

    Raises:
        ExportError: Bad input (see `convert`) or malformed held-out data
            (`km_tf.export.data.check_heldout`). Both are checked before
            anything is converted or written.
        km_tf.export.micro.MicroRuntimeError: A micro model with ops TFLite Micro
            lacks, or TFLite Micro failed on it.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    _check_single_io(model)
    _check_writable(Path(output_dir))
    heldout = check_heldout(heldout, model, parity_samples)
    stem = f"{name}_{preset.name}"
    start = time.perf_counter()
    model_bytes = convert(model, preset, calibration_data,
                          calibration_samples)
    seconds = time.perf_counter() - start
    graph = read_graph(model_bytes)
    if preset.integer_only and graph.float_ops_on_path():
        raise ExportError(
            f"The {preset.name!r} model still computes in float at "
            f"{graph.float_ops_on_path()}; an op of this model has no int8 "
            "kernel. Replace that layer in the base network.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tflite_path = output_dir / f"{stem}.tflite"
    write_atomically(str(tflite_path), model_bytes)
    report: dict[str, Any] = {
        "name": name, "preset": preset.name, "summary": preset.summary,
        "source": dict(source or {}),
        "tflite": tflite_path.name, "size_bytes": len(model_bytes),
        "conversion_seconds": round(seconds, 3),
        "calibration_samples": (min(calibration_samples, len(calibration_data))
                                if preset.needs_calibration else 0),
        "op_count": len(graph.ops), "ops": graph.op_counts,
        "inputs": [t.io_summary() for t in graph.inputs],
        "outputs": [t.io_summary() for t in graph.outputs],
        "float_ops_on_path": graph.float_ops_on_path(),
    }
    lite = LiteRTModel(model_bytes)
    extra_paths: tuple[Path, ...] = ()
    if heldout is not None:
        x, y = heldout
        logging.info("Parity of %s on %d held-out samples.", stem, len(x))
        report["parity"] = parity(model, lite, x, y)
    else:
        report["parity"] = None
    if preset.micro:
        # TFLM runs held-out samples, or calibration ones when there are none.
        samples = heldout[0] if heldout is not None else calibration_data
        report["micro"], extra_paths = _micro_section(
            model_bytes, graph, lite,
            np.asarray(samples, np.float32)[:MICRO_CHECK_SAMPLES],
            output_dir, stem, boards, c_symbol)
    if preset.edgetpu:
        report["edgetpu"] = {
            **check_edgetpu(graph).to_dict(),
            "compiler_command": compiler_command(tflite_path, output_dir),
        }
    report_path = output_dir / f"{stem}.report.json"
    text_path = output_dir / f"{stem}.report.txt"
    write_atomically(str(report_path),
                      json.dumps(report, indent=2).encode())
    write_atomically(str(text_path), format_report(report).encode())
    logging.info("Wrote %s (%d bytes).", tflite_path, len(model_bytes))
    return ExportResult(tflite_path, report_path, text_path, report,
                        extra_paths)


def _check_writable(folder: Path) -> None:
    """Refuses an output folder this process cannot write, before the
    (long) conversion."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(
            f"Cannot write into {str(existing)!r} (permission denied): pass "
            "an --output_dir this user can write.")


def write_summary(reports: Sequence[dict[str, Any]],
                  output_dir: str | os.PathLike) -> Path:
    """Writes `summary.json`: the reports of several exports, in order."""
    path = Path(output_dir) / "summary.json"
    write_atomically(str(path), json.dumps(list(reports), indent=2).encode())
    return path


def format_report(report: dict[str, Any]) -> str:
    """A readable text version of an export report."""
    def io_line(t: dict[str, Any]) -> str:
        quant = (f", scale {t['scale']:.6g}, zero point {t['zero_point']}"
                 if "scale" in t else "")
        return f"  {t['name']}: {t['dtype']} {t['shape']}{quant}"

    lines = [
        f"{report['name']} -> {report['tflite']}  (preset {report['preset']}:"
        f" {report['summary']})",
        f"size: {report['size_bytes']:,} bytes; converted in "
        f"{report['conversion_seconds']} s",
        f"ops ({report['op_count']}): " + ", ".join(
            f"{op} x{n}" for op, n in report["ops"].items()),
        "inputs:", *map(io_line, report["inputs"]),
        "outputs:", *map(io_line, report["outputs"]),
        "float ops on the input->output path: "
        + (", ".join(report["float_ops_on_path"]) or "none"),
    ]
    if report.get("calibration_samples"):
        lines.append(f"calibration samples: {report['calibration_samples']}")
    result = report.get("parity")
    if result:
        line = (f"parity on {result['samples']} held-out samples: top-1 "
                f"agreement {100 * result['top1_agreement']:.1f}%")
        if "float_accuracy" in result:
            line += (f"; accuracy float {100 * result['float_accuracy']:.1f}%"
                     f", tflite {100 * result['tflite_accuracy']:.1f}%")
        lines.append(line)
    else:
        lines.append("parity: not run (no held-out data)")
    micro = report.get("micro")
    if micro:
        lines += [
            f"TFLite Micro arena: {micro['arena_used_bytes']:,} bytes used, "
            f"reserve {micro['arena_budget_bytes']:,}; flash (model) "
            f"{micro['flash_bytes']:,} bytes",
            *(f"TFLite Micro vs LiteRT{label} on {check['samples']} samples: "
              f"top-1 agreement {100 * check['top1_agreement']:.1f}%, max "
              f"|diff| {check['max_abs_diff_quantized']} (quantized units)"
              for label, check in (
                  ("", micro["micro_vs_litert"]),
                  (" reference kernels",
                   micro["micro_vs_litert_reference_kernels"]))),
            f"C array: {micro['c_source']} + {micro['c_header']} "
            f"(symbol {micro['c_symbol']})",
        ]
        for fit in micro["boards"]:
            lines.append(
                f"  board {fit['board']} ({fit['description']}): "
                f"{'fits' if fit['fits'] else 'does NOT fit'}; RAM headroom "
                f"{fit['ram_headroom_bytes']:,} B, flash headroom "
                f"{fit['flash_headroom_bytes']:,} B")
    edgetpu = report.get("edgetpu")
    if edgetpu:
        lines.append("Edge TPU (static check): " + (
            "all ops map to the Edge TPU" if edgetpu["fully_mapped"] else
            f"{len(edgetpu['cpu_ops'])} ops fall back to the CPU: "
            + ", ".join(edgetpu["cpu_ops"])))
        lines += [f"  issue: {issue}" for issue in edgetpu["issues"]]
        lines.append(f"  compile with: {edgetpu['compiler_command']}")
    return "\n".join(lines) + "\n"
