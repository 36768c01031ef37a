"""Deploying KM tasks: base + task file -> baked Keras model -> `.tflite`.

    base.keras + task file ──restore_task/bake──> plain Keras model
        ──convert(preset)──> .tflite ──export_model──> .tflite + report
                                                   (+ C array for micro,
                                                    + Edge TPU check)

One module per job:

    pipeline.py    load_baked_task, convert, parity, export_model, reports
    presets.py     the table of presets (float32, float16, dynamic, int8,
                   micro, edgetpu)
    data.py        calibration and held-out data: a dataset spec or an .npz
    graph.py       reading a .tflite flatbuffer (ops, tensors, quantization)
    litert.py      running a .tflite in LiteRT
    micro.py       TFLite Micro: C array, real-interpreter runs, boards
    edgetpu.py     the static Edge TPU compatibility check

Example:
>>> from km_tf import export
>>> baked = export.load_baked_task("base.keras", "birds.kmtask")
>>> data = export.data.from_spec("folder:/data/birds", baked,
...                              calibration_samples=200, parity_samples=500)
>>> result = export.export_model(baked, "int8", "out/", name="birds",
...                              calibration_data=data.calibration,
...                              heldout=data.heldout)
>>> print(result.report_text)
"""

from km_tf.errors import ExportError
from km_tf.export import data
from km_tf.export.pipeline import (DEFAULT_PARITY_SAMPLES, MICRO_CHECK_SAMPLES,
                                   ExportResult, anchor_pixel_range, convert,
                                   export_model, format_report,
                                   load_baked_task, parity,
                                   static_batch_model, write_summary)
from km_tf.export.presets import PRESETS, Preset, get_preset

__all__ = [
    "DEFAULT_PARITY_SAMPLES",
    "ExportError",
    "ExportResult",
    "MICRO_CHECK_SAMPLES",
    "PRESETS",
    "Preset",
    "anchor_pixel_range",
    "convert",
    "data",
    "export_model",
    "format_report",
    "get_preset",
    "load_baked_task",
    "parity",
    "static_batch_model",
    "write_summary",
]
