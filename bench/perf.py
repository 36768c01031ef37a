"""KM cost next to full fine-tuning and the plain base, as ratios, one run.

    .venv/bin/python bench/perf.py                       # 224px (GPU-sized)
    .venv/bin/python bench/perf.py --image_size=96 --batch_size=8 --steps=5

For MobileNetV2 (1.0) and ResNet50 (random weights: costs do not depend on
weight values), measured side by side on the same machine:

1. training: step time and peak memory of a KM step (default settings) and a
   full fine-tuning step, same batch, same optimizer (Adam), same traced
   train step (`transfer_suite.Trainer`). Step times: both methods in one
   process, stepped in turn (background load hits both alike). Peak memory:
   each method alone in a fresh process, at every `--memory_batch_sizes`:
   the peak bytes held by TensorFlow's allocator on the training device
   (`tf.config.experimental.get_memory_info`, GPU:0 or CPU:0) over the
   training steps: weights, optimizer state, activations, gradients.
2. export: seconds to convert the base to `.tflite` vs the KM path (save the
   task file, load it into the base, bake, convert) with the same preset.
3. inference: LiteRT batch-1 latency of the baked KM model over the base's,
   interleaved rounds.
4. storage: per-task bytes (`km_tf.task_report`) and the task file size over
   the full float32 model.

Writes `<output>.json` and `<output>.md`.
"""

import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from memory import EXACT_CPU_COUNTS  # noqa: E402
from results_io import provenance, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("mobilenet_v2", "resnet50")
TRAINING = ("km", "full")  # Method names of transfer_suite.METHODS.
MEMORY_STEPS = 3  # Measured steps per memory process, after a tracing step.
MEMORY_MEASURES = {  # peak_memory's keys: what each counts, in how many steps.
    "tensor": ("live tensors' own bytes", 1),
    "allocator": ("allocator peak, chunk slack included", MEMORY_STEPS),
}
NUM_CLASSES = 10

flags.DEFINE_list("models", list(MODELS), "Base networks to measure.")
flags.DEFINE_integer("image_size", 224, "Input size.")
flags.DEFINE_integer("batch_size", 32, "Training batch size (step time).")
flags.DEFINE_list("memory_batch_sizes", ["1", "8", "32"],
                  "Training batch sizes at which peak memory is measured.")
flags.DEFINE_integer("memory_repeats", 3, "Fresh processes per method and "
                     f"batch size for peak memory ({MEMORY_STEPS} measured "
                     "steps each, and one profiled step).")
flags.DEFINE_integer("steps", 20, "Timed rounds (one step of each method) "
                     "after 3 warm-up steps.")
flags.DEFINE_string("preset", "float32", "Export preset for export/latency.")
flags.DEFINE_integer("latency_runs", 20, "Timed LiteRT invokes per round.")
flags.DEFINE_integer("latency_rounds", 5, "Interleaved base/baked rounds.")
flags.DEFINE_integer("threads", 1, "LiteRT threads.")
flags.DEFINE_string("output", str(RESULTS / "perf"),
                    "Results path stem (.json and .md are written).")


def _task_model(model: str, image_size: int):
    import keras
    from km_tf import models

    keras.utils.set_random_seed(0)
    return models.build_model(model, NUM_CLASSES, image_size=image_size)


def _trainer_and_batch(model: str, method: str, image_size: int,
                       batch_size: int):
    """A traced-on-first-call `Trainer` for `method` and one random batch."""
    import numpy as np
    import tensorflow as tf
    import transfer_suite

    network = transfer_suite.METHODS[method].prepare(
        _task_model(model, image_size), 1)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal(
        (batch_size, image_size, image_size, 3), np.float32))
    labels = tf.constant(rng.integers(0, NUM_CLASSES, batch_size), tf.int32)
    return transfer_suite.Trainer(network, NUM_CLASSES), (images, labels)


def step_times(model: str, image_size: int, batch_size: int,
               steps: int) -> dict:
    """Median step time of every method in `TRAINING`, stepped in turn.

    All methods live in one process and alternate step by step, so that
    background load hits them alike. Call through `_in_child`.
    """
    trainers = {method: _trainer_and_batch(model, method, image_size,
                                           batch_size)
                for method in TRAINING}
    for trainer, batch in trainers.values():
        for _ in range(3):  # The first call traces.
            trainer.step(*batch)
    times = {method: [] for method in TRAINING}
    for _ in range(steps):
        for method, (trainer, batch) in trainers.items():
            start = time.perf_counter()
            trainer.step(*batch)  # float(loss) waits for the step.
            times[method].append(time.perf_counter() - start)
    return {method: {"step_seconds_median": statistics.median(values),
                     "trainable_variables":
                         len(trainers[method][0].model.trainable_variables)}
            for method, values in times.items()}


def peak_memory(model: str, method: str, image_size: int,
                batch_size: int) -> dict[str, list[int]]:
    """Peak training bytes of one method alone. Call through `_in_child`.

    Counts everything alive during training: weights, optimizer state,
    activations and gradients, after a tracing step. `"allocator"`: the
    allocator's peak in each of `MEMORY_STEPS` steps (`memory.peak_bytes`);
    `"tensor"`: the peak of the live tensors' own bytes in one more,
    profiled, step (`peak_tensor_bytes`, without the allocator's chunk
    slack). Peaks differ from step to step (parallel op scheduling changes
    what is alive at once), hence several steps and processes.
    """
    from memory import peak_bytes, peak_tensor_bytes

    trainer, batch = _trainer_and_batch(model, method, image_size,
                                        batch_size)
    trainer.step(*batch)
    allocator = [peak_bytes(lambda: trainer.step(*batch))
                 for _ in range(MEMORY_STEPS)]
    return {"allocator": allocator,
            "tensor": [peak_tensor_bytes(lambda: trainer.step(*batch))]}


def _spread(samples: list[int]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples),
            "max": max(samples), "samples": samples}


def _in_child(function, *args, environment: dict[str, str] | None = None):
    """Runs `function(*args)` in a fresh process; returns its result.

    `environment` is added to the child's environment (a spawned child
    copies the parent's at start), e.g. `memory.EXACT_CPU_COUNTS`,
    which must be set before TensorFlow starts.
    """
    context = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    os.environ.update(environment or {})
    try:
        with context.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(function, args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def export_latency_storage(model: str, image_size: int) -> dict:
    """Export seconds, LiteRT latency and bytes: base vs baked KM task."""
    import numpy as np
    import transfer_suite
    from km_tf import export, save_task, task_report
    from km_tf.export.litert import LiteRTModel

    FLAGS = flags.FLAGS
    base = _task_model(model, image_size)
    km_model = transfer_suite.METHODS["km"].prepare(base, 1)
    report = task_report(km_model)
    full_bytes = 4 * base.count_params()
    with tempfile.TemporaryDirectory(prefix="km_perf_") as folder:
        task_path = Path(folder, "task.kmtask")
        save_task(km_model, task_path)
        task_file_bytes = task_path.stat().st_size
        start = time.perf_counter()
        base_flatbuffer = export.convert(base, FLAGS.preset)
        base_seconds = time.perf_counter() - start
        start = time.perf_counter()
        baked = export.load_baked_task(base, task_path)
        baked_flatbuffer = export.convert(baked, FLAGS.preset)
        km_seconds = time.perf_counter() - start
    sample = np.random.default_rng(0).standard_normal(
        (1, image_size, image_size, 3)).astype(np.float32)
    runners = {"base": LiteRTModel(base_flatbuffer, FLAGS.threads),
               "baked_km": LiteRTModel(baked_flatbuffer, FLAGS.threads)}
    latency = {name: [] for name in runners}
    for _ in range(FLAGS.latency_rounds):
        for name, runner in runners.items():
            latency[name].append(runner.latency_ms(sample,
                                                   FLAGS.latency_runs))
    latency = {name: statistics.median(v) for name, v in latency.items()}
    return {
        "export_seconds": {"base": base_seconds,
                           "km_load_bake_convert": km_seconds},
        "export_ratio_km_over_base": km_seconds / base_seconds,
        "latency_ms": latency,
        "latency_ratio_baked_over_base": latency["baked_km"] / latency["base"],
        "tflite_bytes": {"base": len(base_flatbuffer),
                         "baked_km": len(baked_flatbuffer)},
        "task_report": report.to_dict(),
        "full_model_bytes": full_bytes,
        "task_file_bytes": task_file_bytes,
        "task_bytes_over_full": report.task_bytes / full_bytes,
        "task_file_over_full": task_file_bytes / full_bytes,
    }


def measure(model: str) -> dict:
    """Every measurement for one base network."""
    FLAGS = flags.FLAGS
    logging.info("%s: timing %s training steps in turn.", model, TRAINING)
    training = _in_child(step_times, model, FLAGS.image_size,
                         FLAGS.batch_size, FLAGS.steps)
    memory = {}
    for batch_size in (int(size) for size in FLAGS.memory_batch_sizes):
        logging.info("%s: peak memory of %s training, batch %d.", model,
                     " and ".join(TRAINING), batch_size)
        samples = {measure: {method: [] for method in TRAINING}
                   for measure in MEMORY_MEASURES}
        for _ in range(FLAGS.memory_repeats):
            for method in TRAINING:  # Alternating, like the step times.
                peaks = _in_child(peak_memory, model, method,
                                  FLAGS.image_size, batch_size,
                                  environment=EXACT_CPU_COUNTS)
                for measure, values in peaks.items():
                    samples[measure][method] += values
        memory[batch_size] = {}
        for measure, by_method in samples.items():
            spreads = {method: _spread(values)
                       for method, values in by_method.items()}
            memory[batch_size][measure] = {
                "peak_bytes": spreads,
                "ratio_km_over_full": (spreads["km"]["median"]
                                       / spreads["full"]["median"])}
    logging.info("%s: export, latency and storage.", model)
    rest = export_latency_storage(model, FLAGS.image_size)
    return {
        "training": training,
        "step_time_ratio_km_over_full": (
            training["km"]["step_seconds_median"]
            / training["full"]["step_seconds_median"]),
        "peak_memory": memory,
        **rest,
    }


def _megabytes(spread: dict) -> str:
    return (f"{spread['median'] / 1e6:.1f} [{spread['min'] / 1e6:.1f}-"
            f"{spread['max'] / 1e6:.1f}]")


def markdown(results: dict) -> str:
    """The ratio table and the machine."""
    lines = [
        "# KM cost: ratios measured side by side",
        "",
        *provenance(results),
        f"Input {results['image_size']}x{results['image_size']}, training "
        f"batch {results['batch_size']}, {NUM_CLASSES} classes, random "
        f"weights; KM = `km_tf.modulate` defaults; export preset "
        f"`{results['preset']}`, LiteRT {results['threads']} thread(s).",
        "",
        "| ratio | " + " | ".join(results["models"]) + " |",
        "|---|" + "---|" * len(results["models"]),
    ]
    rows = (
        ("KM step time / full fine-tuning step time",
         "step_time_ratio_km_over_full"),
        ("export time: KM (load task, bake, convert) / base convert",
         "export_ratio_km_over_base"),
        ("LiteRT latency: baked KM / base", "latency_ratio_baked_over_base"),
        ("per-task bytes (float32) / full model bytes",
         "task_bytes_over_full"),
        ("task file (compressed .kmtask) / full model bytes",
         "task_file_over_full"),
    )
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{results['results'][m][key]:.3f}" for m in results["models"])
            + " |")
    for measure, (what, steps) in MEMORY_MEASURES.items():
        lines += ["", f"Peak training memory, {what} (MB, median [min-max] "
                  f"over {results['memory_repeats']} processes x {steps} "
                  "step(s)):", "",
                  "| model | batch | KM | full fine-tuning (Adam) | "
                  "KM / full |", "|---|---|---|---|---|"]
        for model in results["models"]:
            for batch_size, row in results["results"][model][
                    "peak_memory"].items():
                row = row[measure]
                km, full = (row["peak_bytes"][method] for method in TRAINING)
                lines.append(f"| {model} | {batch_size} | {_megabytes(km)} | "
                             f"{_megabytes(full)} | "
                             f"{row['ratio_km_over_full']:.3f} |")
    lines += ["", "Absolute numbers (seconds, bytes, ms) are in the JSON.",
              "Peak memory counts everything alive on the training device "
              "(weights, optimizer state, activations, gradients), in fresh "
              "processes per method and batch size: the live tensors' own "
              "bytes (`bench/memory.py`'s `peak_tensor_bytes`, from the "
              "allocator's events in TensorFlow's profiler) and the "
              "allocator's peak "
              "(`peak_bytes`), which adds chunk slack of up to 128 MB per "
              "large tensor, varying from process to process. Full "
              "fine-tuning holds a gradient and two Adam slots per weight; "
              "KM holds each layer's modulated kernel (its modulator is "
              "recomputed in the backward pass, `km_tf.layers."
              "modulate_kernel`), and its convolutions compute the kernel "
              "gradient before the input gradient (`km_tf.layers."
              "convolve_kernel_gradient_first`), so an activation is freed "
              "before its gradient is allocated. Activations dominate at "
              "large batches.",
              ""]
    return "\n".join(lines)


def main(argv):
    del argv
    import tensorflow as tf

    FLAGS = flags.FLAGS
    start = time.perf_counter()
    results = {
        "command": " ".join(["python", *sys.argv]),
        "machine": (f"{platform.platform()}, {os.cpu_count()} CPUs, "
                    f"{len(tf.config.list_physical_devices('GPU'))} GPU(s), "
                    f"TensorFlow {tf.__version__}, load average "
                    f"{os.getloadavg()[0]:.1f} at start (shared machine)"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size,
        "memory_batch_sizes": [int(size) for size in
                               FLAGS.memory_batch_sizes],
        "memory_repeats": FLAGS.memory_repeats,
        "steps": FLAGS.steps, "preset": FLAGS.preset,
        "threads": FLAGS.threads, "models": FLAGS.models,
        "results": {model: measure(model) for model in FLAGS.models},
    }
    results["seconds_total"] = time.perf_counter() - start
    write_results(FLAGS.output, {".json": json.dumps(results, indent=1),
                                 ".md": markdown(results)})
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
