"""km-tf: Kernel Modulation for Keras 3 / TensorFlow, with TFLite export.

The core flow: `modulate(base)` -> `fit` -> `save_task(model, path)`; then
`restore_task(base, path)` rebuilds the trained task model from the base and
the task file alone, and `bake(model)` -> TFLite. Task packs for devices:
`km_tf.deploy`.

The names below load on first use, so `km_tf.deploy.applier` (numpy only)
imports on a device that has no TensorFlow.
"""

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("bake", "modulate", "modulation_options"),
                    "km_tf.convert"),
    **dict.fromkeys(("BudgetError", "ClusterError", "DataError",
                     "ExportError", "KMError", "MicroArenaTooSmallError",
                     "MicroRuntimeError", "ModelFileError", "PackError",
                     "ResumeError", "TaskFileError", "UnsupportedLayerError",
                     "WeightsUnavailableError"), "km_tf.errors"),
    **dict.fromkeys(("KernelModulatedConv2D",
                     "KernelModulatedDepthwiseConv2D", "KernelModulator"),
                    "km_tf.layers"),
    "restore_task": "km_tf.restore",
    **dict.fromkeys(("TaskReport", "base_fingerprint", "load_task",
                     "read_task_header", "read_task_options", "save_task",
                     "task_report"), "km_tf.tasks"),
}

__version__ = "0.3.0"

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'km_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted((*globals(), *_EXPORTS))
