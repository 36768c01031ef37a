"""Peak memory of TensorFlow work, read from TensorFlow's own allocator.

Process-level measures (resident set size) mix in the Python heap, tracing,
libraries and allocator caching, and cannot separate two training methods
whose difference is a few weights' worth of bytes. TensorFlow's allocator
counts exactly the tensors it holds (weights, optimizer slots, activations,
gradients), on GPU and on CPU alike.

On CPU one setting matters: TensorFlow's default CPU allocator (oneDNN's)
counts only allocations of 256 KiB or more, so kernels, biases and their
optimizer slots of a MobileNet mostly go uncounted. Started with
`TF_CPU_ALLOCATOR_USE_BFC=true` (`EXACT_CPU_COUNTS`), TensorFlow serves the
CPU from its BFC allocator, which counts every tensor. The variable must be
set before TensorFlow starts, so measure in a fresh process:

    subprocess.run([...], env={**os.environ, **EXACT_CPU_COUNTS})
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import tensorflow as tf

EXACT_CPU_COUNTS = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def training_device() -> str:
    """`"GPU:0"` where TensorFlow sees a GPU, else `"CPU:0"`."""
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def peak_bytes(run: Callable[[], Any], device: str | None = None) -> int:
    """The most bytes TensorFlow's allocator held on `device` during `run()`.

    Everything alive counts, including tensors allocated before `run()`
    (a model's weights, an optimizer's slots), so two methods compare by
    their whole training footprint.

    Args:
        run: Work to measure, e.g. a few training steps.
        device: A logical device name; `training_device()` by default.

    Returns:
        The peak in bytes.

    Raises:
        RuntimeError: On CPU, when TensorFlow was not started with
            `EXACT_CPU_COUNTS` in its environment (the count would miss
            every tensor under 256 KiB).
    """
    device = device or training_device()
    if device.upper().startswith("CPU") and not exact_cpu_counts():
        raise RuntimeError(
            "CPU memory counts would miss every tensor under 256 KiB: start "
            "the measuring process with TF_CPU_ALLOCATOR_USE_BFC=true in its "
            "environment (km_tf.memory.EXACT_CPU_COUNTS); it must be set "
            "before TensorFlow starts.")
    tf.config.experimental.reset_memory_stats(device)
    run()
    return int(tf.config.experimental.get_memory_info(device)["peak"])


def exact_cpu_counts() -> bool:
    """Whether this process's environment asks for the counting CPU allocator.

    (It takes effect only if it was set before TensorFlow started.)
    """
    return all(os.environ.get(name, "").lower() == value
               for name, value in EXACT_CPU_COUNTS.items())
