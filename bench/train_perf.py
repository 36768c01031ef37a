"""Benchmark: KM task training vs full fine-tuning, step time and memory.

    python bench/train_perf.py                         # CPU-sized defaults
    python bench/train_perf.py --image_size=224 --batch_size=32   # on a GPU

Both variants train MobileNetV2 with Adam on the same random batch:
`full` fine-tunes every weight of the classifier; `km` trains a
kernel-modulated copy (`km_tf.models.build_task_model`), one per `--forms`
entry. Step time: all variants live in one process, are warmed up, then
stepped in alternation (`--steps` rounds) and the median is taken, so that
background load hits them alike. Peak memory: each variant runs alone in a
fresh subprocess (build, warm-up, the same steps) and reports the peak of
TensorFlow's allocator over the steps (`memory.peak_bytes`: weights,
Adam slots, activations, gradients; GPU:0 or CPU:0), then the peak of the
live tensors' own bytes in one more, profiled, step
(`memory.peak_tensor_bytes`: no allocator chunk slack).

Writes `{output_dir}/train_perf.json` and `.md`. A benchmark, not a test.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from km_tf import layers, models, task_report, training  # noqa: E402
from km_tf.tasks import write_atomically  # noqa: E402
from memory import (EXACT_CPU_COUNTS, peak_bytes,  # noqa: E402
                    peak_tensor_bytes, training_device)

flags.DEFINE_integer("image_size", 160, "Input height and width.")
flags.DEFINE_integer("batch_size", 16, "Batch size of every step.")
flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("num_classes", 10, "Classes of the head.")
flags.DEFINE_integer("hidden_units", layers.DEFAULT_HIDDEN_UNITS,
                     "KM modulator width (spatial units).")
flags.DEFINE_integer("filter_units", layers.DEFAULT_FILTER_UNITS,
                     "KM modulator width (filter units).")
flags.DEFINE_list("forms", [layers.DEFAULT_FORM, "spatial"],
                  "KM modulator forms to measure.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per variant.")
flags.DEFINE_integer("steps", 10, "Timed rounds (one step of each variant).")
flags.DEFINE_string("output_dir", "bench/results", "Where results go.")
flags.DEFINE_string("memory_of", None, "Internal: measure the peak memory of "
                    "this one variant and print it as JSON.")

FLAGS = flags.FLAGS
FULL = "full"


def _variants() -> list[str]:
    return [FULL] + [f"km_{form}" for form in FLAGS.forms]


def build_variant(name: str) -> keras.Model:
    """A compiled classifier: `full` fine-tuning or a KM task (`km_FORM`)."""
    base = models.build_model("mobilenet_v2", FLAGS.num_classes,
                              image_size=FLAGS.image_size, alpha=FLAGS.alpha)
    model = base if name == FULL else models.build_task_model(
        base, FLAGS.num_classes, hidden_units=FLAGS.hidden_units,
        filter_units=FLAGS.filter_units, form=name.removeprefix("km_"))
    training.compile_classifier(model, keras.optimizers.Adam(1e-4))
    return model


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (FLAGS.batch_size, FLAGS.image_size,
                                 FLAGS.image_size, 3)).astype("float32")
    return images, rng.integers(0, FLAGS.num_classes, FLAGS.batch_size)


def _step(model: keras.Model, batch) -> float:
    start = time.perf_counter()
    model.train_on_batch(*batch)  # Returns numpy: the step has finished.
    return time.perf_counter() - start


def measure_times() -> dict[str, dict]:
    """Median step time of every variant, stepped in alternation."""
    batch = _batch()
    built = {name: build_variant(name) for name in _variants()}
    for model in built.values():
        for _ in range(FLAGS.warmup):
            _step(model, batch)
    times = {name: [] for name in built}
    for _ in range(FLAGS.steps):
        for name, model in built.items():
            times[name].append(_step(model, batch))
    results = {}
    for name, model in built.items():
        results[name] = {
            "median_step_s": statistics.median(times[name]),
            "step_s": [round(t, 5) for t in times[name]],
            "trainable_params": int(sum(np.prod(v.shape)
                                        for v in model.trainable_variables)),
        }
        if name != FULL:
            results[name]["task"] = task_report(model).to_dict()
    return results


def measure_memory_here(name: str) -> dict:
    """Peak memory of one variant's build, warm-up and steps (this process)."""
    batch = _batch()
    model = build_variant(name)

    def train() -> None:
        for _ in range(FLAGS.warmup + FLAGS.steps):
            _step(model, batch)

    allocator = peak_bytes(train)
    tensors = peak_tensor_bytes(lambda: _step(model, batch))
    return {"peak_mb": allocator / 2**20, "tensor_peak_mb": tensors / 2**20,
            "memory_device": training_device()}


def measure_memory(name: str) -> dict:
    """Runs `measure_memory_here` for one variant in a fresh process."""
    passed = [f"--{flag}={FLAGS[flag].serialize().split('=', 1)[1]}"
              for flag in ("image_size", "batch_size", "alpha", "num_classes",
                           "hidden_units", "filter_units", "warmup", "steps")]
    result = subprocess.run(
        [sys.executable, __file__, *passed, f"--memory_of={name}"],
        env={**os.environ, **EXACT_CPU_COUNTS}, capture_output=True,
        text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"Memory run of {name!r} failed:\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """What ran the benchmark."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpus = tf.config.list_physical_devices("GPU")
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "gpus": [tf.config.experimental.get_device_details(g).get(
                "device_name", g.name) for g in gpus],
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "load_average_at_start": os.getloadavg()}


def to_markdown(results: dict) -> str:
    rows = ["| variant | median step (s) | vs full | peak tensors (MB) | "
            "allocator peak (MB) | trainable params |",
            "|---|---|---|---|---|---|"]
    full = results["variants"][FULL]
    for name, row in results["variants"].items():
        rows.append(
            f"| {name} | {row['median_step_s']:.4f} | "
            f"{row['median_step_s'] / full['median_step_s']:.2f}x | "
            f"{_with_ratio(row, full, 'tensor_peak_mb')} | "
            f"{_with_ratio(row, full, 'peak_mb')} | "
            f"{row['trainable_params']:,} |")
    setup = results["setup"]
    return "\n".join([
        "# KM task training vs full fine-tuning (MobileNetV2, Adam)", "",
        f"Command: `{results['command']}`", "",
        f"Setup: {json.dumps(setup)}", "",
        f"Machine: {json.dumps(results['machine'])}", "", *rows, "",
        "Step time: median of alternating steps in one process. Peak "
        "memory: each variant alone in a fresh process, counting weights, "
        "Adam slots, activations and gradients: the live tensors' own bytes "
        "in one profiled step, and the peak of TensorFlow's allocator over "
        "the steps (with its chunk slack).", ""])


def _with_ratio(row: dict, full: dict, key: str) -> str:
    return f"{row[key]:.1f} ({row[key] / full[key]:.2f}x)"


def main(argv):
    del argv
    if FLAGS.memory_of:
        print(json.dumps(measure_memory_here(FLAGS.memory_of)))
        return
    results = {
        "command": "python " + " ".join(sys.argv),
        "setup": {flag: FLAGS[flag].value for flag in (
            "image_size", "batch_size", "alpha", "hidden_units",
            "filter_units", "warmup", "steps")},
        "machine": machine(),
        "variants": measure_times(),
    }
    for name in results["variants"]:
        results["variants"][name].update(measure_memory(name))
    full = results["variants"][FULL]["median_step_s"]
    for name, row in results["variants"].items():
        row["time_ratio_vs_full"] = round(row["median_step_s"] / full, 3)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    path = os.path.join(FLAGS.output_dir, "train_perf")
    write_atomically(path + ".json",
                      (json.dumps(results, indent=2) + "\n").encode())
    write_atomically(path + ".md", to_markdown(results).encode())
    print(to_markdown(results))


if __name__ == "__main__":
    app.run(main)
