"""Trains a base network and Kernel Modulation tasks on it.

    python apps/train.py                      # the offline main job (below)
    python apps/train.py --mode=pretrain --pretrain_data=digits:0-4 \\
        --output_dir=runs/base
    python apps/train.py --mode=task --base=runs/base/base.keras \\
        --task_data=digits:5-9 --shots=40 --output_dir=runs/task59
    python apps/train.py --flagfile=configs/my_run.flags

Modes: `pretrain` trains a plain base classifier and saves it as
`base.keras`; `task` loads a base, modulates it (`km_tf.modulate`), trains
one task and saves only the per-task file `{task_name}.kmtask`; `all` (the
default) does both in one run: pretrain MobileNetV2 (alpha 0.35, 32x32) on
scikit-learn's digits 0-4, then adapt a KM task to digits 5-9. Every run
writes `report.json` and `report.txt` (accuracy, per-task bytes, % of the
base, time) into `--output_dir`.

A killed run resumes where it stopped: start the same command again
(`BackupAndRestore` keeps the last finished epoch under
`{output_dir}/backup`). Strategies: `--strategy=mirrored` (all local GPUs),
`multi_worker` (set `TF_CONFIG` on every worker; only the chief writes the
outputs) and `tpu` (`--tpu=ADDRESS`). `--batch_size` is the global batch.
"""

import os
import shutil
import sys
import time
from pathlib import Path

# apps/ is a folder of programs, not a package: put the repository root on
# the path for km_tf.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402

import keras  # noqa: E402

import km_tf  # noqa: E402
from km_tf import (data, distribute, layers, models, reporting,  # noqa: E402
                   training)

MODES = ("all", "pretrain", "task")
BASE_FILE = "base.keras"
DEFAULT_IMAGE_SIZE = 32

# What to do.
flags.DEFINE_enum("mode", "all", MODES,
                  "pretrain: train a base network and save it; task: "
                  "modulate --base and train one task; all: both in turn.")
# Model.
flags.DEFINE_enum("model", "mobilenet_v2", list(models.MODEL_NAMES),
                  "Base network to pretrain (mode pretrain/all).")
flags.DEFINE_float("alpha", 0.35, "Width multiplier of the base network.")
flags.DEFINE_integer("image_size", None, "Input height and width in pixels "
                     f"(default: {DEFAULT_IMAGE_SIZE} for a new base; a "
                     "task takes its base's, and a different value is an "
                     "error).")
flags.DEFINE_float("bn_momentum", models.DEFAULT_BN_MOMENTUM,
                   "BatchNorm momentum of a pretrained base. Keras' 0.999 "
                   "leaves a briefly trained base at chance in inference.")
flags.DEFINE_float("dropout", 0.2, "Dropout before the classifier head.")
flags.DEFINE_string("base", None, "mode=task: the base network's .keras file "
                    "(from mode=pretrain).")
# Data.
flags.DEFINE_string("pretrain_data", "digits:0-4",
                    "Dataset spec of the base (see km_tf.data): "
                    + ", ".join(data.SPEC_FORMS))
flags.DEFINE_string("task_data", "digits:5-9", "Dataset spec of the task.")
flags.DEFINE_integer("shots", None, "Few-shot task: training images per "
                     "class (default: all of them).")
flags.DEFINE_integer("batch_size", 32, "Global batch size (split across "
                     "replicas).")
flags.DEFINE_float("augment", 0.0, "Augmentation strength in [0, 1].")
flags.DEFINE_boolean("flip", False, "Random left-right flips when "
                     "augmenting (off for digits and text).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder.")
flags.DEFINE_integer("seed", 0, "Seed of weights, splits and shuffling.")
# Optimization.
flags.DEFINE_integer("pretrain_epochs", 30, "Epochs of the base.")
flags.DEFINE_integer("task_epochs", 30, "Epochs of the task.")
flags.DEFINE_integer("steps_per_epoch", None, "Train steps per epoch "
                     "(default: one pass over the training images).")
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
flags.DEFINE_enum("batchnorm", "train", list(km_tf.convert.BATCHNORM_MODES),
                  "train: BatchNorm is part of the task; freeze: keep the "
                  "base's.")
# Output.
flags.DEFINE_string("output_dir", "runs/main", "Folder for the base, task "
                    "file, report, checkpoints, backups and logs.")
flags.DEFINE_string("task_name", "task", "Task file name (without .kmtask).")
flags.DEFINE_boolean("tensorboard", False, "Write TensorBoard logs under "
                     "{output_dir}/logs.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"],
                  "Keras fit verbosity: auto/1 a progress bar, 2 a line per "
                  "epoch, 0 silent.")
# Distribution.
flags.DEFINE_enum("strategy", "default", list(distribute.STRATEGY_NAMES),
                  "default: one device; mirrored: all local GPUs; "
                  "multi_worker: the workers in TF_CONFIG; tpu: --tpu.")
flags.DEFINE_string("tpu", None, "TPU name or grpc:// address "
                    "(strategy=tpu); empty finds it on a TPU VM.")

FLAGS = flags.FLAGS


def _load_data(spec: str, image_size: tuple[int, int],
               **options) -> data.ImageDatasets:
    """Loads a dataset spec with the input settings shared by both stages:
    RGB pixels in [0, 255], which every km-tf model normalizes itself."""
    return data.load(
        spec, image_size=image_size, batch_size=FLAGS.batch_size,
        augment=FLAGS.augment, flip=FLAGS.flip, seed=FLAGS.seed,
        data_dir=FLAGS.data_dir, **options)


def _optimizer(learning_rate: float,
               dataset: data.ImageDatasets) -> training.OptimizerOptions:
    """The optimizer flags, with warm-up converted from epochs to steps."""
    steps = FLAGS.steps_per_epoch or -(-dataset.counts["train"]
                                       // FLAGS.batch_size)
    return training.OptimizerOptions(
        name=FLAGS.optimizer, learning_rate=learning_rate,
        schedule=FLAGS.schedule,
        warmup_steps=round(FLAGS.warmup_epochs * steps),
        weight_decay=FLAGS.weight_decay, momentum=FLAGS.momentum)


def _fit(stage: str, build, dataset: data.ImageDatasets, learning_rate: float,
         epochs: int, strategy, backup_root: str,
         write_dir: str) -> training.FitResult:
    """Trains one stage with the shared flags."""
    verbose = FLAGS.verbose if FLAGS.verbose == "auto" else int(FLAGS.verbose)
    return training.fit_and_evaluate(
        build, dataset, strategy=strategy,
        optimizer=_optimizer(learning_rate, dataset), epochs=epochs,
        backup_dir=os.path.join(backup_root, stage), write_dir=write_dir,
        stage=stage, steps_per_epoch=FLAGS.steps_per_epoch,
        tensorboard=FLAGS.tensorboard, verbose=verbose)


def pretrain(strategy, backup_root: str,
             write_dir: str) -> reporting.StageReport:
    """Trains the base classifier and saves it as `base.keras`."""
    size = FLAGS.image_size or DEFAULT_IMAGE_SIZE
    dataset = _load_data(FLAGS.pretrain_data, (size, size))
    result = _fit(
        "pretrain",
        lambda: models.build_model(
            FLAGS.model, dataset.num_classes, image_size=size,
            alpha=FLAGS.alpha, dropout=FLAGS.dropout,
            bn_momentum=FLAGS.bn_momentum),
        dataset, FLAGS.learning_rate, FLAGS.pretrain_epochs, strategy,
        backup_root, write_dir)
    path = os.path.join(write_dir, BASE_FILE)
    result.model.save(path)
    return _stage_report("pretrain", FLAGS.pretrain_data,
                         dataset, result, path)


def train_task(strategy, base: keras.Model, backup_root: str,
               write_dir: str) -> reporting.StageReport:
    """Modulates `base`, trains the task and saves its `.kmtask` file."""
    dataset = _load_data(FLAGS.task_data, _task_image_size(base),
                         shots=FLAGS.shots)
    result = _fit(
        "task",
        lambda: models.build_task_model(
            base, dataset.num_classes, hidden_units=FLAGS.hidden_units,
            filter_units=FLAGS.filter_units, form=FLAGS.form,
            batchnorm=FLAGS.batchnorm),
        dataset, FLAGS.task_learning_rate, FLAGS.task_epochs, strategy,
        backup_root, write_dir)
    path = os.path.join(write_dir, f"{FLAGS.task_name}.kmtask")
    km_tf.save_task(result.model, path)
    return _stage_report("task", FLAGS.task_data, dataset, result, path,
                         task=km_tf.task_report(result.model))


def _task_image_size(base: keras.Model) -> tuple[int, int]:
    """The base's input size; a contradicting --image_size is an error."""
    try:
        return models.input_size(base, expected=FLAGS.image_size,
                                 what="--image_size")
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def _stage_report(stage: str, spec: str, dataset: data.ImageDatasets,
                  result: training.FitResult, path: str,
                  task: km_tf.TaskReport | None = None
                  ) -> reporting.StageReport:
    return reporting.StageReport(
        stage=stage, data=spec, train_images=dataset.counts["train"],
        epochs=result.epochs, accuracy=result.accuracy,
        seconds=round(result.seconds, 3),
        output=os.path.join(FLAGS.output_dir, os.path.basename(path)),
        task=task)


def load_base(strategy, path: str) -> keras.Model:
    """Loads a base `.keras` file inside the strategy's scope."""
    if not path or not os.path.isfile(path):
        raise app.UsageError(
            f"--base={path!r} is not a file: pass the base.keras written by "
            "--mode=pretrain (or use --mode=all).")
    with strategy.scope():
        base = keras.saving.load_model(path, compile=False)
    if models.input_normalization(base) is None:
        logging.warning(
            "Base %s has no input normalization layer: km-tf feeds RGB "
            "pixels in [0, 255]. If it expects normalized inputs (e.g. a "
            "keras.applications network), save it with "
            "km_tf.models.add_preprocessing(base, mode) first.", path)
    return base


def obtain_base(strategy, backup_root: str, write_dir: str,
                stages: list[reporting.StageReport]) -> keras.Model | None:
    """The base of the task stage: --base, pretrained now, or resumed.

    In mode=all the freshly pretrained base is kept with the backups until
    the run completes, so that a run killed during the task stage resumes
    on the same base instead of pretraining a new one. Mode pretrain
    returns `None` (there is no task stage).
    """
    kept_base = os.path.join(backup_root, BASE_FILE)
    if FLAGS.mode == "task":
        return load_base(strategy, FLAGS.base)
    if FLAGS.mode == "all" and os.path.isfile(kept_base):
        logging.info("Resuming: reusing the base in %s.", kept_base)
        return load_base(strategy, kept_base)
    stages.append(pretrain(strategy, backup_root, write_dir))
    if FLAGS.mode == "pretrain":
        return None
    os.makedirs(backup_root, exist_ok=True)
    # The task trains on the base exactly as saved, so the task file matches
    # the base file (a reloaded model can differ in auto-generated names).
    shutil.copyfile(os.path.join(write_dir, BASE_FILE), kept_base)
    return load_base(strategy, kept_base)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    keras.utils.set_random_seed(FLAGS.seed)
    start = time.perf_counter()
    strategy = distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu)
    logging.info("Strategy %s with %d replica(s).", FLAGS.strategy,
                 strategy.num_replicas_in_sync)
    backup_root = distribute.backup_dir_for(
        os.path.join(FLAGS.output_dir, "backup"), strategy)
    stages = []
    with distribute.output_dir_for(FLAGS.output_dir, strategy) as write_dir:
        base = obtain_base(strategy, backup_root, write_dir, stages)
        if FLAGS.mode != "pretrain":
            stages.append(train_task(strategy, base, backup_root, write_dir))
        report = reporting.RunReport(
            settings=_settings(strategy, base), stages=stages,
            seconds=time.perf_counter() - start)
        reporting.write_report(report, write_dir)
    shutil.rmtree(backup_root, ignore_errors=True)
    if distribute.is_chief(strategy):
        print(report, flush=True)


def _settings(strategy, base: keras.Model | None) -> dict:
    """The flags that shape the run, and the input size used, for the
    report."""
    names = ["mode", "model", "alpha", "batch_size", "shots", "optimizer",
             "schedule", "hidden_units", "filter_units", "form", "batchnorm",
             "strategy"]
    size = (models.input_size(base)[0] if base is not None
            else FLAGS.image_size or DEFAULT_IMAGE_SIZE)
    return {**{name: FLAGS[name].value for name in names},
            "image_size": size, "replicas": strategy.num_replicas_in_sync}


if __name__ == "__main__":
    app.run(main)
