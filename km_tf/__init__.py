"""km-tf: Kernel Modulation for Keras 3 / TensorFlow, with TFLite export.

The core flow: `modulate(base)` -> `fit` -> `save_task(model, path)`; then
`restore_task(base, path)` rebuilds the trained task model from the base and
the task file alone, and `bake(model)` -> TFLite.
"""

from km_tf.convert import bake, modulate, modulation_options
from km_tf.errors import (BudgetError, ClusterError, DataError, ExportError, KMError,
                          MicroArenaTooSmallError, MicroRuntimeError,
                          ModelFileError, ResumeError, TaskFileError,
                          UnsupportedLayerError,
                          WeightsUnavailableError)
from km_tf.layers import (KernelModulatedConv2D, KernelModulatedDepthwiseConv2D,
                          KernelModulator)
from km_tf.restore import restore_task
from km_tf.tasks import (TaskReport, base_fingerprint,
                         load_task, read_task_header, read_task_options,
                         save_task, task_report)

__version__ = "0.2.0"

__all__ = [
    "BudgetError",
    "ClusterError",
    "DataError",
    "ExportError",
    "KMError",
    "MicroArenaTooSmallError",
    "MicroRuntimeError",
    "ModelFileError",
    "ResumeError",
    "WeightsUnavailableError",
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
    "restore_task",
    "save_task",
    "task_report",
]
