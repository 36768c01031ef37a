"""Image pools for meta-learning: every image of a dataset, in memory, with
disjoint meta-train / meta-validation / meta-test classes.

`load_pools(spec, image_size)` reads one of:

- `"glyphs"` (the default, offline): letters drawn from the fonts inside
  matplotlib (`km_tf.synthetic.glyphs`, 20 distorted instances per letter),
  classes split *by script*, so meta-test letters come from scripts that
  meta-training never saw (`GLYPH_SPLIT`):

      meta-train       latin, greek, cyrillic, arabic, canadian   2218 classes
      meta-validation  georgian                                    119 classes
      meta-test        armenian, hebrew, tifinagh, lao, nko,       325 classes
                       ogham, old_italic

- `"glyphs:TRAIN/VALIDATION/TEST"`: the same with scripts of your choice,
  each part script names joined by `+` (`glyphs:greek/georgian/armenian`).
- `"tfds:NAME[:TRAIN/VALIDATION/TEST]"`: a tensorflow-datasets image
  dataset (downloaded into `data_dir` on first use: needs network once;
  `km_tf.sources`' tfds reader). Every split's images are pooled and the
  classes that occur are shuffled (seed `SPLIT_SEED`, whatever the run's
  seed) and cut into meta-train / meta-validation / meta-test classes, by
  the counts given (`tfds:cifar100:64/16/20`, CIFAR-FS style) or else by
  mini-ImageNet's shares, 64% / 16% / 20% (Ravi & Larochelle, 2017).
  `tfds:omniglot` defaults to MAML's split of its 1623 characters, 1200 /
  100 / 323 (Finn et al., 2017; no rotated copies as extra classes).

Images become RGB uint8 `(height, width, 3)` at `image_size` (grey images
repeated over the three channels, resized with antialiasing), what
`km_tf.meta.EpisodeSampler` and every km_tf model take.

Example:
>>> pools = load_pools("glyphs", 28)
>>> sampler = pools.sampler("test", ways=5, shots=1, queries=15, seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from km_tf.errors import DataError
from km_tf.meta.episodes import (DEFAULT_FRACTIONS, SPLIT_NAMES, ClassSplits,
                                 EpisodeSampler, split_classes)

DEFAULT_SPEC = "glyphs"
GLYPH_SPLIT = (("latin", "greek", "cyrillic", "arabic", "canadian"),
               ("georgian",),
               ("armenian", "hebrew", "tifinagh", "lao", "nko", "ogham",
                "old_italic"))
# Seed of the class split of tfds datasets: fixed, so that runs with other
# seeds (and other methods) meet the same meta-test classes.
SPLIT_SEED = 0
# Class counts of MAML's Omniglot split (of 1623 characters).
OMNIGLOT_SPLIT = (1200, 100, 323)
SPEC_FORMS = ("glyphs", "glyphs:TRAIN/VALIDATION/TEST",
              "tfds:NAME[:TRAIN/VALIDATION/TEST]")
# Images resized per call (bounds the float32 memory of one resize).
_RESIZE_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class MetaPools:
    """Every image of a dataset, with its meta-learning class split.

    Attributes:
        spec: The spec it was loaded from.
        images: uint8 RGB `(n, size, size, 3)`.
        labels: int64 class ids `(n,)`, indexing `class_names`.
        class_names: Name of each class id.
        splits: Disjoint meta-train / meta-validation / meta-test class ids.
        description: How the classes were split, in words.
    """

    spec: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    splits: ClassSplits
    description: str

    def class_count(self, split: str) -> int:
        """Classes of one split (`"train"`, `"validation"` or `"test"`)."""
        return len(getattr(self.splits, split))

    def min_images_per_class(self, split: str) -> int:
        """The fewest images any class of `split` has (0 for no classes)."""
        classes = getattr(self.splits, split)
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return int(counts[list(classes)].min()) if classes else 0

    def sampler(self, split: str, *, ways: int, shots: int, queries: int,
                seed: int) -> EpisodeSampler:
        """An `EpisodeSampler` over one split's classes."""
        return EpisodeSampler(self.images, self.labels,
                              getattr(self.splits, split), ways=ways,
                              shots=shots, queries=queries, seed=seed)

    def summary(self) -> dict:
        """Spec, image count, class counts per split and the split rule."""
        return {"spec": self.spec, "images": int(len(self.images)),
                "image_size": int(self.images.shape[1]),
                "classes": {name: self.class_count(name)
                            for name in SPLIT_NAMES},
                "split": self.description}


def load_pools(spec: str = DEFAULT_SPEC, image_size: int = 28, *,
               data_dir: str | None = None) -> MetaPools:
    """Loads a dataset spec's images and class split (module docstring).

    Args:
        spec: `"glyphs"`, `"glyphs:TRAIN/VALIDATION/TEST"` or
            `"tfds:NAME[:TRAIN/VALIDATION/TEST]"`.
        image_size: Output height and width.
        data_dir: tensorflow-datasets data folder (`tfds:` only).

    Returns:
        The `MetaPools`.

    Raises:
        DataError: A malformed spec, unknown script or dataset, or a split
            without classes.
        RuntimeError: A tfds dataset cannot be downloaded (offline).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or (
            image_size < 1):
        raise DataError(f"`image_size` must be a positive integer; got "
                        f"{image_size!r}.")
    source, _, rest = spec.partition(":")
    if source == "glyphs":
        return _glyph_pools(spec, rest, image_size)
    if source == "tfds":
        return _tfds_pools(spec, rest, image_size, data_dir)
    raise DataError(
        f"Unknown meta-learning data {spec!r}; write one of "
        f"{', '.join(SPEC_FORMS)} (e.g. 'glyphs', 'tfds:omniglot').")


def to_rgb(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 `(n, h, w, 1 or 3)` -> uint8 RGB `(n, image_size, image_size, 3)`.

    Grey images are repeated over three channels; other sizes are resized
    (bilinear with antialiasing, so shrinking averages) and rounded.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"Images must be (n, height, width, 1 or 3); got "
                        f"{images.shape}.")
    if images.shape[1:3] != (image_size, image_size):
        parts = [
            tf.image.resize(images[i:i + _RESIZE_CHUNK],
                            (image_size, image_size), antialias=True)
            for i in range(0, len(images), _RESIZE_CHUNK)]
        images = np.clip(np.round(np.concatenate(
            [part.numpy() for part in parts])), 0, 255).astype(np.uint8)
    images = images.astype(np.uint8, copy=False)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _glyph_pools(spec: str, rest: str, image_size: int) -> MetaPools:
    from km_tf.synthetic import glyphs

    if rest:
        parts = rest.split("/")
        if len(parts) != 3 or not all(parts):
            raise DataError(
                f"Spec {spec!r}: write 'glyphs:TRAIN/VALIDATION/TEST', each "
                "part script names joined by '+' (e.g. "
                "'glyphs:greek/georgian/armenian'); scripts: "
                f"{', '.join(glyphs.SCRIPTS)}.")
        groups = tuple(tuple(name.strip().lower() for name in part.split("+"))
                       for part in parts)
    else:
        groups = GLYPH_SPLIT
    used = [name for group in groups for name in group]
    repeated = sorted({name for name in used if used.count(name) > 1})
    if repeated:
        raise DataError(
            f"Spec {spec!r} puts script(s) {', '.join(repeated)} in more "
            "than one split: meta-test classes must never be seen in "
            "meta-training. Give each script to one split.")
    images, labels, names, splits = [], [], [], []
    for group in groups:
        group_images, group_labels, letters = glyphs.glyph_images(group)
        images.append(group_images)
        labels.append(group_labels + len(names))
        splits.append(tuple(range(len(names), len(names) + len(letters))))
        names.extend(letters)
    description = "; ".join(
        f"meta-{split} = glyphs of {'+'.join(group)} ({len(classes)} "
        "classes)" for split, group, classes in zip(SPLIT_NAMES, groups,
                                                    splits))
    return MetaPools(
        spec=spec, images=to_rgb(np.concatenate(images), image_size),
        labels=np.concatenate(labels).astype(np.int64),
        class_names=tuple(names), splits=ClassSplits(*splits),
        description=f"by script: {description}")


def _tfds_pools(spec: str, rest: str, image_size: int,
                data_dir: str | None) -> MetaPools:
    from km_tf import sources

    name, _, counts_text = rest.partition(":")
    if not name:
        raise DataError(f"Spec {spec!r} lacks the dataset name: "
                        "'tfds:NAME[:TRAIN/VALIDATION/TEST]'.")
    counts = _parse_counts(spec, counts_text) if counts_text else None
    # km_tf.data's reader: the download, its offline message, the pools.
    source = sources.read("tfds", name, sources.ReadOptions(data_dir=data_dir))
    images, labels = [], []
    for split in sources.SPLITS:
        pool = source.pools.get(split)
        if pool is None or not len(pool.labels):
            continue
        dataset = pool.take(np.arange(len(pool.labels))).map(
            lambda image, label: (_resized(image, image_size), label),
            num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
        for batch_images, batch_labels in dataset.as_numpy_iterator():
            images.append(batch_images)
            labels.append(batch_labels)
    if not images:
        raise DataError(f"tfds dataset {name!r} has no images in its "
                        f"{', '.join(sources.SPLITS)} splits.")
    labels = np.concatenate(labels).astype(np.int64)
    present = np.unique(labels)
    if counts is None and name == "omniglot" and len(present) == sum(
            OMNIGLOT_SPLIT):
        counts = OMNIGLOT_SPLIT
    # Shuffled with a fixed seed, whatever the run's seed.
    if counts is not None:
        if sum(counts) > len(present):
            raise DataError(
                f"Spec {spec!r} asks for {sum(counts)} classes, but "
                f"{name!r} has {len(present)} (with images). Lower the "
                "counts, or drop them for a 64/16/20% split.")
        shuffled = np.random.default_rng(SPLIT_SEED).permutation(present)
        cuts = np.cumsum(counts)
        splits = ClassSplits(*(tuple(sorted(int(c) for c in part)) for part
                               in np.split(shuffled[:cuts[-1]], cuts[:2])))
        rule = "/".join(str(count) for count in counts) + " classes"
    else:
        splits = split_classes(present, seed=SPLIT_SEED)
        rule = "/".join(f"{round(100 * f)}%" for f in DEFAULT_FRACTIONS)
        rule += f" of {len(present)} classes"
    return MetaPools(
        spec=spec, images=np.concatenate(images).astype(np.uint8),
        labels=labels, class_names=tuple(source.class_names),
        splits=splits,
        description=(f"tfds {name}, all splits pooled; classes shuffled "
                     f"(seed {SPLIT_SEED}) and cut {rule} into meta-train / "
                     "meta-validation / meta-test"))


def _resized(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """One decoded tfds image as uint8 RGB of the pool's size."""
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image[..., :3]


def _parse_counts(spec: str, text: str) -> tuple[int, int, int]:
    parts = text.split("/")
    try:
        counts = tuple(int(part) for part in parts)
    except ValueError:
        counts = ()
    if len(counts) != 3 or any(count < 1 for count in counts):
        raise DataError(
            f"Spec {spec!r}: the class counts must be three positive "
            "integers TRAIN/VALIDATION/TEST, e.g. 'tfds:cifar100:64/16/20'.")
    return counts


def check_classes(pools: MetaPools, *, ways: int, shots: int, queries: int,
                  splits: Sequence[str] = SPLIT_NAMES) -> None:
    """Refuses episode settings some split cannot serve, naming the fix.

    Raises:
        DataError: A split with fewer than `ways` classes, or a class with
            fewer than `shots + queries` images.
    """
    for split in splits:
        classes = pools.class_count(split)
        if classes < ways:
            raise DataError(
                f"--ways={ways} needs {ways} classes in every split, but the "
                f"meta-{split} split of {pools.spec!r} has {classes}. Lower "
                "--ways, or use data with more classes there.")
        fewest = pools.min_images_per_class(split)
        if fewest < shots + queries:
            raise DataError(
                f"--shots={shots} + --queries={queries} = {shots + queries} "
                f"images per class, but a meta-{split} class of "
                f"{pools.spec!r} has only {fewest}. Lower --shots or "
                "--queries.")
