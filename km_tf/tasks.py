"""Per-task files: only what a task changes, tied to the base it was made for.

A task file holds the modulator weights, the BatchNorm parameters and
statistics (when they train per task) and the head, plus a fingerprint of the
frozen base (its architecture and weights). It is a zip archive in NumPy's
`.npz` layout: one `.npy` member per tensor and a JSON header, so it can be
read without km_tf and without pickle:

    t0.npy, t1.npy, ...    the tensors, float32 (or their variables' dtype)
    header.npy             uint8 bytes of a UTF-8 JSON document (see
                           `km_tf.task_header`): format, version, base
                           fingerprint, modulate() options, the layout of
                           the network by slot (class, role, shapes, the
                           head's config) and each tensor's slot, variable,
                           shape, dtype and SHA-256.

Layers are matched by their *slot* (place among the layers with weights,
`km_tf.walk.weighted_layers`), never by name: a task loads into any model of
the same structure, however Keras named its layers. `load_task` checks
everything (header, structure, fingerprint, every tensor's presence, shape,
dtype, digest and finiteness, zip CRCs) before it assigns anything, so a bad
file leaves the model untouched. `save_task` writes to a temporary file in
the target folder and renames it into place. `km_tf.restore_task` rebuilds a
task model from its base and its file alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
import zlib
from typing import Any

import keras
import numpy as np

from km_tf.convert import modulation_options
from km_tf.files import write_atomically
from km_tf.task_header import (FORMAT_NAME, FORMAT_VERSION, TaskFileError,
                               TaskHeader, parse_header)
from km_tf.walk import (ROLE_BATCHNORM, ROLE_FROZEN, ROLE_HEAD,
                        ROLE_MODULATED, layer_role, walk_layers,
                        weighted_layers)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "TaskFileError", "TaskHeader",
           "TaskReport", "TaskVariable", "base_fingerprint", "layer_layout",
           "load_task", "read_task_header", "read_task_options", "save_task",
           "task_report", "task_variables", "write_atomically",
           "config_as_json"]

_HEADER_KEY = "header"
# modulate() options that must agree between a task file and a model; which
# layers are head or skipped is compared slot by slot instead.
_MATCHED_OPTIONS = ("hidden_units", "form", "filter_units", "batchnorm",
                    "overrides")

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class TaskVariable:
    """One per-task variable.

    Attributes:
        slot: Its layer's slot (see `km_tf.walk.weighted_layers`).
        name: The variable's name within that layer, e.g.
            `"modulator/hidden_kernel"` or `"kernel"`.
        path: Layer path and name, e.g. `"head/kernel"`: for people, and
            the key of version 1 files.
        role: The layer's role (`km_tf.walk.layer_role`).
        variable: The Keras variable.
    """

    slot: int
    name: str
    path: str
    role: str
    variable: keras.Variable


def task_variables(model: keras.Model) -> list[TaskVariable]:
    """Lists the variables a task owns: modulators, trained BN, and head."""
    found = []
    for slot, path, layer in weighted_layers(model):
        role = layer_role(layer)
        if role == ROLE_FROZEN:
            continue
        if role == ROLE_MODULATED:
            owner, prefix = layer.modulator, "modulator/"
        else:
            owner, prefix = layer, ""
        for variable in owner.weights:
            name = prefix + variable.name
            found.append(TaskVariable(slot, name, f"{path}/{name}", role,
                                      variable))
    return found


def base_fingerprint(model: keras.Model) -> str:
    """SHA-256 of the frozen base: its layer layout and frozen weights.

    Covers the type (KM layers count as their plain twins) and weight shapes
    of every layer with weights, in order (not their names, which Keras may
    regenerate on save/load), and the values of every weight that no task changes:
    the base kernels of KM layers and all frozen layers. Per-task values
    (modulators, trained BatchNorm, head) are left out, so every task trained
    on one base shares its fingerprint.
    """
    digest = hashlib.sha256()
    for path, layer in walk_layers(model):
        role = layer_role(layer)
        if role == ROLE_HEAD:
            continue
        kind = getattr(layer, "plain_class", type(layer)).__name__
        if role == ROLE_MODULATED:
            weights = [layer.base_kernel] + (
                [layer.bias] if layer.use_bias else [])
        else:
            weights = layer.weights
        if not layer.weights:
            continue  # Weightless layers (inputs, activations) get auto names.
        # Names are left out: Keras renames auto-named layers on save/load.
        digest.update(f"{kind}:".encode())
        for weight in weights:
            digest.update(f"{tuple(weight.shape)};".encode())
            if role != ROLE_BATCHNORM:
                value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
                digest.update(value.tobytes())
    return digest.hexdigest()


def layer_layout(model: keras.Model) -> list[dict[str, Any]]:
    """The header's `layers`: class, role and weight shapes of every slot.

    A KM layer is described as the plain layer it modulates, with its base
    weights, so a base and its KM models have the same layout but for the
    roles. Head layers also carry their Keras config (`get_config()`).
    """
    layout = []
    for _, path, layer in weighted_layers(model):
        role = layer_role(layer)
        plain = getattr(layer, "plain_class", type(layer))
        weights = ([layer.base_kernel] + ([layer.bias] if layer.use_bias
                                          else [])
                   if role == ROLE_MODULATED else layer.weights)
        layout.append({
            "path": path, "class": plain.__name__, "role": role,
            "shapes": [list(weight.shape) for weight in weights],
            "config": config_as_json(layer.get_config()) if role == ROLE_HEAD
            else None,
        })
    return layout


def save_task(model: keras.Model, path: PathLike) -> TaskHeader:
    """Writes the per-task weights of a KM model to `path`, atomically.

    Args:
        model: A model made by `km_tf.modulate` (trained or not).
        path: Destination file (conventionally `*.kmtask`); its folder must
            exist. An existing file is replaced only once the new one is
            completely written.

    Returns:
        The header that was written.

    Raises:
        ValueError: A per-task weight is NaN or infinite (training
            diverged); nothing is written.
    """
    variables = task_variables(model)
    tensors = {f"t{i}": np.ascontiguousarray(
        keras.ops.convert_to_numpy(v.variable)) for i, v in enumerate(variables)}
    for (key, array), item in zip(tensors.items(), variables):
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"Variable {item.path!r} holds NaN or infinite values, so the "
                f"task is not saved to {os.fspath(path)!r}. Training "
                "diverged: lower the learning rate and train again.")
    options = slot_overrides(model, modulation_options(model))
    header = TaskHeader(
        base_fingerprint=base_fingerprint(model),
        options={key: value for key, value in options.items()
                 if value is not None and value != []},
        layers=layer_layout(model),
        tensors=[{"key": key, "slot": v.slot, "variable": v.name,
                  "path": v.path, "role": v.role,
                  "shape": list(array.shape), "dtype": str(array.dtype),
                  "sha256": _digest(array)}
                 for (key, array), v in zip(tensors.items(), variables)],
    )
    tensors[_HEADER_KEY] = np.frombuffer(header.to_json().encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **tensors)
    write_atomically(os.fspath(path), buffer.getvalue())
    return header


def read_task_header(path: PathLike) -> TaskHeader:
    """Reads and validates only the header of a task file.

    Raises:
        FileNotFoundError: No file at `path`.
        TaskFileError: The file is not a readable km-tf task file.
    """
    with _open_task(path) as archive:
        return _read_header(archive, path)


def read_task_options(path: PathLike) -> dict[str, Any]:
    """The `modulate()` keyword arguments the task at `path` was trained with.

    `head` and `skip` appear only where the task chose its layers by name;
    otherwise `modulate`'s defaults pick the same layers in any model of the
    base's structure. Per-layer modulator settings (`modulate`'s
    `overrides`) are recorded by slot, so they are left out here. To
    rebuild a task model (a head of another class count and per-layer
    settings included), use `km_tf.restore_task(base, path)`.

    Example:
    >>> km = km_tf.modulate(base, **km_tf.read_task_options("a.kmtask"))
    >>> km_tf.load_task(km, "a.kmtask")
    """
    options = dict(read_task_header(path).options)
    options.pop("overrides", None)
    return options


def slot_overrides(model: keras.Model, options: dict[str, Any]
                   ) -> dict[str, Any]:
    """`modulation_options` with its `overrides` keyed by slot (a string,
    as JSON keys are), the way task files record them."""
    if not options.get("overrides"):
        return options
    slots = {layer.name: slot for slot, _, layer in weighted_layers(model)}
    return {**options, "overrides": {
        str(slots[name]): settings
        for name, settings in options["overrides"].items()}}


def named_overrides(model: keras.Model,
                    overrides: dict[str, dict[str, Any]]
                    ) -> dict[str, dict[str, Any]]:
    """Overrides keyed by slot (`slot_overrides`) keyed by `model`'s layer
    names instead, as `modulate` takes them."""
    slots = weighted_layers(model)
    return {slots[int(slot)][2].name: settings
            for slot, settings in overrides.items()}


def load_task(model: keras.Model, path: PathLike) -> TaskHeader:
    """Loads a task file into a KM model built on the same base.

    Layers are matched by slot (see the module docstring), so the model may
    come from anywhere: `km_tf.restore_task`, the same architecture rebuilt
    in code under other layer names, or a loaded `.keras` file. Every check
    runs before the first assignment: on any error the model is unchanged.

    Args:
        model: A model made by `km_tf.modulate` from the task's base, with
            the task's head and options (`km_tf.restore_task` builds it).
        path: A file written by `save_task`.

    Returns:
        The file's header.

    Raises:
        FileNotFoundError: No file at `path`.
        TaskFileError: The file is corrupt or truncated, was made for another
            base network, other modulate() options or another head, or one
            of its tensors is missing, mis-shaped, altered or not finite.
    """
    with _open_task(path) as archive:
        header = _read_header(archive, path)
        _check_options(header, model, path)
        if header.version >= 2:
            _check_layout(header, layer_layout(model), path)
        _check_fingerprint(header, model, path)
        values = _read_tensors(archive, header, model, path)
    for variable, value in values:
        variable.assign(value)
    return header


def first_layout_difference(file_layers: list[dict[str, Any]],
                            layers: list[dict[str, Any]], *,
                            roles: bool) -> str | None:
    """Describes the first slot where a file's layout and a model's differ.

    Args:
        file_layers: The `layers` of a task header.
        layers: `layer_layout(model)`.
        roles: Compare roles too (a KM model), or only structure (a base).
            Head layers are compared by class: their shapes are the task's.

    Returns:
        `None` when they agree, else a sentence naming the slot.
    """
    for slot, (theirs, ours) in enumerate(zip(file_layers, layers)):
        head = theirs["role"] == ROLE_HEAD or ours["role"] == ROLE_HEAD
        differs = (theirs["class"] != ours["class"]
                   or (roles and theirs["role"] != ours["role"])
                   or (not head and theirs["shapes"] != ours["shapes"]))
        if differs:
            return (f"layer slot {slot} ({ours['path']!r} in the model, "
                    f"{theirs['path']!r} in the file) is "
                    f"{_describe(ours, roles)} in the model but "
                    f"{_describe(theirs, roles)} in the file")
    if len(file_layers) != len(layers):
        return (f"the file lists {len(file_layers)} layers with weights, the "
                f"model has {len(layers)}")
    return None


@dataclasses.dataclass(frozen=True)
class TaskReport:
    """What one task costs to store, next to its base."""

    modulator_params: int
    batchnorm_params: int
    head_params: int
    base_params: int
    task_bytes: int

    @property
    def task_params(self) -> int:
        return self.modulator_params + self.batchnorm_params + self.head_params

    @property
    def task_percent_of_base(self) -> float:
        return 100.0 * self.task_params / self.base_params

    @property
    def modulator_percent_of_base(self) -> float:
        return 100.0 * self.modulator_params / self.base_params

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self),
                "task_params": self.task_params,
                "task_percent_of_base": round(self.task_percent_of_base, 4),
                "modulator_percent_of_base":
                    round(self.modulator_percent_of_base, 4)}

    def __str__(self) -> str:
        rows = [
            ("modulators", self.modulator_params),
            ("batchnorm (params + statistics)", self.batchnorm_params),
            ("head", self.head_params),
            ("task total", self.task_params),
            ("base network", self.base_params),
        ]
        lines = [f"{name:<32} {count:>12,d}" for name, count in rows]
        lines.append(f"{'task bytes (float32)':<32} {self.task_bytes:>12,d}")
        lines.append(f"{'modulators / base':<32} "
                     f"{self.modulator_percent_of_base:>11.2f}%")
        lines.append(f"{'task / base':<32} {self.task_percent_of_base:>11.2f}%")
        return "\n".join(lines)


def task_report(model: keras.Model) -> TaskReport:
    """Counts the per-task parameters and bytes of a KM model.

    The base counts every weight of the network that KM rewrites or freezes,
    BatchNorm included (as `model.count_params()` does for the plain base);
    modulators and head are the task's own additions.
    """
    counts = {ROLE_MODULATED: 0, ROLE_BATCHNORM: 0, ROLE_HEAD: 0}
    task_bytes = 0
    for item in task_variables(model):
        size = int(np.prod(item.variable.shape))
        counts[item.role] += size
        task_bytes += size * np.dtype(item.variable.dtype).itemsize
    total = sum(int(np.prod(w.shape)) for _, layer in walk_layers(model)
                for w in layer.weights)
    return TaskReport(
        modulator_params=counts[ROLE_MODULATED],
        batchnorm_params=counts[ROLE_BATCHNORM],
        head_params=counts[ROLE_HEAD],
        base_params=total - counts[ROLE_MODULATED] - counts[ROLE_HEAD],
        task_bytes=task_bytes,
    )


class _open_task:
    """Opens a task file's zip archive, turning damage into clear errors."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)

    def __enter__(self) -> zipfile.ZipFile:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"No task file at {self.path!r}. Check the path, or create "
                "the file with km_tf.save_task(model, path).")
        try:
            self.archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise _corrupt(self.path, error) from error
        return self.archive

    def __exit__(self, *exc_info) -> None:
        self.archive.close()


def _corrupt(path: PathLike, error: BaseException) -> TaskFileError:
    return TaskFileError(
        f"Task file {os.fspath(path)!r} is corrupt or truncated ({error}). "
        "Copy it again or re-create it with km_tf.save_task.")


def _members(archive: zipfile.ZipFile) -> set[str]:
    return {name.removesuffix(".npy") for name in archive.namelist()}


def _load_member(archive: zipfile.ZipFile, key: str,
                 path: PathLike) -> np.ndarray:
    """Reads one `.npy` member whole, so that its zip CRC is checked."""
    try:
        data = archive.read(f"{key}.npy")
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError,
            zlib.error) as error:
        raise _corrupt(path, error) from error


def _read_header(archive: zipfile.ZipFile, path: PathLike) -> TaskHeader:
    if _HEADER_KEY not in _members(archive):
        raise TaskFileError(
            f"{os.fspath(path)!r} has no km-tf header: it is not a task file "
            "written by km_tf.save_task.")
    raw = _load_member(archive, _HEADER_KEY, path)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _corrupt(path, ValueError("the header is not UTF-8 bytes"))
    try:
        text = raw.tobytes().decode()
    except UnicodeDecodeError as error:
        raise _corrupt(path, error) from error
    return parse_header(text, os.fspath(path))


def _check_options(header: TaskHeader, model: keras.Model,
                   path: PathLike) -> None:
    """The modulator options of the file and the model agree."""
    options = slot_overrides(model, modulation_options(model))
    names = _MATCHED_OPTIONS
    if header.version == 1:  # It matched head and skipped layers by name.
        names = tuple(header.options)
        options["head"] = [layer.name for _, layer in walk_layers(model)
                           if layer_role(layer) == ROLE_HEAD]
    differing = {k: (header.options.get(k), options.get(k)) for k in names
                 if header.options.get(k) != options.get(k)}
    if differing:
        details = ", ".join(f"{k}: file {a!r} vs model {b!r}"
                            for k, (a, b) in differing.items())
        raise TaskFileError(
            f"Task file {os.fspath(path)!r} was trained with other "
            f"modulate() options ({details}). Build the model with "
            "km_tf.restore_task(base, path).")


def _check_layout(header: TaskHeader, layout: list[dict[str, Any]],
                  path: PathLike) -> None:
    """The model has the file's structure, roles and head shapes."""
    difference = first_layout_difference(header.layers, layout, roles=True)
    if difference:
        raise TaskFileError(
            f"Task file {os.fspath(path)!r} does not fit this model: "
            f"{difference}. Load it into the base it was trained on, "
            "modulated with its options: km_tf.restore_task(base, path).")
    for slot, entry in header.head_layers:
        if entry["shapes"] != layout[slot]["shapes"]:
            raise TaskFileError(
                f"Task file {os.fspath(path)!r} has a head of another size: "
                f"layer slot {slot} ({layout[slot]['path']!r}) has weights "
                f"{entry['shapes']} in the file, {layout[slot]['shapes']} "
                "in the model (another class count). Build the task model "
                "with km_tf.restore_task(base, path), which rebuilds the "
                "file's head.")


def _check_fingerprint(header: TaskHeader, model: keras.Model,
                       path: PathLike) -> None:
    expected = base_fingerprint(model)
    if header.base_fingerprint != expected:
        raise TaskFileError(
            f"Task file {os.fspath(path)!r} was made for a different base "
            f"network (base fingerprint {header.base_fingerprint[:12]}…, "
            f"this model's {expected[:12]}…): the layers match but their "
            "frozen weights differ. Load it into a model modulated from the "
            "base it was trained on, or retrain the task on this base.")


def _read_tensors(archive: zipfile.ZipFile, header: TaskHeader,
                  model: keras.Model, path: PathLike
                  ) -> list[tuple[keras.Variable, np.ndarray]]:
    """Every tensor the model needs, checked; nothing is assigned here."""
    source = os.fspath(path)
    by_key = ((lambda item: (item.slot, item.name)) if header.version >= 2
              else (lambda item: item.path))
    wanted = {by_key(item): item for item in task_variables(model)}
    listed = {(entry["slot"], entry["variable"]) if header.version >= 2
              else entry["path"]: entry for entry in header.tensors}
    missing = sorted(wanted[k].path for k in set(wanted) - set(listed))
    extra = sorted(listed[k]["path"] for k in set(listed) - set(wanted))
    if missing or extra:
        raise TaskFileError(
            f"Task file {source!r} does not match this model's per-task "
            f"variables: missing {_few(missing)}, unexpected {_few(extra)}. "
            "Build the model with km_tf.restore_task(base, path).")
    values = []
    for key, item in wanted.items():
        entry, variable = listed[key], item.variable
        if entry["key"] not in _members(archive):
            raise _corrupt(path, KeyError(f"tensor {entry['key']} of "
                                          f"{item.path}"))
        value = _load_member(archive, entry["key"], path)
        stored = (tuple(value.shape), str(value.dtype))
        if stored != (tuple(entry["shape"]), entry["dtype"]):
            raise TaskFileError(
                f"Tensor {item.path!r} in {source!r} is {stored[1]} "
                f"{stored[0]}, but the header says {entry['dtype']} "
                f"{tuple(entry['shape'])}: the file was altered. Re-create "
                "it with km_tf.save_task.")
        if header.version >= 2 and _digest(value) != entry["sha256"]:
            raise TaskFileError(
                f"Tensor {item.path!r} in {source!r} does not match its "
                "SHA-256 in the header: the file was altered (e.g. tensors "
                "swapped). Re-create it with km_tf.save_task.")
        if tuple(value.shape) != tuple(variable.shape):
            raise TaskFileError(
                f"Tensor {item.path!r} in {source!r} has shape "
                f"{tuple(value.shape)}, but the model's variable has shape "
                f"{tuple(variable.shape)}. The task was trained for another "
                "head or modulator size: build the model with "
                "km_tf.restore_task(base, path).")
        if value.dtype != np.dtype(variable.dtype):
            raise TaskFileError(
                f"Tensor {item.path!r} in {source!r} is {value.dtype}, but "
                f"the model's variable is {variable.dtype}.")
        if not np.all(np.isfinite(value)):
            raise TaskFileError(
                f"Tensor {item.path!r} in {source!r} holds NaN or infinite "
                "values; the task would compute garbage. Retrain it.")
        values.append((variable, value))
    return values


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _describe(entry: dict[str, Any], roles: bool) -> str:
    shapes = ", ".join(str(tuple(shape)) for shape in entry["shapes"])
    role = f" ({entry['role']})" if roles else ""
    return f"{entry['class']} [{shapes}]{role}"


def config_as_json(value: Any) -> Any:
    """A Keras config as the task header stores it: plain JSON types
    (tuples become lists, NumPy values Python ones)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _few(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit
                    else "")
