"""Where a meta-trained network's task adaptation pays: a km-meta-train run
scored with its inner loop restricted to parts of the network.

    .venv/bin/python bench/meta_adaptation.py --run_dir=runs/meta \\
        --output=bench/results/meta_adaptation

A km-meta-train run of km_maml, maml or anil leaves its meta-trained base
(`meta_base.keras`; km_maml also its meta-learned initial task,
`meta_init.kmtask`) and its settings (`meta.report.json`). This program
rebuilds the run's learner and scores the run's meta-validation and
meta-test episodes (the same ones km-meta-train draws) once per
*adaptation*, i.e. per set of weights the inner loop adapts:

    as meta-trained    what the method adapts (km_maml: modulators + head,
                       maml: every weight, anil: the head)
    head only          the head alone (ANIL's adaptation of this network)
    head + BatchNorm   the head and every BatchNorm gamma and beta
    head + <conv>      the head and one convolution: its modulator (km_maml)
                       or its kernel and bias (maml, anil)

Every adaptation uses the run's inner steps and rates at test; the other
weights stay at their meta-trained values. Query sets are scored with their
own batch statistics (transductive) and with statistics re-estimated on the
support set (what a deployed task with its own statistics computes). Each
adaptation's difference to "as meta-trained" is paired per episode.

It answers what the benchmark's totals do not: what KM-MAML's modulator
steps add (its "head only" row), and which weights MAML's advantage lives
in (BUILD.md, "Few-shot meta-learning").

Writes `<output>.json` and `<output>.md`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import km_tf  # noqa: E402
from km_tf import meta, models  # noqa: E402
from km_tf.cli import meta_train  # noqa: E402
from km_tf.layers import KM_LAYERS  # noqa: E402
from km_tf.meta import pools as meta_pools  # noqa: E402
from km_tf.walk import BATCHNORM_TYPES, is_convolution, walk_layers  # noqa: E402

from determinism import THREADS_HELP, make_reproducible  # noqa: E402
from results_io import (  # noqa: E402
    machine_summary, provenance, write_report)

METHODS = ("km_maml", "maml", "anil")
SPLITS = ("validation", "test")
STATISTICS = ("query", "support")
AS_TRAINED = "as meta-trained"
HEAD_ONLY = "head only"


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings of a finished km_maml, maml or anil run of
    km-meta-train.

    Raises:
        FileNotFoundError: The folder lacks the run's report, base or (for
            km_maml) initial task: the run has not finished.
        ValueError: The run fine-tuned (it meta-trained nothing), or
            meta-learned its inner rates (this program adapts with the
            fixed ones).
    """
    run_dir = Path(run_dir)
    report = run_dir / f"{meta_train.REPORT_NAME}.json"
    for path in (report, run_dir / meta_train.BASE_FILE):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: pass the --output_dir of a finished "
                "km-meta-train run.")
    settings = json.loads(report.read_text())["settings"]
    if settings["method"] not in METHODS:
        raise ValueError(
            f"{run_dir} is a --method={settings['method']} run, which "
            "meta-trains nothing; pass a run of "
            f"{', '.join(METHODS)}.")
    if (settings["method"] == "km_maml"
            and not (run_dir / meta_train.META_INIT_FILE).is_file()):
        raise FileNotFoundError(
            f"{run_dir / meta_train.META_INIT_FILE} is missing: pass the "
            "--output_dir of a finished km-meta-train run.")
    if settings["learn_inner_rates"]:
        raise ValueError(f"{run_dir} meta-learned its inner rates; this "
                         "program adapts with fixed ones. Pass a run without "
                         "--learn_inner_rates.")
    return settings


def options_of(settings: dict[str, Any]) -> meta.MetaOptions:
    """The inner-loop options the run adapted tasks with."""
    return meta.MetaOptions(
        inner_steps=settings["inner_steps"],
        inner_learning_rate=settings["inner_learning_rate"],
        modulator_learning_rate=settings.get("modulator_learning_rate"),
        last_modulator_learning_rate=settings.get(
            "last_modulator_learning_rate"),
        eval_inner_steps=settings["eval_inner_steps"],
        zero_head=settings.get("zero_head", False))


def rebuild_learner(run_dir: str | os.PathLike, settings: dict[str, Any]
                    ) -> meta.MetaLearner:
    """The run's learner, holding the run's meta-trained weights.

    The learner is built in code, as km-meta-train builds it, and the
    weights are copied from the run's files: the base (maml, anil), or the
    base with the initial task restored on it (km_maml; a restored task
    model has frozen, inference-mode BatchNorm, so it cannot adapt itself).
    """
    run_dir = Path(run_dir)
    method = settings["method"]
    base = models.build_model(
        settings["model"], settings["ways"], image_size=settings["image_size"],
        alpha=settings["alpha"], dropout=0.0)
    # Runs older than an option recorded its default.
    modulation = ({"adapt_head": settings.get("adapt_head", True),
                   "last_filter_units": settings.get("last_filter_units"),
                   **{key: settings[key] for key in (
                       "hidden_units", "form", "filter_units",
                       "adapt_batchnorm")}}
                  if method == "km_maml" else {})
    learner = meta.make_learner(method, base, settings["ways"],
                                options=options_of(settings), **modulation)
    trained = keras.saving.load_model(run_dir / meta_train.BASE_FILE,
                                      compile=False)
    if method == "km_maml":
        trained = km_tf.restore_task(trained,
                                     run_dir / meta_train.META_INIT_FILE)
    for mine, theirs in zip(learner.model.variables, trained.variables,
                            strict=True):
        if tuple(mine.shape) != tuple(theirs.shape):
            raise ValueError(f"{run_dir}'s network does not match its "
                             f"settings: {mine.path} is {tuple(mine.shape)}"
                             f", the run's {tuple(theirs.shape)}.")
        mine.assign(theirs)
    return learner


def adaptations(learner: meta.MetaLearner) -> dict[str, list[keras.Variable]]:
    """The weight sets to adapt, by name (see the module docstring); a set
    equal to one named before it is left out (anil's head only)."""
    model = learner.model
    head = meta.head_variables(model)
    batchnorm = [weight for _, layer in walk_layers(model)
                 if isinstance(layer, BATCHNORM_TYPES)
                 for weight in layer.trainable_weights]
    candidates = {AS_TRAINED: learner.inner_variables, HEAD_ONLY: head,
                  "head + BatchNorm": head + batchnorm}
    for _, layer in walk_layers(model):
        if is_convolution(layer):
            own = (layer.modulator if isinstance(layer, KM_LAYERS)
                   else layer).trainable_weights
            candidates[f"head + {layer.name}"] = head + own
    chosen: dict[str, list[keras.Variable]] = {}
    for name, variables in candidates.items():
        ids = {id(v) for v in variables}
        if variables and all(ids != {id(v) for v in seen}
                             for seen in chosen.values()):
            chosen[name] = variables
    return chosen


def measure(run_dir: str | os.PathLike, episodes: int) -> dict[str, Any]:
    """Scores the run's episodes with every adaptation; returns the
    JSON-ready results."""
    started = time.perf_counter()
    settings = read_run(run_dir)
    pools = meta_pools.load_pools(settings["data"], settings["image_size"])
    learner = rebuild_learner(run_dir, settings)
    variants = {name: meta.MetaLearner(learner.model, inner_variables=inner,
                                       outer_variables=[],
                                       options=learner.options)
                for name, inner in adaptations(learner).items()}
    scores: dict[str, Any] = {}
    for split in SPLITS:
        sampler = pools.sampler(
            split, ways=settings["ways"], shots=settings["shots"],
            queries=settings["queries"],
            seed=meta.episode_seed(settings["seed"], split))
        # The same episodes every time, so differences are paired.
        accuracies = {name: variant.evaluate_with(
                          sampler.episodes(episodes), statistics=STATISTICS)
                      for name, variant in variants.items()}
        scores[split] = {
            name: {statistics: _summary(
                       values, values - accuracies[AS_TRAINED][statistics])
                   for statistics, values in by_statistics.items()}
            for name, by_statistics in accuracies.items()}
    adapted = {name: int(sum(np.prod(v.shape) for v in variant.
                             inner_variables))
               for name, variant in variants.items()}
    return {"run_dir": os.fspath(run_dir), "settings": settings,
            "episodes": episodes, "adapted_weights": adapted,
            "scores": scores, "machine": machine_summary(tensorflow=True),
            "date": time.strftime("%Y-%m-%d"),
            "seconds": round(time.perf_counter() - started, 1)}


def _summary(accuracies: np.ndarray, gains: np.ndarray) -> dict[str, float]:
    """Mean and 95% CI of per-episode accuracies and of their paired gains
    over "as meta-trained"."""
    accuracy, ci95 = meta.mean_confidence_interval(accuracies)
    gain, gain_ci95 = meta.mean_confidence_interval(gains)
    return {key: round(float(value), 5) for key, value in (
        ("accuracy", accuracy), ("ci95", ci95), ("gain", gain),
        ("gain_ci95", gain_ci95))}


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown report."""
    settings = results["settings"]
    lines = [
        "# Where the task adaptation of a meta-trained network pays",
        "",
        *provenance(results),
        f"Run: `{results['run_dir']}` (--method={settings['method']}, "
        f"{settings['ways']}-way {settings['shots']}-shot, "
        f"{settings['meta_steps']} meta-steps, seed {settings['seed']}); "
        f"{results['episodes']} episodes per split, "
        f"{settings['eval_inner_steps']} inner steps. Accuracy in % with "
        "95% CI; the difference to the first row is paired per episode.",
    ]
    for split in SPLITS:
        lines += ["", f"## Meta-{split}", "",
                  "| inner loop adapts | weights | transductive | difference"
                  " | support statistics | difference |",
                  "|---|---|---|---|---|---|"]
        for name, by_statistics in results["scores"][split].items():
            cells = []
            for statistics in STATISTICS:
                score = by_statistics[statistics]
                cells += [f"{100 * score['accuracy']:.2f} ± "
                          f"{100 * score['ci95']:.2f}",
                          "" if name == AS_TRAINED else
                          f"{100 * score['gain']:+.2f} ± "
                          f"{100 * score['gain_ci95']:.2f}"]
            lines.append(f"| {name} | {results['adapted_weights'][name]:,} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    make_reproducible(flags.FLAGS.threads)
    results = measure(flags.FLAGS.run_dir, flags.FLAGS.episodes)
    results = {"command": " ".join(["python", *sys.argv]), **results}
    print(write_report(flags.FLAGS.output, results, markdown))


if __name__ == "__main__":
    flags.DEFINE_string("run_dir", None, "--output_dir of a finished "
                        "km-meta-train run of km_maml, maml or anil.",
                        required=True)
    flags.DEFINE_integer("episodes", 600, "Episodes per split.",
                         lower_bound=2)
    flags.DEFINE_string("output", "bench/results/meta_adaptation",
                        "Results path stem (.json and .md are written).")
    flags.DEFINE_integer("threads", 1, THREADS_HELP, lower_bound=0)
    app.run(main)
