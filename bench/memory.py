"""Peak memory of TensorFlow work, read from TensorFlow's own allocator.

Used by the benchmarks (`bench/perf.py`, `bench/train_perf.py`) and
`tests/test_memory.py`; scripts in `bench/` import it as `memory`.

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

Two measures:

- `peak_bytes`: the allocator's own peak, what TensorFlow held. The BFC
  allocator hands out whole free chunks when splitting them would leave less
  than 128 MB, so with activations of a hundred megabytes the peak carries
  up to that much slack per large tensor, and which chunk serves which
  tensor varies from process to process.
- `peak_tensor_bytes`: the peak of the bytes the live tensors asked for,
  summed from the allocator's allocation events (TensorFlow's profiler), so
  without chunk slack: what two methods' footprints differ by.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
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
    device = _checked(device)
    tf.config.experimental.reset_memory_stats(device)
    run()
    return int(tf.config.experimental.get_memory_info(device)["peak"])


def peak_tensor_bytes(run: Callable[[], Any], device: str | None = None
                      ) -> int:
    """The most bytes that live tensors on `device` asked for during `run()`.

    Like `peak_bytes`, but without the allocator's chunk slack: `run()` goes
    under TensorFlow's profiler, and the allocation and deallocation events
    of the device's allocator are replayed in time order, each allocation
    counting the bytes it requested. Tensors alive before `run()` count with
    the allocator's bytes in use at the start.

    Args:
        run: Work to measure; it runs once, profiled (slower than usual).
        device: A logical device name; `training_device()` by default.

    Returns:
        The peak in bytes.

    Raises:
        RuntimeError: As `peak_bytes`; also when the profile holds no
            allocation event of the device (a TensorFlow without memory
            profiling, or a device whose allocator is not BFC).
    """
    device = _checked(device)
    before = int(tf.config.experimental.get_memory_info(device)["current"])
    with tempfile.TemporaryDirectory(prefix="km_memory_profile_") as logdir:
        tf.profiler.experimental.start(
            logdir, tf.profiler.experimental.ProfilerOptions(
                host_tracer_level=3, python_tracer_level=0))
        try:
            run()
        finally:
            tf.profiler.experimental.stop()
        events = sorted(_allocation_events(logdir, _allocator_tag(device)))
    if not events:
        raise RuntimeError(
            f"TensorFlow's profiler recorded no allocation on {device}; "
            "measure with memory.peak_bytes (bench/memory.py) instead.")
    live: dict[int, int] = {}
    current = peak = 0
    for _, address, requested in events:
        if requested is None:
            current -= live.pop(address, 0)
        else:
            current += requested - live.get(address, 0)
            live[address] = requested
            peak = max(peak, current)
    return before + peak


def _checked(device: str | None) -> str:
    device = device or training_device()
    if _kind_and_index(device)[0] == "CPU" and not exact_cpu_counts():
        raise RuntimeError(
            "CPU memory counts would miss every tensor under 256 KiB: start "
            "the measuring process with TF_CPU_ALLOCATOR_USE_BFC=true in its "
            "environment (EXACT_CPU_COUNTS of bench/memory.py); it must be "
            "set before TensorFlow starts.")
    return device


def _kind_and_index(device: str) -> tuple[str, str]:
    """`("GPU", "1")` for "GPU:1", "/device:GPU:1" or "/job:w/.../GPU:1"."""
    name = device.upper().rsplit("/", 1)[-1].removeprefix("DEVICE:")
    kind, _, index = name.partition(":")
    return kind, index or "0"


def _allocator_tag(device: str) -> str:
    """What the name of `device`'s allocator holds ("GPU_0_bfc", "...cpu...")."""
    kind, index = _kind_and_index(device)
    return "cpu" if kind == "CPU" else f"{kind.lower()}_{index}_"


def _allocation_events(logdir: str, allocator_tag: str
                       ) -> Iterator[tuple[int, int, int | None]]:
    """`(time_ns, address, requested bytes or None for a free)` events of the
    allocators whose name holds `allocator_tag` (case-insensitive)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    for path in Path(logdir).rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
        for plane in space.planes:
            for line in plane.lines:
                for event in line.events:
                    kind = plane.event_metadata[event.metadata_id].name
                    if kind not in ("MemoryAllocation", "MemoryDeallocation"):
                        continue
                    stats = {plane.stat_metadata[stat.metadata_id].name:
                             _stat_value(plane, stat) for stat in event.stats}
                    if allocator_tag in str(stats["allocator_name"]).lower():
                        yield (line.timestamp_ns + event.offset_ps // 1000,
                               int(stats["addr"]),
                               int(stats["requested_bytes"])
                               if kind == "MemoryAllocation" else None)


def _stat_value(plane, stat) -> Any:
    """The value of one profiler statistic (names are stored by reference)."""
    field = stat.WhichOneof("value")
    if field == "ref_value":
        return plane.stat_metadata[stat.ref_value].name
    return getattr(stat, field)


def exact_cpu_counts() -> bool:
    """Whether this process's environment asks for the counting CPU allocator.

    (It takes effect only if it was set before TensorFlow started.)
    """
    return all(os.environ.get(name, "").lower() == value
               for name, value in EXACT_CPU_COUNTS.items())
