"""Summaries of few-shot evaluations: accuracy with its confidence
interval, and what an adapted task costs to store."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from km_tf.layers import KM_LAYERS
from km_tf.meta.learners import MetaLearner
from km_tf.walk import (ROLE_BATCHNORM, ROLE_HEAD, ROLE_MODULATED,
                        layer_role, walk_layers)


def mean_confidence_interval(accuracies: Sequence[float]
                             ) -> tuple[float, float]:
    """Mean accuracy over episodes and its 95% confidence half-width.

    The half-width is `1.96 * sd / sqrt(episodes)`, with `sd` the sample
    standard deviation (ddof=1), as few-shot papers report `mean ± ci`.

    Args:
        accuracies: One accuracy per episode (`MetaLearner.evaluate`).

    Returns:
        `(mean, half_width)`.

    Raises:
        ValueError: Fewer than two episodes (no spread to measure).

    Example:
    >>> mean_confidence_interval([0.5, 0.7])  # (0.6, 0.196)
    """
    values = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if values.size < 2:
        raise ValueError(
            f"A confidence interval needs at least 2 episodes; got "
            f"{values.size}. Evaluate more episodes (papers use 600+).")
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(half_width)


@dataclasses.dataclass(frozen=True)
class TaskStorage:
    """What one adapted task costs to store, next to the shared network.

    Attributes:
        contents: What a task stores (`"modulators"`, `"modulators +
            head"`, `"head"`, `"whole network"`).
        task_bytes: Bytes of those values (as the variables' dtypes).
        base_bytes: Bytes of the shared base network (every variable but
            the modulators, BatchNorm statistics included).
    """

    contents: str
    task_bytes: int
    base_bytes: int

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.task_bytes / self.base_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self),
                "percent_of_base": round(self.percent_of_base, 4)}


def task_storage(learner: MetaLearner, *,
                 own_statistics: bool = False) -> TaskStorage:
    """Per-task bytes of a learner's adapted tasks.

    A task stores the values its inner loop changes: the modulators (and
    the head, with `adapt_head`) for `km_maml` (its task file also holds
    the shared head, a few hundred bytes), the head for `anil` and
    head-only fine-tuning. When the inner loop adapts every trainable
    weight (`maml`, fine-tuning all layers) a task is a whole network.

    Args:
        learner: Any `MetaLearner`.
        own_statistics: Tasks also keep their own BatchNorm moving
            statistics (`learner.support_statistics`). Counted are the
            statistics alone; a km_maml task file with them today also
            holds BatchNorm's (meta-trained) gamma and beta.

    Returns:
        The `TaskStorage`.
    """
    model = learner.model
    role_of = {id(weight): layer_role(layer)
               for _, layer in walk_layers(model)
               for weight in layer.weights}
    for _, layer in walk_layers(model):
        if isinstance(layer, KM_LAYERS):  # Its modulator is the task's.
            role_of.update({id(weight): ROLE_MODULATED
                            for weight in layer.modulator.weights})
            for weight in [layer.base_kernel] + (
                    [layer.bias] if layer.use_bias else []):
                role_of.pop(id(weight), None)
    modulators = {id(w) for w in model.variables
                  if role_of.get(id(w)) == ROLE_MODULATED}
    base_bytes = sum(_bytes(v) for v in model.variables
                     if id(v) not in modulators)
    inner = {id(v) for v in learner.inner_variables}
    # A task is the whole network when it adapts every weight the network
    # learns (meta-trained weights; KM base kernels count, though Keras
    # calls them non-trainable).
    learned = learner.network_outer_variables or model.trainable_variables
    if {id(v) for v in learned} <= inner:
        return TaskStorage("whole network", base_bytes, base_bytes)
    names = {ROLE_MODULATED: "modulators", ROLE_BATCHNORM: "batchnorm",
             ROLE_HEAD: "head"}
    roles = {names.get(role_of.get(id(v)), "other")
             for v in learner.inner_variables}
    contents = " + ".join(name for name in (*names.values(), "other")
                          if name in roles)
    task_bytes = sum(_bytes(v) for v in learner.inner_variables)
    if own_statistics:
        contents += " + batchnorm statistics"
        task_bytes += sum(_bytes(v) for v in learner.moving_statistics)
    return TaskStorage(contents, task_bytes, base_bytes)


def _bytes(variable) -> int:
    return int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize
