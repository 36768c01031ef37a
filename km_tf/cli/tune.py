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
    km-tune --task_data=digits:5-9 --trials=8 --epochs=3 \\
        --max_task_percent=5 --output_dir=runs/tune
"""

from __future__ import annotations

import os
import time

import keras
import tensorflow as tf
from absl import app, flags, logging

import km_tf
from km_tf import distribute, files, reporting, training, tuning
from km_tf.cli import common

_DEFAULT_SPACE = tuning.SearchSpace()
FLAGS = flags.FLAGS

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

# Base, data and strategy: as in km-train.
common.define_base_flags()
common.define_data_flags(pretrain_epochs=5)
common.define_strategy_flags()

# Run.
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


def base_model(output_dir: str,
               strategy: tf.distribute.Strategy) -> keras.Model:
    """The base network to tune tasks on.

    Args:
        output_dir: This run's output folder.
        strategy: The strategy to pretrain under.

    Returns:
        `--base`, else the `base.keras` kept in `output_dir`, else a base
        pretrained now on `--pretrain_data` (`km_tf.cli.common.pretrain`,
        as km-train does) and saved there.
    """
    if FLAGS.base:
        logging.info("Base: %s", FLAGS.base)
        return common.load_base(FLAGS.base, strategy)
    path = os.path.join(output_dir, "base.keras")
    if os.path.exists(path):
        logging.info("Base: reusing %s", path)
        return common.load_base(path, strategy)
    pretrain = common.load_data(FLAGS.pretrain_data,
                                common.pretrain_image_size())
    result = common.pretrain(
        pretrain, strategy=strategy, optimizer=training.OptimizerOptions(),
        backup_dir=os.path.join(output_dir, "backup", "pretrain"),
        write_dir=output_dir, verbose=2)
    logging.info("Base accuracy: %s; saved %s", result.accuracy, path)
    files.save_model_atomically(result.model, path)
    return result.model


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    strategy = distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu)
    with distribute.output_dir_for(_OUTPUT_DIR.value, strategy) as out:
        start = time.perf_counter()
        base = base_model(out, strategy)
        size = common.task_image_size(base)
        task_data = common.load_data(FLAGS.task_data, size, shots=FLAGS.shots)
        try:
            hypermodel = tuning.KMHyperModel(
                base, task_data.num_classes,
                lambda strength: common.load_data(
                    FLAGS.task_data, size, augment=strength,
                    shots=FLAGS.shots),
                space=search_space(),
                budget=tuning.Budget(_MAX_TASK_PARAMS.value,
                                     _MAX_TASK_PERCENT.value))
        except ValueError as error:  # BudgetError, or a bad budget value
            raise app.UsageError(str(error)) from None
        tuner = tuning.make_tuner(
            _TUNER.value, hypermodel, trials=_TRIALS.value,
            epochs=_EPOCHS.value, directory=out,
            project_name=_PROJECT_NAME.value, strategy=strategy,
            seed=FLAGS.seed, overwrite=_OVERWRITE.value)
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
            stage="task", data=FLAGS.task_data,
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


def run() -> None:
    """The `km-tune` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
