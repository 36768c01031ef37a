"""km-tf: Kernel Modulation for Keras 3 / TensorFlow, with TFLite export.

The core flow: `modulate(base)` -> `fit` -> `save_task(model, path)`; on the
device side `load_task(modulate(base, **read_task_options(path)), path)` ->
`bake(model)` -> TFLite.
"""

from km_tf.convert import (UnsupportedLayerError, bake, modulate,
                           modulation_options)
from km_tf.layers import (KernelModulatedConv2D, KernelModulatedDepthwiseConv2D,
                          KernelModulator)
from km_tf.tasks import (TaskFileError, TaskReport, base_fingerprint,
                         load_task, read_task_header, read_task_options,
                         save_task, task_report)

__version__ = "0.1.0"

__all__ = [
    "KernelModulatedConv2D",
    "KernelModulatedDepthwiseConv2D",
    "KernelModulator",
    "TaskFileError",
    "TaskReport",
    "UnsupportedLayerError",
    "bake",
    "base_fingerprint",
    "load_task",
    "modulate",
    "modulation_options",
    "read_task_header",
    "read_task_options",
    "save_task",
    "task_report",
]
