"""TFLite export presets: one row per deployment target.

A preset says how a baked Keras model becomes a `.tflite` file: which
quantization, which input/output type, whether the batch size is pinned to 1,
and which extra artifacts and checks come with it. The table `PRESETS` is the
single place these choices live; `km_tf.export` reads it and never branches
on a preset's name.

    preset    quantization                IO        batch   extras
    float32   none                        float32   any
    float16   float16 weights             float32   any
    dynamic   int8 weights (dyn. range)   float32   any
    int8      full int8 (calibrated)      int8*     any
    micro     full int8 (calibrated)      int8*     1       C array, TFLM arena
    edgetpu   full int8 (calibrated)      uint8     1       Edge TPU check

    * `int8` and `micro` take `io_type="uint8"` too.
"""

from __future__ import annotations

import dataclasses

QUANT_NONE = "none"
QUANT_FLOAT16 = "float16"
QUANT_DYNAMIC = "dynamic"
QUANT_INT8 = "int8"

INTEGER_IO_TYPES = ("int8", "uint8")

# Calibration samples drawn from the task's training data for int8 presets.
DEFAULT_CALIBRATION_SAMPLES = 200


@dataclasses.dataclass(frozen=True)
class Preset:
    """How to convert a baked model for one deployment target.

    Attributes:
        name: The preset's name (the `--preset` flag value).
        summary: One line for reports and `--help`.
        quantization: `"none"`, `"float16"`, `"dynamic"` or `"int8"` (full
            integer, calibrated on a representative dataset).
        io_type: Input/output tensor type: `"float32"`, `"int8"` or `"uint8"`.
        io_types: The `io_type` values a caller may choose for this preset.
        static_batch: Pin the batch dimension to 1 (micro, Edge TPU).
        micro: Also write a C source + header and measure the TFLM arena.
        edgetpu: Also check the model against the Edge TPU's requirements.
    """

    name: str
    summary: str
    quantization: str
    io_type: str = "float32"
    io_types: tuple[str, ...] = ("float32",)
    static_batch: bool = False
    micro: bool = False
    edgetpu: bool = False

    @property
    def needs_calibration(self) -> bool:
        """True when conversion needs a representative dataset."""
        return self.quantization == QUANT_INT8

    @property
    def integer_only(self) -> bool:
        """True when no float op may remain between input and output."""
        return self.quantization == QUANT_INT8

    def with_io_type(self, io_type: str | None) -> "Preset":
        """Returns this preset with another input/output type.

        Raises:
            ValueError: `io_type` is not allowed for this preset.
        """
        if io_type is None or io_type == self.io_type:
            return self
        if io_type not in self.io_types:
            raise ValueError(
                f"Preset {self.name!r} does not take io_type {io_type!r}; "
                f"choose one of {self.io_types}."
            )
        return dataclasses.replace(self, io_type=io_type)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("float32", "float32 model for phone CPU/GPU delegates",
               QUANT_NONE),
        Preset("float16", "float16 weights, float32 compute/IO (GPU delegate)",
               QUANT_FLOAT16),
        Preset("dynamic", "dynamic-range quantization: int8 weights, float IO",
               QUANT_DYNAMIC),
        Preset("int8", "full-integer int8 kernels and activations",
               QUANT_INT8, io_type="int8", io_types=INTEGER_IO_TYPES),
        Preset("micro", "int8, batch 1, TFLite Micro ops, C array for MCUs",
               QUANT_INT8, io_type="int8", io_types=INTEGER_IO_TYPES,
               static_batch=True, micro=True),
        Preset("edgetpu", "int8 with uint8 IO and static shapes for Coral",
               QUANT_INT8, io_type="uint8", io_types=("uint8",),
               static_batch=True, edgetpu=True),
    )
}


def get_preset(name: str, io_type: str | None = None) -> Preset:
    """Looks up a preset by name, optionally with another IO type.

    Args:
        name: One of `PRESETS`.
        io_type: Optional input/output type override (`"int8"`/`"uint8"`
            for the integer presets).

    Raises:
        ValueError: Unknown preset, or an IO type the preset does not take.
    """
    if name not in PRESETS:
        raise ValueError(
            f"Unsupported export preset {name!r}; choose one of "
            f"{sorted(PRESETS)}."
        )
    return PRESETS[name].with_io_type(io_type)
