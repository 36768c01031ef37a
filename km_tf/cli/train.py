"""Trains a base network and Kernel Modulation tasks on it.

    km-train                      # the offline main job (below)
    km-train --mode=pretrain --pretrain_data=digits:0-4 \\
        --output_dir=runs/base
    km-train --mode=task --base=runs/base/base.keras \\
        --task_data=digits:5-9 --shots=40 --output_dir=runs/task59
    km-train --flagfile=configs/my_run.flags

(`km-train` is the console program `pip install .` makes; `python
apps/train.py` runs the same.)

Modes: `pretrain` trains a plain base classifier and saves it as
`base.keras`; `task` loads a base, modulates it (`km_tf.modulate`), trains
one task and saves only the per-task file `{task_name}.kmtask`; `all` (the
default) does both in one run: pretrain MobileNetV2 (alpha 0.35, 32x32) on
scikit-learn's digits 0-4, then adapt a KM task to digits 5-9. Every run
writes `report.json` and `report.txt` (accuracy, per-task bytes, % of the
base, time) into `--output_dir`. By default (`--batchnorm=auto`) a task's
BatchNorm mode and modulator rate follow the measured rule of
`km_tf.recipes` for its training images per class (BatchNorm frozen and the
modulators at 0.03x the head's rate below 16, else BatchNorm trained and one
rate); the report says what was chosen and why.

A killed run resumes where it stopped: start the same command again
(`BackupAndRestore` keeps the last finished epoch under
`{output_dir}/backup`). Strategies: `--strategy=mirrored` (all local GPUs),
`multi_worker` (set `TF_CONFIG` on every worker; only the chief writes the
outputs) and `tpu` (`--tpu=ADDRESS`). `--batch_size` is the global batch.
"""

import dataclasses
import json
import os
import shutil
import time

import keras
from absl import flags, logging

import km_tf
from km_tf import distribute, files, layers, recipes, reporting, training
from km_tf.cli import common

MODES = ("all", "pretrain", "task")
BASE_FILE = "base.keras"
PRETRAIN_REPORT_FILE = "pretrain_report.json"
# Flags that change where and how a run reports, not what it trains: a
# resumed run may change them.
OUTPUT_FLAGS = ("output_dir", "task_name", "tensorboard", "verbose",
                "restart", "strategy", "tpu")

flags.DEFINE_enum("mode", "all", MODES,
                  "pretrain: train a base network and save it; task: "
                  "modulate --base and train one task; all: both in turn.")
common.define_base_flags()
common.define_data_flags(pretrain_epochs=30)
common.define_strategy_flags()
common.define_restart_flag()
# Training.
flags.DEFINE_integer("task_epochs", 30, "Epochs of the task.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Train steps per epoch "
                     "(default: one pass over the training images).",
                     lower_bound=1)
flags.DEFINE_float("augment", 0.0, "Augmentation strength in [0, 1].",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("optimizer", "adam", list(training.OPTIMIZERS),
                  "Optimizer of both stages.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate of the base.")
flags.DEFINE_float("task_learning_rate", 3e-3, "Peak learning rate of the "
                   "task (modulators, BatchNorm, head).")
flags.DEFINE_enum("schedule", "cosine", list(training.SCHEDULES),
                  "Learning-rate schedule after the warm-up.")
flags.DEFINE_float("warmup_epochs", 1.0, "Linear warm-up, in epochs.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay (adamw).")
flags.DEFINE_float("momentum", 0.9, "Momentum (sgd).")
# What trains per task.
flags.DEFINE_integer("hidden_units", layers.DEFAULT_HIDDEN_UNITS,
                     "Hidden width of the modulators of kh x kw kernel units "
                     "(the task-size knob).")
flags.DEFINE_integer("filter_units", layers.DEFAULT_FILTER_UNITS,
                     "Hidden width of the modulators of whole-filter units.")
flags.DEFINE_enum("form", layers.DEFAULT_FORM, list(layers.MODULATOR_FORMS),
                  "Modulator unit: spatial (each kh x kw kernel), filter "
                  "(each output filter), hybrid (spatial, but filter for 1x1 "
                  "kernels).")
flags.DEFINE_enum("batchnorm", recipes.AUTO, list(recipes.BATCHNORM_CHOICES),
                  "train: BatchNorm is part of the task; freeze: keep the "
                  "base's; auto: freeze below "
                  f"{recipes.FEW_IMAGES_PER_CLASS} training images in the "
                  "task's smallest class, else train (the measured rule, "
                  "BUILD.md).")
flags.DEFINE_float("modulator_rate_factor", None, "The modulators' learning "
                   "rate as a multiple of --task_learning_rate (the head's "
                   "and BatchNorm's). Default: by the rule with "
                   "--batchnorm=auto ("
                   f"{recipes.FEW_IMAGES_MODULATOR_RATE_FACTOR:g} when it "
                   "freezes BatchNorm, else 1), 1 otherwise; a value given "
                   "always wins.")
# Output.
flags.DEFINE_string("output_dir", "runs/main", "Folder for the base, task "
                    "file, report, checkpoints, backups and logs.")
flags.DEFINE_string("task_name", "task", "Task file name (without .kmtask).")
flags.DEFINE_boolean("tensorboard", False, "Write TensorBoard logs under "
                     "{output_dir}/logs.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"],
                  "Keras fit verbosity: auto a progress bar on a terminal "
                  "and a line per epoch in a log, 1 a progress bar, 2 a "
                  "line per epoch, 0 silent.")

FLAGS = flags.FLAGS


def _optimizer(learning_rate: float, dataset: km_tf.data.ImageDatasets,
               modulator_rate_factor: float = 1.0
               ) -> training.OptimizerOptions:
    """The optimizer flags, with warm-up converted from epochs to steps."""
    steps = FLAGS.steps_per_epoch or -(-dataset.counts["train"]
                                       // FLAGS.batch_size)
    return training.OptimizerOptions(
        name=FLAGS.optimizer, learning_rate=learning_rate,
        schedule=FLAGS.schedule,
        warmup_steps=round(FLAGS.warmup_epochs * steps),
        weight_decay=FLAGS.weight_decay, momentum=FLAGS.momentum,
        modulator_rate_factor=modulator_rate_factor)


def _verbosity() -> str | int:
    return FLAGS.verbose if FLAGS.verbose == "auto" else int(FLAGS.verbose)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a run reads, loaded and checked before it writes anything.

    Attributes:
        base: `--base` (mode task), else None.
        pretrain_data: The base's data (modes all and pretrain), else None.
        task_data: The task's data (modes all and task), else None.
        recipe: The task's BatchNorm mode and modulator rate, resolved from
            the flags and `task_data` (`km_tf.recipes.resolve_recipe`), or
            None without a task.
    """

    base: keras.Model | None
    pretrain_data: km_tf.data.ImageDatasets | None
    task_data: km_tf.data.ImageDatasets | None
    recipe: recipes.KMRecipe | None


def pretrain(strategy, dataset: km_tf.data.ImageDatasets, backup_root: str,
             write_dir: str) -> reporting.StageReport:
    """Trains the base classifier and saves it as `base.keras`."""
    result = common.pretrain(
        dataset, strategy=strategy,
        optimizer=_optimizer(FLAGS.learning_rate, dataset),
        backup_dir=os.path.join(backup_root, "pretrain"),
        write_dir=write_dir, steps_per_epoch=FLAGS.steps_per_epoch,
        verbose=_verbosity(), tensorboard=FLAGS.tensorboard)
    path = os.path.join(write_dir, BASE_FILE)
    files.save_model_atomically(result.model, path)
    report = _stage_report("pretrain", FLAGS.pretrain_data, dataset, result,
                           path)
    # Kept with the backups: a run resumed in its task stage reports both.
    files.write_atomically(os.path.join(backup_root, PRETRAIN_REPORT_FILE),
                           json.dumps(report.to_dict()).encode())
    return report


def train_task(strategy, base: keras.Model,
               dataset: km_tf.data.ImageDatasets, recipe: recipes.KMRecipe,
               backup_root: str, write_dir: str) -> reporting.StageReport:
    """Modulates `base`, trains the task as `recipe` says and saves its
    `.kmtask` file."""
    logging.info("Task settings: %s.", recipe.reason)
    result = training.fit_and_evaluate(
        lambda: km_tf.models.build_task_model(
            base, dataset.num_classes, hidden_units=FLAGS.hidden_units,
            filter_units=FLAGS.filter_units, form=FLAGS.form,
            batchnorm=recipe.batchnorm),
        dataset, strategy=strategy,
        optimizer=_optimizer(FLAGS.task_learning_rate, dataset,
                             recipe.modulator_rate_factor),
        epochs=FLAGS.task_epochs,
        backup_dir=os.path.join(backup_root, "task"), write_dir=write_dir,
        stage="task", steps_per_epoch=FLAGS.steps_per_epoch,
        tensorboard=FLAGS.tensorboard, verbose=_verbosity())
    path = os.path.join(write_dir, f"{FLAGS.task_name}.kmtask")
    km_tf.save_task(result.model, path)
    return _stage_report("task", FLAGS.task_data, dataset, result, path,
                         task=km_tf.task_report(result.model))


def _stage_report(stage: str, spec: str, dataset: km_tf.data.ImageDatasets,
                  result: training.FitResult, path: str,
                  task: km_tf.TaskReport | None = None
                  ) -> reporting.StageReport:
    return reporting.StageReport(
        stage=stage, data=spec, train_images=dataset.counts["train"],
        epochs=result.epochs, accuracy=result.accuracy,
        seconds=round(result.seconds, 3),
        output=os.path.join(FLAGS.output_dir, os.path.basename(path)),
        task=task)


def check_inputs(strategy) -> Inputs:
    """Loads and checks everything a run reads before it creates an output:
    the optimizer settings, `--base` and its input size (mode task), the
    datasets (specs, folders, decodable images, class counts) and the
    task's settings (`--batchnorm=auto` resolved from its training
    split)."""
    factor = FLAGS.modulator_rate_factor
    for rate in (FLAGS.learning_rate, FLAGS.task_learning_rate):
        training.OptimizerOptions(
            name=FLAGS.optimizer, learning_rate=rate, schedule=FLAGS.schedule,
            modulator_rate_factor=1.0 if factor is None else factor)
    base = pretrain_data = task_data = recipe = None
    if FLAGS.mode == "task":
        if not FLAGS.base:
            raise FileNotFoundError(
                "--mode=task needs --base: pass the base.keras written by "
                "--mode=pretrain (or use --mode=all).")
        base = common.load_base(FLAGS.base, strategy)
        size = common.task_image_size(base)
    else:
        size = common.pretrain_image_size()
        pretrain_data = common.load_data(FLAGS.pretrain_data, size,
                                         augment=FLAGS.augment)
    if FLAGS.mode != "pretrain":
        task_data = common.load_data(FLAGS.task_data, size,
                                     augment=FLAGS.augment, shots=FLAGS.shots)
        recipe = recipes.resolve_recipe(
            FLAGS.batchnorm, FLAGS.modulator_rate_factor,
            images_per_class=recipes.training_images_per_class(
                task_data.class_counts["train"]))
    return Inputs(base, pretrain_data, task_data, recipe)


def obtain_base(strategy, inputs: Inputs, backup_root: str, write_dir: str,
                stages: list[reporting.StageReport]) -> keras.Model | None:
    """The base of the task stage (mode all): pretrained now, or resumed.

    In mode=all the freshly pretrained base is kept with the backups until
    the run completes, so that a run killed during the task stage resumes
    on the same base instead of pretraining a new one. Mode pretrain
    returns `None` (there is no task stage).
    """
    kept_base = os.path.join(backup_root, BASE_FILE)
    if FLAGS.mode == "all" and os.path.isfile(kept_base):
        logging.info("Resuming: reusing the base in %s.", kept_base)
        with open(os.path.join(backup_root, PRETRAIN_REPORT_FILE)) as stream:
            stages.append(reporting.StageReport(**json.load(stream)))
        return common.load_base(kept_base, strategy)
    stages.append(pretrain(strategy, inputs.pretrain_data, backup_root,
                           write_dir))
    if FLAGS.mode == "pretrain":
        return None
    os.makedirs(backup_root, exist_ok=True)
    # The task trains on the base exactly as saved.
    shutil.copyfile(os.path.join(write_dir, BASE_FILE), kept_base)
    return common.load_base(kept_base, strategy)


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}.")
    keras.utils.set_random_seed(FLAGS.seed)
    start = time.perf_counter()
    strategy = distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu)
    logging.info("Strategy %s with %d replica(s).", FLAGS.strategy,
                 strategy.num_replicas_in_sync)
    inputs = check_inputs(strategy)
    stages = []
    with common.resumable_run(FLAGS.output_dir, strategy,
                              programs=[__name__], ignore=OUTPUT_FLAGS,
                              restart=FLAGS.restart) as run_folders:
        write_dir, backup_root = run_folders.write_dir, run_folders.backup_root
        base = inputs.base or obtain_base(strategy, inputs, backup_root,
                                          write_dir, stages)
        if FLAGS.mode != "pretrain":
            stages.append(train_task(strategy, base, inputs.task_data,
                                     inputs.recipe, backup_root, write_dir))
        report = reporting.RunReport(
            settings=_settings(strategy, base, inputs.recipe), stages=stages,
            seconds=time.perf_counter() - start)
        reporting.write_report(report, write_dir)
    if distribute.is_chief(strategy):
        print(report, flush=True)


def _settings(strategy, base: keras.Model | None,
              recipe: recipes.KMRecipe | None) -> dict:
    """The flags that shape the run, and the input size used, for the
    report; with a task, the BatchNorm mode and modulator rate it trained
    with (`--batchnorm=auto` resolved) and why (`recipe`)."""
    names = ["mode", "model", "alpha", "batch_size", "shots", "optimizer",
             "schedule", "hidden_units", "filter_units", "form", "batchnorm",
             "modulator_rate_factor", "strategy"]
    size = (km_tf.models.input_size(base)[0] if base is not None
            else common.pretrain_image_size()[0])
    settings = {name: FLAGS[name].value for name in names}
    if recipe is not None:
        settings.update(batchnorm=recipe.batchnorm,
                        modulator_rate_factor=recipe.modulator_rate_factor,
                        recipe=recipe.reason)
    return {**settings, "image_size": size,
            "replicas": strategy.num_replicas_in_sync}


def run() -> None:
    """The `km-train` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
