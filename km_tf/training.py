"""Training helpers: optimizer and schedule from flags, callbacks, fit.

One stage (pretraining a base, or training one KM task) is
`fit_and_evaluate(build, data, ...)`: it builds the model and optimizer in
the strategy's scope, compiles a logits classifier, fits with
`BackupAndRestore` (a killed run resumes at the epoch it stopped in),
`ModelCheckpoint` and optionally `TensorBoard`, and returns the model with
its accuracy and timing.

Example:
>>> strategy = km_tf.distribute.make_strategy("default")
>>> data = km_tf.data.load("digits:5-9", image_size=32)
>>> result = fit_and_evaluate(
...     lambda: km_tf.models.build_task_model(base, data.num_classes),
...     data, strategy=strategy, optimizer=OptimizerOptions(),
...     epochs=10, backup_dir="runs/x/backup/task", write_dir="runs/x",
...     stage="task")
>>> km_tf.save_task(result.model, "runs/x/task.kmtask")
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import keras
import tensorflow as tf

from km_tf.data import ImageDatasets
from km_tf.distribute import patch_keras_multi_worker
from km_tf.tasks import PathLike, task_variables
from km_tf.walk import ROLE_MODULATED

OPTIMIZERS = ("adam", "sgd", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """What the optimizer flags choose.

    Attributes:
        name: One of `OPTIMIZERS`.
        learning_rate: Peak learning rate.
        schedule: `"constant"`, or `"cosine"` (decays to 0 at the last step).
        warmup_steps: Linear warm-up steps before the schedule.
        weight_decay: Decoupled weight decay (`adamw` only).
        momentum: Momentum (`sgd` only; Nesterov).
        modulator_rate_factor: The KM modulators' learning rate as a
            multiple of the others' (the head's, BatchNorm's); see
            `scale_learning_rates`. BUILD.md ("Choosing the default") has
            the measurements: 0.1 with `batchnorm="freeze"` is the best KM
            setting found for tasks of few images per class.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    modulator_rate_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.name!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose one "
                             f"of {', '.join(SCHEDULES)}.")
        if not self.learning_rate > 0:
            raise ValueError("`learning_rate` must be positive; got "
                             f"{self.learning_rate}.")
        if self.warmup_steps < 0:
            raise ValueError("`warmup_steps` must be >= 0; got "
                             f"{self.warmup_steps}.")
        if not self.modulator_rate_factor > 0:
            raise ValueError("`modulator_rate_factor` must be positive; got "
                             f"{self.modulator_rate_factor}.")


def learning_rate_schedule(options: OptimizerOptions, total_steps: int
                           ) -> float | keras.optimizers.schedules.CosineDecay:
    """The learning rate (or schedule) for `total_steps` training steps.

    Both schedules are Keras' own `CosineDecay` (constant is a cosine whose
    floor is its peak), so a saved model needs no custom objects.

    Args:
        options: Optimizer options.
        total_steps: Steps of the whole run, warm-up included.

    Returns:
        A float for a constant rate without warm-up, else a schedule.
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1; got {total_steps}.")
    peak, warmup = options.learning_rate, min(options.warmup_steps,
                                              total_steps - 1)
    if options.schedule == "constant" and not warmup:
        return peak
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / (warmup + 1) if warmup else peak,
        decay_steps=max(total_steps - warmup, 1),
        alpha=1.0 if options.schedule == "constant" else 0.0,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(options: OptimizerOptions,
                   total_steps: int) -> keras.optimizers.Optimizer:
    """Builds the optimizer; call it inside `strategy.scope()`."""
    rate = learning_rate_schedule(options, total_steps)
    if options.name == "sgd":
        return keras.optimizers.SGD(rate, momentum=options.momentum,
                                    nesterov=True)
    if options.name == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=options.weight_decay)
    return keras.optimizers.Adam(rate)


def scale_learning_rates(optimizer: keras.optimizers.Optimizer,
                         variables: Sequence[keras.Variable],
                         factor: float) -> None:
    """Makes `optimizer` step `variables` at `factor` times its rate.

    Keras optimizers have one learning rate (or schedule). Every optimizer
    computes a variable's step in `update_step(gradient, variable,
    learning_rate)`, called once per variable (under `tf.distribute`, once
    per replica's copy); this wraps that method of this one instance so
    that the listed variables get `learning_rate * factor`. Variables are
    recognised by the key Keras itself uses to find their optimizer slots
    (`optimizer._var_key`, which sees through distributed copies). Call it
    before the optimizer's first step; the factor is not part of the
    optimizer's config (a model saved with it and loaded again has one
    rate).

    Example:
    >>> optimizer = keras.optimizers.Adam(1e-2)
    >>> scale_learning_rates(optimizer, modulator_variables(model), 0.1)
    >>> model.compile(optimizer, ...)
    """
    if not factor > 0:
        raise ValueError(f"`factor` must be positive; got {factor}.")
    keys = {optimizer._var_key(variable) for variable in variables}
    update_step = optimizer.update_step

    def scaled_update_step(gradient, variable, learning_rate):
        if optimizer._var_key(variable) in keys:
            learning_rate = learning_rate * factor
        return update_step(gradient, variable, learning_rate)

    optimizer.update_step = scaled_update_step


def modulator_variables(model: keras.Model) -> list[keras.Variable]:
    """The KM modulators' weights of a (modulated) model."""
    return [item.variable for item in task_variables(model)
            if item.role == ROLE_MODULATED]


def compile_classifier(model: keras.Model,
                       optimizer: keras.optimizers.Optimizer | str
                       ) -> keras.Model:
    """Compiles a logits classifier: sparse cross-entropy and accuracy."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def make_callbacks(*, backup_dir: PathLike, checkpoint_path: PathLike | None,
                   log_dir: PathLike | None = None,
                   monitor: str = "val_accuracy"
                   ) -> list[keras.callbacks.Callback]:
    """The callbacks of a resumable run.

    Args:
        backup_dir: `BackupAndRestore` folder, one per stage and worker (see
            `km_tf.distribute.backup_dir_for`); it is deleted when `fit`
            completes and read back when a killed run starts again.
        checkpoint_path: `.weights.h5` file for the best weights by
            `monitor`; `None` for none.
        log_dir: TensorBoard folder; `None` for none.
        monitor: Metric that picks the best checkpoint.

    Returns:
        The callbacks, `BackupAndRestore` first.
    """
    # double_checkpoint keeps the previous backup too: a job killed while it
    # writes one restarts from the one before instead of failing to load.
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(os.fspath(backup_dir),
                                         double_checkpoint=True)]
    if checkpoint_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint_path)),
                    exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.fspath(checkpoint_path), monitor=monitor, save_best_only=True,
            save_weights_only=True))
    if log_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(os.fspath(log_dir)))
    return callbacks


@dataclasses.dataclass
class FitResult:
    """What one training stage gives back.

    Attributes:
        model: The trained model (last epoch's weights).
        epochs: The (1-based) epochs this call ran; after a resume, the
            first ones are missing.
        history: Keras' per-epoch logs of this call.
        accuracy: Accuracy per evaluated split (`"validation"`, `"test"`).
        seconds: Wall time of the stage (building, fitting, evaluating).
    """

    model: keras.Model
    epochs: list[int]
    history: dict[str, list[float]]
    accuracy: dict[str, float]
    seconds: float


def fit_and_evaluate(
    build: Callable[[], keras.Model],
    data: ImageDatasets,
    *,
    strategy: tf.distribute.Strategy,
    optimizer: OptimizerOptions,
    epochs: int,
    backup_dir: PathLike,
    write_dir: PathLike,
    stage: str,
    steps_per_epoch: int | None = None,
    tensorboard: bool = False,
    verbose: str | int = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> FitResult:
    """Builds, compiles, fits and evaluates one model under a strategy.

    Args:
        build: Makes the model; called inside `strategy.scope()`.
        data: Train / validation / test pipelines (batches are global).
        strategy: From `km_tf.distribute.make_strategy`.
        optimizer: Optimizer and schedule options.
        epochs: Epochs of the whole run (a resumed run runs the rest).
        backup_dir: This worker's `BackupAndRestore` folder for the stage.
        write_dir: Where this worker writes checkpoints and logs
            (`checkpoints/{stage}.weights.h5`, `logs/{stage}`).
        stage: Stage name used in those paths.
        steps_per_epoch: Train steps per epoch (the training data repeats);
            `None` for one pass over it.
        tensorboard: Write TensorBoard logs.
        verbose: Keras `fit` verbosity; `"auto"`: see `progress_verbosity`.
        callbacks: More callbacks, after the standard ones.

    Returns:
        A `FitResult`.
    """
    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1; got {epochs}.")
    start = time.perf_counter()
    train = data.train
    if steps_per_epoch is None:
        steps = _batches_per_pass(train)
    else:
        steps, train = steps_per_epoch, train.repeat()
    with strategy.scope():
        model = build()
        model_optimizer = make_optimizer(optimizer, epochs * steps)
        if optimizer.modulator_rate_factor != 1.0:
            scale_learning_rates(model_optimizer, modulator_variables(model),
                                 optimizer.modulator_rate_factor)
        compile_classifier(model, model_optimizer)
    patch_keras_multi_worker(model)
    standard = make_callbacks(
        backup_dir=backup_dir,
        checkpoint_path=os.path.join(write_dir, "checkpoints",
                                     f"{stage}.weights.h5"),
        log_dir=os.path.join(write_dir, "logs", stage) if tensorboard
        else None,
    )
    history = model.fit(
        train, epochs=epochs, steps_per_epoch=steps_per_epoch,
        validation_data=data.validation, callbacks=[*standard, *callbacks],
        shuffle=False,  # The datasets shuffle themselves.
        verbose=progress_verbosity(verbose))
    accuracy = {split: evaluate_accuracy(model, getattr(data, split))
                for split in ("validation", "test")}
    return FitResult(model=model, epochs=[e + 1 for e in history.epoch],
                     history=history.history, accuracy=accuracy,
                     seconds=time.perf_counter() - start)


def progress_verbosity(verbose: str | int = "auto",
                       stream: TextIO | None = None) -> int:
    """Keras `fit` verbosity: a progress bar on a terminal, else a line per
    epoch.

    Keras' own `"auto"` draws the progress bar into log files too, where
    every refresh becomes a fragment (thousands per run).

    Args:
        verbose: `"auto"`, or a Keras verbosity (0 silent, 1 progress bar,
            2 one line per epoch), returned as it is.
        stream: The output to judge; default `sys.stdout`.

    Returns:
        1 when `verbose` is `"auto"` and `stream` is a terminal, 2 when it
        is `"auto"` and not, else `int(verbose)`.
    """
    if verbose != "auto":
        return int(verbose)
    stream = sys.stdout if stream is None else stream
    return 1 if stream.isatty() else 2


def evaluate_accuracy(model: keras.Model, dataset: tf.data.Dataset,
                      *, steps: int | None = None) -> float:
    """Top-1 accuracy of a logits (or probabilities) classifier."""
    if not model.compiled:
        compile_classifier(model, "sgd")  # The optimizer stays unused.
    logs = model.evaluate(dataset, steps=steps, verbose=0, return_dict=True)
    if "accuracy" not in logs:
        raise ValueError(
            f"Model {model.name!r} was compiled without an 'accuracy' metric "
            "(it has " + ", ".join(logs) + "); compile it with "
            "km_tf.training.compile_classifier.")
    return float(logs["accuracy"])


def _batches_per_pass(dataset: tf.data.Dataset) -> int:
    """How many batches one pass over a finite dataset yields."""
    count = int(dataset.cardinality())
    if count < 1:
        raise ValueError(
            "Cannot tell how many batches the training data holds (its "
            f"cardinality is {count}): pass `steps_per_epoch`.")
    return count
