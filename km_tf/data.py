"""Image-classification `tf.data` pipelines for base pretraining and KM tasks.

One entry point, `load(spec, ...)`, reads a dataset named by a spec string:

- `"digits[:CLASSES]"`: scikit-learn's 8x8 digits (offline; 1797 images).
- `"skimage:faces[:CLASSES]"`: `skimage.data.lfw_subset()`, face / non_face.
- `"skimage:textures[:CLASSES]"`: 32x32 patches cut from the texture images
  of `skimage.data` (`TEXTURE_IMAGES`), one class per image.
- `"skimage:photos[:CLASSES]"`: 32x32 colour patches cut from the
  photographs of `skimage.data` (`PHOTO_IMAGES`, each reduced to
  `PHOTO_SIDE` pixels on its short side), one class per photograph.
- `"glyphs:SCRIPTS[:CLASSES]"`: letters drawn from the fonts inside
  matplotlib, one class per letter, `km_tf.synthetic.glyphs.INSTANCES`
  distorted instances each (offline; thousands of classes). `SCRIPTS` is
  `all` or script names joined by `+` (`glyphs:armenian`,
  `glyphs:latin+greek+cyrillic`); `km_tf.synthetic.glyphs.scripts()` lists
  them.
- `"fractals:N[:CLASSES]"`: N classes of FractalDB-style fractals
  (`km_tf.synthetic.fractals`), offline.
- `"tfds:NAME[:CLASSES]"`: a tensorflow-datasets image dataset (downloaded
  into `data_dir` on first use, so it needs network once).
- `"folder:PATH"`: a folder with one sub-folder of images per class. Every
  image file is decoded once before any pipeline is built: files that do
  not decode are named in one `DataError` (or skipped with a warning, with
  `skip_bad_images=True`), instead of aborting `fit` mid-epoch.

`CLASSES` picks a subset in order, re-indexed `0..k-1`: `0-4`, `5-9`,
`1,3,7` or class names (`face,non_face`). E.g. `"digits:0-4"` to pretrain a
base and `"digits:5-9"` as a new task.

Every split yields `(images, labels)` batches: float32 RGB images
`(batch, height, width, 3)` with pixel values in `[0, 255]` (what every
`km_tf.models` model takes: it normalises inside) and int32 labels. For a
model without in-model normalisation, `normalization=` a mode (`"tf"`,
`"torch"`, `"caffe"`; see `km_tf.models.input_normalization`) normalises in
the pipeline instead. Datasets without a native validation or test split
get one carved out of their training data, stratified per class and seeded.
A selection of fewer than two classes is refused (`DataError`): with one,
every prediction is right and the test accuracy reads 100%.
"""

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from km_tf.errors import DataError
from km_tf.models.preprocessing import normalize
from km_tf.sources import READERS, SPLITS, Pool, ReadOptions, Source, read
# The sources' constants stay importable from here (`data.PHOTO_IMAGES`).
from km_tf.sources import (  # noqa: F401
    IMAGE_EXTENSIONS, PHOTO_IMAGES, PHOTO_SIDE, SHOWN_BAD_FILES,
    SKIMAGE_DATASETS, TEXTURE_IMAGES, TEXTURE_PATCH)

SPEC_FORMS = (
    "digits[:CLASSES]",
    "skimage:faces|textures|photos[:CLASSES]",
    "glyphs:all|SCRIPT[+SCRIPT...][:CLASSES]",
    "fractals:N[:CLASSES]",
    "tfds:NAME[:CLASSES]",
    "folder:PATH",
)
# Augmentation at strength 1: zoom-in of the random crop, brightness shift
# (in 0-255 pixel units).
_MAX_ZOOM = 0.25
_MAX_BRIGHTNESS = 64.0


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed spec string.

    Attributes:
        source: `"digits"`, `"skimage"`, `"glyphs"`, `"fractals"`,
            `"tfds"` or `"folder"`.
        name: Dataset name within the source, or the folder path.
        classes: Class selectors (ints or names), or `None` for all.
    """

    source: str
    name: str
    classes: tuple[int | str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ImageDatasets:
    """Train, validation and test pipelines of one image dataset.

    Attributes:
        train: Shuffled (and, if asked, augmented) batches.
        validation: Batches in a fixed order.
        test: Batches in a fixed order.
        num_classes: Number of classes (labels are `0..num_classes-1`).
        class_names: Name of each label.
        image_size: `(height, width)` of the images.
        counts: Number of images in each split.
        class_counts: Number of images of each class (by label) in each
            split; e.g. `km_tf.recipes.training_images_per_class(
            class_counts["train"])`. Empty when not counted (datasets
            built by hand).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    counts: dict[str, int]
    class_counts: dict[str, tuple[int, ...]] = dataclasses.field(
        default_factory=dict)


def load(
    spec: str,
    *,
    image_size: int | tuple[int, int] = 96,
    normalization: str | None = None,
    classes: Sequence[int | str] | None = None,
    shots: int | None = None,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    batch_size: int = 32,
    augment: float = 0.0,
    flip: bool = True,
    seed: int = 0,
    data_dir: str | None = None,
    cache: bool = True,
    skip_bad_images: bool = False,
) -> ImageDatasets:
    """Builds train / validation / test pipelines for a dataset spec.

    Args:
        spec: Dataset spec, see the module docstring (`"digits:0-4"`,
            `"skimage:textures"`, `"tfds:oxford_flowers102"`,
            `"folder:/data/birds"`).
        image_size: Output height and width (int for square).
        normalization: `None` (default) yields pixels in `[0, 255]`, for
            models that normalise inside (all `km_tf.models` models, and
            `km_tf.models.add_preprocessing`). A mode (`"tf"`: [-1, 1];
            `"torch"`; `"caffe"`) normalises in the pipeline, for models
            whose `km_tf.models.input_normalization(model)` is `None`.
        classes: Class subset, as ints or names, in the order that defines
            the new labels. Not with a `CLASSES` part in `spec`.
        shots: Few-shot: keep this many training images per class
            (validation and test are unchanged).
        validation_fraction: Share of each class carved from the training
            data for validation when the dataset has no validation split.
        test_fraction: The same for the test split.
        batch_size: Batch size of all three pipelines.
        augment: Augmentation strength in `[0, 1]` for the training split
            (random crop/zoom, brightness, optional flip); 0 turns it off.
        flip: Whether augmentation includes random left-right flips (turn
            off for digits and text).
        seed: Seed of the split, the few-shot draw and the shuffling.
        data_dir: tensorflow-datasets data directory (`tfds:` only).
        cache: Cache decoded, resized images in memory (before
            augmentation).
        skip_bad_images: `folder:` only. Image files that do not decode
            (truncated, not an image) are dropped with one warning naming
            them; by default they are refused with a `DataError`.

    Returns:
        An `ImageDatasets`.

    Raises:
        DataError: A malformed spec, unknown dataset or class, fewer than
            two classes, a folder without class sub-folders or images, image
            files that do not decode (unless `skip_bad_images`), or too few
            images per class. A `ValueError`, as `except ValueError` expects.
        FileNotFoundError: The folder does not exist.
        RuntimeError: A tfds dataset cannot be downloaded (offline).

    Example:
    >>> data = load("digits:5-9", image_size=32, shots=10)
    >>> model.fit(data.train, validation_data=data.validation, epochs=5)
    """
    parsed = parse_spec(spec)
    if classes is not None and parsed.classes is not None:
        raise DataError(
            f"Classes given twice: in the spec {spec!r} and as "
            f"`classes={list(classes)}`; use one."
        )
    if not 0.0 <= augment <= 1.0:
        raise DataError(f"`augment` must be in [0, 1]; got {augment}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(
        image_size
    )
    source = read(parsed.source, parsed.name,
                  ReadOptions(data_dir, skip_bad_images))
    selectors = classes if classes is not None else parsed.classes
    keep = _class_ids(source.class_names, selectors, spec)
    _check_two_classes(spec, source.class_names, keep)
    relabel = np.full(len(source.class_names), -1, np.int32)
    relabel[keep] = np.arange(len(keep), dtype=np.int32)
    selection = _split(
        source, keep, validation_fraction, test_fraction, seed, spec
    )
    if shots is not None:
        pool, indices = selection["train"]
        selection["train"] = (pool, _few_shot(pool.labels, indices, shots,
                                              source.class_names, seed))
    datasets = {
        split: _pipeline(
            pool.take(indices),
            relabel,
            size,
            normalization=normalization,
            batch_size=batch_size,
            training=split == "train",
            augment=augment,
            flip=flip,
            seed=seed,
            cache=cache,
            count=len(indices),
        )
        for split, (pool, indices) in selection.items()
    }
    return ImageDatasets(
        **datasets,
        num_classes=len(keep),
        class_names=tuple(source.class_names[i] for i in keep),
        image_size=size,
        counts={split: len(idx) for split, (_, idx) in selection.items()},
        class_counts={
            split: tuple(np.bincount(relabel[pool.labels[idx]],
                                     minlength=len(keep)).tolist())
            for split, (pool, idx) in selection.items()},
    )


def parse_spec(spec: str) -> DataSpec:
    """Parses a dataset spec string.

    Args:
        spec: One of the forms in `SPEC_FORMS`, e.g. `"digits:0-4"`,
            `"tfds:mnist:1,7"`, `"folder:/data/pets"`.

    Returns:
        A `DataSpec`.

    Raises:
        DataError: An unknown source, or a spec without its path or name.

    Example:
    >>> parse_spec("digits:5-9")
    DataSpec(source='digits', name='digits', classes=(5, 6, 7, 8, 9))
    """
    source, _, rest = spec.partition(":")
    if source not in READERS:
        raise DataError(
            f"Unknown data source {source!r} in spec {spec!r}; write one of "
            f"{', '.join(SPEC_FORMS)}."
        )
    if source == "folder":
        if not rest:
            raise DataError(f"Spec {spec!r} lacks the path: 'folder:PATH'.")
        return DataSpec(source, rest)
    if source == "digits":
        name, selectors = "digits", rest
    else:
        name, _, selectors = rest.partition(":")
        if not name:
            raise DataError(
                f"Spec {spec!r} lacks the dataset name: '{source}:NAME'."
            )
    return DataSpec(source, name, _parse_classes(selectors) if selectors
                    else None)


def _parse_classes(text: str) -> tuple[int | str, ...]:
    """Parses `0-4`, `1,3,7` or `cat,dog` into class selectors."""
    selectors: list[int | str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        first, dash, last = item.partition("-")
        if dash and first.isdigit() and last.isdigit():
            selectors.extend(range(int(first), int(last) + 1))
        else:
            selectors.append(int(item) if item.isdigit() else item)
    return tuple(selectors)


def _class_ids(
    class_names: Sequence[str],
    selectors: Sequence[int | str] | None,
    spec: str,
) -> list[int]:
    """Maps class selectors (ints or names) to the source's label ids."""
    if selectors is None:
        return list(range(len(class_names)))
    ids = []
    for selector in selectors:
        if isinstance(selector, str) and selector in class_names:
            ids.append(class_names.index(selector))
        elif isinstance(selector, (int, np.integer)) and (
            0 <= selector < len(class_names)
        ):
            ids.append(int(selector))
        else:
            raise DataError(
                f"Class {selector!r} is not in {spec!r}: it has "
                f"{len(class_names)} classes (0-{len(class_names) - 1}), "
                f"named {list(class_names)[:20]}."
            )
    if len(set(ids)) != len(ids):
        raise DataError(f"Classes {list(selectors)} repeat a class.")
    return ids


def _check_two_classes(spec: str, class_names: Sequence[str],
                       keep: Sequence[int]) -> None:
    """Refuses a selection of fewer than two classes.

    Raises:
        DataError: `keep` holds fewer than two classes.
    """
    if len(keep) >= 2:
        return
    names = list(class_names)[:20]
    if len(class_names) < 2:
        found = f"has {len(class_names)} class ({names})"
        fix = ("add images of at least one more class (for a folder: one "
               "sub-folder of images per class)")
    else:
        found = (f"selects {len(keep)} class "
                 f"({[class_names[i] for i in keep]}) of the "
                 f"{len(class_names)} it has ({names})")
        fix = ("select at least two of them, in the spec's CLASSES part or "
               "with `classes=`")
    raise DataError(
        f"Dataset {spec!r} {found}: a classifier needs at least two, and "
        f"with one every prediction is right (accuracy reads 100%). Fix: "
        f"{fix}.")


def _split(
    source: Source,
    keep: Sequence[int],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    spec: str,
) -> dict[str, tuple[Pool, np.ndarray]]:
    """Chooses the examples of each split: native splits, else carved."""
    carve_from = source.pools.get("train") or source.pools["all"]
    fractions = {
        split: fraction
        for split, fraction in (("validation", validation_fraction),
                                ("test", test_fraction))
        if split not in source.pools
    }
    rng = np.random.default_rng(seed)
    carved: dict[str, list[np.ndarray]] = {"train": [], **{
        split: [] for split in fractions}}
    for class_id in keep:
        members = rng.permutation(np.flatnonzero(carve_from.labels == class_id))
        total = len(members)
        for split, fraction in fractions.items():
            n = max(1, round(total * fraction)) if fraction else 0
            carved[split].append(members[:n])
            members = members[n:]
        if not len(members):
            raise DataError(
                f"Class {source.class_names[class_id]!r} of {spec!r} has too "
                "few images to split into train/validation/test; add images "
                "or lower `validation_fraction` / `test_fraction`."
            )
        carved["train"].append(members)
    selection = {
        split: (carve_from, np.sort(np.concatenate(parts)))
        for split, parts in carved.items()
    }
    for split in SPLITS:
        if split not in selection:
            pool = source.pools[split]
            selection[split] = (pool, np.flatnonzero(np.isin(pool.labels,
                                                             keep)))
    return {split: selection[split] for split in SPLITS}


def _few_shot(
    labels: np.ndarray,
    indices: np.ndarray,
    shots: int,
    class_names: Sequence[str],
    seed: int,
) -> np.ndarray:
    """Keeps `shots` random examples of each class among `indices`."""
    if shots < 1:
        raise DataError(f"`shots` must be >= 1; got {shots}.")
    rng = np.random.default_rng(seed + 1)
    chosen = []
    for class_id in np.unique(labels[indices]):
        members = indices[labels[indices] == class_id]
        if len(members) < shots:
            raise DataError(
                f"Class {class_names[class_id]!r} has {len(members)} training "
                f"images, fewer than shots={shots}."
            )
        chosen.append(rng.choice(members, shots, replace=False))
    return np.sort(np.concatenate(chosen))


def _pipeline(
    dataset: tf.data.Dataset,
    relabel: np.ndarray,
    size: tuple[int, int],
    *,
    normalization: str | None,
    batch_size: int,
    training: bool,
    augment: float,
    flip: bool,
    seed: int,
    cache: bool,
    count: int,
) -> tf.data.Dataset:
    """Resize -> cache -> shuffle -> augment -> batch -> float (normalise)."""
    relabel = tf.constant(relabel)
    dataset = dataset.map(
        lambda image, label: (_resize_rgb(image, size),
                              tf.gather(relabel, label)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if cache:
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(max(count, 1), seed=seed,
                                  reshuffle_each_iteration=True)
        if augment:
            dataset = dataset.map(
                lambda image, label: (
                    _augment(image, augment, flip=flip, seed=seed), label),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
    dataset = dataset.batch(batch_size).map(
        lambda images, labels: (_to_float(images, normalization), labels),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _to_float(images: tf.Tensor, normalization: str | None) -> tf.Tensor:
    """uint8 pixels -> float32 in `[0, 255]`, or normalised with a mode."""
    images = tf.cast(images, tf.float32)
    if normalization is None:
        return images
    return normalize(images, normalization)


def _resize_rgb(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Any uint8 image (1, 3 or 4 channels) -> uint8 RGB of `size`."""
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels != 3:
        image = image[..., :3]
    image = tf.image.resize(image, size, antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _augment(
    image: tf.Tensor, strength: float, *, flip: bool, seed: int
) -> tf.Tensor:
    """Random zoom-crop, brightness and (optionally) flip; float 0-255 out."""
    height, width = image.shape[0], image.shape[1]
    zoom = 1.0 + _MAX_ZOOM * strength
    image = tf.image.resize(
        image, (round(height * zoom), round(width * zoom))
    )
    image = tf.image.random_crop(image, (height, width, 3), seed=seed)
    image = tf.image.random_brightness(
        image, _MAX_BRIGHTNESS * strength, seed=seed
    )
    if flip:
        image = tf.image.random_flip_left_right(image, seed=seed)
    return tf.clip_by_value(image, 0.0, 255.0)

