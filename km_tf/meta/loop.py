"""The meta-training loop: distributed, logged, checkpointed and resumable.

A *stage* is one kind of training step and the batches it eats:
`meta_stage` (a `MetaLearner`'s outer steps on meta-batches of episodes) or
`classifier_stage` (plain supervised steps on the meta-training classes:
the pretraining of the fine-tuning baseline). `train(stage, ...)` runs
steps `start+1 .. steps` of it:

- Global batch `s` is a function of `s` alone (episodes `s*B .. s*B+B-1`
  of a seeded `EpisodeSampler`, or images drawn with `(seed, s)`), so a run
  resumed at step `s` sees exactly the batches an uninterrupted one would.
- Under a `tf.distribute` strategy each replica takes an equal, consecutive
  part of every global batch (`strategy.distribute_datasets_from_function`):
  with meta-batch 4 on 2 replicas, replica 0 adapts to episodes `4s, 4s+1`
  and replica 1 to `4s+2, 4s+3`; gradients are averaged over all four.
- Every `checkpoint_every` steps (and after the last) a `Checkpoint` writes
  all the state — model variables (BatchNorm statistics included),
  optimizer variables (its step counter included) and the progress (step,
  history) — into one `.npz` file, atomically (temporary file + rename).
  A run restored from it continues as if it had never stopped.
- A `ProgressLog` draws a progress bar on a terminal and prints one line
  per `log_every` steps otherwise (a log file gets no bar fragments).

Example:
>>> stage = meta_stage(learner, sampler, meta_batch_size=4)
>>> checkpoint = Checkpoint("run/backup/checkpoint.npz", stage.variables)
>>> progress = checkpoint.restore() or {"step": 0, "history": []}
>>> history = train(stage, strategy=strategy, steps=2000,
...                 start=progress["step"], history=progress["history"],
...                 checkpoint=checkpoint, log=ProgressLog(2))
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import keras
import numpy as np
import tensorflow as tf

from km_tf.errors import DataError, ResumeError
from km_tf.files import write_atomically
from km_tf.meta.episodes import Episode, EpisodeSampler
from km_tf.meta.forward import run_model
from km_tf.meta.learners import (MetaLearner, accuracy, assign_updates,
                                 cross_entropy)

CHECKPOINT_FILE = "checkpoint.npz"
_PROGRESS_KEY = "progress.json"
# Learning-rate schedules of the outer optimizer (`outer_optimizer`).
OUTER_SCHEDULES = ("constant", "cosine")

Batch = Any  # A nest of NumPy arrays with a leading batch axis.


def outer_optimizer(learning_rate: float, *, steps: int,
                    schedule: str = "constant") -> keras.optimizers.Adam:
    """Adam for meta-training (and the fine-tuning baseline's pretraining).

    Args:
        learning_rate: Adam's rate (the first step's, with a schedule).
        steps: The run's steps (its `--meta_steps`).
        schedule: `"constant"`, or `"cosine"`: the rate falls from
            `learning_rate` to zero along a half cosine over `steps`
            (MAML++'s cosine annealing of the meta-optimizer, Antoniou et
            al., 2019). The schedule reads the optimizer's step counter,
            which `Checkpoint` holds, so a resumed run continues on it.
    """
    if schedule not in OUTER_SCHEDULES:
        raise ValueError(f"Unknown outer schedule {schedule!r}; choose one "
                         f"of {', '.join(OUTER_SCHEDULES)}.")
    if schedule == "cosine":
        return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(steps, 1)))
    return keras.optimizers.Adam(learning_rate)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One kind of training step and the batches it eats.

    Attributes:
        name: How the log names it (`"meta-train"`, `"pretrain"`).
        step: Replica function: one replica's part of a global batch ->
            `{"loss": ..., "accuracy": ...}` scalars; updates variables.
        batch_part: `(step, first, count) -> items first .. first+count-1`
            of global batch `step` (NumPy, a leading item axis).
        element_spec: `count -> the tf.TensorSpec nest of such a part`.
        batch_size: Items in a global batch (episodes, or images).
        variables: What a `Checkpoint` of this stage holds, by group
            (`"model"`, `"optimizer"`).
    """

    name: str
    step: Callable[[Batch], Mapping[str, tf.Tensor]]
    batch_part: Callable[[int, int, int], Batch]
    element_spec: Callable[[int], Any]
    batch_size: int
    variables: Mapping[str, Sequence[keras.Variable]]


def meta_stage(learner: MetaLearner, sampler: EpisodeSampler, *,
               meta_batch_size: int) -> Stage:
    """The outer loop of `learner` on `sampler`'s episodes.

    Global batch `s` holds episodes `s * meta_batch_size` onwards.
    """
    def batch_part(step: int, first: int, count: int) -> Episode:
        start = step * meta_batch_size + first
        episodes = [sampler.episode(index)
                    for index in range(start, start + count)]
        return Episode(*(np.stack(parts) for parts in zip(*episodes)))

    return Stage(name="meta-train", step=learner.meta_train_step,
                 batch_part=batch_part, element_spec=sampler.element_spec,
                 batch_size=meta_batch_size,
                 variables={"model": learner.model.variables,
                            "optimizer": learner.optimizer.variables,
                            "rates": ([] if learner.inner_rates is None
                                      else [learner.inner_rates])})


def classifier_stage(model: keras.Model,
                     optimizer: keras.optimizers.Optimizer,
                     images: np.ndarray, labels: np.ndarray,
                     classes: Sequence[int], *, batch_size: int,
                     seed: int) -> Stage:
    """Supervised training of `model` on the images of `classes`.

    Labels are the positions of the classes in `classes`; global batch `s`
    is `batch_size` distinct images drawn with `(seed, s)`. Forward passes
    run in training mode through `km_tf.meta.run_model` (BatchNorm batch
    statistics, moving statistics averaged over replicas), like the
    meta-learners' steps. `optimizer` is built on the model's trainable
    variables here.

    Raises:
        DataError: Fewer images of `classes` than `batch_size`.
    """
    classes = [int(c) for c in classes]
    relabel = np.full(int(np.max(labels)) + 1, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    members = np.flatnonzero(np.isin(labels, classes))
    if len(members) < batch_size:
        raise DataError(
            f"A batch of {batch_size} images needs that many training "
            f"images, but the classes have {len(members)}. Use a smaller "
            "batch.")
    variables = model.trainable_variables
    optimizer.build(variables)

    def batch_part(step: int, first: int, count: int):
        rng = np.random.default_rng((seed, step))
        chosen = rng.choice(members, batch_size, replace=False)
        chosen = chosen[first:first + count]
        return images[chosen].astype(np.float32), relabel[labels[chosen]]

    def element_spec(count: int):
        return (tf.TensorSpec((count, *images.shape[1:]), tf.float32),
                tf.TensorSpec((count,), tf.int32))

    def step(batch) -> dict[str, tf.Tensor]:
        batch_images, batch_labels = batch
        values = [tf.convert_to_tensor(v) for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            logits, updates = run_model(
                model, {id(v): t for v, t in zip(variables, values)},
                batch_images, training=True)
            loss = cross_entropy(batch_labels, logits)
        gradients = tape.gradient(loss, values)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        optimizer.apply_gradients(zip(
            [tf.zeros_like(v) if g is None else g / replicas
             for v, g in zip(values, gradients)], variables))
        assign_updates(model, updates, replicas)
        return {"loss": loss, "accuracy": accuracy(batch_labels, logits)}

    return Stage(name="pretrain", step=step, batch_part=batch_part,
                 element_spec=element_spec, batch_size=batch_size,
                 variables={"model": model.variables,
                            "optimizer": optimizer.variables})


class Checkpoint:
    """All of a run's state in one `.npz` file, written atomically.

    Args:
        path: The file (its folder is created on the first save).
        variables: The variables to keep, by group (a stage's
            `variables`); restored by position, so build the same model
            and optimizer before restoring.
    """

    def __init__(self, path: str | os.PathLike,
                 variables: Mapping[str, Sequence[keras.Variable]]) -> None:
        self.path = os.fspath(path)
        self.variables = {group: list(items)
                          for group, items in variables.items()}

    def exists(self) -> bool:
        """Whether a checkpoint file is there."""
        return os.path.isfile(self.path)

    def save(self, progress: Mapping[str, Any]) -> None:
        """Writes every variable and `progress` (JSON-able) atomically.

        Call it outside `strategy.run` (mirrored variables are read from
        their first replica; the replicas are kept equal).
        """
        arrays = {f"{group}/{index:05d}": keras.ops.convert_to_numpy(v)
                  for group, items in self.variables.items()
                  for index, v in enumerate(items)}
        arrays[_PROGRESS_KEY] = np.frombuffer(
            json.dumps(progress).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)),
                    exist_ok=True)
        write_atomically(self.path, buffer.getvalue())

    def restore(self) -> dict[str, Any] | None:
        """Assigns the saved values; returns the saved progress, or `None`
        when there is no checkpoint.

        Raises:
            ResumeError: The file does not read, or holds other variables
                (another model or optimizer); nothing is assigned then.
        """
        if not self.exists():
            return None
        fix = "Delete it (km-meta-train: --restart) to start afresh."
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                saved = {key: stored[key] for key in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ResumeError(f"Checkpoint {self.path} does not read "
                              f"({error}). {fix}") from error
        pairs = []
        for group, items in self.variables.items():
            count = sum(key.startswith(group + "/") for key in saved)
            if count != len(items):
                raise ResumeError(
                    f"Checkpoint {self.path} holds {count} {group} "
                    f"variables, this run has {len(items)}: it belongs to "
                    f"another network or optimizer. {fix}")
            for index, variable in enumerate(items):
                value = saved[f"{group}/{index:05d}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ResumeError(
                        f"Checkpoint {self.path} holds {group} variable "
                        f"{index} with shape {value.shape}, this run's "
                        f"({variable.path}) is {tuple(variable.shape)}: it "
                        f"belongs to another network. {fix}")
                pairs.append((variable, value))
        for variable, value in pairs:
            variable.assign(value)
        return json.loads(saved[_PROGRESS_KEY].tobytes().decode())


class ProgressLog:
    """Shows training progress: a bar on a terminal, lines in a log file.

    Args:
        verbose: 0 silent, 1 a progress bar (updated every step), 2 one line
            per logged interval; `"auto"`: 1 on a terminal, else 2.
        stream: Where to write (default `sys.stdout`).
    """

    def __init__(self, verbose: int | str = "auto",
                 stream: TextIO | None = None) -> None:
        self.stream = sys.stdout if stream is None else stream
        if verbose == "auto":
            verbose = 1 if self.stream.isatty() else 2
        self.verbose = int(verbose)
        self._bar: keras.utils.Progbar | None = None

    def begin(self, name: str, start: int, steps: int) -> None:
        """A stage starts (or resumes) at `start` of `steps`."""
        self._name, self._steps = name, steps
        resumed = f", resuming after step {start}" if start else ""
        self.message(f"{name}: {steps} steps{resumed}")
        if self.verbose == 1:
            self._bar = keras.utils.Progbar(
                steps, stateful_metrics=["val_accuracy"])
            self._bar.update(start)

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """One step ended with these loss / accuracy values."""
        if self._bar is not None:
            self._bar.update(step, list(values.items()))

    def record(self, record: Mapping[str, Any]) -> None:
        """An interval ended: one line (verbose 2), or the validation
        accuracy on the bar (verbose 1)."""
        if self.verbose == 2:
            parts = [f"{key} {value:.4f}" for key, value in record.items()
                     if key not in ("step", "seconds_per_step")]
            if "seconds_per_step" in record:
                parts.append(f"{record['seconds_per_step']:.3f} s/step")
            self._write(f"{self._name} step {record['step']}/{self._steps}: "
                        + ", ".join(parts))
        elif self._bar is not None and "val_accuracy" in record:
            self._bar.update(record["step"],
                             [("val_accuracy", record["val_accuracy"])])

    def message(self, text: str) -> None:
        """A line of its own (not when silent)."""
        if self.verbose:
            if self._bar is not None:
                if self._bar._seen_so_far < self._steps:  # Ends its line.
                    self.stream.write("\n")
                self._bar = None
            self._write(text)

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def train(stage: Stage, *, strategy: tf.distribute.Strategy, steps: int,
          start: int = 0, history: Sequence[dict] = (),
          checkpoint: Checkpoint | None = None, checkpoint_every: int = 100,
          log_every: int = 50, eval_every: int = 0,
          validate: Callable[[], float] | None = None,
          log: ProgressLog | None = None) -> list[dict]:
    """Runs steps `start+1 .. steps` of `stage` under `strategy`.

    Args:
        stage: From `meta_stage` or `classifier_stage`, built in
            `strategy.scope()`.
        strategy: The distribution strategy; its replica count must divide
            `stage.batch_size`.
        steps: The run's total steps.
        start: Steps done before (a restored checkpoint's).
        history: The records of those steps.
        checkpoint: Saved every `checkpoint_every` steps and after the
            last, with `{"stage", "step", "history"}`; `None` for none.
        checkpoint_every: Steps between checkpoints.
        log_every: Steps per history record (mean loss and accuracy over
            the interval, seconds per step) and log line.
        eval_every: Steps between calls of `validate` (0: never); its value
            is recorded as `val_accuracy`.
        validate: Scores the current weights, e.g. on meta-validation
            episodes; called outside the replicas.
        log: Where progress goes (default: a silent one).

    Returns:
        The history: `history` plus a record per interval of this call.

    Raises:
        DataError: The replicas do not divide the global batch.
    """
    history = list(history)
    log = log or ProgressLog(0)
    replicas = strategy.num_replicas_in_sync
    if stage.batch_size % replicas:
        raise DataError(
            f"A global batch of {stage.batch_size} cannot be split evenly "
            f"over {replicas} replicas: use a multiple of {replicas}.")
    if start >= steps:
        return history
    dataset = strategy.distribute_datasets_from_function(
        _dataset_function(stage, start, steps))

    # Without autograph: the steps are straight-line code (Python loops
    # over static counts), and converting them doubles the tracing time.
    @tf.function(autograph=False)
    def distributed_step(batch):
        results = strategy.run(stage.step, args=(batch,))
        return {key: strategy.reduce(tf.distribute.ReduceOp.MEAN, value,
                                     axis=None)
                for key, value in results.items()}

    log.begin(stage.name, start, steps)
    batches = iter(dataset)
    totals: dict[str, float] = {}
    count, clock = 0, time.perf_counter()
    for step in range(start + 1, steps + 1):
        values = {key: float(value) for key, value
                  in distributed_step(next(batches)).items()}
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
        log.step(step, values)
        record: dict[str, Any] = {}
        if step % log_every == 0 or step == steps:
            record = {"step": step, **{key: total / count for key, total
                                       in totals.items()},
                      "seconds_per_step": (time.perf_counter() - clock)
                      / count}
            totals, count = {}, 0
        if validate is not None and eval_every and (
                step % eval_every == 0 or step == steps):
            record = {"step": step, **record, "val_accuracy": validate()}
        if record:
            history.append(record)
            log.record(record)
            clock = time.perf_counter()
        if checkpoint is not None and (step % checkpoint_every == 0
                                       or step == steps):
            checkpoint.save({"stage": stage.name, "step": step,
                             "history": history})
    log.message(f"{stage.name}: done ({steps} steps)")
    return history


def _dataset_function(stage: Stage, start: int, stop: int
                      ) -> Callable[[tf.distribute.InputContext],
                                    tf.data.Dataset]:
    """Per input pipeline, the parts of global batches `start .. stop-1`
    its replicas take, in the order they take them (round robin)."""
    def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
        size = context.get_per_replica_batch_size(stage.batch_size)
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def generate():
            for step in range(start, stop):
                for replica in range(first, first + local):
                    yield stage.batch_part(step, replica * size, size)

        return tf.data.Dataset.from_generator(
            generate, output_signature=stage.element_spec(size)).prefetch(2)

    return make
