"""Transfer benchmark: KM against head / BN / LoRA / full fine-tuning.

One protocol, one base, the same budget for every method (see
`bench/transfer_suite.py` for the method table and the protocol). Writes
`<output>.json`, `<output>.png` and `--markdown` (RESULTS.md).

Offline suite (runs here on 2 CPU cores: a MobileNetV2 base pretrained on
FractalDB-style fractals and Greek + Cyrillic glyphs, 13 min once, then
cached in bench/cache/; six target tasks, 5 seeds, the rate chosen on 3;
the process runs TensorFlow on one thread with op determinism
(`--threads`), so split the methods over one process per core, e.g.
`--methods=head,bitfit,km,full` and
`--methods=bn_head,lora,lora_x4,lora_bn,lora_rule`, ~47 min each, then
merge them with `--report_only --merge=a.json,b.json`;
a row rerun alone reproduces its runs in the full run to the last digit):

    .venv/bin/python bench/transfer.py                 # baselines + KM
    .venv/bin/python bench/transfer.py --methods=ablation \\
        --output=/tmp/ablation --markdown=/tmp/ablation.md
    .venv/bin/python bench/ablation_table.py bench/results/transfer.json \\
        /tmp/ablation.json --markdown=/tmp/ABLATION.md

(`--methods=km_h8,km_f4` etc. run a part of the study.) The study in
bench/results/ABLATION.md ran under the earlier protocol (rate chosen at
seed 0, grid to 0.03, 3 seeds, TensorFlow's default threads), as four such
parts side by side; `ablation_table.py bench/results/transfer_3seeds.json
bench/results/ablation_*.json` rebuilds it. Files of different protocols do
not merge.

Online suites (ImageNet weights and tfds datasets are downloaded: needs
network; see bench/results/RESULTS.md for a time estimate):

    .venv/bin/python bench/transfer.py --suite=online_mobilenet_v2 \\
        --output=bench/results/transfer_mobilenet_v2 \\
        --markdown=bench/results/RESULTS_mobilenet_v2.md
    .venv/bin/python bench/transfer.py --suite=online_resnet50 ...

Smoke run (seconds): `--suite=smoke`.
"""

import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import transfer_report  # noqa: E402
import transfer_suite  # noqa: E402
from determinism import THREADS_HELP, make_reproducible  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

flags.DEFINE_enum("suite", "offline", list(transfer_suite.SUITES),
                  "Benchmark configuration (base, tasks, budget).")
flags.DEFINE_list("methods", None, "Methods to run: names from "
                  f"{list(transfer_suite.METHODS)}, or 'main' (default: the "
                  "baselines and the default KM), 'ablation' (the KM design "
                  "study), 'all'.")
flags.DEFINE_list("tasks", None, "Override the suite's task specs, e.g. "
                  "'digits:5-9'; shots/fractions come from the suite when the "
                  "spec is one of its tasks.")
flags.DEFINE_integer("steps", None, "Override training steps per run.")
flags.DEFINE_integer("seeds", None, "Override the number of seeds (the "
                     "sweep seeds become at most as many).")
flags.DEFINE_integer("sweep_seeds", None, "Override how many seeds sweep "
                     "the grid (the rate is chosen on their mean validation "
                     "accuracy).")
flags.DEFINE_list("learning_rates", None, "Override the sweep grid.")
flags.DEFINE_integer("image_size", None, "Override the base input size.")
flags.DEFINE_integer("pretrain_steps", None, "Override base pretraining.")
flags.DEFINE_string("model", None, "Override the base model (a km_tf.models "
                    "name, or 'tiny_convnet' for tests).")
flags.DEFINE_string("pretrain", None, "Override the base's source task: "
                    "dataset specs joined by spaces.")
flags.DEFINE_string("output", str(RESULTS / "transfer"),
                    "Results path stem (.json and .png are written).")
flags.DEFINE_string("markdown", str(RESULTS / "RESULTS.md"),
                    "Markdown report path.")
flags.DEFINE_bool("report_only", False,
                  "Rebuild the PNG and Markdown from `<output>.json` without "
                  "training (e.g. after a change to the report).")
flags.DEFINE_list("merge", None,
                  "With --report_only: result JSONs of runs of the same suite "
                  "with different --methods (e.g. two processes on two "
                  "cores), merged into `<output>.json` first; a method in "
                  "several takes the last one's runs.")
flags.DEFINE_integer("threads", 1, THREADS_HELP, lower_bound=0)
flags.DEFINE_string("cache_dir", str(Path(__file__).resolve().parent / "cache"),
                    "Where pretrained bases are cached (not in git).")


def configured_suite() -> transfer_suite.Suite:
    """The chosen suite with the flag overrides applied."""
    FLAGS = flags.FLAGS
    suite = transfer_suite.SUITES[FLAGS.suite]
    base = suite.base
    if FLAGS.image_size:
        base = dataclasses.replace(base, image_size=FLAGS.image_size)
    if FLAGS.pretrain_steps:
        base = dataclasses.replace(base, pretrain_steps=FLAGS.pretrain_steps)
    if FLAGS.model:
        base = dataclasses.replace(base, model=FLAGS.model)
    if FLAGS.pretrain:
        base = dataclasses.replace(base, pretrain=FLAGS.pretrain)
    changes = {"base": base}
    if FLAGS.tasks:
        known = {task.spec: task for task in
                 (*suite.tasks, *transfer_suite.OFFLINE_TASKS)}
        changes["tasks"] = tuple(
            known.get(spec, transfer_suite.TaskSpec(spec))
            for spec in FLAGS.tasks)
    if FLAGS.steps:
        changes["steps"] = FLAGS.steps
    if FLAGS.seeds:
        changes["seeds"] = FLAGS.seeds
        changes["sweep_seeds"] = min(suite.sweep_seeds, FLAGS.seeds)
    if FLAGS.sweep_seeds:
        changes["sweep_seeds"] = FLAGS.sweep_seeds
    if FLAGS.learning_rates:
        changes["learning_rates"] = tuple(float(r)
                                          for r in FLAGS.learning_rates)
    if FLAGS.methods:
        changes["methods"] = tuple(FLAGS.methods)
    return dataclasses.replace(suite, **changes)


def merged_results(parts: list[dict]) -> dict:
    """One result dict from runs of the same suite.

    A method in several parts takes its runs from the last of them (e.g. a
    row rerun after a change to it replaces the row of the full run). Rows
    come in the method table's order, whatever the parts' order.

    Raises:
        ValueError: The parts ran different suites or bases.
    """
    first = parts[0]
    merged = {**first, "methods": {}, "runs": [], "seconds_total": 0.0}
    for part in parts:
        differing = transfer_suite.suite_differences(first, part)
        if differing:
            raise ValueError(f"Cannot merge results of a different suite "
                             f"({', '.join(differing)} differ).")
        replaced = set(part["methods"])
        merged["runs"] = [run for run in merged["runs"]
                          if run["method"] not in replaced] + part["runs"]
        merged["methods"].update(part["methods"])
        merged["seconds_total"] += part["seconds_total"]
    order = list(transfer_suite.METHODS)
    merged["methods"] = dict(sorted(
        merged["methods"].items(),
        key=lambda item: (order.index(item[0]) if item[0] in order
                          else len(order))))
    merged["suite"] = {**first["suite"], "methods": list(merged["methods"])}
    merged["command"] = " && ".join(part.get("command", "?")
                                    for part in parts)
    if all("cpu_seconds" in part.get("machine", {}) for part in parts):
        merged["machine"] = {**first["machine"], "cpu_seconds": round(sum(
            part["machine"]["cpu_seconds"] for part in parts), 1)}
    merged["summary"] = transfer_suite.summarize(merged)
    return merged


def main(argv):
    del argv
    output = Path(flags.FLAGS.output)
    if flags.FLAGS.report_only:
        if flags.FLAGS.merge:
            results = merged_results([json.loads(Path(path).read_text())
                                      for path in flags.FLAGS.merge])
        else:
            results = json.loads(output.with_suffix(".json").read_text())
        transfer_report.write_all(results, output, flags.FLAGS.markdown)
        return
    make_reproducible(flags.FLAGS.threads)  # Training only.
    suite = configured_suite()
    cache_dir = flags.FLAGS.cache_dir
    load_before = os.getloadavg()[0]
    results = transfer_suite.run_suite(suite, cache_dir)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.update(
        command=" ".join(["python", *sys.argv]),
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine={"platform": platform.platform(),
                 "processor": platform.machine(),
                 "cpu_count": os.cpu_count(),
                 "tensorflow": tf.__version__, "keras": keras.__version__,
                 "gpus": len(tf.config.list_physical_devices("GPU")),
                 # Other work shares the machine: how busy it was, and how
                 # much CPU this run got.
                 "load_average_start_end": [round(load_before, 2),
                                            round(os.getloadavg()[0], 2)],
                 "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)},
    )
    transfer_report.write_all(results, output, flags.FLAGS.markdown)
    logging.info("Wrote %s.json/.png and %s (%.1f min).", output,
                 flags.FLAGS.markdown, results["seconds_total"] / 60)


if __name__ == "__main__":
    app.run(main)
