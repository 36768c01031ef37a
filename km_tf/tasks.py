"""Per-task files: only what a task changes, tied to the base it was made for.

A task file holds the modulator weights, the BatchNorm parameters and
statistics (when they train per task) and the head, plus a fingerprint of the
frozen base (its architecture and weights). It is a zip archive in NumPy's
`.npz` layout: one `.npy` member per tensor and a JSON header, so it can be
read without km_tf and without pickle:

    t0.npy, t1.npy, ...    the tensors, float32 (or their variables' dtype)
    header.npy             uint8 bytes of a UTF-8 JSON document (see
                           `TaskHeader`): format, version, base fingerprint,
                           modulate() options, and each tensor's variable
                           path, role, shape and dtype.

`load_task` checks everything (format, fingerprint, options, every tensor's
presence, shape and dtype, zip CRCs) before it assigns anything, so a bad file
leaves the model untouched. `save_task` writes to a temporary file in the
target folder and renames it into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from typing import Any

import keras
import numpy as np

from km_tf.convert import modulation_options
from km_tf.walk import (ROLE_BATCHNORM, ROLE_FROZEN, ROLE_HEAD,
                        ROLE_MODULATED, layer_role, walk_layers)

FORMAT_NAME = "km-tf-task"
FORMAT_VERSION = 1
_HEADER_KEY = "header"

PathLike = str | os.PathLike


class TaskFileError(ValueError):
    """A task file that cannot be loaded into this model."""


@dataclasses.dataclass(frozen=True)
class TaskVariable:
    """One per-task variable: its stable key, role and Keras variable."""

    path: str
    role: str
    variable: keras.Variable


def task_variables(model: keras.Model) -> list[TaskVariable]:
    """Lists the variables a task owns: modulators, trained BN, and head.

    Keys are stable across clones and saves: the layer path (see
    `walk.walk_layers`) joined with the variable's name, e.g.
    `"block_1_project/modulator/hidden_kernel"` or `"head/kernel"`.
    """
    found = []
    for path, layer in walk_layers(model):
        role = layer_role(layer)
        if role == ROLE_FROZEN:
            continue
        if role == ROLE_MODULATED:
            owner, prefix = layer.modulator, f"{path}/modulator/"
        else:
            owner, prefix = layer, f"{path}/"
        for variable in owner.weights:
            found.append(TaskVariable(prefix + variable.name, role, variable))
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


@dataclasses.dataclass(frozen=True)
class TaskHeader:
    """The JSON header of a task file."""

    base_fingerprint: str
    options: dict[str, Any]
    tensors: list[dict[str, Any]]
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def save_task(model: keras.Model, path: PathLike) -> TaskHeader:
    """Writes the per-task weights of a KM model to `path`, atomically.

    Args:
        model: A model made by `km_tf.modulate` (trained or not).
        path: Destination file (conventionally `*.kmtask`); its folder must
            exist. An existing file is replaced only once the new one is
            completely written.

    Returns:
        The header that was written.
    """
    variables = task_variables(model)
    tensors = {f"t{i}": keras.ops.convert_to_numpy(v.variable)
               for i, v in enumerate(variables)}
    header = TaskHeader(
        base_fingerprint=base_fingerprint(model),
        options=modulation_options(model),
        tensors=[{"key": key, "path": v.path, "role": v.role,
                  "shape": list(array.shape), "dtype": str(array.dtype)}
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

    Example:
    >>> km = km_tf.modulate(base, **km_tf.read_task_options("a.kmtask"))
    >>> km_tf.load_task(km, "a.kmtask")
    """
    return dict(read_task_header(path).options)


def load_task(model: keras.Model, path: PathLike) -> TaskHeader:
    """Loads a task file into a KM model built on the same base.

    Every check runs before the first assignment: on any error the model is
    unchanged.

    Args:
        model: A model made by `km_tf.modulate` from the task's base, with
            the options in `read_task_options(path)`.
        path: A file written by `save_task`.

    Returns:
        The file's header.

    Raises:
        FileNotFoundError: No file at `path`.
        TaskFileError: The file is corrupt or truncated, was made for another
            base network or other modulate() options, or lacks or mis-shapes
            a tensor this model needs.
    """
    with _open_task(path) as archive:
        header = _read_header(archive, path)
        options = modulation_options(model)
        differing = {k: (v, options.get(k))
                     for k, v in header.options.items() if options.get(k) != v}
        if differing:
            details = ", ".join(f"{k}: file {a!r} vs model {b!r}"
                                for k, (a, b) in differing.items())
            raise TaskFileError(
                f"Task file {os.fspath(path)!r} was trained with other "
                f"modulate() options ({details}). Build the model with "
                "km_tf.modulate(base, **km_tf.read_task_options(path))."
            )
        expected = base_fingerprint(model)
        if header.base_fingerprint != expected:
            raise TaskFileError(
                f"Task file {os.fspath(path)!r} was made for a different base "
                f"network (base fingerprint {header.base_fingerprint[:12]}…, "
                f"this model's {expected[:12]}…). Load it into a model "
                "modulated from the base it was trained on, or retrain the "
                "task on this base."
            )
        values = _read_tensors(archive, header, model, path)
    for variable, value in values:
        variable.assign(value)
    return header


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


def write_atomically(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a fsynced temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write {path!r}: folder {folder!r} does not exist. "
            "Create it first.")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                                         suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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
    try:
        fields = json.loads(raw.tobytes().decode())
        header = TaskHeader(**fields)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise _corrupt(path, error) from error
    if header.format != FORMAT_NAME or header.version > FORMAT_VERSION:
        raise TaskFileError(
            f"{os.fspath(path)!r} is {header.format!r} version "
            f"{header.version}; this km-tf reads {FORMAT_NAME!r} up to "
            f"version {FORMAT_VERSION}. Upgrade km-tf.")
    return header


def _read_tensors(archive: zipfile.ZipFile, header: TaskHeader,
                  model: keras.Model, path: PathLike
                  ) -> list[tuple[keras.Variable, np.ndarray]]:
    wanted = {item.path: item.variable for item in task_variables(model)}
    listed = {entry["path"]: entry for entry in header.tensors}
    missing = sorted(set(wanted) - set(listed))
    extra = sorted(set(listed) - set(wanted))
    if missing or extra:
        raise TaskFileError(
            f"Task file {os.fspath(path)!r} does not match this model's "
            f"per-task variables: missing {_few(missing)}, unexpected "
            f"{_few(extra)}. Build the model with the task's base and "
            "options (km_tf.read_task_options).")
    values = []
    for name, variable in wanted.items():
        entry = listed[name]
        if entry["key"] not in _members(archive):
            raise _corrupt(path, KeyError(f"tensor {entry['key']} of {name}"))
        value = _load_member(archive, entry["key"], path)
        if tuple(value.shape) != tuple(variable.shape):
            raise TaskFileError(
                f"Tensor {name!r} in {os.fspath(path)!r} has shape "
                f"{tuple(value.shape)}, but the model's variable has shape "
                f"{tuple(variable.shape)}. The task was trained for another "
                "head or modulator size: build the model to match it.")
        if value.dtype != np.dtype(variable.dtype):
            raise TaskFileError(
                f"Tensor {name!r} in {os.fspath(path)!r} is {value.dtype}, "
                f"but the model's variable is {variable.dtype}.")
        values.append((variable, value))
    return values


def _few(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit
                    else "")
