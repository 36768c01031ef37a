"""The JSON header of a task file: its fields, and checking a file's header.

A task file (see `km_tf.tasks`) carries one JSON header. Version 2 (written
since km-tf 0.2) describes the network by *slots*, the places of its layers
with weights in walk order (`km_tf.walk.weighted_layers`), never by layer
names, which Keras generates anew for every model built in code:

    format, version        "km-tf-task", 2
    base_fingerprint       SHA-256 of the frozen base (`base_fingerprint`)
    options                modulate() options: hidden_units, form,
                           filter_units, batchnorm (and head / skip names
                           only where the user chose them by name, and
                           overrides, {slot: hidden_units, form,
                           filter_units}, only for layers whose modulator
                           settings differ)
    layers                 one entry per slot: path (informative), class,
                           role, weight shapes; head layers also carry
                           their Keras config, so that a head of another
                           class count can be rebuilt from the file
    tensors                one entry per stored tensor: archive key, slot,
                           variable name within the layer, role, shape,
                           dtype and the SHA-256 of its bytes

Version 1 files (km-tf 0.1) named layers by path and had no `layers`, and no
digests; `parse_header` still reads them (`TaskHeader.version == 1`).
Everything a header says is checked here (types, values, consistency), so a
damaged or hand-edited header is a `TaskFileError`, never a `KeyError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from km_tf.errors import TaskFileError

FORMAT_NAME = "km-tf-task"
FORMAT_VERSION = 2
_SHA256 = re.compile(r"[0-9a-f]{64}")
# modulate() options every file records, with their JSON types.
_STRUCTURAL_OPTIONS = {"hidden_units": int, "form": str, "filter_units": int,
                       "batchnorm": str}


@dataclasses.dataclass(frozen=True)
class TaskHeader:
    """The JSON header of a task file (see the module docstring).

    Attributes:
        base_fingerprint: SHA-256 (hex) of the frozen base.
        options: The `modulate()` keyword arguments of the task.
        tensors: One dict per stored tensor.
        layers: One dict per slot (version 2); `None` in version 1 files.
        format: Always `FORMAT_NAME`.
        version: The format version the file was written in.
    """

    base_fingerprint: str
    options: dict[str, Any]
    tensors: list[dict[str, Any]]
    layers: list[dict[str, Any]] | None = None
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def head_layers(self) -> list[tuple[int, dict[str, Any]]]:
        """`(slot, entry)` of the head layers (version 2)."""
        return [(slot, entry) for slot, entry in enumerate(self.layers or ())
                if entry["role"] == "head"]


def parse_header(text: str, source: str) -> TaskHeader:
    """Reads and checks a header's JSON text.

    Args:
        text: The header's JSON document.
        source: The file's name, for messages.

    Returns:
        The header, of version 1 or 2.

    Raises:
        TaskFileError: Not JSON, not a km-tf task header, a newer version,
            or any field of the wrong type or an inconsistent value.
    """
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise _malformed(source, f"not JSON ({error})") from error
    check = _Checker(source)
    check.mapping(fields, "header")
    if fields.get("format") != FORMAT_NAME:
        raise TaskFileError(
            f"{source!r} is not a km-tf task file (format "
            f"{fields.get('format')!r}): write task files with "
            "km_tf.save_task.")
    version = fields.get("version")
    check.integer(version, "version", minimum=1)
    if version > FORMAT_VERSION:
        raise TaskFileError(
            f"{source!r} is {FORMAT_NAME!r} version {version}; this km-tf "
            f"reads up to version {FORMAT_VERSION}. Upgrade km-tf.")
    expected = {"format", "version", "base_fingerprint", "options",
                "tensors"} | ({"layers"} if version >= 2 else set())
    check.keys(fields, expected, "header")
    if not (isinstance(fields["base_fingerprint"], str)
            and _SHA256.fullmatch(fields["base_fingerprint"])):
        raise _malformed(source, "base_fingerprint is not a SHA-256 digest")
    _check_options(check, fields["options"], version)
    check.sequence(fields["tensors"], "tensors")
    keys = set()
    for index, entry in enumerate(fields["tensors"]):
        _check_tensor(check, entry, f"tensors[{index}]", version)
        if entry["key"] in keys:
            raise _malformed(source, f"tensor key {entry['key']!r} repeats")
        keys.add(entry["key"])
    if version >= 2:
        _check_layers(check, fields["layers"], fields["tensors"])
        for slot in fields["options"].get("overrides", {}):
            if int(slot) >= len(fields["layers"]):
                raise check.error(f"options.overrides names slot {slot}, "
                                  "which the network does not have")
    return TaskHeader(**fields)


def _check_options(check: _Checker, options: Any, version: int) -> None:
    check.mapping(options, "options")
    for name, kind in _STRUCTURAL_OPTIONS.items():
        if kind is int:
            check.integer(options.get(name), f"options.{name}", minimum=1)
        elif not isinstance(options.get(name), kind):
            raise check.error(f"options.{name} is not a {kind.__name__}")
    # Version 1 always named the head and skipped layers; version 2 only
    # where the user chose them by name.
    required = set(_STRUCTURAL_OPTIONS) | (
        set() if version >= 2 else {"head", "skip"})
    check.keys(options, set(_STRUCTURAL_OPTIONS) | {"head", "skip",
                                                     "overrides"},
               "options", required=required)
    if "overrides" in options:
        _check_overrides(check, options["overrides"])
    for name in ("head", "skip"):
        if name in options and options[name] is not None:
            check.sequence(options[name], f"options.{name}")
            if not all(isinstance(item, str) for item in options[name]):
                raise check.error(f"options.{name} holds a non-string")


def _check_overrides(check: _Checker, overrides: Any) -> None:
    """`options.overrides`: `{slot (a string): {hidden_units, form,
    filter_units}}`."""
    check.mapping(overrides, "options.overrides")
    for slot, settings in overrides.items():
        where = f"options.overrides[{slot!r}]"
        if not slot.isdigit():
            raise check.error(f"{where} is not keyed by a slot number")
        check.mapping(settings, where)
        check.keys(settings, {"hidden_units", "form", "filter_units"}, where)
        for name in ("hidden_units", "filter_units"):
            check.integer(settings[name], f"{where}.{name}", minimum=1)
        if not isinstance(settings["form"], str):
            raise check.error(f"{where}.form is not a str")


def _check_tensor(check: _Checker, entry: Any, where: str,
                  version: int) -> None:
    check.mapping(entry, where)
    required = {"key", "path", "role", "shape", "dtype"}
    if version >= 2:
        required |= {"slot", "variable", "sha256"}
    check.keys(entry, required, where)
    for name in ("key", "path", "role", "dtype") + (
            ("variable", "sha256") if version >= 2 else ()):
        if not isinstance(entry[name], str):
            raise check.error(f"{where}.{name} is not a string")
    check.shape(entry["shape"], f"{where}.shape")
    if version >= 2:
        check.integer(entry["slot"], f"{where}.slot", minimum=0)
        if not _SHA256.fullmatch(entry["sha256"]):
            raise check.error(f"{where}.sha256 is not a SHA-256 digest")


def _check_layers(check: _Checker, layers: Any,
                  tensors: list[dict[str, Any]]) -> None:
    check.sequence(layers, "layers")
    for slot, entry in enumerate(layers):
        where = f"layers[{slot}]"
        check.mapping(entry, where)
        check.keys(entry, {"path", "class", "role", "shapes", "config"},
                   where)
        for name in ("path", "class", "role"):
            if not isinstance(entry[name], str):
                raise check.error(f"{where}.{name} is not a string")
        check.sequence(entry["shapes"], f"{where}.shapes")
        for index, shape in enumerate(entry["shapes"]):
            check.shape(shape, f"{where}.shapes[{index}]")
        if entry["role"] == "head":
            check.mapping(entry["config"], f"{where}.config")
        elif entry["config"] is not None:
            raise check.error(f"{where} carries a config but is no head")
    for entry in tensors:
        if entry["slot"] >= len(layers):
            raise check.error(
                f"tensor {entry['key']!r} names slot {entry['slot']}, but "
                f"the file lists {len(layers)} layers")
        if layers[entry["slot"]]["role"] != entry["role"]:
            raise check.error(
                f"tensor {entry['key']!r} has role {entry['role']!r}, its "
                f"layer {layers[entry['slot']]['role']!r}")


class _Checker:
    """Type checks of JSON values that fail with a `TaskFileError`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, problem: str) -> TaskFileError:
        return _malformed(self.source, problem)

    def mapping(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise self.error(f"{where} is not a JSON object")

    def sequence(self, value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise self.error(f"{where} is not a JSON list")

    def integer(self, value: Any, where: str, *, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or (
                value < minimum):
            raise self.error(f"{where} is not an integer >= {minimum} "
                             f"(got {value!r})")

    def shape(self, value: Any, where: str) -> None:
        self.sequence(value, where)
        for size in value:
            self.integer(size, where, minimum=0)

    def keys(self, value: dict[str, Any], allowed: set[str], where: str,
             required: set[str] | None = None) -> None:
        missing = sorted((allowed if required is None else required)
                         - set(value))
        unknown = sorted(set(value) - allowed)
        if missing or unknown:
            raise self.error(f"{where} lacks {missing} / has unknown "
                             f"{unknown}")


def _malformed(source: str, problem: str) -> TaskFileError:
    return TaskFileError(
        f"Task file {source!r} has a malformed header ({problem}). It was "
        "damaged or edited by hand: copy it again or re-create it with "
        "km_tf.save_task.")
