"""Glyphs: one class per letter of the fonts that ship inside matplotlib.

An offline, Omniglot-like dataset with thousands of classes across scripts.
matplotlib's wheel carries the DejaVu (Sans, Serif, Mono; regular, bold,
oblique) and STIX General fonts, which together draw about 3,400 letters
(Unicode category L) of Latin, Greek, Cyrillic, Arabic, Canadian
syllabics, Georgian, Armenian, Hebrew and more. Each letter is a class;
each instance is drawn

- in a random one of the fonts that cover the letter (the fonts differ as
  much as hands do: serif, sans, monospace, bold, slanted),
- with a random stroke width, size, rotation, shear and shift,
- with random ink and paper grey levels and pixel noise,

at `GLYPH_SIZE` pixels, grey, centred on its ink. Instance `i` of a letter
depends only on the seed, the letter and `i`, so a script's images are the
same whichever scripts are loaded with it.

Letters that look exactly alike in the reference font (Latin `A`, Greek
`Alpha`, Cyrillic `A`) would be one class under several labels: every letter
whose reference rendering equals that of a letter before it (in `SCRIPTS`
order, then code point order) is left out. `scripts()` lists what remains.
"""

import functools
import math
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from km_tf.errors import DataError
from km_tf.synthetic.cache import cached_arrays

GLYPH_SIZE = 32
INSTANCES = 20
GENERATOR_VERSION = 1
# Scripts with at least this many distinct letters, in the order that
# decides which of two identical-looking letters stays.
SCRIPTS = ("latin", "greek", "cyrillic", "arabic", "canadian", "georgian",
           "armenian", "hebrew", "tifinagh", "lao", "nko", "ogham",
           "old_italic")
# Fonts used, by file-name prefix. Left out: LastResort (a placeholder box
# for every code point), the Display cuts (a few dozen glyphs), Computer
# Modern and STIX NonUni/Size (glyphs at code points that do not name them).
_FONT_PREFIXES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral")
_REFERENCE_FONT = "DejaVuSans.ttf"
# Drawing (on a canvas of `_CANVAS` pixels, reduced 2x at the end).
_CANVAS = 2 * GLYPH_SIZE
_FONT_SIZES = (36, 48)
_STROKE_WIDTHS = 3  # 0, 1 or 2 canvas pixels of extra stroke.
_MAX_ROTATION_DEGREES = 15.0
_MAX_SHEAR = 0.2
_SCALES = (0.85, 1.05)
_MAX_SHIFT = 0.08  # Of the canvas side.
_INK_LEVELS = (0.0, 90.0)
_PAPER_LEVELS = (170.0, 255.0)
_MAX_NOISE = 10.0


def scripts() -> dict[str, int]:
    """The scripts `glyph_images` can draw, with their number of letters."""
    counts = {script: 0 for script in SCRIPTS}
    for _, script, _ in _catalogue():
        counts[script] += 1
    return counts


def letters(names: Sequence[str]) -> list[str]:
    """The letters (classes) of the named scripts, in `SCRIPTS` order.

    Args:
        names: Script names from `SCRIPTS`, or `["all"]`.

    Raises:
        DataError: An unknown script name.
    """
    chosen = _check_scripts(names)
    return [char for char, script, _ in _catalogue() if script in chosen]


def glyph_images(names: Sequence[str], instances: int = INSTANCES,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Draws (or reads from the cache) every letter of some scripts.

    Args:
        names: Script names from `SCRIPTS`, or `["all"]`.
        instances: Images per letter.
        seed: Seed of the drawing.

    Returns:
        `(images, labels, class_names)`: uint8 `(n, GLYPH_SIZE, GLYPH_SIZE,
        1)` images (dark ink on light paper), int64 labels indexing
        `class_names` (the letters), `instances` per class in class order.

    Raises:
        DataError: An unknown script name, or `instances < 1`.
    """
    if instances < 1:
        raise DataError(f"`instances` must be >= 1; got {instances}.")
    chosen = _check_scripts(names)
    classes = [entry for entry in _catalogue() if entry[1] in chosen]
    key = "+".join(script for script in SCRIPTS if script in chosen)
    arrays = cached_arrays(
        f"glyphs_v{GENERATOR_VERSION}_{key}_{instances}x{GLYPH_SIZE}px_"
        f"seed{seed}",
        lambda: {"images": np.stack([
            _draw(char, fonts, rng)
            for char, _, fonts in classes
            for rng in [np.random.default_rng([seed, ord(char)])]
            for _ in range(instances)])})
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), instances)
    return arrays["images"], labels, [char for char, _, _ in classes]


def script_of(char: str) -> str | None:
    """The script name of a letter (`"latin"`), from its Unicode name."""
    try:
        words = unicodedata.name(char).lower().split()
    except ValueError:
        return None
    return "_".join(words[:2]) if words[0] == "old" else words[0]


def _check_scripts(names: Sequence[str]) -> set[str]:
    names = [name.strip().lower() for name in names]
    if names == ["all"]:
        return set(SCRIPTS)
    unknown = [name for name in names if name not in SCRIPTS]
    if unknown or not names:
        raise DataError(
            f"Unknown glyph script(s) {unknown or names}; choose from "
            f"{', '.join(SCRIPTS)} (joined with '+', e.g. "
            "'glyphs:latin+greek'), or 'all'.")
    return set(names)


def _font_folder() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@functools.lru_cache(maxsize=1)
def _font_files() -> tuple[str, ...]:
    """The fonts used, the reference font first."""
    names = sorted(name for name in os.listdir(_font_folder())
                   if name.endswith(".ttf") and "Display" not in name
                   and name.startswith(_FONT_PREFIXES))
    names.sort(key=lambda name: name != _REFERENCE_FONT)
    return tuple(os.path.join(_font_folder(), name) for name in names)


@functools.lru_cache(maxsize=1)
def _catalogue() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """`(letter, script, covering fonts)` of every class, in class order."""
    from fontTools.ttLib import TTFont

    covering: dict[int, list[str]] = {}
    for path in _font_files():
        for code in TTFont(path, lazy=True).getBestCmap() or {}:
            covering.setdefault(code, []).append(path)
    by_script: dict[str, list[int]] = {script: [] for script in SCRIPTS}
    for code in sorted(covering):
        char = chr(code)
        script = script_of(char)
        if (script in by_script
                and unicodedata.category(char).startswith("L")):
            by_script[script].append(code)
    seen: set[bytes] = set()
    entries = []
    for script in SCRIPTS:
        for code in by_script[script]:
            fonts = covering[code]
            reference = _reference_bitmap(chr(code), fonts[0])
            if reference is None or reference in seen:
                continue
            seen.add(reference)
            entries.append((chr(code), script, tuple(fonts)))
    return tuple(entries)


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _reference_bitmap(char: str, font_path: str) -> bytes | None:
    """The letter's plain rendering, binarised (None: the font draws no ink)."""
    mask = _font(font_path, GLYPH_SIZE).getmask(char)
    if mask.getbbox() is None:
        return None
    bitmap = np.asarray(mask, np.uint8).reshape(mask.size[1], mask.size[0])
    return bytes(str(bitmap.shape), "ascii") + np.packbits(
        bitmap > 127).tobytes()


def _draw(char: str, fonts: Sequence[str], rng: np.random.Generator
          ) -> np.ndarray:
    """One instance of a letter: uint8 `(GLYPH_SIZE, GLYPH_SIZE, 1)`."""
    from PIL import Image, ImageDraw

    order = rng.permutation(len(fonts))
    size = int(rng.integers(*_FONT_SIZES, endpoint=True))
    stroke = int(rng.integers(_STROKE_WIDTHS))
    for index in order:  # The first covering font that draws ink.
        canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
        ImageDraw.Draw(canvas).text(
            (_CANVAS / 2, _CANVAS / 2), char, fill=255, anchor="mm",
            font=_font(fonts[index], size), stroke_width=stroke,
            stroke_fill=255)
        box = canvas.getbbox()
        if box is not None:
            break
    else:
        raise DataError(f"No font draws {char!r} (U+{ord(char):04X}).")
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    canvas = canvas.transform(
        canvas.size, Image.Transform.AFFINE, _inverse_affine(centre, rng),
        resample=Image.Resampling.BILINEAR, fillcolor=0)
    ink = np.asarray(canvas.reduce(2), np.float64) / 255.0
    paper = rng.uniform(*_PAPER_LEVELS)
    levels = paper + (rng.uniform(*_INK_LEVELS) - paper) * ink
    levels += rng.normal(0.0, rng.uniform(0.0, _MAX_NOISE), levels.shape)
    return np.clip(np.round(levels), 0, 255).astype(np.uint8)[..., None]


def _inverse_affine(centre: tuple[float, float], rng: np.random.Generator
                    ) -> tuple[float, ...]:
    """PIL's affine data (output -> input) of a random rotation, shear and
    scale about the ink centre, moved to the canvas centre plus a shift."""
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEGREES,
                                     _MAX_ROTATION_DEGREES))
    cos, sin = math.cos(angle), math.sin(angle)
    shear = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR)
    scale = rng.uniform(*_SCALES)
    linear = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array(
        [[1.0, shear], [0.0, 1.0]])
    target = _CANVAS / 2 + rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, 2) * _CANVAS
    inverse = np.linalg.inv(linear)
    offset = np.asarray(centre) - inverse @ target
    return (inverse[0, 0], inverse[0, 1], offset[0],
            inverse[1, 0], inverse[1, 1], offset[1])
