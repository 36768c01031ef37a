"""Meta-trains a network for few-shot tasks: KM-MAML, ANIL, MAML, fine-tuning.

    km-meta-train                               # KM-MAML, offline glyphs
    km-meta-train --method=anil --shots=5 --output_dir=runs/anil5
    km-meta-train --data=tfds:omniglot          # needs network once
    km-meta-train --data=tfds:cifar100:64/16/20 --image_size=32 \\
        --model=mobilenet_v2 --alpha=0.35       # CIFAR-FS-style split

(`km-meta-train` is the console program `pip install .` makes; `python
apps/meta_train.py` runs the same.)

Methods (`km_tf.meta.learners` explains them): `km_maml` adapts each task's
kernel modulators and meta-trains everything, the head included (a task is
a small `.kmtask` file next to the meta-trained base; --adapt_head adapts
the head too, --last_filter_units sizes the last convolution's filter-form
modulator); `anil` adapts the head;
`maml` adapts every weight; `finetune` meta-trains nothing: it pretrains
the base as an ordinary classifier of all meta-training classes (as many
steps as --meta_steps, batches of --pretrain_batch_size images), then
fine-tunes a fresh head (or, with --finetune_layers=all, everything) on
each task's support set.

Data (`km_tf.meta.pools`): by default letters drawn from the fonts inside
matplotlib, classes split by script so that meta-test letters come from
scripts meta-training never saw: meta-train latin, greek, cyrillic, arabic
and canadian syllabics (2218 classes), meta-validation georgian (119),
meta-test armenian, hebrew, tifinagh, lao, nko, ogham and old italic (325);
20 images per class. `--data=glyphs:TRAIN/VALIDATION/TEST` picks other
scripts; `tfds:NAME[:TRAIN/VALIDATION/TEST]` a tensorflow-datasets dataset
(all classes pooled and split 64/16/20%, or by the class counts given;
omniglot 1200/100/323 as in MAML).

Outputs in --output_dir: `meta_base.keras` (the meta-trained network
without modulators; for finetune the pretrained base), for km_maml
`meta_init.kmtask` (the meta-learned modulators and head: `km_tf.
restore_task(base, file)` is the network every task starts from) and
`example_task.kmtask` (adapted to meta-test episode 0, with BatchNorm
statistics re-estimated on its support set: --task_statistics), and
`meta.report.json` / `meta.report.txt`: mean accuracy over --eval_episodes
meta-test episodes with its 95% confidence interval (for meta-learners
transductive, as MAML reports, and as deployed: with the moving statistics
of meta-training, and with each task's support-set statistics), and the
bytes each task stores (the modulators for km_maml, the head for anil,
the whole network for maml and --finetune_layers=all).

A killed run resumes where it stopped: start the same command again. Every
--checkpoint_every meta-steps all the state (network, optimizer, step,
history) goes atomically into `{output_dir}/backup/checkpoint.npz`; the
episodes of step s depend on (--seed, s) only, so the resumed run ends with
the same weights as an uninterrupted one. --strategy=mirrored splits every
meta-batch's episodes over the local GPUs (--cpu_replicas=N mirrors over N
logical CPUs instead, to try it without GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from km_tf import distribute, files, layers, meta, models, training
from km_tf.cli import common
from km_tf.meta import loop, pools as meta_pools
from km_tf.meta.metrics import task_storage

BASE_FILE = "meta_base.keras"
META_INIT_FILE = "meta_init.kmtask"
EXAMPLE_TASK_FILE = "example_task.kmtask"
REPORT_NAME = "meta.report"
FINETUNE_LAYERS = ("head", "all")
# Flags that change where and how a run reports, not what it computes: a
# resumed run may change them (the checkpoint does not depend on the
# replica count).
OUTPUT_FLAGS = ("output_dir", "verbose", "restart", "strategy", "tpu",
                "cpu_replicas", "log_every", "data_dir")

flags.DEFINE_enum("method", "km_maml", list(meta.METHODS),
                  "km_maml: tasks adapt the modulators; anil: the head; "
                  "maml: every weight; finetune: a pretrained base, no "
                  "meta-training.")
flags.DEFINE_enum("model", "conv4", list(models.MODEL_NAMES),
                  "Base network (conv4: the Conv-4 of MAML, any size from "
                  "8 px; the others need 32 px or more).")
flags.DEFINE_float("alpha", 1.0, "Width multiplier of the base (conv4: "
                   "64 * alpha filters).")
flags.DEFINE_integer("image_size", 28, "Input height and width.",
                     lower_bound=8)
flags.DEFINE_float("bn_momentum", models.DEFAULT_BN_MOMENTUM,
                   "BatchNorm momentum of the base.")
flags.DEFINE_string("data", meta_pools.DEFAULT_SPEC,
                    "Classes and their split: "
                    f"{', '.join(meta_pools.SPEC_FORMS)}.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder.")
# Episodes.
flags.DEFINE_integer("ways", 5, "Classes per task (N).", lower_bound=2)
flags.DEFINE_integer("shots", 1, "Support images per class (K).",
                     lower_bound=1)
flags.DEFINE_integer("queries", 15, "Query images per class.", lower_bound=1)
flags.DEFINE_integer("meta_batch_size", 4, "Episodes per meta-step (split "
                     "over the replicas).", lower_bound=1)
# The inner loop.
flags.DEFINE_integer("inner_steps", 5, "Gradient steps per task when "
                     "meta-training.", lower_bound=0)
flags.DEFINE_integer("eval_inner_steps", None, "Gradient steps per task "
                     "when evaluating (default: --inner_steps; 100 for "
                     "finetune).", lower_bound=0)
flags.DEFINE_float("inner_learning_rate", 0.1, "Step size of the inner "
                   "loop (and of fine-tuning).")
flags.DEFINE_float("modulator_learning_rate", None, "km_maml: inner-loop "
                   "step size of the modulators (default: "
                   "--inner_learning_rate, or 0.1 x it with --adapt_head; "
                   "measured in BUILD.md).")
flags.DEFINE_float("last_modulator_learning_rate", None, "km_maml: "
                   "inner-loop step size of the last convolution's "
                   "modulator (default: 10 x --inner_learning_rate if it "
                   "is filter-form, else as the other modulators').")
flags.DEFINE_boolean("learn_inner_rates", False, "Meta-learn one inner "
                     "step size per inner weight, starting at the rates "
                     "above (MAML++-style per-layer rates; second-order "
                     "only; not finetune).")
flags.DEFINE_boolean("zero_head", False, "Start every task's head at zero "
                     "instead of a meta-trained value (the zeroing trick; "
                     "the head is then not meta-trained).")
flags.DEFINE_boolean("first_order", False, "First-order meta-gradients "
                     "(FOMAML): faster, less exact.")
flags.DEFINE_enum("finetune_layers", "head", list(FINETUNE_LAYERS),
                  "finetune: fine-tune the head, or every weight.")
# The outer loop.
flags.DEFINE_float("outer_learning_rate", 1e-3, "Adam learning rate of "
                   "meta-training (and of finetune's pretraining).")
flags.DEFINE_enum("outer_schedule", "constant", list(loop.OUTER_SCHEDULES),
                  "Outer learning-rate schedule: constant, or cosine "
                  "(annealed to zero over --meta_steps, as MAML++). "
                  "km_maml's default needs cosine at 5 shots (its "
                  "meta-training spikes at a constant rate) and scores "
                  "best with constant at 1 shot (BUILD.md).")
flags.DEFINE_integer("meta_steps", 2000, "Meta-training steps (finetune: "
                     "pretraining steps); 0 evaluates the initial network.",
                     lower_bound=0)
flags.DEFINE_integer("pretrain_batch_size", None, "finetune: images per "
                     "pretraining step (default: as many as a meta-step "
                     "sees, meta_batch_size * ways * (shots + queries)).",
                     lower_bound=1)
# Modulators (km_maml).
flags.DEFINE_integer("hidden_units", layers.DEFAULT_HIDDEN_UNITS,
                     "Hidden width of the modulators of kh x kw kernel units.")
flags.DEFINE_integer("filter_units", layers.DEFAULT_FILTER_UNITS,
                     "Hidden width of the modulators of whole-filter units.")
flags.DEFINE_enum("form", layers.DEFAULT_FORM, list(layers.MODULATOR_FORMS),
                  "Modulator unit (see km-train --help).")
flags.DEFINE_integer("last_filter_units", meta.DEFAULT_LAST_FILTER_UNITS,
                     "km_maml: the last convolution's modulator works on "
                     "whole filters with this many hidden units (0: a "
                     "modulator like the others).", lower_bound=0)
flags.DEFINE_boolean("adapt_head", False, "km_maml: tasks adapt the head "
                     "too (default: only the modulators adapt; the head is "
                     "meta-trained and shared by every task).")
flags.DEFINE_boolean("adapt_batchnorm", False, "km_maml: tasks also adapt "
                     "BatchNorm's gamma and beta (their files hold "
                     "BatchNorm, as a km-train task with --batchnorm=train).")
# Evaluation, logging, checkpoints.
flags.DEFINE_enum("task_statistics", "support", ["support", "base"],
                  "km_maml: the BatchNorm statistics of example_task.kmtask."
                  " support: re-estimated on the task's support set after "
                  "adapting, kept in the task file (with BatchNorm's gamma "
                  "and beta: 15.4 KB against 10.8 KB on Conv-4 alpha 0.5; "
                  "91.0% vs 86.1% at 1 shot on the offline split, "
                  "BUILD.md); base: the moving statistics of meta-training.")
flags.DEFINE_integer("eval_episodes", 600, "Meta-test episodes of the final "
                     "evaluation.", lower_bound=2)
flags.DEFINE_integer("val_episodes", 100, "Meta-validation episodes per "
                     "validation.", lower_bound=2)
flags.DEFINE_integer("eval_every", 500, "Meta-steps between validations "
                     "(0: never; not for finetune).", lower_bound=0)
flags.DEFINE_integer("log_every", 50, "Meta-steps per log line (when the "
                     "output is not a terminal) and history record.",
                     lower_bound=1)
flags.DEFINE_integer("checkpoint_every", 100, "Meta-steps between "
                     "checkpoints.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the weights and the episodes.",
                     lower_bound=0)
flags.DEFINE_string("output_dir", "runs/meta", "Folder for the base, task "
                    "files, report and checkpoint.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"],
                  "auto: a progress bar on a terminal and a line per "
                  "--log_every steps in a log; 1 the bar, 2 the lines, 0 "
                  "silent.")
common.define_strategy_flags()
flags.DEFINE_integer("cpu_replicas", None, "With --strategy=mirrored: split "
                     "the CPU into this many logical devices and mirror over "
                     "them (to try tf.distribute without GPUs).",
                     lower_bound=2)
common.define_restart_flag()

FLAGS = flags.FLAGS


@dataclasses.dataclass
class Setup:
    """What a run trains and evaluates, built in the strategy's scope."""

    stage: loop.Stage
    learner: meta.MetaLearner | None  # None until finetune's pretraining ends
    base: keras.Model  # finetune: the classifier it pretrains


def episode_seed(split: str) -> int:
    """Seed of the episodes of one split (`"train"`, `"validation"`,
    `"test"`): different streams for one --seed."""
    return meta.episode_seed(FLAGS.seed, split)


def check_flags(strategy: tf.distribute.Strategy) -> None:
    """Refuses flag combinations that cannot run, before any data loads."""
    if FLAGS.model != "conv4" and FLAGS.image_size < 32:
        raise ValueError(
            f"--model={FLAGS.model} needs --image_size of 32 or more (got "
            f"{FLAGS.image_size}). Pass --image_size=32, or use "
            "--model=conv4 for small images.")
    if not FLAGS.inner_learning_rate > 0:
        raise ValueError("--inner_learning_rate must be positive; got "
                         f"{FLAGS.inner_learning_rate}.")
    if FLAGS.modulator_learning_rate is not None and not (
            FLAGS.modulator_learning_rate > 0):
        raise ValueError("--modulator_learning_rate must be positive; got "
                         f"{FLAGS.modulator_learning_rate}.")
    if FLAGS.zero_head and FLAGS.method == "km_maml" and not FLAGS.adapt_head:
        raise ValueError(
            "--zero_head starts every task's head at zero, so tasks must "
            "adapt the head, and km_maml shares one meta-trained head by "
            "default: add --adapt_head, or drop --zero_head.")
    if FLAGS.learn_inner_rates and FLAGS.method == "finetune":
        raise ValueError(
            "--learn_inner_rates meta-learns the inner rates, and finetune "
            "meta-trains nothing: use --method=km_maml, anil or maml, or "
            "drop --learn_inner_rates.")
    if FLAGS.learn_inner_rates and FLAGS.first_order:
        raise ValueError(
            "--learn_inner_rates needs second-order meta-gradients (the "
            "first-order ones never reach the rates): drop --first_order.")
    if not FLAGS.outer_learning_rate > 0:
        raise ValueError("--outer_learning_rate must be positive; got "
                         f"{FLAGS.outer_learning_rate}.")
    replicas = strategy.num_replicas_in_sync
    batch = (_pretrain_batch_size() if FLAGS.method == "finetune"
             else FLAGS.meta_batch_size)
    flag = ("--pretrain_batch_size" if FLAGS.method == "finetune"
            else "--meta_batch_size")
    if batch % replicas:
        raise ValueError(
            f"{flag}={batch} cannot be split evenly over {replicas} "
            f"replicas: pass a multiple of {replicas}.")


def make_strategy() -> tf.distribute.Strategy:
    """The strategy of the flags (mirrored over logical CPUs with
    --cpu_replicas)."""
    if FLAGS.cpu_replicas is None:
        return distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu)
    if FLAGS.strategy != "mirrored":
        raise ValueError(f"--cpu_replicas={FLAGS.cpu_replicas} needs "
                         "--strategy=mirrored.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.cpu_replicas)
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(FLAGS.cpu_replicas)])


def _pretrain_batch_size() -> int:
    return FLAGS.pretrain_batch_size or (
        FLAGS.meta_batch_size * FLAGS.ways * (FLAGS.shots + FLAGS.queries))


def _options() -> meta.MetaOptions:
    if FLAGS.method == "finetune":
        steps = (meta.FINETUNE_OPTIONS.inner_steps
                 if FLAGS.eval_inner_steps is None
                 else FLAGS.eval_inner_steps)
        return dataclasses.replace(
            meta.FINETUNE_OPTIONS, inner_steps=steps,
            inner_learning_rate=FLAGS.inner_learning_rate,
            zero_head=FLAGS.zero_head)
    return meta.MetaOptions(
        inner_steps=FLAGS.inner_steps,
        inner_learning_rate=FLAGS.inner_learning_rate,
        modulator_learning_rate=FLAGS.modulator_learning_rate,
        last_modulator_learning_rate=FLAGS.last_modulator_learning_rate,
        learn_inner_rates=FLAGS.learn_inner_rates,
        first_order=FLAGS.first_order,
        eval_inner_steps=FLAGS.eval_inner_steps,
        zero_head=FLAGS.zero_head)


def build(pools: meta_pools.MetaPools) -> Setup:
    """The base, and the learner or finetune's pretraining; call it in the
    strategy's scope."""
    size = FLAGS.image_size
    optimizer = loop.outer_optimizer(FLAGS.outer_learning_rate,
                                     steps=FLAGS.meta_steps,
                                     schedule=FLAGS.outer_schedule)
    if FLAGS.method == "finetune":
        base = models.build_model(
            FLAGS.model, pools.class_count("train"), image_size=size,
            alpha=FLAGS.alpha, dropout=0.0, bn_momentum=FLAGS.bn_momentum)
        stage = loop.classifier_stage(
            base, optimizer, pools.images, pools.labels, pools.splits.train,
            batch_size=_pretrain_batch_size(), seed=episode_seed("train"))
        return Setup(stage=stage, learner=None, base=base)
    base = models.build_model(
        FLAGS.model, FLAGS.ways, image_size=size, alpha=FLAGS.alpha,
        dropout=0.0, bn_momentum=FLAGS.bn_momentum)
    modulation = ({"hidden_units": FLAGS.hidden_units,
                   "filter_units": FLAGS.filter_units, "form": FLAGS.form,
                   "adapt_batchnorm": FLAGS.adapt_batchnorm,
                   "adapt_head": FLAGS.adapt_head,
                   "last_filter_units": FLAGS.last_filter_units or None}
                  if FLAGS.method == "km_maml" else {})
    learner = meta.make_learner(FLAGS.method, base, FLAGS.ways,
                                options=_options(), optimizer=optimizer,
                                **modulation)
    sampler = pools.sampler("train", ways=FLAGS.ways, shots=FLAGS.shots,
                            queries=FLAGS.queries,
                            seed=episode_seed("train"))
    stage = loop.meta_stage(learner, sampler,
                            meta_batch_size=FLAGS.meta_batch_size)
    return Setup(stage=stage, learner=learner, base=base)


def validation(learner: meta.MetaLearner | None,
               pools: meta_pools.MetaPools) -> Callable[[], float] | None:
    """Mean accuracy on the first --val_episodes meta-validation episodes
    (the same ones every time), or None (no --eval_every, or finetune)."""
    if learner is None or not FLAGS.eval_every:
        return None
    sampler = pools.sampler("validation", ways=FLAGS.ways, shots=FLAGS.shots,
                            queries=FLAGS.queries,
                            seed=episode_seed("validation"))

    def validate() -> float:
        return float(np.mean(learner.evaluate(
            sampler.episodes(FLAGS.val_episodes))))

    return validate


def evaluate(learner: meta.MetaLearner, sampler: meta.EpisodeSampler,
             count: int, log: loop.ProgressLog) -> dict[str, np.ndarray]:
    """Accuracy on `count` episodes under each of the learner's
    `scored_statistics` (`MetaLearner.evaluate`), with a log line per 100
    of the first (the headline score)."""
    statistics = learner.scored_statistics
    scores = {name: [] for name in statistics}
    for start in range(0, count, 100):
        chunk = min(100, count - start)
        for name, values in learner.evaluate_with(
                sampler.episodes(chunk, start=start),
                statistics=statistics).items():
            scores[name].extend(values)
        log.message(f"meta-test: {start + chunk}/{count} episodes, mean "
                    f"accuracy {np.mean(scores[statistics[0]]):.4f}")
    return {name: np.asarray(values) for name, values in scores.items()}


def write_outputs(learner: meta.MetaLearner, base: keras.Model,
                  pools: meta_pools.MetaPools, write_dir: str
                  ) -> dict[str, Any]:
    """Saves the base (and km_maml's init and example task); returns what
    the report says about them."""
    if FLAGS.method == "finetune":
        meta_base = base  # What fine-tuning starts from.
    else:
        meta_base = meta.meta_trained_base(learner)
    outputs: dict[str, Any] = {"base": _shown(BASE_FILE)}
    files.save_model_atomically(meta_base, os.path.join(write_dir, BASE_FILE))
    if FLAGS.method != "km_maml":
        return outputs
    meta.save_adapted_task(learner, learner.parameter_values(), meta_base,
                           os.path.join(write_dir, META_INIT_FILE))
    sampler = pools.sampler("test", ways=FLAGS.ways, shots=FLAGS.shots,
                            queries=FLAGS.queries, seed=episode_seed("test"))
    episode = sampler.episode(0)
    adapted = learner.adapt(learner.parameter_values(),
                            episode.support_images, episode.support_labels)
    statistics = None
    if FLAGS.task_statistics == "support":
        statistics = learner.support_statistics(adapted,
                                                episode.support_images)
    meta.save_adapted_task(learner, adapted, meta_base,
                           os.path.join(write_dir, EXAMPLE_TASK_FILE),
                           statistics=statistics)
    logits = learner.forward(adapted, episode.query_images, training=False,
                             statistics=statistics)
    outputs.update(
        meta_init=_shown(META_INIT_FILE),
        example_task={
            "file": _shown(EXAMPLE_TASK_FILE), "episode": 0,
            "episode_seed": episode_seed("test"),
            # What restore_task(base, file) scores on the query set
            # (inference mode: the task's BatchNorm statistics, or the
            # base's with --task_statistics=base).
            "statistics": FLAGS.task_statistics,
            "query_accuracy": float(meta.accuracy(episode.query_labels,
                                                  logits)),
            "bytes": os.path.getsize(os.path.join(write_dir,
                                                  EXAMPLE_TASK_FILE))})
    return outputs


def inner_rates(learner: meta.MetaLearner) -> list[dict[str, Any]]:
    """The inner step size of each weight a task adapts (the meta-learned
    ones with --learn_inner_rates): a task adapted elsewhere from the saved
    base must use these rates."""
    modulators = {id(v) for v in training.modulator_variables(learner.model)}
    return [{"variable": variable.path, "modulator": id(variable) in
             modulators, "rate": round(rate, 6)} for variable, rate
            in zip(learner.inner_variables, learner.inner_step_sizes())]


def _shown(name: str) -> str:
    return os.path.join(FLAGS.output_dir, name)


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}.")
    started = time.perf_counter()
    keras.utils.set_random_seed(FLAGS.seed)
    strategy = make_strategy()
    logging.info("Strategy %s with %d replica(s).", FLAGS.strategy,
                 strategy.num_replicas_in_sync)
    check_flags(strategy)
    pools = meta_pools.load_pools(FLAGS.data, FLAGS.image_size,
                                  data_dir=FLAGS.data_dir)
    meta_pools.check_classes(pools, ways=FLAGS.ways, shots=FLAGS.shots,
                             queries=FLAGS.queries)
    log = loop.ProgressLog(FLAGS.verbose if FLAGS.verbose == "auto"
                           else int(FLAGS.verbose))
    with common.resumable_run(FLAGS.output_dir, strategy,
                              programs=[__name__], ignore=OUTPUT_FLAGS,
                              restart=FLAGS.restart) as run_folders:
        write_dir, backup_root = run_folders.write_dir, run_folders.backup_root
        with strategy.scope():
            setup = build(pools)
        checkpoint = loop.Checkpoint(
            os.path.join(backup_root, loop.CHECKPOINT_FILE),
            setup.stage.variables)
        progress = checkpoint.restore() or {"step": 0, "history": []}
        train_started = time.perf_counter()
        history = loop.train(
            setup.stage, strategy=strategy, steps=FLAGS.meta_steps,
            start=progress["step"], history=progress["history"],
            checkpoint=checkpoint, checkpoint_every=FLAGS.checkpoint_every,
            log_every=FLAGS.log_every, eval_every=FLAGS.eval_every,
            validate=validation(setup.learner, pools), log=log)
        train_seconds = time.perf_counter() - train_started
        learner = setup.learner
        if learner is None:
            with strategy.scope():
                learner = meta.finetune(
                    setup.base, FLAGS.ways, options=_options(),
                    all_layers=FLAGS.finetune_layers == "all")
        test = pools.sampler("test", ways=FLAGS.ways, shots=FLAGS.shots,
                             queries=FLAGS.queries, seed=episode_seed("test"))
        evaluated = time.perf_counter()
        scores = evaluate(learner, test, FLAGS.eval_episodes, log)
        headline, *as_deployed = learner.scored_statistics
        accuracies = scores[headline]
        mean, half_width = meta.mean_confidence_interval(accuracies)
        deployed = {}
        for name in as_deployed:
            deployed_mean, deployed_half_width = (
                meta.mean_confidence_interval(scores[name]))
            deployed[name] = {"accuracy": deployed_mean,
                              "ci95": deployed_half_width}
        report = {
            "settings": _settings(strategy),
            "data": pools.summary(),
            "training": {
                "stage": setup.stage.name, "steps": FLAGS.meta_steps,
                "resumed_after": progress["step"],
                "seconds": round(train_seconds, 3), "history": history},
            "test": {
                "episodes": len(accuracies), "accuracy": mean,
                "ci95": half_width,
                "inner_steps": learner.options.evaluation_steps,
                "batch_statistics": learner.options.batch_statistics,
                "deployed": deployed,
                "seconds": round(time.perf_counter() - evaluated, 3)},
            "task_storage": task_storage(
                learner, own_statistics=FLAGS.method == "km_maml"
                and FLAGS.task_statistics == "support").to_dict(),
            "inner_rates": inner_rates(learner),
            "outputs": write_outputs(learner, setup.base, pools, write_dir),
            "seconds": round(time.perf_counter() - started, 3)}
        write_report(report, write_dir)
    if distribute.is_chief(strategy):
        print(report_text(report), flush=True)


def _settings(strategy: tf.distribute.Strategy) -> dict[str, Any]:
    names = ["method", "model", "alpha", "image_size", "data", "ways",
             "shots", "queries", "meta_batch_size", "inner_steps",
             "eval_inner_steps", "inner_learning_rate",
             "learn_inner_rates", "zero_head", "first_order",
             "outer_learning_rate", "outer_schedule", "meta_steps", "seed",
             "strategy"]
    if FLAGS.method == "km_maml":
        names += ["hidden_units", "filter_units", "form", "adapt_batchnorm",
                  "adapt_head", "last_filter_units",
                  "modulator_learning_rate", "last_modulator_learning_rate",
                  "task_statistics"]
    if FLAGS.method == "finetune":
        names += ["finetune_layers"]
    settings = {name: FLAGS[name].value for name in names}
    if FLAGS.method == "km_maml":
        settings["last_filter_units"] = FLAGS.last_filter_units or None
    if FLAGS.method == "finetune":
        settings["pretrain_batch_size"] = _pretrain_batch_size()
    return {**settings, "replicas": strategy.num_replicas_in_sync}


def report_text(report: dict[str, Any]) -> str:
    """The report for people (`meta.report.txt`)."""
    settings, data, training = (report["settings"], report["data"],
                                report["training"])
    test, storage = report["test"], report["task_storage"]
    classes = data["classes"]
    header = ", ".join(f"{key}={value}" for key, value in settings.items())
    resumed = (f", resumed after step {training['resumed_after']}"
               if training["resumed_after"] else "")
    lines = [
        f"km-tf meta-learning report ({header})",
        f"data: {data['spec']}, {data['images']} images at "
        f"{data['image_size']} px; classes meta-train {classes['train']}, "
        f"meta-validation {classes['validation']}, meta-test "
        f"{classes['test']} ({data['split']})",
        f"{training['stage']}: {training['steps']} steps{resumed}, "
        f"{training['seconds']:.1f} s in this run"]
    last = training["history"][-1] if training["history"] else {}
    if "loss" in last:
        lines.append(f"  last interval: loss {last['loss']:.4f}, accuracy "
                     f"{last['accuracy']:.4f}")
    validations = [r for r in training["history"] if "val_accuracy" in r]
    if validations:
        lines.append(f"  meta-validation accuracy at step "
                     f"{validations[-1]['step']}: "
                     f"{100 * validations[-1]['val_accuracy']:.2f}%")
    lines += [
        f"meta-test: {settings['ways']}-way {settings['shots']}-shot, "
        f"{test['episodes']} episodes, {test['inner_steps']} inner steps: "
        f"accuracy {100 * test['accuracy']:.2f}% +- "
        f"{100 * test['ci95']:.2f}% (95% CI)"
        + (" with the query set's batch statistics (transductive)"
           if test["deployed"] else "")]
    names = {"moving": "the moving statistics of meta-training",
             "support": "statistics re-estimated on the support set"}
    for name, score in test["deployed"].items():
        lines.append(f"  as deployed, with {names[name]}: "
                     f"{100 * score['accuracy']:.2f}% +- "
                     f"{100 * score['ci95']:.2f}%")
    lines += [
        f"per task: {storage['contents']}, {storage['task_bytes']:,} bytes "
        f"({storage['percent_of_base']:.2f}% of the "
        f"{storage['base_bytes']:,}-byte base)"]
    rates = report.get("inner_rates", [])
    if settings.get("learn_inner_rates") and rates:
        lines.append("learned inner rates (each in meta.report.json): "
                     + ", ".join(f"{name} {min(group):.4g} .. "
                                 f"{max(group):.4g}"
                                 for name, group in _rate_groups(rates)))
    outputs = report["outputs"]
    written = [outputs["base"], outputs.get("meta_init")]
    if "example_task" in outputs:
        example = outputs["example_task"]
        written.append(example["file"])
        lines.append(f"example task (meta-test episode 0): query accuracy "
                     f"{100 * example['query_accuracy']:.2f}% in inference "
                     f"mode ({example['statistics']} statistics), "
                     f"{example['bytes']:,} bytes")
    lines.append("wrote " + ", ".join(name for name in written if name))
    lines.append(f"total time {report['seconds']:.1f} s")
    return "\n".join(lines)


def _rate_groups(rates: list[dict[str, Any]]
                 ) -> list[tuple[str, list[float]]]:
    """The rates of modulator weights and of the rest, for the text."""
    groups = {"modulators": [], "other weights": []}
    for rate in rates:
        groups["modulators" if rate["modulator"]
               else "other weights"].append(rate["rate"])
    return [(name, group) for name, group in groups.items() if group]


def write_report(report: dict[str, Any], directory: str) -> None:
    """`meta.report.json` and `meta.report.txt`, atomically."""
    files.write_atomically(
        os.path.join(directory, REPORT_NAME + ".json"),
        (json.dumps(report, indent=2) + "\n").encode())
    files.write_atomically(os.path.join(directory, REPORT_NAME + ".txt"),
                           (report_text(report) + "\n").encode())


def run() -> None:
    """The `km-meta-train` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
