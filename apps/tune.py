"""Searches KM task hyperparameters under a budget, then trains the best.

Runs a keras-tuner search (random, bayesian or hyperband) over the modulator
size, BatchNorm training, AdamW learning rate and weight decay, and the
augmentation strength (see `km_tf.tuning`); trials whose task would exceed
`--max_task_params` / `--max_task_percent` are never run or never win. The
search state lives in `--output_dir/--project_name`: run the same command
again after an interruption and it resumes, skipping finished trials. At
the end the best configuration is trained for `--final_epochs` and saved as
`task.kmtask`, with `tune_report.json` and `tune_report.txt`.

Without `--base`, a small base is pretrained first on `--pretrain_data`
and kept as `--output_dir/base.keras` (reused on a resumed run, so the
trials stay comparable).

Example:
    python apps/tune.py --task_data=digits:5-9 --trials=8 --epochs=3 \\
        --max_task_percent=5 --output_dir=runs/tune
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# apps/ is a folder of programs, not a package: put the repository root on
# the path for km_tf.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import km_tf  # noqa: E402
from km_tf import (data, distribute, models, reporting, training,  # noqa: E402
                   tuning)

_DEFAULT_SPACE = tuning.SearchSpace()
DEFAULT_IMAGE_SIZE = 32  # Of a base pretrained here.

# Search.
_TUNER = flags.DEFINE_enum("tuner", "random", list(tuning.TUNER_NAMES),
                           "keras-tuner algorithm.")
_TRIALS = flags.DEFINE_integer(
    "trials", 10, "Most trials (random, bayesian); Hyperband sizes itself "
    "from --epochs.", lower_bound=1)
_EPOCHS = flags.DEFINE_integer(
    "epochs", 3, "Epochs per trial (Hyperband: the most a trial gets).",
    lower_bound=1)
_FINAL_EPOCHS = flags.DEFINE_integer(
    "final_epochs", None, "Epochs to train the best configuration; default "
    "--epochs.", lower_bound=1)
_STEPS = flags.DEFINE_integer(
    "steps_per_epoch", None, "Train steps per epoch (the data repeats); "
    "default one pass over the training data.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the search and the data.")

# Search space and budget: one list flag per `SearchSpace` field, with the
# type of its values.
_SPACE_FIELDS = {
    "hidden_units": (int, "Modulator hidden widths to search."),
    "filter_units": (int, "Filter-unit modulator widths to search."),
    "batchnorm": (str, "BatchNorm per task: 'train' (parameters and "
                  "statistics stored per task), 'freeze' (the base's), or "
                  "both to search."),
    "learning_rate": (float, "LOW,HIGH of the log-uniform AdamW learning "
                      "rate."),
    "weight_decay": (float, "LOW,HIGH of the log-uniform AdamW weight "
                     "decay."),
    "augment": (float, "Training augmentation strengths in [0, 1] to search "
                "(see km_tf.data.load)."),
}
_SPACE_FLAGS = {
    name: flags.DEFINE_list(
        name, [str(v) for v in getattr(_DEFAULT_SPACE, name)], help_text)
    for name, (_, help_text) in _SPACE_FIELDS.items()
}
_MAX_TASK_PARAMS = flags.DEFINE_integer(
    "max_task_params", None, "Most per-task parameters (modulators, trained "
    "BatchNorm, head) a configuration may have.", lower_bound=1)
_MAX_TASK_PERCENT = flags.DEFINE_float(
    "max_task_percent", None, "Most per-task parameters as a percentage of "
    "the base's.", lower_bound=0.0)

# Data.
_TASK_DATA = flags.DEFINE_string(
    "task_data", "digits:5-9", "Dataset spec of the task (see km_tf.data): "
    + ", ".join(data.SPEC_FORMS))
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input height and "
                                   "width of a base pretrained here (default "
                                   f"{DEFAULT_IMAGE_SIZE}); with --base it "
                                   "must be the base's.",
                                   lower_bound=32)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size.",
                                   lower_bound=1)
_SHOTS = flags.DEFINE_integer("shots", None, "Few-shot: training images per "
                              "class.", lower_bound=1)
_FLIP = flags.DEFINE_bool("flip", False, "Augmentation includes left-right "
                          "flips (keep off for digits and text).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data "
                                "folder.")

# Base network.
_BASE = flags.DEFINE_string(
    "base", None, "Base classifier .keras file (head named 'head'); none: "
    "pretrain one (see --pretrain_data).")
_MODEL = flags.DEFINE_enum(
    "model", "mobilenet_v2", list(models.MODEL_NAMES),
    "Architecture of the base: picks the input normalisation, and what to "
    "pretrain without --base.")
_ALPHA = flags.DEFINE_float("alpha", 0.35, "Width multiplier of a "
                            "pretrained base.")
_PRETRAIN_DATA = flags.DEFINE_string(
    "pretrain_data", "digits:0-4", "Dataset to pretrain a base on when "
    "--base is not given.")
_PRETRAIN_EPOCHS = flags.DEFINE_integer("pretrain_epochs", 5, "Epochs to "
                                        "pretrain that base.", lower_bound=1)

# Run.
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", list(distribute.STRATEGY_NAMES),
    "Distribution strategy each trial trains under.")
_TPU = flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "runs/tune", "Folder of the search state, base, task file "
    "and report.")
_PROJECT_NAME = flags.DEFINE_string(
    "project_name", "search", "Sub-folder of the tuner's state; the same "
    "name resumes a search.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the previous "
                               "search state and start afresh.")


def search_space() -> tuning.SearchSpace:
    """The search space the flags describe."""
    fields = {}
    for name, (kind, _) in _SPACE_FIELDS.items():
        values = _SPACE_FLAGS[name].value
        try:
            fields[name] = tuple(kind(value) for value in values)
        except ValueError:
            raise app.UsageError(f"--{name} takes {kind.__name__} values; "
                                 f"got {values}.") from None
    for name in ("learning_rate", "weight_decay"):
        if len(fields[name]) != 2:
            raise app.UsageError(f"--{name} takes LOW,HIGH; got "
                                 f"{_SPACE_FLAGS[name].value}.")
    try:
        return tuning.SearchSpace(**fields)
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def load_data(spec: str, augment: float, image_size: tuple[int, int],
              shots: int | None = None) -> data.ImageDatasets:
    """The pipelines of dataset `spec`: RGB pixels in [0, 255], which
    km-tf models normalize themselves.

    Args:
        spec: Dataset spec (`km_tf.data.load`).
        augment: Training augmentation strength in `[0, 1]`.
        image_size: The base's input height and width.
        shots: Training images per class; `None` for all.

    Returns:
        The `ImageDatasets`.
    """
    return data.load(spec, image_size=image_size, shots=shots,
                     batch_size=_BATCH_SIZE.value, augment=augment,
                     flip=_FLIP.value, seed=_SEED.value,
                     data_dir=_DATA_DIR.value)


def base_model(output_dir: str,
               strategy: tf.distribute.Strategy) -> keras.Model:
    """The base network to tune tasks on.

    Args:
        output_dir: This run's output folder.
        strategy: The strategy to pretrain under.

    Returns:
        `--base`, else the `base.keras` kept in `output_dir`, else a base
        pretrained now on `--pretrain_data` (and saved there).
    """
    if _BASE.value:
        logging.info("Base: %s", _BASE.value)
        return keras.saving.load_model(_BASE.value)
    path = os.path.join(output_dir, "base.keras")
    if os.path.exists(path):
        logging.info("Base: reusing %s", path)
        return keras.saving.load_model(path)
    size = _IMAGE_SIZE.value or DEFAULT_IMAGE_SIZE
    pretrain = load_data(_PRETRAIN_DATA.value, 0.0, (size, size))
    logging.info("Pretraining a %s (alpha %g) base on %s for %d epoch(s)",
                 _MODEL.value, _ALPHA.value, _PRETRAIN_DATA.value,
                 _PRETRAIN_EPOCHS.value)
    result = training.fit_and_evaluate(
        lambda: models.build_model(_MODEL.value, pretrain.num_classes,
                                   image_size=size,
                                   alpha=_ALPHA.value),
        pretrain, strategy=strategy, optimizer=training.OptimizerOptions(),
        epochs=_PRETRAIN_EPOCHS.value,
        backup_dir=os.path.join(output_dir, "backup", "pretrain"),
        write_dir=output_dir, stage="pretrain", verbose=2)
    logging.info("Base accuracy: %s; saved %s", result.accuracy, path)
    result.model.save(path)
    return result.model


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    strategy = distribute.make_strategy(_STRATEGY.value, tpu=_TPU.value)
    with distribute.output_dir_for(_OUTPUT_DIR.value, strategy) as out:
        start = time.perf_counter()
        base = base_model(out, strategy)
        try:
            size = models.input_size(base, expected=_IMAGE_SIZE.value,
                                     what="--image_size")
        except ValueError as error:
            raise app.UsageError(str(error)) from None
        task_data = load_data(_TASK_DATA.value, 0.0, size, _SHOTS.value)
        try:
            hypermodel = tuning.KMHyperModel(
                base, task_data.num_classes,
                lambda strength: load_data(_TASK_DATA.value, strength, size,
                                           _SHOTS.value),
                space=search_space(),
                budget=tuning.Budget(_MAX_TASK_PARAMS.value,
                                     _MAX_TASK_PERCENT.value))
        except ValueError as error:  # BudgetError, or a bad budget value
            raise app.UsageError(str(error)) from None
        tuner = tuning.make_tuner(
            _TUNER.value, hypermodel, trials=_TRIALS.value,
            epochs=_EPOCHS.value, directory=out,
            project_name=_PROJECT_NAME.value, strategy=strategy,
            seed=_SEED.value, overwrite=_OVERWRITE.value)
        logging.info("Searching (%s tuner, state in %s)", _TUNER.value,
                     tuner.project_dir)
        tuner.search(epochs=_EPOCHS.value, steps_per_epoch=_STEPS.value,
                     verbose=2)
        config, result = tuning.train_best(
            tuner, epochs=_FINAL_EPOCHS.value or _EPOCHS.value,
            output_dir=out, strategy=strategy, steps_per_epoch=_STEPS.value)
        task_path = os.path.join(out, "task.kmtask")
        km_tf.save_task(result.model, task_path)
        final = reporting.StageReport(
            stage="task", data=_TASK_DATA.value,
            train_images=task_data.counts["train"], epochs=result.epochs,
            accuracy=result.accuracy, seconds=result.seconds,
            output=task_path, task=km_tf.task_report(result.model))
        report = tuning.TuneReport(
            tuner=_TUNER.value, budget=hypermodel.budget,
            space=hypermodel.space, best=config,
            trials=tuning.trial_summaries(tuner), final=final,
            seconds=time.perf_counter() - start)
        paths = reporting.write_report(report, out, name="tune_report")
        logging.info("\n%s\nWrote %s, %s", report, task_path,
                     " and ".join(paths))


if __name__ == "__main__":
    app.run(main)
