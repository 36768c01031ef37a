"""`restore_task`: a trained task model from its base and its task file alone.

    base + task file ──restore_task──> the KM model that was trained
                                       (head of the task's class count)

Training usually gives a task its own head (`km_tf.models.build_task_model`
replaces the base's classifier by one with the task's class count), so
`modulate(base)` alone does not rebuild it. The task file records, per layer
slot, which layers are the head and their Keras config; `restore_task`
rebuilds those layers on a copy of the base, modulates it with the file's
options and loads the file. Every program that turns "base + task file" into
a model (evaluation, export, tuning, benchmarks) calls this one function.
"""

from __future__ import annotations

import os
from typing import Any

import keras

from km_tf.convert import clone_layers, modulate
from km_tf.task_header import TaskFileError, TaskHeader
from km_tf.tasks import (PathLike, config_as_json, first_layout_difference,
                         layer_layout, load_task, named_overrides,
                         read_task_header)
from km_tf.walk import (ROLE_FROZEN, is_convolution, walk_layers,
                        weighted_layers)

# Config keys that do not change what a head layer computes.
_UNCOMPARED_CONFIG_KEYS = ("name", "trainable")


def restore_task(base: keras.Model, task_path: PathLike) -> keras.Model:
    """Rebuilds the trained task model from its base and task file.

    The head is rebuilt from the file (its class count may differ from the
    base's), the copy is modulated with the file's options and the task's
    weights are loaded. Layers are matched by their place in the network,
    not by name, so the base may be a loaded `.keras` file or the same
    architecture rebuilt in code. `base` itself is not changed. Call it
    inside a `tf.distribute` strategy's scope to place the variables there.

    Args:
        base: The plain base network the task was trained on.
        task_path: A task file written by `km_tf.save_task` (any version).

    Returns:
        The KM model, computing what the trained task model computed;
        `km_tf.bake` turns it into a plain Keras model.

    Raises:
        FileNotFoundError: No file at `task_path`.
        TaskFileError: The file is damaged, or was made for a network of
            another structure (the message names the first differing layer)
            or other weights.

    Example:
    >>> base = keras.saving.load_model("runs/main/base.keras")
    >>> model = km_tf.restore_task(base, "runs/main/task.kmtask")
    >>> plain = km_tf.bake(model)
    """
    header = read_task_header(task_path)
    if header.version >= 2:
        heads = _head_configs(header, base, task_path)
        options = _modulate_options(header, base)
    else:
        heads = _version1_head_configs(header, base, task_path)
        options = header.options
    model = modulate(_with_heads(base, heads), **options)
    load_task(model, task_path)
    return model


def _head_configs(header: TaskHeader, base: keras.Model,
                  task_path: PathLike) -> dict[int, tuple[type, dict]]:
    """The head layers to rebuild: `{id(base layer): (class, config)}`."""
    source = os.fspath(task_path)
    difference = first_layout_difference(header.layers, layer_layout(base),
                                         roles=False)
    if difference:
        raise TaskFileError(
            f"Task file {source!r} was made for a network of another "
            f"structure: {difference}. Pass the base it was trained on.")
    slots = weighted_layers(base)
    heads = {}
    for slot, entry in header.head_layers:
        layer = slots[slot][2]
        config = _comparable(entry["config"])
        if config == _comparable(layer.get_config()):
            continue
        kind = getattr(keras.layers, entry["class"], None)
        if kind is None or not issubclass(kind, keras.layers.Layer):
            raise TaskFileError(
                f"Task file {source!r} has a head layer of class "
                f"{entry['class']!r} that differs from the base's "
                f"{layer.name!r} and is not a Keras layer km-tf can rebuild. "
                "Build the task model in code (km_tf.modulate) and load the "
                "file with km_tf.load_task.")
        heads[id(layer)] = (kind, {**entry["config"], "name": layer.name})
    return heads


def _version1_head_configs(header: TaskHeader, base: keras.Model,
                           task_path: PathLike
                           ) -> dict[int, tuple[type, dict]]:
    """Version 1 files: heads by name; Dense units from the stored kernel."""
    shapes = {entry["path"]: entry["shape"] for entry in header.tensors}
    heads = {}
    for path, layer in walk_layers(base):
        kernel = shapes.get(f"{path}/kernel")
        if layer.name not in header.options["head"] or kernel is None:
            continue
        if list(layer.kernel.shape) == kernel:
            continue
        if not isinstance(layer, keras.layers.Dense):
            raise TaskFileError(
                f"Task file {os.fspath(task_path)!r} (version 1) has a head "
                f"{path!r} of another shape that is not a Dense layer; "
                "re-save the task with this km-tf to rebuild it.")
        heads[id(layer)] = (keras.layers.Dense,
                            {**layer.get_config(), "units": kernel[-1]})
    return heads


def _modulate_options(header: TaskHeader, base: keras.Model
                      ) -> dict[str, Any]:
    """The file's modulate() options, with head and skip named by slot."""
    options = {key: header.options[key] for key in
               ("hidden_units", "form", "filter_units", "batchnorm")}
    slots = weighted_layers(base)
    options["head"] = [slots[slot][2].name for slot, _ in header.head_layers]
    options["skip"] = [
        slots[slot][2].name for slot, entry in enumerate(header.layers)
        if entry["role"] == ROLE_FROZEN and is_convolution(slots[slot][2])]
    options["overrides"] = named_overrides(
        base, header.options.get("overrides", {}))
    return options


def _with_heads(base: keras.Model,
                heads: dict[int, tuple[type, dict]]) -> keras.Model:
    """A copy of `base` (weights included) whose head layers are rebuilt."""
    if not heads:
        return base

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind, config = heads.get(id(layer),
                                 (type(layer), layer.get_config()))
        return kind.from_config(config)

    copy = clone_layers(base, clone_layer)
    for (_, source), (_, target) in zip(walk_layers(base),
                                        walk_layers(copy)):
        if id(source) not in heads:
            target.set_weights(source.get_weights())
    return copy


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A layer config as JSON types, without keys that change nothing."""
    return {key: value for key, value in config_as_json(config).items()
            if key not in _UNCOMPARED_CONFIG_KEYS}
