"""Reading and writing task plans (`.kmplan`) and packs (`.kmpack`).

The byte layouts are specified in `tflite/packs/FORMAT.md`, which the C
applier (`tflite/packs/km_apply.c`) implements too. This module needs only
numpy and the standard library: it runs on a device without TensorFlow.
Reading validates everything (magic, version, sizes, CRCs, counts) and raises
`km_tf.errors.PackError` naming the problem; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from km_tf.errors import PackError

PLAN_MAGIC = b"KMPLAN\x00\x01"
PACK_MAGIC = b"KMPACK\x00\x01"
VERSION = 1
PLAN_HEADER_BYTES = 96
PACK_HEADER_BYTES = 80
NO_ACTIVATION = 0xFFFFFFFF

# Template weight types (plan header) and array types (packs).
WEIGHT_TYPES = ("float32", "float16", "int8")
ARRAY_TYPES = ("float32", "float16", "int8")
PLAN_HAS_BASE_KERNELS = 1
PLAN_HAS_KERNEL_RESIDUALS = 2
# What a plan holds of the base kernels (`--plan_kernels`): float32 kernels
# (exact), int8 residuals refining an int8 template's weights, or nothing.
PLAN_KERNELS = ("float32", "residual", "none")
RESIDUAL_STEPS = 254  # A residual of r is r / 254 of a quantization step.
LAYER_HAS_MODULATOR = 1
LAYER_HAS_BATCHNORM = 2

KIND_CONV, KIND_DEPTHWISE = 0, 1
_LAYER_FIELDS = 16
_HEAD_FIELDS = 8


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Where one convolution lives in the template, and its base values.

    Attributes:
        kind: `KIND_CONV` or `KIND_DEPTHWISE`.
        kernel_shape: The Keras kernel shape `(kh, kw, cin, cout)` or, for
            a depthwise kernel, `(kh, kw, cin, multiplier)`.
        cout: Output channels (`cin * multiplier` for depthwise).
        slot: The layer's slot in task files (`km_tf.walk.weighted_layers`).
        kernel_offset, kernel_scale_offset, bias_offset, bias_scale_offset:
            Template byte offsets (scale offsets are 0 for float templates).
        input_activation: Activation-table index of the layer's input
            (`NO_ACTIVATION` for float templates).
        base_multiplier, base_offset: The base's folded BatchNorm
            (`m`, `o`; ones and zeros without BatchNorm), float32[cout].
        conv_bias: The convolution's own bias, float32[cout].
        base_kernel: The float32 base kernel (Keras layout), or None when
            the plan leaves it out (compact mode).
        kernel_residual: int8 residuals of an int8 template's kernel
            (template layout): the folded base weight is
            `(q + r / 254) * scale`. None unless the plan holds them.
    """

    kind: int
    kernel_shape: tuple[int, int, int, int]
    cout: int
    slot: int
    kernel_offset: int
    kernel_scale_offset: int
    bias_offset: int
    bias_scale_offset: int
    input_activation: int
    base_multiplier: np.ndarray
    base_offset: np.ndarray
    conv_bias: np.ndarray
    base_kernel: np.ndarray | None = None
    kernel_residual: np.ndarray | None = None

    @property
    def template_shape(self) -> tuple[int, ...]:
        """The kernel's shape in the template (TFLite layout)."""
        kh, kw, cin, last = self.kernel_shape
        if self.kind == KIND_DEPTHWISE:
            return (1, kh, kw, cin * last)
        return (last, kh, kw, cin)

    @property
    def kernel_size(self) -> int:
        """Elements of the kernel."""
        return int(np.prod(self.kernel_shape))


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """Where the classifier head (a Dense layer) lives in the template."""

    weight_offset: int
    weight_scale_offset: int
    bias_offset: int
    bias_scale_offset: int
    input_activation: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A template's plan: what a pack's values overwrite, and where.

    Attributes:
        fingerprint: SHA-256 of the template file.
        template_bytes: Size of the template file.
        template_crc32: zlib CRC-32 of the template file.
        weight_type: `"float32"`, `"float16"` or `"int8"`.
        layers: One `LayerPlan` per convolution, in slot order.
        head: The head's `HeadPlan`.
        classes: The template head's width (the most classes a pack holds).
        features: The head's input features.
        activations: `(scale_offset, zero_point_offset)` per activation
            tensor of an int8 template (empty for float templates).
    """

    fingerprint: bytes
    template_bytes: int
    template_crc32: int
    weight_type: str
    layers: tuple[LayerPlan, ...]
    head: HeadPlan
    classes: int
    features: int
    activations: tuple[tuple[int, int], ...] = ()

    @property
    def has_base_kernels(self) -> bool:
        """True when the plan holds the float32 base kernels (exact mode)."""
        return all(layer.base_kernel is not None for layer in self.layers)

    @property
    def kernels(self) -> str:
        """What the plan holds of the base kernels (`PLAN_KERNELS`)."""
        if self.has_base_kernels:
            return "float32"
        if self.layers and all(layer.kernel_residual is not None
                               for layer in self.layers):
            return "residual"
        return "none"


@dataclasses.dataclass(frozen=True)
class LayerPack:
    """One layer's per-task values (float32, as the pack stores them).

    Attributes:
        unit_axes: Leading kernel axes per modulator unit (2 or 3).
        hidden: The modulator's hidden width.
        modulator: `(U, c, V, d)` shaped `(h, u)`, `(h,)`, `(u, h)`, `(u,)`,
            or None for an unmodulated layer.
        batchnorm: The task's folded BatchNorm `(m, o)`, or None to keep the
            base's.
    """

    unit_axes: int
    hidden: int
    modulator: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    batchnorm: tuple[np.ndarray, np.ndarray] | None


@dataclasses.dataclass(frozen=True)
class Pack:
    """One task's per-task values for a template.

    Attributes:
        fingerprint: The template's fingerprint (`Plan.fingerprint`).
        classes: The task's class count (the first `classes` outputs of the
            applied model are the task's).
        head_kernel: float32 `(features, classes)`.
        head_bias: float32 `(classes,)`.
        layers: One `LayerPack` per plan layer.
        activations: `(scale, zero_point)` per plan activation (int8).
    """

    fingerprint: bytes
    classes: int
    head_kernel: np.ndarray
    head_bias: np.ndarray
    layers: tuple[LayerPack, ...]
    activations: tuple[tuple[float, int], ...] = ()


def unit_size(kernel_shape: Sequence[int], unit_axes: int) -> int:
    """Weights per modulator unit: the product of the leading axes."""
    return int(np.prod(kernel_shape[:unit_axes]))


def crc32(data: bytes | memoryview) -> int:
    """zlib's CRC-32, as both appliers compute it."""
    return zlib.crc32(data) & 0xFFFFFFFF


# --------------------------------------------------------------- writing

class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> int:
        offset = self.size
        self.parts.append(data)
        self.size += len(data)
        pad = -self.size % 4
        if pad:
            self.parts.append(b"\x00" * pad)
            self.size += pad
        return offset

    def u32(self, *values: int) -> None:
        self.add(struct.pack(f"<{len(values)}I", *values))

    def array(self, values: np.ndarray, array_type: str) -> None:
        """One pack array: type, (int8: scale), elements, padding."""
        values = np.asarray(values, np.float32).reshape(-1)
        code = ARRAY_TYPES.index(array_type)
        if array_type == "float32":
            self.add(struct.pack("<I", code) + values.astype("<f4").tobytes())
        elif array_type == "float16":
            self.add(struct.pack("<I", code) + values.astype("<f2").tobytes())
        else:
            scale, q = quantize_symmetric(values)
            self.add(struct.pack("<If", code, scale) + q.tobytes())

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def quantize_symmetric(values: np.ndarray) -> tuple[float, np.ndarray]:
    """int8 with one scale (max |v| / 127): a pack's int8 array."""
    values = np.asarray(values, np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = np.float32(peak / 127.0) if peak > 0 else np.float32(1.0)
    q = np.clip(np.round(values.astype(np.float64) / float(scale)), -127, 127)
    return float(scale), q.astype(np.int8)


def dequantize_symmetric(scale: float, q: np.ndarray) -> np.ndarray:
    """The float32 values an int8 pack array stands for: `q * scale`."""
    return q.astype(np.float32) * np.float32(scale)


def round_trip(values: np.ndarray, array_type: str) -> np.ndarray:
    """What a value becomes once stored in a pack as `array_type`."""
    values = np.asarray(values, np.float32)
    if array_type == "float32":
        return values.copy()
    if array_type == "float16":
        return values.astype(np.float16).astype(np.float32)
    return dequantize_symmetric(*quantize_symmetric(values)).reshape(
        values.shape)


def write_plan(plan: Plan) -> bytes:
    """Serializes a plan (`tflite/packs/FORMAT.md`)."""
    count = len(plan.layers)
    body_start = PLAN_HEADER_BYTES
    data_start = (body_start + 4 * (_LAYER_FIELDS * count + _HEAD_FIELDS
                                    + 2 * len(plan.activations)))
    data = _Writer()
    offsets = []
    for layer in plan.layers:
        arrays = [np.asarray(a, "<f4") for a in (
            layer.base_multiplier, layer.base_offset, layer.conv_bias)]
        if layer.base_kernel is not None:
            arrays.append(np.asarray(layer.base_kernel, "<f4"))
        elif layer.kernel_residual is not None:
            arrays.append(np.asarray(layer.kernel_residual, np.int8))
        placed = [data_start + data.add(a.tobytes()) for a in arrays]
        offsets.append(placed + [0] * (4 - len(placed)))
    body = _Writer()
    for layer, (m_at, o_at, bias_at, kernel_at) in zip(plan.layers, offsets):
        kh, kw, cin, last = layer.kernel_shape
        body.u32(layer.kind, kh, kw, cin, layer.cout,
                 last if layer.kind == KIND_DEPTHWISE else 1, layer.slot,
                 layer.kernel_offset, layer.kernel_scale_offset,
                 layer.bias_offset, layer.bias_scale_offset,
                 layer.input_activation, m_at, o_at, bias_at, kernel_at)
    head = plan.head
    body.u32(head.weight_offset, head.weight_scale_offset, head.bias_offset,
             head.bias_scale_offset, head.input_activation, 0, 0, 0)
    for scale_at, zero_at in plan.activations:
        body.u32(scale_at, zero_at)
    rest = body.bytes() + data.bytes()
    total = PLAN_HEADER_BYTES + len(rest)
    flags = {"float32": PLAN_HAS_BASE_KERNELS,
             "residual": PLAN_HAS_KERNEL_RESIDUALS, "none": 0}[plan.kernels]
    header = (PLAN_MAGIC + struct.pack("<II", VERSION, PLAN_HEADER_BYTES)
              + plan.fingerprint
              + struct.pack("<11I", plan.template_bytes, plan.template_crc32,
                            WEIGHT_TYPES.index(plan.weight_type), flags,
                            count, len(plan.activations), plan.classes,
                            plan.features, total, crc32(rest), 0))
    return header + struct.pack("<I", crc32(header)) + rest


def write_pack(pack: Pack, *, modulator_type: str, batchnorm_type: str,
               head_type: str) -> bytes:
    """Serializes a pack (`tflite/packs/FORMAT.md`).

    Args:
        pack: The values; arrays are stored as the `*_type` arguments say
            (`"float32"`, `"float16"` or `"int8"`). Use `round_trip` to know
            what a value becomes.
        modulator_type: Storage of the modulator arrays.
        batchnorm_type: Storage of the folded BatchNorm arrays.
        head_type: Storage of the head kernel (its bias stays float32).
    """
    payload = _Writer()
    for layer in pack.layers:
        flags = ((LAYER_HAS_MODULATOR if layer.modulator is not None else 0)
                 | (LAYER_HAS_BATCHNORM if layer.batchnorm is not None
                    else 0))
        payload.u32(flags, layer.unit_axes, layer.hidden)
        for array in layer.modulator or ():
            payload.array(array, modulator_type)
        for array in layer.batchnorm or ():
            payload.array(array, batchnorm_type)
    payload.array(pack.head_kernel, head_type)
    payload.array(pack.head_bias, "float32")
    for scale, zero_point in pack.activations:
        payload.add(struct.pack("<fi", scale, zero_point))
    body = payload.bytes()
    features = pack.head_kernel.shape[0]
    header = (PACK_MAGIC + struct.pack("<II", VERSION, PACK_HEADER_BYTES)
              + pack.fingerprint
              + struct.pack("<7I", len(body), crc32(body), len(pack.layers),
                            len(pack.activations), pack.classes, features, 0))
    return header + struct.pack("<I", crc32(header)) + body


# --------------------------------------------------------------- reading

class _Reader:
    """Bounds-checked little-endian reads from one file's bytes."""

    def __init__(self, data: bytes, what: str, fix: str) -> None:
        self.data = memoryview(data)
        self.what = what
        self.fix = fix
        self.at = 0

    def fail(self, problem: str) -> PackError:
        return PackError(f"{self.what} {problem}. {self.fix}")

    def take(self, count: int, at: int | None = None) -> memoryview:
        start = self.at if at is None else at
        if start < 0 or count < 0 or start + count > len(self.data):
            raise self.fail(
                f"is truncated: it needs {start + count:,} bytes and has "
                f"{len(self.data):,}")
        if at is None:
            self.at = start + count
        return self.data[start:start + count]

    def u32(self, count: int = 1) -> tuple[int, ...]:
        return struct.unpack(f"<{count}I", self.take(4 * count))

    def floats(self, at: int, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, at), "<f4").astype(
            np.float32)

    def array(self, count: int) -> np.ndarray:
        (code,) = self.u32()
        if code >= len(ARRAY_TYPES):
            raise self.fail(f"holds an array of unknown type {code}")
        kind = ARRAY_TYPES[code]
        if kind == "int8":
            (scale,) = struct.unpack("<f", self.take(4))
            values = dequantize_symmetric(
                scale, np.frombuffer(self.take(count), np.int8))
        else:
            dtype = "<f4" if kind == "float32" else "<f2"
            values = np.frombuffer(self.take(np.dtype(dtype).itemsize * count),
                                   dtype).astype(np.float32)
        self.take(-self.at % 4)  # Arrays end on a 4-byte boundary.
        return values


def _check_header(reader: _Reader, magic: bytes, header_bytes: int,
                  kind: str) -> None:
    head = reader.take(header_bytes, 0)
    if bytes(head[:8]) != magic:
        raise reader.fail(f"is not a km-tf {kind} (its first bytes are "
                          f"{bytes(head[:8])!r})")
    version, size = struct.unpack("<II", head[8:16])
    if version != VERSION or size != header_bytes:
        raise reader.fail(
            f"has format version {version}; this km-tf reads version "
            f"{VERSION}. Re-export it with this km-tf")
    (stored,) = struct.unpack("<I", head[-4:])
    if stored != crc32(head[:-4]):
        raise reader.fail("is corrupt (its header checksum does not match)")


def read_plan(data: bytes) -> Plan:
    """Parses and validates a `.kmplan` file's bytes.

    Raises:
        PackError: Not a plan, another version, truncated or corrupt.
    """
    reader = _Reader(data, "The plan",
                     "Copy the .kmplan written next to the template again.")
    _check_header(reader, PLAN_MAGIC, PLAN_HEADER_BYTES, "plan")
    fingerprint = bytes(reader.take(32, 16))
    (template_bytes, template_crc, weight_code, flags, count, activations,
     classes, features, total, body_crc, _) = struct.unpack(
        "<11I", reader.take(44, 48))
    if total != len(data):
        raise reader.fail(f"is truncated or padded: its header says "
                          f"{total:,} bytes, the file has {len(data):,}")
    if body_crc != crc32(reader.data[PLAN_HEADER_BYTES:]):
        raise reader.fail("is corrupt (its checksum does not match)")
    if weight_code >= len(WEIGHT_TYPES):
        raise reader.fail(f"names unknown weight type {weight_code}")
    if flags not in (0, PLAN_HAS_BASE_KERNELS, PLAN_HAS_KERNEL_RESIDUALS) or (
            flags == PLAN_HAS_KERNEL_RESIDUALS
            and WEIGHT_TYPES[weight_code] != "int8"):
        raise reader.fail(f"has unknown flags {flags:#x}")
    reader.at = PLAN_HEADER_BYTES
    layers = []
    for _ in range(count):
        (kind, kh, kw, cin, cout, multiplier, slot, kernel_at, kscale_at,
         bias_at, bscale_at, activation, m_at, o_at, cbias_at,
         base_at) = reader.u32(_LAYER_FIELDS)
        if kind not in (KIND_CONV, KIND_DEPTHWISE):
            raise reader.fail(f"has a layer of unknown kind {kind}")
        consistent = (cout == cin * multiplier if kind == KIND_DEPTHWISE
                      else multiplier == 1)
        if not (consistent and min(kh, kw, cin, cout) > 0 and (
                activation < activations
                or activation == NO_ACTIVATION and not activations)):
            raise reader.fail(f"describes layer {len(layers)} inconsistently")
        shape = (kh, kw, cin, multiplier if kind == KIND_DEPTHWISE else cout)
        size = int(np.prod(shape))
        base_kernel = residual = None
        if flags & PLAN_HAS_BASE_KERNELS:
            base_kernel = reader.floats(base_at, size).reshape(shape)
        elif flags & PLAN_HAS_KERNEL_RESIDUALS:
            residual = np.frombuffer(reader.take(size, base_at), np.int8)
        layers.append(LayerPlan(
            kind, shape, cout, slot, kernel_at, kscale_at, bias_at,
            bscale_at, activation, reader.floats(m_at, cout),
            reader.floats(o_at, cout), reader.floats(cbias_at, cout),
            base_kernel))
        if residual is not None:
            layers[-1] = dataclasses.replace(
                layers[-1],
                kernel_residual=residual.reshape(layers[-1].template_shape))
    head = HeadPlan(*reader.u32(_HEAD_FIELDS)[:5])
    if not (head.input_activation < activations or (
            head.input_activation == NO_ACTIVATION and not activations)):
        raise reader.fail("describes the head inconsistently")
    table = reader.u32(2 * activations)
    return Plan(fingerprint, template_bytes, template_crc,
                WEIGHT_TYPES[weight_code], tuple(layers), head, classes,
                features, tuple(zip(table[::2], table[1::2])))


def read_pack(data: bytes, plan: Plan) -> Pack:
    """Parses and validates a `.kmpack` file's bytes against its plan.

    Raises:
        PackError: Not a pack, another version, truncated, corrupt, made
            for another template, or inconsistent with the plan.
    """
    reader = _Reader(data, "The task pack",
                     "Copy the .kmpack again, or export it again with "
                     "tflite/export_packs.py.")
    _check_header(reader, PACK_MAGIC, PACK_HEADER_BYTES, "task pack")
    fingerprint = bytes(reader.take(32, 16))
    (payload_bytes, payload_crc, count, activations, classes, features,
     _) = struct.unpack("<7I", reader.take(28, 48))
    if fingerprint != plan.fingerprint:
        raise PackError(
            f"The task pack was made for another template (fingerprint "
            f"{fingerprint.hex()[:16]}..., this template's is "
            f"{plan.fingerprint.hex()[:16]}...). Export the pack for this "
            "template: tflite/export_packs.py --template=<its .tflite>.")
    if PACK_HEADER_BYTES + payload_bytes != len(data):
        raise reader.fail(
            f"is truncated: its header says "
            f"{PACK_HEADER_BYTES + payload_bytes:,} bytes, the file has "
            f"{len(data):,}")
    if payload_crc != crc32(reader.data[PACK_HEADER_BYTES:]):
        raise reader.fail("is corrupt (its checksum does not match)")
    expected = (len(plan.layers), len(plan.activations), plan.features)
    if (count, activations, features) != expected:
        raise reader.fail(
            f"has {count} layers, {activations} activations and {features} "
            f"head features where the template has {expected[0]}, "
            f"{expected[1]} and {expected[2]}")
    if not 1 <= classes <= plan.classes:
        raise PackError(
            f"The task pack has {classes} classes; the template's head holds "
            f"at most {plan.classes}. Export a template with "
            f"--classes={classes} or more, and its packs.")
    reader.at = PACK_HEADER_BYTES
    layers = tuple(_read_layer(reader, layer) for layer in plan.layers)
    head_kernel = reader.array(features * classes).reshape(features, classes)
    head_bias = reader.array(classes)
    values = [struct.unpack("<fi", reader.take(8))
              for _ in range(activations)]
    if reader.at != len(data):
        raise reader.fail(f"has {len(data) - reader.at} unread bytes at its "
                          "end")
    return Pack(fingerprint, classes, head_kernel, head_bias, layers,
                tuple((float(s), int(z)) for s, z in values))


def _read_layer(reader: _Reader, layer: LayerPlan) -> LayerPack:
    flags, unit_axes, hidden = reader.u32(3)
    if flags & ~(LAYER_HAS_MODULATOR | LAYER_HAS_BATCHNORM):
        raise reader.fail(f"has unknown layer flags {flags:#x}")
    modulator = None
    if flags & LAYER_HAS_MODULATOR:
        if unit_axes not in (2, 3) or not 1 <= hidden <= 65535:
            raise reader.fail(
                f"gives slot {layer.slot} a modulator with {unit_axes} unit "
                f"axes and {hidden} hidden units")
        units = unit_size(layer.kernel_shape, unit_axes)
        if (layer.kernel_size // units) % layer.cout:
            raise reader.fail(
                f"gives slot {layer.slot} modulator units that cut across "
                "output channels")
        modulator = (reader.array(hidden * units).reshape(hidden, units),
                     reader.array(hidden), reader.array(
                         units * hidden).reshape(units, hidden),
                     reader.array(units))
    batchnorm = None
    if flags & LAYER_HAS_BATCHNORM:
        batchnorm = (reader.array(layer.cout), reader.array(layer.cout))
    return LayerPack(unit_axes, hidden, modulator, batchnorm)
