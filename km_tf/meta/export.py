"""From a KM-MAML learner to ordinary km_tf files: a base and task files.

    learner ──meta_trained_base──> base (plain Keras model: meta-trained
                                   kernels, BatchNorm and head init)
    learner.adapt(...) ──save_adapted_task──> task.kmtask
    km_tf.restore_task(base, "task.kmtask") == the adapted network

A meta-trained KM network is a plain base plus modulators, so once the base
is saved (`base.save("base.keras")`), every new few-shot task is a small
task file holding its adapted modulators and head (and BatchNorm's gamma
and beta when the learner adapts them: `batchnorm="train"`, the moving
statistics copied from meta-training). The task runs BatchNorm in
inference mode, so its predictions equal the learner's in inference mode
(`learner.forward(values, x, training=False)`), not the transductive
batch-statistics ones MAML reports. Given `statistics` (the support set's,
`learner.support_statistics`), the task carries its own BatchNorm
statistics and scores as `learner.evaluate(..., statistics="support")`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from km_tf.convert import (clone_layers, copy_base_weights, modulate,
                            modulation_options)
from km_tf.layers import KM_LAYERS
from km_tf.meta.learners import MetaLearner
from km_tf.task_header import TaskHeader
from km_tf.tasks import (PathLike, named_overrides, save_task, slot_overrides,
                         task_variables)
from km_tf.walk import (ROLE_BATCHNORM, ROLE_HEAD, layer_role, walk_layers,
                         weighted_layers)


def meta_trained_base(learner: MetaLearner) -> keras.Model:
    """The learner's network without modulators: the meta-trained base.

    KM convolutions become the plain layers they modulate, holding the
    meta-trained *base* kernels (not the modulated ones: tasks modulate
    them); every other layer keeps its weights, the head its meta-learned
    initial values. All layers are trainable, as in a freshly built base.

    Args:
        learner: Any `MetaLearner` (for `anil` / `maml`, a copy of its
            model).

    Returns:
        A new plain `keras.Model` with the learner's structure and names.
    """
    model = learner.model

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if not isinstance(layer, KM_LAYERS):
            return layer.__class__.from_config(config)
        for key in layer._modulator_config():
            config.pop(key)
        return layer.plain_class.from_config(config)

    base = clone_layers(model, clone_layer)
    copy_base_weights(model, base)
    base.trainable = True
    return base


def save_adapted_task(learner: MetaLearner, values: Sequence[tf.Tensor],
                      base: keras.Model, path: PathLike, *,
                      statistics: Mapping[int, tf.Tensor] | None = None
                      ) -> TaskHeader:
    """Writes a KM-MAML task, adapted by `learner.adapt`, as a task file.

    A fresh `km_tf.modulate(base, batchnorm="freeze")` (with the learner's
    modulator options; `"train"` if the learner adapts BatchNorm or
    `statistics` are given) gets the adapted modulators and head (and
    BatchNorm), and `km_tf.save_task` writes it; `km_tf.restore_task(base,
    path)` rebuilds it.

    Args:
        learner: A `km_maml` learner.
        values: Its adapted parameter values (`learner.adapt(...)`).
        base: The learner's meta-trained base (`meta_trained_base(learner)`,
            or that model saved and loaded again).
        path: The task file to write.
        statistics: The task's own BatchNorm moving statistics, e.g.
            `learner.support_statistics(values, support_images)`; the task
            file then holds BatchNorm (its statistics and the meta-trained
            gamma and beta: 2 KB of values on the benchmark's Conv-4) and
            computes `learner.evaluate(..., statistics="support")`.
            `None`: the task keeps the base's statistics (`"moving"`).

    Returns:
        The header written.

    Raises:
        ValueError: `learner` has no KM layers, `values` do not match its
            parameters, or `base` is not its meta-trained base (the message
            names the first layer that differs).
    """
    if not any(isinstance(layer, KM_LAYERS)
               for _, layer in walk_layers(learner.model)):
        raise ValueError(
            "Only a km_maml learner adapts kernel modulators, and only its "
            "tasks are task files. Save an adapted anil / maml network as a "
            "whole model instead.")
    if len(values) != len(learner.parameters):
        raise ValueError(
            f"`values` holds {len(values)} tensors but the learner has "
            f"{len(learner.parameters)} parameters: pass the list "
            "learner.adapt(...) returns.")
    options = modulation_options(learner.model)
    adapted = {id(v) for v in learner.inner_variables}
    roles = {item.role for item in task_variables(learner.model)
             if id(item.variable) in adapted}
    own_batchnorm = ROLE_BATCHNORM in roles or bool(statistics)
    # Per-layer settings go by slot: `base` may name its layers otherwise.
    overrides = named_overrides(base, slot_overrides(
        learner.model, options)["overrides"] or {})
    task = modulate(base, batchnorm="train" if own_batchnorm else "freeze",
                    overrides=overrides,
                    **{key: options[key] for key in
                       ("hidden_units", "form", "filter_units")})
    _check_base(learner.model, task)
    given = {id(v): value for v, value in zip(learner.parameters, values)}
    given.update(statistics or {})
    sources = {(item.slot, item.name): item.variable
               for item in task_variables(learner.model)}
    for item in task_variables(task):
        source = sources[(item.slot, item.name)]
        item.variable.assign(given.get(id(source), source))
    return save_task(task, path)


def _check_base(learned: keras.Model, task: keras.Model) -> None:
    """Raises a ValueError unless `task` was modulated from `learned`'s
    base: same structure, same base kernels, BatchNorm and frozen weights."""
    ours, theirs = weighted_layers(learned), weighted_layers(task)
    hint = ("Pass the learner's meta-trained base "
            "(km_tf.meta.meta_trained_base(learner)), taken after the last "
            "meta-training step.")
    if len(ours) != len(theirs):
        raise ValueError(
            f"`base` has {len(theirs)} layers with weights, the learner's "
            f"network {len(ours)}. {hint}")
    for (_, path, layer), (_, _, other) in zip(ours, theirs):
        if layer_role(layer) == ROLE_HEAD:
            continue  # The task's own.
        if isinstance(layer, KM_LAYERS) != isinstance(other, KM_LAYERS):
            raise ValueError(f"Layer {path!r} of `base` differs in kind "
                             f"from the learner's. {hint}")
        if isinstance(layer, KM_LAYERS):
            pairs = [(layer.base_kernel, other.base_kernel)] + (
                [(layer.bias, other.bias)] if layer.use_bias else [])
        else:
            pairs = list(zip(layer.weights, other.weights))
        for mine, yours in pairs:
            if mine.shape != yours.shape or not np.array_equal(
                    keras.ops.convert_to_numpy(mine),
                    keras.ops.convert_to_numpy(yours)):
                raise ValueError(
                    f"Layer {path!r} of `base` does not hold the learner's "
                    f"meta-trained weights ({mine.path}). {hint}")
