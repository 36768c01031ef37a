"""Export benchmark: int8 MobileNetV2 accuracy/size, KM latency cost, micro fit.

    .venv/bin/python bench/export_bench.py            # full run (~10-20 min)
    .venv/bin/python bench/export_bench.py --quick    # smoke run (~2 min)

Three measurements, written to bench/results/export.json and export.md:

1. MobileNetV2 (1.0, 224) int8: a base pretrained briefly on sklearn digits
   (upsampled to 224x224, the only real image data available offline; no
   ImageNet weights here), a KM task trained on it, baked and exported with
   the `int8` preset: export time, size, float-vs-int8 accuracy and top-1
   agreement on held-out digits.
2. KM inference cost: LiteRT latency of the baked task model vs the base
   model (same preset, same interpreter settings, interleaved rounds) as a
   ratio; KM bakes into the same graph, so the target is 1.00 +- noise.
3. Micro: MobileNetV2 (0.35, 96x96) exported with the `micro` preset; the
   arena measured by the real TFLite Micro interpreter and the flash size
   against 256 KB RAM / 1 MB flash.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import km_tf  # noqa: E402
from km_tf import export  # noqa: E402
from km_tf.export.litert import LiteRTModel  # noqa: E402
from results_io import machine_summary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

flags.DEFINE_bool("quick", False, "Tiny settings to check the bench runs.")
flags.DEFINE_integer("pretrain_epochs", 3, "Base pretraining epochs (224).")
flags.DEFINE_integer("task_epochs", 1, "KM task training epochs.")
flags.DEFINE_integer("calibration_samples", 200, "int8 calibration samples.")
flags.DEFINE_integer("latency_runs", 30, "Timed invokes per round.")
flags.DEFINE_integer("latency_rounds", 5, "Interleaved base/baked rounds.")
flags.DEFINE_integer("threads", 1, "LiteRT threads for latency.")
flags.DEFINE_string("output", str(RESULTS / "export"),
                    "Results path stem (.json and .md are written).")


def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as (n, size, size, 3) in [-1, 1] (MobileNet scaling)."""
    data = load_digits()
    images = keras.ops.convert_to_numpy(keras.ops.image.resize(
        data.images[..., None].astype(np.float32) / 8.0 - 1.0, (size, size),
        interpolation="bilinear"))
    return np.repeat(images, 3, axis=-1), data.target


def mobilenet_v2(size: int, alpha: float) -> keras.Model:
    """MobileNetV2 with 10 logits; BatchNorm momentum 0.9 (BUILD.md)."""
    model = keras.applications.MobileNetV2(
        (size, size, 3), alpha=alpha, weights=None, classes=10,
        classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def train(model: keras.Model, x, y, epochs: int, lr: float) -> None:
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=2)


def base_and_task(size: int, alpha: float, quick: bool, workdir: Path):
    """Pretrains a base, trains one KM task, returns (base, baked, data)."""
    workdir.mkdir(parents=True, exist_ok=True)
    x, y = digits(size)
    split = 1400
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    if quick:
        x_train, y_train = x_train[:256], y_train[:256]
        x_test, y_test = x_test[:64], y_test[:64]
    keras.utils.set_random_seed(0)
    base = mobilenet_v2(size, alpha)
    logging.info("Pretraining MobileNetV2 %.2f %d.", alpha, size)
    train(base, x_train, y_train, 1 if quick else flags.FLAGS.pretrain_epochs,
          1e-3)
    base.save(workdir / "base.keras")
    # Tasks are trained on the saved base, as apps/train.py does (an
    # in-memory keras.applications model names its input layer differently
    # from the reloaded one, which the base fingerprint sees).
    base = km_tf.models.load_base(workdir / "base.keras")
    km_model = km_tf.modulate(base, hidden_units=16)
    logging.info("Training a KM task.")
    train(km_model, x_train, y_train, flags.FLAGS.task_epochs, 1e-3)
    km_tf.save_task(km_model, workdir / "task.kmtask")
    baked = export.load_baked_task(workdir / "base.keras",
                                   workdir / "task.kmtask")
    return base, baked, (x_train, y_train, x_test, y_test)


def interleaved_latency(models: dict[str, bytes], sample: np.ndarray
                        ) -> dict[str, float]:
    """Median batch-1 latency (ms) per model over interleaved rounds."""
    runners = {name: LiteRTModel(data, num_threads=flags.FLAGS.threads)
               for name, data in models.items()}
    times = {name: [] for name in models}
    for _ in range(flags.FLAGS.latency_rounds):
        for name, runner in runners.items():
            times[name].append(runner.latency_ms(
                sample, runs=flags.FLAGS.latency_runs))
    return {name: float(np.median(values)) for name, values in times.items()}


def int8_and_latency(workdir: Path, quick: bool) -> dict:
    base, baked, (x_train, _, x_test, y_test) = base_and_task(
        224, 1.0, quick, workdir)
    start = time.perf_counter()
    result = export.export_model(
        baked, "int8", workdir / "out", "mobilenetv2_224",
        calibration_data=x_train,
        calibration_samples=flags.FLAGS.calibration_samples,
        heldout=(x_test, y_test), parity_samples=len(x_test))
    export_seconds = time.perf_counter() - start
    report = result.report
    logging.info("Converting base and baked float32/int8 for latency.")
    models = {
        "base_float32": export.convert(base, "float32"),
        "baked_float32": export.convert(baked, "float32"),
        "base_int8": export.convert(base, "int8", x_train, 50),
        "baked_int8": result.tflite_path.read_bytes(),
    }
    latency = interleaved_latency(models, x_test)
    return {
        "model": "MobileNetV2 alpha 1.0, 224x224x3, 10 classes",
        "export_seconds_total": round(export_seconds, 2),
        "conversion_seconds": report["conversion_seconds"],
        "int8_size_bytes": report["size_bytes"],
        "float32_size_bytes": len(models["baked_float32"]),
        "calibration_samples": report["calibration_samples"],
        "parity": report["parity"],
        "float_ops_on_path": report["float_ops_on_path"],
        "latency_ms": latency,
        "latency_ratio_baked_over_base": {
            preset: round(latency[f"baked_{preset}"]
                          / latency[f"base_{preset}"], 3)
            for preset in ("float32", "int8")},
        "litert_threads": flags.FLAGS.threads,
    }


def micro_fit(workdir: Path, quick: bool) -> dict:
    _, baked, (x_train, _, x_test, y_test) = base_and_task(
        96, 0.35, quick, workdir)
    result = export.export_model(
        baked, "micro", workdir / "out", "mobilenetv2_035_96",
        calibration_data=x_train,
        calibration_samples=flags.FLAGS.calibration_samples,
        heldout=(x_test, y_test), parity_samples=len(x_test))
    micro = result.report["micro"]
    return {
        "model": "MobileNetV2 alpha 0.35, 96x96x3, 10 classes, batch 1",
        "size_bytes": result.report["size_bytes"],
        "arena_used_bytes": micro["arena_used_bytes"],
        "arena_budget_bytes": micro["arena_budget_bytes"],
        "boards": micro["boards"],
        "micro_vs_litert": micro["micro_vs_litert"],
        "micro_vs_litert_reference_kernels":
            micro["micro_vs_litert_reference_kernels"],
        "parity": result.report["parity"],
    }


def markdown(results: dict) -> str:
    big, tiny = results["int8_mobilenetv2_224"], results["micro_mobilenetv2"]
    parity, lat = big["parity"], big["latency_ms"]
    board = tiny["boards"][0]
    return f"""# Export benchmark

Command: `{results['command']}`
Machine: {results['machine']}; {results['date']}.
Data: sklearn digits (8x8, upsampled to the model size), 1400 train /
{parity['samples']} held-out. No ImageNet weights offline: the base is
MobileNetV2 trained from scratch for a few epochs, then one KM task trained
on it. Accuracies are on this small real dataset, not ImageNet.

## MobileNetV2 (1.0, 224) int8

| metric | value | target |
|---|---|---|
| export time (convert + parity + report) | {big['export_seconds_total']} s (convert {big['conversion_seconds']} s) | |
| size int8 / float32 | {big['int8_size_bytes']:,} / {big['float32_size_bytes']:,} bytes | |
| float accuracy | {100 * parity['float_accuracy']:.1f}% | |
| int8 accuracy | {100 * parity['tflite_accuracy']:.1f}% | drop <= 1 point |
| accuracy drop | {parity['accuracy_drop_points']:.2f} points | <= 1 |
| top-1 agreement | {100 * parity['top1_agreement']:.1f}% | >= 97% |
| float ops on path | {big['float_ops_on_path'] or 'none'} | none |

## KM cost at inference (LiteRT, batch 1, {big['litert_threads']} thread(s))

| preset | base ms | baked KM task ms | ratio |
|---|---|---|---|
| float32 | {lat['base_float32']:.2f} | {lat['baked_float32']:.2f} | {big['latency_ratio_baked_over_base']['float32']} |
| int8 | {lat['base_int8']:.2f} | {lat['baked_int8']:.2f} | {big['latency_ratio_baked_over_base']['int8']} |

Target 1.00 +- noise: the baked model is the base graph with other kernel
values.

## Micro: {tiny['model']}

| metric | value |
|---|---|
| flash (model array) | {tiny['size_bytes']:,} bytes |
| arena (measured, TFLite Micro interpreter) | {tiny['arena_used_bytes']:,} bytes (reserve {tiny['arena_budget_bytes']:,}) |
| fits {board['description']} | {'yes' if board['fits'] else 'no'} (RAM headroom {board['ram_headroom_bytes']:,} B, flash headroom {board['flash_headroom_bytes']:,} B) |
| TFLM vs LiteRT (default kernels) top-1 agreement | {100 * tiny['micro_vs_litert']['top1_agreement']:.1f}% (max diff {tiny['micro_vs_litert']['max_abs_diff_quantized']} quantized units, {tiny['micro_vs_litert']['samples']} samples) |
| TFLM vs LiteRT (reference kernels) top-1 agreement | {100 * tiny['micro_vs_litert_reference_kernels']['top1_agreement']:.1f}% (max diff {tiny['micro_vs_litert_reference_kernels']['max_abs_diff_quantized']} quantized units) |
| float vs micro int8 top-1 agreement | {100 * tiny['parity']['top1_agreement']:.1f}% |
| accuracy float / micro int8 | {100 * tiny['parity']['float_accuracy']:.1f}% / {100 * tiny['parity']['tflite_accuracy']:.1f}% ({tiny['parity']['samples']} held-out) |

The arena is measured on a 64-bit host; 32-bit MCUs need a little less.
Flash headroom must also hold the TFLM runtime and the application.
"""


def main(argv):
    del argv
    quick = flags.FLAGS.quick
    results = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_summary(),
        "date": time.strftime("%Y-%m-%d"),
        "quick": quick,
    }
    with tempfile.TemporaryDirectory(prefix="km_export_bench_") as tmp:
        results["micro_mobilenetv2"] = micro_fit(Path(tmp, "micro"), quick)
        results["int8_mobilenetv2_224"] = int8_and_latency(Path(tmp, "int8"),
                                                           quick)
    stem = Path(flags.FLAGS.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=2)),
                         (".md", markdown(results))):
        path = stem.with_suffix(suffix)
        with open(f"{path}.tmp", "w") as stream:
            stream.write(text)
        os.replace(f"{path}.tmp", path)
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
