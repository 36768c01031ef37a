"""Task packs on the device side: pack size, task switch time, served latency.

    .venv/bin/python bench/packs.py                 # MobileNetV2 1.0, 224 px
    .venv/bin/python bench/packs.py --alpha=0.35 --image_size=32 \
        --classes=3 --presets=float32,int8 --repeats=1   # smoke run

One base (`km_tf.models.build_model`, random weights: no network here) with
non-trivial BatchNorm (moving statistics of random pixel images, random gamma
and beta) and two task files of it with random modulators and heads: one
that trains BatchNorm per task (`batchnorm="train"`, the default; its
BatchNorm values differ from the base's) and one that keeps the base's
(`batchnorm="freeze"`). Per preset (float32, float16, int8; micro on
request, it is for MCUs) the template and plan are exported once and each
task as a pack (default pack storage), then:

1. size: pack bytes over the task's own `.tflite` (what you would ship
   without packs); target <= 3%. Template and plan bytes too.
2. task switch on the device: `apply_pack(template, plan, pack)` +
   `Interpreter(model_content=...)` + `allocate_tensors()`, median of
   `--repeats`, split into apply and interpreter creation (the plan is
   parsed once, as a service keeps it; its parse time is reported apart).
   The first invoke after the switch is reported apart as well.
3. served latency: the applied model over the task's `.tflite` from the
   converter (`PackResult.reference_tflite`), both in LiteRT with the default
   (XNNPACK) delegate and `--threads` threads, interleaved rounds, median
   batch-1 invoke time; target 1.00 +- noise. Whether the applied bytes equal
   the conversion (`report["applied_equals_conversion"]`) is reported too.

Writes `<output>.json` and `<output>.md` (default bench/results/packs.*).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import km_tf  # noqa: E402
from km_tf import models  # noqa: E402
from km_tf.deploy import applier, export, formats  # noqa: E402
from km_tf.export.litert import LiteRTModel  # noqa: E402
from results_io import (  # noqa: E402
    machine_summary, provenance, write_report)

RESULTS = Path(__file__).resolve().parent / "results"
BATCHNORM_MODES = ("train", "freeze")  # Per-task BatchNorm, the base's.
PACK_TARGET = 0.03  # pack bytes / task .tflite bytes


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (tests
    import this module next to other bench modules with flags of the same
    names)."""
    flags.DEFINE_string("model", "mobilenet_v2",
                        f"Base network ({', '.join(models.MODEL_NAMES)}).")
    flags.DEFINE_float("alpha", 1.0, "Width multiplier.")
    flags.DEFINE_integer("image_size", 224, "Input height and width.")
    flags.DEFINE_integer("classes", 10,
                         "Classes of the tasks and the template.")
    flags.DEFINE_list("presets", ["float32", "float16", "int8"],
                      "Export presets (micro too on request: it is for MCUs).")
    flags.DEFINE_list("batchnorm", list(BATCHNORM_MODES),
                      "Tasks to pack: 'train' (BatchNorm per task, the "
                      "default of km_tf.modulate) and/or 'freeze' (the "
                      "base's).")
    flags.DEFINE_integer("hidden_units", None,
                         "Modulator hidden units (default: km_tf's).")
    flags.DEFINE_integer("calibration_samples", 16,
                         "Random pixel images calibrating integer presets.")
    flags.DEFINE_integer("repeats", 10, "Task switches timed per pack.")
    flags.DEFINE_integer("latency_runs", 20, "Timed invokes per round.")
    flags.DEFINE_integer("latency_rounds", 5,
                         "Interleaved applied / converter-export rounds.")
    flags.DEFINE_integer("threads", 1, "LiteRT threads (both models).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("output", str(RESULTS / "packs"),
                        "Results path stem (.json and .md are written).")


@dataclasses.dataclass(frozen=True)
class Config:
    """What `measure` runs; `main` fills it from the flags."""

    model: str = "mobilenet_v2"
    alpha: float = 1.0
    image_size: int = 224
    classes: int = 10
    presets: tuple[str, ...] = ("float32", "float16", "int8")
    batchnorm: tuple[str, ...] = BATCHNORM_MODES
    hidden_units: int | None = None
    calibration_samples: int = 16
    repeats: int = 10
    latency_runs: int = 20
    latency_rounds: int = 5
    threads: int = 1
    seed: int = 0


# ------------------------------------------------------------ base and tasks

def random_pixels(n: int, size: int, seed: int) -> np.ndarray:
    """`n` random RGB images, pixels in [0, 255] (the models normalise)."""
    return np.random.default_rng(seed).uniform(
        0.0, 255.0, (n, size, size, 3)).astype(np.float32)


def _batchnorms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def build_base(config: Config) -> keras.Model:
    """The base with realistic BatchNorm: moving statistics of a batch of
    random pixel images (each layer sees its inputs' real scale), gamma
    around 1 and beta around 0."""
    keras.utils.set_random_seed(config.seed)
    base = models.build_model(config.model, config.classes,
                              image_size=config.image_size,
                              alpha=config.alpha)
    rng = np.random.default_rng(config.seed)
    batchnorms = _batchnorms(base)
    momenta = [layer.momentum for layer in batchnorms]
    for layer in batchnorms:
        layer.momentum = 0.0  # moving statistics := this batch's
    base(random_pixels(16, config.image_size, config.seed + 1),
         training=True)
    for layer, momentum in zip(batchnorms, momenta):
        layer.momentum = momentum
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([
            rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
            rng.normal(0.0, 0.2, beta.shape).astype(np.float32),
            mean, variance])
    return base


def make_task(base: keras.Model, config: Config, batchnorm: str,
              seed: int) -> keras.Model:
    """A task model with random (non-identity) modulators, a random head
    and, with `batchnorm="train"`, BatchNorm values other than the base's."""
    options = {"batchnorm": batchnorm}
    if config.hidden_units is not None:
        options["hidden_units"] = config.hidden_units
    task = models.build_task_model(base, config.classes, **options)
    rng = np.random.default_rng(seed)
    for layer in task.layers:
        if hasattr(layer, "modulator"):
            hidden_kernel, hidden_bias, output_kernel, output_bias = (
                layer.modulator.get_weights())
            layer.modulator.set_weights([
                hidden_kernel,  # Glorot-uniform, hidden bias U(-1, 1)
                hidden_bias,
                rng.normal(0.0, 0.05, output_kernel.shape).astype(np.float32),
                rng.normal(0.0, 0.05, output_bias.shape).astype(np.float32)])
    if batchnorm == "train":
        for layer in _batchnorms(task):
            gamma, beta, mean, variance = layer.get_weights()
            shape = gamma.shape
            layer.set_weights([
                gamma * rng.uniform(0.8, 1.2, shape).astype(np.float32),
                beta + rng.normal(0.0, 0.1, shape).astype(np.float32),
                mean + rng.normal(0.0, 0.1, shape).astype(np.float32)
                * np.sqrt(variance),
                variance * rng.uniform(0.8, 1.2, shape).astype(np.float32)])
    head = task.layers[-1]
    head.set_weights([rng.normal(0.0, 0.05, w.shape).astype(np.float32)
                      for w in head.get_weights()])
    return task


# ----------------------------------------------------------------- measuring

def switch_times(template: bytes, plan: formats.Plan, pack: bytes,
                 sample: np.ndarray, config: Config) -> dict[str, Any]:
    """Median ms of apply, interpreter creation + allocate, their sum, and
    the first invoke after the switch, over `config.repeats` switches."""
    times: dict[str, list[float]] = {"apply_ms": [], "interpreter_ms": [],
                                     "switch_ms": [], "first_invoke_ms": []}
    for _ in range(config.repeats):
        start = time.perf_counter()
        model = applier.apply_pack(template, plan, pack)
        applied = time.perf_counter()
        interpreter = Interpreter(model_content=model,
                                  num_threads=config.threads)
        interpreter.allocate_tensors()
        created = time.perf_counter()
        details = interpreter.get_input_details()[0]
        interpreter.set_tensor(details["index"], _typed(sample,
                                                         details["dtype"]))
        invoke = time.perf_counter()
        interpreter.invoke()
        done = time.perf_counter()
        times["apply_ms"].append(1e3 * (applied - start))
        times["interpreter_ms"].append(1e3 * (created - applied))
        times["switch_ms"].append(1e3 * (created - start))
        times["first_invoke_ms"].append(1e3 * (done - invoke))
        del interpreter, model
    return {"repeats": config.repeats,
            **{name: round(float(np.median(values)), 3)
               for name, values in times.items()}}


def _typed(pixels: np.ndarray, dtype) -> np.ndarray:
    """Pixels as an input of `dtype` (an integer input gets them shifted
    into its range; the values do not matter for timing)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(pixels) + info.min, info.min,
                       info.max).astype(dtype)
    return pixels.astype(dtype)


def served_latency(applied: bytes, reference: bytes, sample: np.ndarray,
                   config: Config) -> dict[str, Any]:
    """Median batch-1 invoke ms of both models, interleaved rounds (order
    alternating), and applied / reference."""
    runners = {"applied": LiteRTModel(applied, num_threads=config.threads),
               "reference": LiteRTModel(reference,
                                        num_threads=config.threads)}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(config.latency_rounds):
        order = list(runners)[::1 if round_index % 2 == 0 else -1]
        for name in order:
            times[name].append(runners[name].latency_ms(
                sample, runs=config.latency_runs))
    medians = {name: float(np.median(values))
               for name, values in times.items()}
    return {"applied_ms": round(medians["applied"], 3),
            "reference_ms": round(medians["reference"], 3),
            "ratio": round(medians["applied"] / medians["reference"], 3),
            "rounds": config.latency_rounds, "runs": config.latency_runs,
            "threads": config.threads}


def measure_preset(base: keras.Model, preset: str,
                   tasks: dict[str, Path], calibration: np.ndarray,
                   sample: np.ndarray, workdir: Path,
                   config: Config) -> dict[str, Any]:
    """Template, plan and every task's pack for one preset, measured."""
    logging.info("%s: exporting the template.", preset)
    start = time.perf_counter()
    files = export.export_template(
        base, preset, workdir, "base", classes=config.classes,
        calibration_data=calibration)
    template_seconds = time.perf_counter() - start
    template = files.template_bytes
    plan_bytes = files.plan_path.read_bytes()
    start = time.perf_counter()
    plan = formats.read_plan(plan_bytes)
    plan_load_ms = 1e3 * (time.perf_counter() - start)
    rows = []
    for batchnorm, task_path in tasks.items():
        logging.info("%s: exporting the pack of the BN-%s task.", preset,
                     batchnorm)
        start = time.perf_counter()
        result = export.export_pack(base, task_path, files, workdir,
                                    f"task_bn_{batchnorm}",
                                    calibration_data=calibration)
        pack_seconds = time.perf_counter() - start
        report = result.report
        pack = result.pack_path.read_bytes()
        logging.info("%s: timing switches and serving.", preset)
        switch = switch_times(template, plan, pack, sample, config)
        applied = applier.apply_pack(template, plan, pack)
        latency = served_latency(applied, result.reference_tflite, sample,
                                 config)
        rows.append({
            "batchnorm": batchnorm,
            "batchnorm_in_pack": report["batchnorm_in_pack"],
            "storage": report["storage"],
            "plan_kernels": report["plan_kernels"],
            "pack_bytes": report["pack_bytes"],
            "task_tflite_bytes": report["task_tflite_bytes"],
            "pack_to_tflite": round(report["pack_to_tflite"], 5),
            "meets_target": report["pack_to_tflite"] <= PACK_TARGET,
            "applied_equals_conversion": report["applied_equals_conversion"],
            "applied_bytes_identical": applied == result.reference_tflite,
            "pack_export_seconds": round(pack_seconds, 2),
            "switch": switch,
            "latency": latency,
        })
    return {"preset": preset, "weight_type": plan.weight_type,
            "template_bytes": len(template), "plan_bytes": len(plan_bytes),
            "plan_load_ms": round(plan_load_ms, 3),
            "template_export_seconds": round(template_seconds, 2),
            "rows": rows}


def measure(config: Config, workdir: str | os.PathLike | None = None
            ) -> dict[str, Any]:
    """Runs every measurement of `config`; returns the results (JSON-ready).

    Args:
        config: Model, size, presets and repeat counts.
        workdir: Folder for the task files, templates and packs (default: a
            temporary folder, removed afterwards).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="km_packs_bench_") as tmp:
            return measure(config, tmp)
    workdir = Path(workdir)
    started = time.perf_counter()
    base = build_base(config)
    tasks = {}
    for batchnorm in config.batchnorm:
        index = BATCHNORM_MODES.index(batchnorm)
        task = make_task(base, config, batchnorm, config.seed + 10 + index)
        tasks[batchnorm] = workdir / f"task_bn_{batchnorm}.kmtask"
        km_tf.save_task(task, tasks[batchnorm])
        del task
    calibration = random_pixels(config.calibration_samples,
                                config.image_size, config.seed + 2)
    sample = random_pixels(1, config.image_size, config.seed + 3)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "machine": machine_summary(),
        "date": time.strftime("%Y-%m-%d"),
        "base_params": int(base.count_params()),
        "pack_target": PACK_TARGET,
        "presets": {},
    }
    for preset in config.presets:
        results["presets"][preset] = measure_preset(
            base, preset, tasks, calibration, sample, workdir / preset,
            config)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


# ------------------------------------------------------------------ writing

def markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        "# Task packs: size, switch time, served latency",
        "",
        *provenance(results, default_command="measure()"),
        f"Base: {config['model']} alpha {config['alpha']}, "
        f"{config['image_size']}x{config['image_size']}x3, "
        f"{config['classes']} classes ({results['base_params']:,} params), "
        "random weights with non-trivial BatchNorm; tasks with random "
        "modulators and heads, default pack storage, int8 calibrated on "
        f"{config['calibration_samples']} random images.",
        "",
        "| preset | BN | pack bytes | task .tflite bytes | pack / .tflite "
        "| applied == conversion | apply ms | interpreter ms | switch ms "
        "| first invoke ms | served ms (applied / .tflite) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, entry in results["presets"].items():
        for row in entry["rows"]:
            switch, latency = row["switch"], row["latency"]
            lines.append(
                f"| {preset} | {row['batchnorm']} | {row['pack_bytes']:,} | "
                f"{row['task_tflite_bytes']:,} | "
                f"{100 * row['pack_to_tflite']:.2f}% | "
                f"{'yes' if row['applied_equals_conversion'] else 'NO'} | "
                f"{switch['apply_ms']:.1f} | {switch['interpreter_ms']:.1f} | "
                f"{switch['switch_ms']:.1f} | "
                f"{switch['first_invoke_ms']:.1f} | "
                f"{latency['applied_ms']:.2f} / {latency['reference_ms']:.2f}"
                f" | {latency['ratio']:.3f} |")
    lines += ["", "| preset | template bytes | plan bytes | plan parse ms "
              "| template export s |", "|---|---|---|---|---|"]
    for preset, entry in results["presets"].items():
        lines.append(
            f"| {preset} | {entry['template_bytes']:,} | "
            f"{entry['plan_bytes']:,} | {entry['plan_load_ms']:.1f} | "
            f"{entry['template_export_seconds']} |")
    lines += [
        "",
        f"Targets: pack / .tflite <= {100 * results['pack_target']:.0f}%; "
        "served latency ratio 1.00 +- noise. BN `train`: BatchNorm per task "
        "(default, folded BN in the pack); `freeze`: the base's BatchNorm. "
        f"Switch: median of {config['repeats']} `apply_pack` (plan parsed "
        "once) + `Interpreter(model_content=...)` + `allocate_tensors()`; "
        "first invoke apart. Served: LiteRT, default XNNPACK delegate, "
        f"{config['threads']} thread(s), {config['latency_rounds']} "
        f"interleaved rounds of {config['latency_runs']} batch-1 invokes, "
        "median.",
    ]
    identical = sorted({f"{preset}/{row['batchnorm']}"
                        for preset, entry in results["presets"].items()
                        for row in entry["rows"]
                        if row["applied_bytes_identical"]})
    lines += [
        "",
        "\"applied == conversion\" is `export_pack`'s check: same graph, "
        "every constant's bytes, every scale and zero point; tensor names "
        "aside (the converter names tensors after the Keras layers of the "
        "task). Whole files byte-identical, names included: "
        f"{', '.join(identical) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def config_from_flags() -> Config:
    flag = flags.FLAGS
    return Config(
        model=flag.model, alpha=flag.alpha, image_size=flag.image_size,
        classes=flag.classes, presets=tuple(flag.presets),
        batchnorm=tuple(flag.batchnorm),
        hidden_units=flag.hidden_units,
        calibration_samples=flag.calibration_samples, repeats=flag.repeats,
        latency_runs=flag.latency_runs, latency_rounds=flag.latency_rounds,
        threads=flag.threads, seed=flag.seed)


def main(argv):
    del argv
    results = measure(config_from_flags())
    results = {"command": " ".join(["python", *sys.argv]), **results}
    print(write_report(flags.FLAGS.output, results, markdown))


if __name__ == "__main__":
    define_flags()
    app.run(main)
