"""Few-shot benchmark: KM-MAML against ANIL, MAML and fine-tuning (issue 16).

    .venv/bin/python bench/meta.py                  # full size (see below)
    .venv/bin/python bench/meta.py --meta_steps=2 --eval_episodes=4 \\
        --image_size=8 --alpha=0.125 --queries=2 --meta_batch_size=1 \\
        --inner_steps=1 --finetune_steps=2 --output=/tmp/meta   # smoke run

One protocol for every method: 5-way 1-shot and 5-shot episodes of the
offline glyph split (`km_tf.meta.pools`: meta-train latin, greek, cyrillic,
arabic and canadian letters; meta-test letters of seven scripts that
meta-training never sees), the same Conv-4 (`km_tf.models`, conv4) from the
same seed, the same meta-training budget (--meta_steps outer steps of
--meta_batch_size episodes; fine-tuning pretrains a classifier of all
meta-training classes for as many steps, on as many images per step), and
the same --eval_episodes meta-test episodes for every method (mean accuracy
and its 95% confidence interval, `km_tf.meta.mean_confidence_interval`).
The published 5-shot numbers anneal the outer rate for km_maml and maml
(`--shots=5 --outer_schedule=cosine`; ANIL keeps the constant rate, its
better one): BUILD.md, "At 5 shots the default's meta-training spikes".

    method      a task adapts                  meta-training
    km_maml     modulators (task file)         everything (KM-MAML)
    anil        head                           everything
    maml        every weight                   everything
    finetune    head, --finetune_steps steps   none: a pretrained base

Per-task bytes are what one more task stores next to the shared base
(`km_tf.meta.task_storage`). Meta-test scores use the query set's batch
statistics for the meta-learners (transductive, as MAML reports) and the
moving statistics for fine-tuning; the meta-learners are also scored
as an exported task computes ("deployed": BatchNorm with the moving
statistics of meta-training; "deployed, support statistics": a task that
keeps statistics re-estimated on its support set after adapting,
`MetaLearner.support_statistics`). Each episode is adapted once and scored
all three ways.

Writes `<output>.json` and `<output>.md` (default bench/results/meta.*).

Runtime at 3,000 meta-steps, one process per core of a 2-core CPU
(`--threads=1`): KM-MAML 14-18 min at 1 shot (0.26-0.32 s per
meta-step), 33-38 min at 5 shots (0.65 s; the head-adapting configuration
about as long); MAML 13 and 35 min (0.24, 0.65 s); ANIL 8 and 13
min. Each meta-learner's 600 evaluation episodes take 0.3-1.2 min; the
fine-tuning baseline's 100 steps per episode make its evaluation the
longest (2.4 and 7 minutes). README and BUILD.md have the results
(`bench/results/meta_*.md`).

TensorFlow runs on one thread per pool with op determinism (`--threads`,
`bench/determinism.py`), so a part reproduces on any number of cores.

--methods and --shots run a part. The results so far are rewritten after
each method, so a run that dies keeps what it finished; it does not resume
a method mid-way (km-meta-train does, for long single runs).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from km_tf import meta, models  # noqa: E402
from km_tf.meta import loop, pools as meta_pools  # noqa: E402
from determinism import THREADS_HELP, make_reproducible  # noqa: E402
from results_io import (  # noqa: E402
    machine_summary, provenance, write_report)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("km_maml", "anil", "maml", "finetune")


@dataclasses.dataclass(frozen=True)
class Config:
    """What `measure` runs; `main` fills it from the flags."""

    data: str = meta_pools.DEFAULT_SPEC
    methods: tuple[str, ...] = METHODS
    shots: tuple[int, ...] = (1, 5)
    ways: int = 5
    queries: int = 15
    model: str = "conv4"
    alpha: float = 0.5
    image_size: int = 28
    meta_steps: int = 3000
    meta_batch_size: int = 4
    inner_steps: int = 5
    eval_inner_steps: int = 10
    inner_learning_rate: float = 0.1
    modulator_learning_rate: float | None = None
    last_modulator_learning_rate: float | None = None
    learn_inner_rates: bool = False
    zero_head: bool = False
    adapt_batchnorm: bool = False
    adapt_head: bool = False
    last_filter_units: int | None = meta.DEFAULT_LAST_FILTER_UNITS
    first_order: bool = False
    outer_learning_rate: float = 1e-3
    outer_schedule: str = "constant"
    finetune_steps: int = 100
    finetune_learning_rate: float = 0.01
    hidden_units: int | None = None
    eval_episodes: int = 600
    log_every: int = 100
    seed: int = 0
    verbose: int = 2


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (tests
    import this module next to other bench modules with flags of the same
    names)."""
    defaults = Config()
    flags.DEFINE_string("data", defaults.data, "Meta-learning data spec "
                        f"({', '.join(meta_pools.SPEC_FORMS)}).")
    flags.DEFINE_list("methods", list(defaults.methods),
                      f"Methods, from {', '.join(METHODS)}.")
    flags.DEFINE_list("shots", [str(s) for s in defaults.shots],
                      "Shot settings (support images per class).")
    flags.DEFINE_integer("ways", defaults.ways, "Classes per episode.")
    flags.DEFINE_integer("queries", defaults.queries,
                         "Query images per class.")
    flags.DEFINE_string("model", defaults.model, "Base network (a "
                        "km_tf.models name).")
    flags.DEFINE_float("alpha", defaults.alpha, "Width multiplier.")
    flags.DEFINE_integer("image_size", defaults.image_size,
                         "Input height and width.")
    flags.DEFINE_integer("meta_steps", defaults.meta_steps,
                         "Meta-training (finetune: pretraining) steps.")
    flags.DEFINE_integer("meta_batch_size", defaults.meta_batch_size,
                         "Episodes per meta-step.")
    flags.DEFINE_integer("inner_steps", defaults.inner_steps,
                         "Inner steps when meta-training.")
    flags.DEFINE_integer("eval_inner_steps", defaults.eval_inner_steps,
                         "Inner steps when evaluating the meta-learners.")
    flags.DEFINE_float("inner_learning_rate", defaults.inner_learning_rate,
                       "Inner-loop step size.")
    flags.DEFINE_float("modulator_learning_rate", None,
                       "km_maml: inner-loop step size of the modulators "
                       "(default: km_tf.meta.km_maml's, --inner_learning_"
                       "rate, or 0.1 x it with --adapt_head).")
    flags.DEFINE_float("last_modulator_learning_rate", None,
                       "km_maml: inner-loop step size of the last "
                       "convolution's modulator (default: km_tf.meta."
                       "km_maml's, 10 x --inner_learning_rate if it is "
                       "filter-form, else as the others').")
    flags.DEFINE_bool("learn_inner_rates", defaults.learn_inner_rates,
                      "Meta-learners meta-learn one inner step size per "
                      "inner weight (MAML++-style), starting at the "
                      "fixed rates.")
    flags.DEFINE_bool("zero_head", defaults.zero_head,
                      "Every method starts each task's head at zero (the "
                      "zeroing trick; the head is not meta-trained).")
    flags.DEFINE_bool("first_order", defaults.first_order,
                      "First-order meta-gradients.")
    flags.DEFINE_float("outer_learning_rate", defaults.outer_learning_rate,
                       "Adam rate of meta-training and pretraining.")
    flags.DEFINE_enum("outer_schedule", defaults.outer_schedule,
                      list(loop.OUTER_SCHEDULES), "Outer learning-rate "
                      "schedule: constant, or cosine (annealed to zero "
                      "over --meta_steps).")
    flags.DEFINE_integer("finetune_steps", defaults.finetune_steps,
                         "Fine-tuning steps per meta-test task.")
    flags.DEFINE_float("finetune_learning_rate",
                       defaults.finetune_learning_rate,
                       "Fine-tuning step size.")
    flags.DEFINE_bool("adapt_batchnorm", defaults.adapt_batchnorm,
                      "km_maml: tasks also adapt BatchNorm's gamma and "
                      "beta.")
    flags.DEFINE_bool("adapt_head", defaults.adapt_head,
                      "km_maml: tasks adapt the head too (default: only "
                      "the modulators adapt; the head is meta-trained and "
                      "shared).")
    flags.DEFINE_integer("last_filter_units", defaults.last_filter_units,
                         "km_maml: the last convolution's modulator works "
                         "on whole filters with this many hidden units (0: "
                         "a modulator like the others).", lower_bound=0)
    flags.DEFINE_integer("hidden_units", None,
                         "Modulator hidden units (default: km_tf's).")
    flags.DEFINE_integer("eval_episodes", defaults.eval_episodes,
                         "Meta-test episodes per method and shot setting.")
    flags.DEFINE_integer("log_every", defaults.log_every,
                         "Steps per progress line.")
    flags.DEFINE_integer("seed", defaults.seed, "Seed of weights and "
                         "episodes.")
    flags.DEFINE_string("output", str(RESULTS / "meta"),
                        "Results path stem (.json and .md are written).")
    flags.DEFINE_integer("threads", 1, THREADS_HELP, lower_bound=0)


def config_from_flags() -> Config:
    flag = flags.FLAGS
    unknown = sorted(set(flag.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from "
                         f"{', '.join(METHODS)}.")
    return Config(
        data=flag.data, methods=tuple(flag.methods),
        shots=tuple(int(s) for s in flag.shots), ways=flag.ways,
        queries=flag.queries, model=flag.model, alpha=flag.alpha,
        image_size=flag.image_size, meta_steps=flag.meta_steps,
        meta_batch_size=flag.meta_batch_size, inner_steps=flag.inner_steps,
        eval_inner_steps=flag.eval_inner_steps,
        inner_learning_rate=flag.inner_learning_rate,
        modulator_learning_rate=flag.modulator_learning_rate,
        last_modulator_learning_rate=flag.last_modulator_learning_rate,
        learn_inner_rates=flag.learn_inner_rates,
        zero_head=flag.zero_head, first_order=flag.first_order,
        outer_learning_rate=flag.outer_learning_rate,
        outer_schedule=flag.outer_schedule,
        finetune_steps=flag.finetune_steps,
        finetune_learning_rate=flag.finetune_learning_rate,
        hidden_units=flag.hidden_units,
        adapt_batchnorm=flag.adapt_batchnorm, adapt_head=flag.adapt_head,
        last_filter_units=flag.last_filter_units or None,
        eval_episodes=flag.eval_episodes,
        log_every=flag.log_every, seed=flag.seed)


def run_method(config: Config, pools: meta_pools.MetaPools, method: str,
               shots: int) -> dict[str, Any]:
    """Meta-trains (or pretrains) one method and scores it on the meta-test
    episodes; the same seed, so the same initial weights and episodes, for
    every method."""
    keras.utils.set_random_seed(config.seed)
    log = loop.ProgressLog(config.verbose)
    log.message(f"== {method}, {config.ways}-way {shots}-shot")
    optimizer = loop.outer_optimizer(config.outer_learning_rate,
                                     steps=config.meta_steps,
                                     schedule=config.outer_schedule)
    sampler = pools.sampler("train", ways=config.ways, shots=shots,
                            queries=config.queries,
                            seed=meta.episode_seed(config.seed, "train"))
    if method == "finetune":
        base = models.build_model(
            config.model, pools.class_count("train"),
            image_size=config.image_size, alpha=config.alpha, dropout=0.0)
        stage = loop.classifier_stage(
            base, optimizer, pools.images, pools.labels, pools.splits.train,
            batch_size=config.meta_batch_size * config.ways * (
                shots + config.queries),
            seed=meta.episode_seed(config.seed, "train"))
    else:
        base = models.build_model(
            config.model, config.ways, image_size=config.image_size,
            alpha=config.alpha, dropout=0.0)
        options = meta.MetaOptions(
            inner_steps=config.inner_steps,
            inner_learning_rate=config.inner_learning_rate,
            modulator_learning_rate=config.modulator_learning_rate,
            last_modulator_learning_rate=(
                config.last_modulator_learning_rate),
            learn_inner_rates=config.learn_inner_rates,
            zero_head=config.zero_head, first_order=config.first_order,
            eval_inner_steps=config.eval_inner_steps)
        extra = {}
        if method == "km_maml":
            extra["adapt_batchnorm"] = config.adapt_batchnorm
            extra["adapt_head"] = config.adapt_head
            extra["last_filter_units"] = config.last_filter_units
            if config.hidden_units:
                extra["hidden_units"] = config.hidden_units
        learner = meta.make_learner(method, base, config.ways,
                                    options=options, optimizer=optimizer,
                                    **extra)
        stage = loop.meta_stage(learner, sampler,
                                meta_batch_size=config.meta_batch_size)
    started = time.perf_counter()
    history = loop.train(stage, strategy=tf.distribute.get_strategy(),
                         steps=config.meta_steps,
                         log_every=config.log_every, log=log)
    train_seconds = time.perf_counter() - started
    if method == "finetune":
        learner = meta.finetune(base, config.ways, options=dataclasses.replace(
            meta.FINETUNE_OPTIONS, inner_steps=config.finetune_steps,
            inner_learning_rate=config.finetune_learning_rate,
            zero_head=config.zero_head))
    test = pools.sampler("test", ways=config.ways, shots=shots,
                         queries=config.queries,
                         seed=meta.episode_seed(config.seed, "test"))
    started = time.perf_counter()
    # Meta-learners: transductive (the query set's statistics, as MAML
    # reports), and as deployed: an exported task with the moving
    # statistics of meta-training, or with its support set's.
    statistics = learner.scored_statistics
    scores = learner.evaluate_with(test.episodes(config.eval_episodes),
                                   statistics=statistics)
    eval_seconds = time.perf_counter() - started
    accuracies = scores[statistics[0]]
    mean, half_width = meta.mean_confidence_interval(accuracies)
    log.message(f"{method} {shots}-shot: {100 * mean:.2f}% +- "
                f"{100 * half_width:.2f}%")
    deployed = {}
    for name, key in (("moving", "deployed"), ("support", "support")):
        if name in statistics[1:]:
            deployed_mean, deployed_half_width = (
                meta.mean_confidence_interval(scores[name]))
            deployed.update({f"{key}_accuracy": deployed_mean,
                             f"{key}_ci95": deployed_half_width})
            log.message(f"{method} {shots}-shot, {name} statistics: "
                        f"{100 * deployed_mean:.2f}% +- "
                        f"{100 * deployed_half_width:.2f}%")
    if "support" in statistics:
        deployed["support_task_storage"] = meta.task_storage(
            learner, own_statistics=True).to_dict()
    # Steady-state seconds per step: the first interval holds the trace.
    rates = [r["seconds_per_step"] for r in history[1:]] or [
        r["seconds_per_step"] for r in history]
    return {
        "method": method, "shots": shots, "accuracy": mean,
        "ci95": half_width, "episodes": len(accuracies),
        "task_storage": meta.task_storage(learner).to_dict(),
        "inner_steps": learner.options.evaluation_steps,
        "transductive": learner.options.batch_statistics,
        **deployed,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(float(np.median(rates)), 4)
        if rates else None,
        "eval_seconds": round(eval_seconds, 3),
        "final_loss": history[-1]["loss"] if history else None,
    }


def measure(config: Config,
            on_run: Callable[[dict[str, Any]], None] | None = None,
            ) -> dict[str, Any]:
    """Every method at every shot setting; the results as a dict.

    `on_run`, if given, receives the results so far after each method, so
    a long run that dies keeps what it finished.
    """
    started = time.perf_counter()
    pools = meta_pools.load_pools(config.data, config.image_size)
    meta_pools.check_classes(pools, ways=config.ways,
                             shots=max(config.shots),
                             queries=config.queries)
    results = {
        "config": dataclasses.asdict(config), "data": pools.summary(),
        "runs": [], "seconds": 0.0,
        "machine": machine_summary(tensorflow=True),
        "date": time.strftime("%Y-%m-%d"),
    }
    for shots in config.shots:
        for method in config.methods:
            results["runs"].append(run_method(config, pools, method, shots))
            results["seconds"] = round(time.perf_counter() - started, 1)
            if on_run is not None:
                on_run(results)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown report."""
    config, data = results["config"], results["data"]
    classes = data["classes"]
    learned = (" (initial rates, each weight's meta-learned)"
               if config.get("learn_inner_rates") else "")
    if config.get("zero_head"):
        learned += "; every task's head starting at zero"
    rate, last_rate = _modulator_rates(config)
    schedule = (" annealed to 0 along a cosine"
                if config.get("outer_schedule") == "cosine" else "")
    if config.get("last_filter_units"):
        learned += (f"; the last convolution's modulator on whole filters, "
                    f"{config['last_filter_units']} hidden units")
    if last_rate != rate:
        learned += f", stepping at {last_rate:g}"
    if not config.get("adapt_head", True):
        learned += "; KM-MAML's tasks keep the meta-trained head"
    lines = [
        "# Few-shot meta-learning: KM-MAML, ANIL, MAML, fine-tuning",
        "",
        *provenance(results, default_command="python bench/meta.py"),
        f"Data: {data['spec']} at {data['image_size']} px, "
        f"{classes['train']} / {classes['validation']} / {classes['test']} "
        f"meta-train / -validation / -test classes ({data['split']}).  ",
        f"Network: {config['model']} alpha {config['alpha']} from seed "
        f"{config['seed']}; {config['meta_steps']} meta-steps of "
        f"{config['meta_batch_size']} episodes ({config['inner_steps']} inner "
        f"steps at {config['inner_learning_rate']}, KM-MAML's modulators "
        f"at {rate:g}{learned}, "
        f"{'first' if config['first_order'] else 'second'}-order, Adam "
        f"{config['outer_learning_rate']}{schedule}); meta-learners adapt "
        f"{config['eval_inner_steps']} steps at test, fine-tuning "
        f"{config['finetune_steps']} steps at "
        f"{config['finetune_learning_rate']}.",
        "",
        f"| {config['ways']}-way | method | accuracy (95% CI) | deployed "
        "| deployed, support statistics | task adapts | bytes per task "
        "| % of base | train s | s / step | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        storage = run["task_storage"]
        rate = run["seconds_per_step"]
        deployed, support = (
            "as accuracy" if not run["transductive"] else
            f"{100 * run[key + '_accuracy']:.2f}% +- "
            f"{100 * run[key + '_ci95']:.2f}%"
            if key + "_accuracy" in run else "-"
            for key in ("deployed", "support"))
        if "support_task_storage" in run:
            support += (f" ({run['support_task_storage']['task_bytes']:,}"
                        " bytes)")
        lines.append(
            f"| {run['shots']}-shot | {run['method']} | "
            f"{100 * run['accuracy']:.2f}% +- {100 * run['ci95']:.2f}% | "
            f"{deployed} | {support} | "
            f"{storage['contents']} | {storage['task_bytes']:,} | "
            f"{storage['percent_of_base']:.2f}% | {run['train_seconds']:.0f}"
            f" | {'-' if rate is None else f'{rate:.3f}'} | "
            f"{run['eval_seconds']:.0f} |")
    lines += [
        "",
        f"Accuracy: mean over {config['eval_episodes']} meta-test episodes "
        f"({config['queries']} queries per class), the same episodes for "
        "every method, +- 1.96 standard errors. Meta-learners score the "
        "query set with its own batch statistics (transductive, as MAML "
        "reports); fine-tuning with the pretrained moving statistics. "
        "Deployed: the meta-learners scored as an exported task computes, "
        "BatchNorm with the moving statistics of meta-training (- where "
        "not measured); deployed, support statistics: a task that keeps "
        "BatchNorm statistics re-estimated on its support set after "
        "adapting (its bytes with them). "
        "Bytes per task: float32 values a task stores next to the shared "
        "base (the base: every weight but the modulators).",
    ]
    return "\n".join(lines) + "\n"


def _modulator_rates(config: dict[str, Any]) -> tuple[float, float]:
    """The inner step sizes of KM-MAML's modulators and of its last one in
    a run (runs recorded before KM-MAML's body-only default adapted the
    head and had no filter-form last modulator)."""
    options = meta.km_maml_options(
        meta.MetaOptions(
            inner_learning_rate=config["inner_learning_rate"],
            modulator_learning_rate=config.get("modulator_learning_rate"),
            last_modulator_learning_rate=config.get(
                "last_modulator_learning_rate")),
        adapt_head=config.get("adapt_head", True),
        last_filter_form=bool(config.get("last_filter_units")))
    return (options.modulator_learning_rate,
            options.last_modulator_learning_rate)


def write(results: dict[str, Any], stem: str | os.PathLike) -> None:
    """`<stem>.json` and `<stem>.md`, atomically."""
    write_report(stem, results, markdown)


def main(argv):
    del argv
    make_reproducible(flags.FLAGS.threads)
    command = " ".join(["python", *sys.argv])

    def write_so_far(results: dict[str, Any]) -> None:
        write({"command": command, **results}, flags.FLAGS.output)

    results = measure(config_from_flags(), on_run=write_so_far)
    print(markdown({"command": command, **results}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
