"""What the km-tf programs share: flag groups, data, base, pretraining, errors.

Each program (`km_tf.cli.train`, `evaluate`, `tune`, `export`) defines the
flag groups it needs from here at import, and wires library calls together
in its `main`; `run_program` runs a `main` under absl and turns bad input
into one line. The drivers in `apps/` and `tflite/` and the console programs
(`km-train`, `km-evaluate`, `km-tune`, `km-export`) call `run()` of these
modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf
from absl import app, flags, logging

from km_tf import data, distribute, export, files, models, training
from km_tf.export import data as export_data
from km_tf.export.presets import DEFAULT_CALIBRATION_SAMPLES
from km_tf.errors import KMError, ResumeError

FLAGS = flags.FLAGS
# Input size of a base pretrained by a program (a task takes its base's).
DEFAULT_IMAGE_SIZE = 32
# The settings a backup was made with, kept beside it.
RUN_SETTINGS_FILE = "run_settings.json"


def define_base_flags() -> None:
    """The base network: an existing file, or the one to pretrain."""
    flags.DEFINE_string("base", None, "The base network's .keras file (from "
                        "--mode=pretrain, or your own saved model).")
    flags.DEFINE_enum("model", "mobilenet_v2", list(models.MODEL_NAMES),
                      "Base network to pretrain.")
    flags.DEFINE_float("alpha", 0.35, "Width multiplier of a pretrained "
                       "base (not for resnet50).")
    flags.DEFINE_integer("image_size", None, "Input height and width of a "
                         f"base pretrained here (default {DEFAULT_IMAGE_SIZE})"
                         "; a task takes its base's, and a different value "
                         "is an error.", lower_bound=32)
    flags.DEFINE_float("bn_momentum", models.DEFAULT_BN_MOMENTUM,
                       "BatchNorm momentum of a pretrained base. Keras' 0.999 "
                       "leaves a briefly trained base at chance in inference.")
    flags.DEFINE_float("dropout", 0.2, "Dropout before the classifier head "
                       "of a pretrained base.")


def define_data_flags(*, pretrain_epochs: int) -> None:
    """Datasets (specs of `km_tf.data`), batching and the seed."""
    forms = ", ".join(data.SPEC_FORMS)
    flags.DEFINE_string("pretrain_data", "digits:0-4",
                        f"Dataset spec of a pretrained base: {forms}.")
    flags.DEFINE_integer("pretrain_epochs", pretrain_epochs,
                         "Epochs of a pretrained base.", lower_bound=1)
    flags.DEFINE_string("task_data", "digits:5-9",
                        f"Dataset spec of the task: {forms}.")
    flags.DEFINE_integer("shots", None, "Few-shot task: training images per "
                         "class (default: all of them).", lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Global batch size (split across "
                         "replicas).", lower_bound=1)
    flags.DEFINE_boolean("flip", False, "Random left-right flips when "
                         "augmenting (off for digits and text).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder.")
    flags.DEFINE_boolean("skip_bad_images", False, "folder: specs: train on "
                         "the images that decode and warn about the others "
                         "(default: refuse the folder, naming them).")
    flags.DEFINE_integer("seed", 0, "Seed of weights, splits and shuffling.")


def define_export_data_flags() -> None:
    """Calibration and held-out data of an export (km-export, km-export-packs)."""
    flags.DEFINE_string("calibration_data", None,
                        "Dataset spec of the task's data, as in training (e.g. "
                        "digits:5-9, folder:PATH, tfds:NAME): int8 calibration "
                        "from its training split, parity on its test split.")
    flags.DEFINE_integer("seed", 0, "--calibration_data: the training run's "
                         "--seed (it chose the split).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder.")
    flags.DEFINE_string("calibration_dataset", None,
                        "Instead of --calibration_data: an .npz with model "
                        "inputs (RGB pixels in [0, 255] for km-tf models): "
                        "x_train (calibration) and optionally y_train, x_test, "
                        "y_test (held-out parity).")
    flags.DEFINE_integer("calibration_samples",
                         DEFAULT_CALIBRATION_SAMPLES,
                         "Training samples that calibrate int8 quantization.")
    flags.DEFINE_integer("parity_samples", export.DEFAULT_PARITY_SAMPLES,
                         "Held-out samples for the float-vs-TFLite checks.")


def export_data_from_flags(model: keras.Model
                           ) -> export_data.ExportData | None:
    """The calibration / held-out data the export data flags name, or None."""
    if FLAGS.calibration_data and FLAGS.calibration_dataset:
        raise ValueError("Pass --calibration_data or "
                         "--calibration_dataset, not both.")
    if FLAGS.calibration_dataset:
        return export_data.from_npz(FLAGS.calibration_dataset)
    if FLAGS.calibration_data:
        return export_data.from_spec(
            FLAGS.calibration_data, model, seed=FLAGS.seed,
            calibration_samples=FLAGS.calibration_samples,
            parity_samples=FLAGS.parity_samples, data_dir=FLAGS.data_dir)
    return None


def define_strategy_flags() -> None:
    """The `tf.distribute` strategy."""
    flags.DEFINE_enum("strategy", "default",
                      list(distribute.STRATEGY_NAMES),
                      "default: one device; mirrored: all local GPUs; "
                      "multi_worker: the workers in TF_CONFIG; tpu: --tpu.")
    flags.DEFINE_string("tpu", None, "TPU name or grpc:// address "
                        "(strategy=tpu); empty finds it on a TPU VM.")


def define_restart_flag() -> None:
    """`--restart`: discard the backup of an interrupted run."""
    flags.DEFINE_boolean("restart", False, "Discard the backup of an "
                         "interrupted run in --output_dir and start afresh "
                         "(needed when the flags changed since).")


def run_settings(programs: Sequence[str], *, ignore: Sequence[str] = ()
                 ) -> dict[str, Any]:
    """The values of the flags the given modules define, minus `ignore`:
    what a resumed run must share with the run it resumes."""
    settings = {}
    for module in (*programs, __name__):
        for flag in FLAGS.get_flags_for_module(module):
            if flag.name not in ignore:
                settings[flag.name] = flag.value
    return json.loads(json.dumps(settings, default=str))


def check_resume(backup_root: str, settings: dict[str, Any], *,
                 restart: bool) -> None:
    """Makes sure a backup in `backup_root` belongs to a run like this one.

    With `restart`, any backup is deleted. Otherwise a backup made with
    other settings is refused (the `BackupAndRestore` state would load into
    another model, or silently continue another run) with one line naming
    the differing flags, the folder and `--restart`. The settings are then
    recorded beside the backup for the next run to compare.

    Raises:
        ResumeError: The backup was made with other settings, or with
            settings not recorded (an older km-tf).
    """
    path = os.path.join(backup_root, RUN_SETTINGS_FILE)
    if restart:
        shutil.rmtree(backup_root, ignore_errors=True)
    elif os.path.isfile(path):
        with open(path) as stream:
            recorded = json.load(stream)
        differing = [f"--{name}: {recorded.get(name)!r} then, {value!r} now"
                     for name, value in settings.items()
                     if recorded.get(name) != value]
        if differing:
            raise ResumeError(
                f"{backup_root} holds the backup of an interrupted run with "
                f"other flags ({'; '.join(differing)}). Rerun with the same "
                "flags to resume it, or pass --restart to discard it.")
    elif os.path.isdir(backup_root) and os.listdir(backup_root):
        raise ResumeError(
            f"{backup_root} holds a backup whose flags were not recorded. "
            "Pass --restart to discard it and start afresh.")
    os.makedirs(backup_root, exist_ok=True)
    files.write_atomically(path, json.dumps(settings, indent=2).encode())


@contextlib.contextmanager
def created_output_dir(path: str) -> Iterator[None]:
    """Removes `path` again if this run created it and fails leaving it
    empty, so a bad input leaves no empty output folder behind."""
    existed = os.path.exists(path)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise


@dataclasses.dataclass(frozen=True)
class RunFolders:
    """Where a resumable run writes: `write_dir` for its outputs (the
    chief's --output_dir, a scratch folder on other workers) and
    `backup_root` for its backup."""

    write_dir: str
    backup_root: str


@contextlib.contextmanager
def resumable_run(output_dir: str, strategy: tf.distribute.Strategy, *,
                  programs: Sequence[str], ignore: Sequence[str],
                  restart: bool) -> Iterator[RunFolders]:
    """The folders of a run that resumes when started again.

    Creates --output_dir (removed again if the run fails before writing
    into it), clears temporaries a killed write left, and checks that a
    backup found belongs to a run with the same flags (`check_resume`:
    the flags of `programs`, minus `ignore`). The backup is deleted when
    the body finishes; a failure keeps it for the next run to resume.
    """
    backup_root = distribute.backup_dir_for(
        os.path.join(output_dir, "backup"), strategy)
    with created_output_dir(output_dir), \
            distribute.output_dir_for(output_dir, strategy) as write_dir:
        files.remove_stale_temporaries(write_dir)
        check_resume(backup_root, run_settings(programs, ignore=ignore),
                     restart=restart)
        yield RunFolders(write_dir=write_dir, backup_root=backup_root)
    shutil.rmtree(backup_root, ignore_errors=True)


def load_data(spec: str, image_size: tuple[int, int], *,
              augment: float = 0.0,
              shots: int | None = None) -> data.ImageDatasets:
    """A dataset spec's pipelines with the shared data flags: RGB pixels in
    [0, 255], which every km-tf model normalizes itself."""
    return data.load(spec, image_size=image_size,
                     batch_size=FLAGS.batch_size, augment=augment,
                     flip=FLAGS.flip, shots=shots, seed=FLAGS.seed,
                     data_dir=FLAGS.data_dir,
                     skip_bad_images=FLAGS.skip_bad_images)


def load_base(path: str, strategy: tf.distribute.Strategy) -> keras.Model:
    """Loads a base file in the strategy's scope (`km_tf.models.load_base`),
    warning when it has no in-model input normalization."""
    with strategy.scope():
        base = models.load_base(path)
    if models.input_normalization(base) is None:
        logging.warning(
            "Base %s has no input normalization layer: km-tf feeds RGB "
            "pixels in [0, 255]. If it expects normalized inputs (e.g. a "
            "keras.applications network), save it with "
            "km_tf.models.add_preprocessing(base, mode) first.", path)
    return base


def task_image_size(base: keras.Model) -> tuple[int, int]:
    """The base's input size; a contradicting `--image_size` is a
    ValueError naming both."""
    return models.input_size(base, expected=FLAGS.image_size,
                             what="--image_size")


def pretrain(dataset: data.ImageDatasets, *,
             strategy: tf.distribute.Strategy,
             optimizer: training.OptimizerOptions, backup_dir: str,
             write_dir: str, steps_per_epoch: int | None = None,
             verbose: str | int = "auto",
             tensorboard: bool = False) -> training.FitResult:
    """Pretrains the base the flags describe (`--model`, `--alpha`,
    `--image_size`, `--bn_momentum`, `--dropout`) on `dataset`."""
    size, _ = pretrain_image_size()
    logging.info("Pretraining a %s (alpha %g, %d px) base on %s for %d "
                 "epoch(s).", FLAGS.model, FLAGS.alpha, size,
                 FLAGS.pretrain_data, FLAGS.pretrain_epochs)
    return training.fit_and_evaluate(
        lambda: models.build_model(
            FLAGS.model, dataset.num_classes, image_size=size,
            alpha=FLAGS.alpha, dropout=FLAGS.dropout,
            bn_momentum=FLAGS.bn_momentum),
        dataset, strategy=strategy, optimizer=optimizer,
        epochs=FLAGS.pretrain_epochs, backup_dir=backup_dir,
        write_dir=write_dir, stage="pretrain",
        steps_per_epoch=steps_per_epoch, tensorboard=tensorboard,
        verbose=verbose)


def pretrain_image_size() -> tuple[int, int]:
    """`(size, size)` of a base pretrained here."""
    size = FLAGS.image_size or DEFAULT_IMAGE_SIZE
    return size, size


def run_program(main: Callable[[list[str]], None]) -> None:
    """Runs `main` under absl; bad input ends it with one line.

    A km-tf error (`KMError`), a missing file or a bad value prints
    `program: error: <message, with the fix>` and exits with status 2. With
    `--verbosity=1` (absl's flag) the traceback is shown instead. `--help`
    shows the program's docstring and flags (absl exits 1 after it).
    """
    _show_program_in_help(sys.modules[main.__module__])

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (KMError, FileNotFoundError, ValueError) as error:
            if FLAGS.verbosity >= 1:
                raise
            program = os.path.basename(sys.argv[0])
            sys.stderr.write(f"{program}: error: {error}\n")
            sys.exit(2)

    app.run(guarded)


def _show_program_in_help(program) -> None:
    """Makes absl's `--help` describe `program` (a `km_tf.cli` module).

    absl documents the `__main__` module, which for a console program is a
    generated stub: give it the program's docstring, and the flags that the
    program and `common` define as its key flags.
    """
    main_module = sys.modules["__main__"]
    main_module.__doc__ = program.__doc__
    for module in (program.__name__, __name__):
        for flag in FLAGS.get_flags_for_module(module):
            FLAGS.register_key_flag_for_module(sys.argv[0], flag)
