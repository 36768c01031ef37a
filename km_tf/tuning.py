"""Hyperparameter search for KM task adaptation, under a per-task budget.

`KMHyperModel` is a `keras_tuner.HyperModel` over one base network and one
task. Each trial modulates the base (`km_tf.models.build_task_model`) and
trains the task with AdamW. The search space (`SearchSpace`) covers:

- the modulator size: `hidden_units` and `filter_units`;
- what trains besides the modulators: `batchnorm` `"train"` (BatchNorm
  parameters and statistics per task) or `"freeze"`;
- the AdamW `learning_rate` and `weight_decay` (log-uniform ranges);
- the augmentation strength `augment` of the training pipeline.

Augmentation lives in the `tf.data` pipeline, not in the model: the hyper
model asks a `load_data(strength)` function (typically a
`km_tf.data.load(..., augment=strength)` call) for the trial's datasets, so
the task model holds no augmentation layers and `save_task`, `bake` and the
TFLite export see exactly the model `modulate` made. Input normalisation is
the base's own (`km_tf.models` bases take pixels in `[0, 255]`, which
`load` yields by default); for a base without it, pass `load` its
`normalization=` mode.

The objective is validation accuracy. The per-task parameter budget
(`Budget`: absolute `max_task_params` and/or `max_task_percent` of the base)
is a hard constraint, enforced twice:

1. Up front, `KMHyperModel` prices every structural choice (hidden units x
   filter units x batchnorm) with `km_tf.task_report` on an untrained
   modulated model, and drops every value that fits in no combination
   (`fit_space`); if nothing fits, it raises `BudgetError` naming the
   smallest configuration and its size.
2. In `build()`, a model over budget (a combination of individually
   affordable values, or a value from a search resumed with a looser
   budget) raises `keras_tuner.errors.FailedTrialError`. keras-tuner 1.4.8
   marks such trials `FAILED` without retrying them, and
   `get_best_trials` / `get_best_hyperparameters` only ever return
   `COMPLETED` trials, so an over-budget configuration is never the best.

Example:
>>> base = keras.saving.load_model("runs/main/base.keras")
>>> hypermodel = KMHyperModel(
...     base, 5,
...     lambda strength: km_tf.data.load("digits:5-9", image_size=32,
...                                      augment=strength, flip=False),
...     budget=Budget(max_task_percent=5.0))
>>> tuner = make_tuner("random", hypermodel, trials=10, epochs=3,
...                    directory="runs/tune", project_name="digits59")
>>> tuner.search(epochs=3)
>>> best = tuner.get_best_hyperparameters(1)[0]
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import keras_tuner
import tensorflow as tf

from km_tf.convert import BATCHNORM_MODES
from km_tf.data import ImageDatasets
from km_tf.errors import BudgetError
from km_tf.layers import DEFAULT_FORM
from km_tf.models import build_task_model
from km_tf.reporting import StageReport
from km_tf.tasks import TaskReport, task_report
from km_tf.training import (FitResult, OptimizerOptions, compile_classifier,
                            fit_and_evaluate, make_optimizer)

logger = logging.getLogger(__name__)



class _TensorBoardOnlyWhenUsed:
    """Imports tensorboard only for runs with a TensorBoard callback.

    keras-tuner 1.4.8 imports `tensorboard` in every TensorFlow-backend
    trial (`Tuner._configure_tensorboard_dir`), but TensorFlow 2.21 no
    longer depends on it; without it every trial would fail.
    """

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        if any(type(c).__name__ == "TensorBoard" for c in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)


def _tuner_class(tuner: type[keras_tuner.Tuner]) -> type[keras_tuner.Tuner]:
    return type(tuner.__name__, (_TensorBoardOnlyWhenUsed, tuner), {})


# Tuner kind -> (keras-tuner class, its size arguments from trials/epochs).
# Hyperband sizes itself from `max_epochs` (brackets of factor 3); the
# number of trials follows from it.
TUNERS: dict[str, tuple[type[keras_tuner.Tuner],
                        Callable[[int, int], dict[str, int]]]] = {
    "random": (_tuner_class(keras_tuner.RandomSearch),
               lambda trials, epochs: {"max_trials": trials}),
    "bayesian": (_tuner_class(keras_tuner.BayesianOptimization),
                 lambda trials, epochs: {"max_trials": trials}),
    "hyperband": (_tuner_class(keras_tuner.Hyperband),
                  lambda trials, epochs: {"max_epochs": epochs, "factor": 3}),
}
TUNER_NAMES = tuple(TUNERS)
OBJECTIVE = "val_accuracy"

# The structural choices that decide a task's size.
STRUCTURE_KEYS = ("hidden_units", "filter_units", "batchnorm")
Structure = tuple[int, int, str]  # (hidden_units, filter_units, batchnorm)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The hyperparameters a KM task search may choose from.

    Attributes:
        hidden_units: Modulator hidden widths (`modulate(hidden_units=)`).
        filter_units: Filter-unit modulator widths (`modulate(filter_units=)`).
        batchnorm: `"train"` and/or `"freeze"` (`modulate(batchnorm=)`).
        learning_rate: `(low, high)` of the log-uniform AdamW learning rate.
        weight_decay: `(low, high)` of the log-uniform AdamW weight decay.
        augment: Augmentation strengths in `[0, 1]` for the training data.
        form: Modulator form (fixed, not searched).
    """

    hidden_units: Sequence[int] = (4, 8, 16, 32)
    filter_units: Sequence[int] = (1,)
    batchnorm: Sequence[str] = BATCHNORM_MODES
    learning_rate: tuple[float, float] = (1e-4, 1e-2)
    weight_decay: tuple[float, float] = (1e-5, 1e-2)
    augment: Sequence[float] = (0.0, 0.25, 0.5)
    form: str = DEFAULT_FORM

    def __post_init__(self) -> None:
        for name in ("hidden_units", "filter_units", "batchnorm", "augment"):
            values = tuple(sorted(set(getattr(self, name))))
            if not values:
                raise ValueError(f"SearchSpace.{name} is empty; give at "
                                 "least one value.")
            object.__setattr__(self, name, values)
        unknown = set(self.batchnorm) - set(BATCHNORM_MODES)
        if unknown:
            raise ValueError(f"SearchSpace.batchnorm has {sorted(unknown)}; "
                             f"use values from {BATCHNORM_MODES}.")
        if not all(0.0 <= value <= 1.0 for value in self.augment):
            raise ValueError("SearchSpace.augment strengths must lie in "
                             f"[0, 1]; got {self.augment}.")
        for name in ("learning_rate", "weight_decay"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"SearchSpace.{name} must be (low, high) with "
                    f"0 < low <= high; got {(low, high)}.")

    def structures(self) -> list[Structure]:
        """Every `(hidden_units, filter_units, batchnorm)` combination."""
        return list(itertools.product(self.hidden_units, self.filter_units,
                                      self.batchnorm))


@dataclasses.dataclass(frozen=True)
class Budget:
    """The most a task may store: absolute parameters and/or % of the base.

    Attributes:
        max_task_params: Most per-task parameters (modulators, trained
            BatchNorm, head); `None` for no limit.
        max_task_percent: Most per-task parameters as a percentage of the
            base's; `None` for no limit.
    """

    max_task_params: int | None = None
    max_task_percent: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_task_params", "max_task_percent"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Budget.{name} must be positive (or None "
                                 f"for no limit); got {value}.")

    def allows(self, report: TaskReport) -> bool:
        """Whether a task of this size fits."""
        return ((self.max_task_params is None
                 or report.task_params <= self.max_task_params)
                and (self.max_task_percent is None
                     or report.task_percent_of_base <= self.max_task_percent))

    def __str__(self) -> str:
        limits = []
        if self.max_task_params is not None:
            limits.append(f"{self.max_task_params:,} task params")
        if self.max_task_percent is not None:
            limits.append(f"{self.max_task_percent:g}% of the base")
        return "at most " + " and ".join(limits) if limits else "unlimited"


def price_structures(base: keras.Model, num_classes: int,
                     space: SearchSpace) -> dict[Structure, TaskReport]:
    """Measures the task size of every structural choice, without training.

    Args:
        base: The base classifier (head named `"head"`).
        num_classes: Classes of the task.
        space: The search space.

    Returns:
        `{(hidden_units, filter_units, batchnorm): TaskReport}`.
    """
    prices = {}
    for structure in space.structures():
        model = build_task_model(base, num_classes, form=space.form,
                                 **dict(zip(STRUCTURE_KEYS, structure)))
        prices[structure] = task_report(model)
        del model
    return prices


def fit_space(space: SearchSpace, prices: dict[Structure, TaskReport],
              budget: Budget) -> SearchSpace:
    """Shrinks a search space to the structural values the budget allows.

    A value stays when at least one combination holding it fits; the
    combinations of affordable values that still do not fit are rejected
    per trial by `KMHyperModel.build`.

    Args:
        space: The full search space.
        prices: From `price_structures(base, num_classes, space)`.
        budget: The per-task budget.

    Returns:
        The shrunk space.

    Raises:
        BudgetError: No combination fits; the message names the smallest
            one and its size.
    """
    fitting = [s for s in space.structures() if budget.allows(prices[s])]
    if not fitting:
        smallest = min(space.structures(),
                       key=lambda s: prices[s].task_params)
        report = prices[smallest]
        raise BudgetError(
            f"No configuration fits the budget ({budget}): the smallest, "
            f"{_describe(smallest)}, has {report.task_params:,} task params "
            f"({report.task_percent_of_base:.2f}% of the base's "
            f"{report.base_params:,}). Raise max_task_params to at least "
            f"{report.task_params} or max_task_percent to at least "
            f"{report.task_percent_of_base:.2f}, or add smaller hidden_units"
            " / filter_units"
            + ("" if "freeze" in space.batchnorm else " or batchnorm='freeze'")
            + " to the search space.")
    kept = {key: tuple(sorted({s[i] for s in fitting}))
            for i, key in enumerate(STRUCTURE_KEYS)}
    return dataclasses.replace(space, **kept)


def _describe(structure: Structure) -> str:
    return ", ".join(f"{key}={value!r}"
                     for key, value in zip(STRUCTURE_KEYS, structure))


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One trial's choices, read from (and declared in) a `HyperParameters`."""

    hidden_units: int
    filter_units: int
    batchnorm: str
    learning_rate: float
    weight_decay: float
    augment: float

    @property
    def structure(self) -> Structure:
        return (self.hidden_units, self.filter_units, self.batchnorm)

    def optimizer(self) -> OptimizerOptions:
        """AdamW at a constant rate (trials are too short for schedules)."""
        return OptimizerOptions(name="adamw", learning_rate=self.learning_rate,
                                schedule="constant",
                                weight_decay=self.weight_decay)


class KMHyperModel(keras_tuner.HyperModel):
    """A keras-tuner hyper model of one KM task on a frozen base.

    Construction prices the space (one untrained modulated model per
    structural combination) and shrinks it to the budget (see `fit_space`).

    Args:
        base: The base classifier (`km_tf.models.build_model` or a loaded
            `.keras`), head named `"head"`; it is not changed.
        num_classes: Classes of the task.
        load_data: `strength -> ImageDatasets`: the task's pipelines with
            training augmentation of that strength (called once per
            strength; results are cached).
        space: The search space before the budget.
        budget: The per-task budget.
        name: Hyper model name.

    Raises:
        BudgetError: Nothing in `space` fits `budget`.
    """

    def __init__(self, base: keras.Model, num_classes: int,
                 load_data: Callable[[float], ImageDatasets], *,
                 space: SearchSpace = SearchSpace(),
                 budget: Budget = Budget(), name: str = "km_task") -> None:
        super().__init__(name=name)
        self.base = base
        self.num_classes = num_classes
        self.budget = budget
        self.full_space = space
        self.prices = price_structures(base, num_classes, space)
        self.space = fit_space(space, self.prices, budget)
        self.load_data = functools.lru_cache(maxsize=None)(load_data)
        logger.info("Budget %s: searching hidden_units=%s filter_units=%s "
                    "batchnorm=%s (of %s / %s / %s); %d combination(s) of "
                    "these still exceed it and fail as trials.", budget,
                    self.space.hidden_units, self.space.filter_units,
                    self.space.batchnorm, space.hidden_units,
                    space.filter_units, space.batchnorm,
                    len(self.over_budget))

    @property
    def over_budget(self) -> list[Structure]:
        """Combinations of the searched values that exceed the budget."""
        return [s for s in self.space.structures()
                if not self.budget.allows(self.prices[s])]

    @property
    def cheapest(self) -> Structure:
        """The smallest affordable structure (the search's default point)."""
        return min(self.space.structures(),
                   key=lambda s: self.prices[s].task_params)

    def config(self, hp: keras_tuner.HyperParameters) -> TrialConfig:
        """Declares the space in `hp` (idempotent) and reads a trial's values.

        Defaults are the cheapest affordable structure, so the default
        point (which keras-tuner builds when it starts) is within budget.
        """
        space, default = self.space, dict(zip(STRUCTURE_KEYS, self.cheapest))
        return TrialConfig(
            hidden_units=hp.Choice("hidden_units", space.hidden_units,
                                   default=default["hidden_units"]),
            filter_units=hp.Choice("filter_units", space.filter_units,
                                   default=default["filter_units"]),
            batchnorm=hp.Choice("batchnorm", space.batchnorm,
                                default=default["batchnorm"]),
            learning_rate=hp.Float("learning_rate", *space.learning_rate,
                                   sampling="log"),
            weight_decay=hp.Float("weight_decay", *space.weight_decay,
                                  sampling="log"),
            augment=hp.Choice("augment", space.augment),
        )

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """Modulates the base for one trial and compiles it.

        Raises:
            keras_tuner.errors.FailedTrialError: The trial's model is over
                budget (keras-tuner records the trial as failed).
        """
        trial = self.config(hp)
        model = self.build_config(trial)
        report = task_report(model)
        if not self.budget.allows(report):
            raise keras_tuner.errors.FailedTrialError(
                f"Over budget ({self.budget}): {_describe(trial.structure)} "
                f"has {report.task_params:,} task params "
                f"({report.task_percent_of_base:.2f}% of the base).")
        return compile_classifier(model, make_optimizer(trial.optimizer(),
                                                        total_steps=1))

    def build_config(self, trial: TrialConfig) -> keras.Model:
        """The (uncompiled) task model of one configuration."""
        return build_task_model(
            self.base, self.num_classes, form=self.space.form,
            **dict(zip(STRUCTURE_KEYS, trial.structure)))

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model,
            *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """Trains a trial on data augmented at the trial's strength.

        The training and validation data come from `load_data`; pass only
        fit options (`epochs`, `steps_per_epoch`, `callbacks`, `verbose`)
        to `tuner.search`. With `steps_per_epoch`, the training data
        repeats.
        """
        if args or "x" in kwargs or "validation_data" in kwargs:
            raise ValueError(
                "KMHyperModel makes each trial's training and validation data "
                "itself (with the trial's augmentation strength): call "
                "tuner.search() with fit options only, e.g. "
                "tuner.search(epochs=3).")
        data = self.load_data(self.config(hp).augment)
        train = data.train
        if kwargs.get("steps_per_epoch"):
            train = train.repeat()
        return model.fit(train, validation_data=data.validation, **kwargs)


def make_tuner(kind: str, hypermodel: KMHyperModel, *, trials: int,
               epochs: int, directory: str, project_name: str,
               strategy: tf.distribute.Strategy | None = None,
               seed: int = 0, overwrite: bool = False) -> keras_tuner.Tuner:
    """Builds a keras-tuner tuner for a KM hyper model, resumable on disk.

    Args:
        kind: One of `TUNER_NAMES`.
        hypermodel: The task's `KMHyperModel`.
        trials: Most trials (`random`, `bayesian`; Hyperband sizes itself
            from `epochs`).
        epochs: Epochs per trial (Hyperband's `max_epochs`).
        directory: Folder of the tuner's state.
        project_name: Sub-folder of this search. A tuner made again with
            the same folder and `overwrite=False` reloads the finished
            trials and runs only the missing ones. It keeps the search
            space it was first made with; under a tighter budget, its
            over-budget values fail as trials.
        strategy: `tf.distribute.Strategy` each trial builds and trains
            under (`km_tf.distribute.make_strategy`); `None` for the default.
        seed: Seed of the oracle.
        overwrite: Start afresh, deleting the previous state.

    Returns:
        The tuner, objective `val_accuracy` (max).
    """
    if kind not in TUNERS:
        raise ValueError(f"Unknown tuner {kind!r}; choose one of "
                         f"{', '.join(TUNER_NAMES)}.")
    if trials < 1 or epochs < 1:
        raise ValueError(f"`trials` and `epochs` must be >= 1; got "
                         f"trials={trials}, epochs={epochs}.")
    tuner_class, sizes = TUNERS[kind]
    return tuner_class(
        hypermodel=hypermodel,
        objective=keras_tuner.Objective(OBJECTIVE, direction="max"),
        seed=seed,
        # Over-budget combinations fail without training; do not let a run
        # of them stop the search.
        max_consecutive_failed_trials=3 + len(hypermodel.over_budget),
        distribution_strategy=strategy,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        **sizes(trials, epochs),
    )


def best_config(tuner: keras_tuner.Tuner) -> TrialConfig:
    """The best completed trial's configuration.

    Raises:
        RuntimeError: No trial completed (all failed or none ran).
    """
    best = tuner.oracle.get_best_trials(1)
    if not best:
        raise RuntimeError(
            "No trial completed, so there is no best configuration. Check "
            "the trial errors under the tuner's directory (trial_*/"
            "trial.json, 'message'), then run the search again.")
    return tuner.hypermodel.config(best[0].hyperparameters.copy())


def trial_summaries(tuner: keras_tuner.Tuner) -> list[dict[str, Any]]:
    """Each trial's id, status, score (`val_accuracy`) and values, in order."""
    return [{"trial_id": trial.trial_id, "status": trial.status,
             "score": None if trial.score is None else float(trial.score),
             "hyperparameters": dict(trial.hyperparameters.values)}
            for trial in sorted(tuner.oracle.trials.values(),
                                key=lambda t: t.trial_id)]


def train_best(tuner: keras_tuner.Tuner, *, epochs: int, output_dir: str,
               strategy: tf.distribute.Strategy | None = None,
               steps_per_epoch: int | None = None,
               verbose: str | int = 2) -> tuple[TrialConfig, FitResult]:
    """Trains the best configuration of a search afresh and evaluates it.

    Uses `km_tf.training.fit_and_evaluate` (resumable with
    `BackupAndRestore` under `output_dir/backup/best`), on data augmented
    at the best trial's strength.

    Args:
        tuner: A tuner from `make_tuner` after `search`.
        epochs: Epochs of the final training.
        output_dir: Folder for the backup and checkpoint of this stage.
        strategy: The strategy to train under; `None` for the default.
        steps_per_epoch: Train steps per epoch; `None` for one pass.
        verbose: Keras `fit` verbosity.

    Returns:
        The best configuration and the `FitResult` (model, validation and
        test accuracy).
    """
    hypermodel: KMHyperModel = tuner.hypermodel
    config = best_config(tuner)
    logger.info("Training the best configuration for %d epoch(s): %s",
                epochs, config)
    result = fit_and_evaluate(
        lambda: hypermodel.build_config(config),
        hypermodel.load_data(config.augment),
        strategy=strategy or tf.distribute.get_strategy(),
        optimizer=config.optimizer(), epochs=epochs,
        backup_dir=os.path.join(output_dir, "backup", "best"),
        write_dir=output_dir, stage="best", steps_per_epoch=steps_per_epoch,
        verbose=verbose)
    return config, result


@dataclasses.dataclass
class TuneReport:
    """What a search found: the best configuration, its task, the trials.

    Attributes:
        tuner: Tuner kind.
        budget: The per-task budget.
        space: The space searched (after the budget shrank it).
        best: The best configuration.
        trials: `trial_summaries` of the search.
        final: The final training of `best` (accuracy, task size, file).
        seconds: Wall time of the whole run (search and final training).
    """

    tuner: str
    budget: Budget
    space: SearchSpace
    best: TrialConfig
    trials: list[dict[str, Any]]
    final: StageReport
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"tuner": self.tuner,
                "budget": dataclasses.asdict(self.budget),
                "space": dataclasses.asdict(self.space),
                "best_hyperparameters": dataclasses.asdict(self.best),
                "trials": self.trials,
                "final": self.final.to_dict(),
                "seconds": round(self.seconds, 3)}

    def __str__(self) -> str:
        best = ", ".join(f"{key}={value:.3g}" if isinstance(value, float)
                         else f"{key}={value}" for key, value
                         in dataclasses.asdict(self.best).items())
        statuses: dict[str, int] = {}
        for trial in self.trials:
            statuses[trial["status"]] = statuses.get(trial["status"], 0) + 1
        counts = ", ".join(f"{n} {status.lower()}"
                           for status, n in sorted(statuses.items()))
        lines = [f"km-tf tuning report ({self.tuner} search, budget: "
                 f"{self.budget})",
                 f"trials: {counts}",
                 f"best hyperparameters: {best}",
                 str(self.final),
                 f"total time {self.seconds:.1f} s"]
        return "\n".join(lines)
