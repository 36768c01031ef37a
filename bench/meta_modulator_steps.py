"""What KM-MAML's modulator steps add to a task: a km-meta-train run scored
with and without them.

    .venv/bin/python bench/meta_modulator_steps.py --run_dir=runs/meta \\
        --output=bench/results/meta_modulator_steps

A km_maml run of km-meta-train leaves its meta-trained base
(`meta_base.keras`), the meta-learned initial task (`meta_init.kmtask`:
modulators and head) and its settings (`meta.report.json`). This program
rebuilds that learner and scores the run's meta-validation and meta-test
episodes (the same ones km-meta-train draws) twice: with the inner loop
adapting modulators and head, as meta-trained, and with the head alone
(the modulators stay at their meta-learned initial values, as ANIL would
adapt this network). Both use the run's inner steps and rates at test;
query sets are scored with their own batch statistics (transductive) and
with statistics re-estimated on the support set (as a deployed task with
its own statistics computes). The difference is what the modulators'
inner steps add.

Writes `<output>.json` and `<output>.md`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

import km_tf  # noqa: E402
from km_tf import meta, models  # noqa: E402
from km_tf.cli import meta_train  # noqa: E402
from km_tf.meta import pools as meta_pools  # noqa: E402
from determinism import THREADS_HELP, make_reproducible  # noqa: E402
from results_io import machine_summary, write_results  # noqa: E402

SPLITS = ("validation", "test")
STATISTICS = ("query", "support")
ADAPTS = ("modulators + head", "head only")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings of a finished km_maml run of km-meta-train.

    Raises:
        FileNotFoundError: The folder lacks the run's report, base or
            initial task (the run has not finished).
        ValueError: The run is not km_maml, or meta-learned its inner rates
            (this program adapts with the fixed ones).
    """
    run_dir = Path(run_dir)
    for name in (f"{meta_train.REPORT_NAME}.json", meta_train.BASE_FILE,
                 meta_train.META_INIT_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} is missing: pass the --output_dir of a "
                "finished km-meta-train --method=km_maml run.")
    settings = json.loads(
        (run_dir / f"{meta_train.REPORT_NAME}.json").read_text())["settings"]
    if settings["method"] != "km_maml":
        raise ValueError(f"{run_dir} is a --method={settings['method']} run; "
                         "modulator steps exist only in km_maml runs.")
    if settings["learn_inner_rates"]:
        raise ValueError(f"{run_dir} meta-learned its inner rates; this "
                         "program adapts with fixed ones. Pass a run without "
                         "--learn_inner_rates.")
    return settings


def learners(run_dir: str | os.PathLike, settings: dict[str, Any]
             ) -> dict[str, meta.MetaLearner]:
    """The run's KM-MAML learner and a head-only one on the same network,
    keyed by `ADAPTS`."""
    run_dir = Path(run_dir)
    options = meta.MetaOptions(
        inner_steps=settings["inner_steps"],
        inner_learning_rate=settings["inner_learning_rate"],
        modulator_learning_rate=settings["modulator_learning_rate"],
        eval_inner_steps=settings["eval_inner_steps"],
        zero_head=settings.get("zero_head", False))
    base = models.build_model(settings["model"], settings["ways"],
                              image_size=settings["image_size"],
                              alpha=settings["alpha"], dropout=0.0)
    learner = meta.km_maml(
        base, settings["ways"], options=options,
        hidden_units=settings["hidden_units"], form=settings["form"],
        filter_units=settings["filter_units"],
        adapt_batchnorm=settings["adapt_batchnorm"])
    meta_base = keras.saving.load_model(run_dir / meta_train.BASE_FILE,
                                        compile=False)
    trained = km_tf.restore_task(meta_base,
                                 run_dir / meta_train.META_INIT_FILE)
    # The restored task model has the learner's layers in the learner's
    # order (its BatchNorm is frozen for inference, so it cannot adapt).
    for mine, theirs in zip(learner.model.variables, trained.variables,
                            strict=True):
        if tuple(mine.shape) != tuple(theirs.shape):
            raise ValueError(f"{run_dir}'s network does not match its "
                             f"settings: {mine.path} is {tuple(mine.shape)}"
                             f", the run's {tuple(theirs.shape)}.")
        mine.assign(theirs)
    head_only = meta.MetaLearner(
        learner.model, inner_variables=meta.head_variables(learner.model),
        outer_variables=[], options=options)
    return dict(zip(ADAPTS, (learner, head_only)))


def measure(run_dir: str | os.PathLike, episodes: int) -> dict[str, Any]:
    """Scores the run's episodes both ways; returns the JSON-ready results."""
    settings = read_run(run_dir)
    pools = meta_pools.load_pools(settings["data"], settings["image_size"])
    compared = learners(run_dir, settings)
    scores: dict[str, Any] = {}
    for split in SPLITS:
        sampler = pools.sampler(
            split, ways=settings["ways"], shots=settings["shots"],
            queries=settings["queries"],
            seed=meta.episode_seed(settings["seed"], split))
        # The same episodes both ways, so the gain is paired per episode.
        accuracies = {adapts: learner.evaluate_with(
                          sampler.episodes(episodes), statistics=STATISTICS)
                      for adapts, learner in compared.items()}
        accuracies["gain"] = {
            name: accuracies[ADAPTS[0]][name] - accuracies[ADAPTS[1]][name]
            for name in STATISTICS}
        scores[split] = {
            key: {name: dict(zip(("accuracy", "ci95"),
                                 meta.mean_confidence_interval(values)))
                  for name, values in by_statistics.items()}
            for key, by_statistics in accuracies.items()}
    return {"run_dir": os.fspath(run_dir), "settings": settings,
            "episodes": episodes, "scores": _floats(scores),
            "machine": machine_summary(tensorflow=True)}


def _floats(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _floats(value) for key, value in tree.items()}
    return round(float(tree), 5)


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown report."""
    settings = results["settings"]
    lines = [
        "# What KM-MAML's modulator steps add",
        "",
        f"Command: `{results.get('command', '')}`  ",
        f"Machine: {results['machine']}.  ",
        f"Run: `{results['run_dir']}` ({settings['ways']}-way "
        f"{settings['shots']}-shot, {settings['meta_steps']} meta-steps, "
        f"seed {settings['seed']}); {results['episodes']} episodes per split,"
        f" {settings['eval_inner_steps']} inner steps. Accuracy in %, 95% "
        "CI; the gain is paired per episode.",
        "",
        "| split | statistics | modulators + head | head only | gain |",
        "|---|---|---|---|---|",
    ]
    for split in SPLITS:
        scores = results["scores"][split]
        for name in STATISTICS:
            cells = [f"{100 * scores[key][name]['accuracy']:.2f} ± "
                     f"{100 * scores[key][name]['ci95']:.2f}"
                     for key in (*ADAPTS, "gain")]
            lines.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    make_reproducible(flags.FLAGS.threads)
    results = measure(flags.FLAGS.run_dir, flags.FLAGS.episodes)
    results = {"command": " ".join(["python", *sys.argv]), **results}
    write_results(flags.FLAGS.output, {
        ".json": json.dumps(results, indent=2) + "\n",
        ".md": markdown(results)})
    print(markdown(results))


if __name__ == "__main__":
    flags.DEFINE_string("run_dir", None, "--output_dir of a finished "
                        "km-meta-train --method=km_maml run.", required=True)
    flags.DEFINE_integer("episodes", 600, "Episodes per split.",
                         lower_bound=2)
    flags.DEFINE_string("output", "bench/results/meta_modulator_steps",
                        "Results path stem (.json and .md are written).")
    flags.DEFINE_integer("threads", 1, THREADS_HELP, lower_bound=0)
    app.run(main)
