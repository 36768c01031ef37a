"""Few-shot episodes: N-way K-shot tasks drawn from a labelled image pool.

Meta-learning trains and evaluates on *episodes*. An episode picks `ways`
classes of one split, relabels them `0 .. ways-1` in a random order, and
draws `shots` support images and `queries` query images of each, all
different:

    support_images (ways*shots, h, w, 3) float32 in [0, 255]
    support_labels (ways*shots,)         int32 in 0 .. ways-1
    query_images   (ways*queries, h, w, 3)
    query_labels   (ways*queries,)

Images keep every km_tf model's input convention (RGB pixels in [0, 255];
models normalise inside). Support and query sets are ordered by label
(`shots` images of label 0, then of label 1, ...).

The classes of a dataset are split into disjoint meta-train, meta-val and
meta-test sets (`split_classes`, or `ClassSplits` from explicit lists); an
`EpisodeSampler` draws from one split only. Episode `i` of a sampler depends
on `(seed, i)` alone, so a run can be reproduced, and resumed at any
episode, whatever came before.

Example:
>>> splits = split_classes(np.unique(labels), seed=0)
>>> train = EpisodeSampler(images, labels, splits.train, ways=5, shots=1,
...                        queries=15, seed=0)
>>> dataset = train.dataset(meta_batch_size=4)   # Episode batches
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from km_tf.errors import DataError

SPLIT_NAMES = ("train", "validation", "test")
# Mini-ImageNet's 64 / 16 / 20 class split (Ravi & Larochelle, 2017).
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)


def episode_seed(seed: int, split: str) -> int:
    """The episode seed of one split (one of `SPLIT_NAMES`) in a run of
    `seed`: every split draws its own stream, and runs of other seeds other
    streams (km-meta-train and bench/meta.py draw their episodes so)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"Unknown split {split!r}; choose from "
                         f"{', '.join(SPLIT_NAMES)}.")
    return len(SPLIT_NAMES) * seed + SPLIT_NAMES.index(split)


class Episode(NamedTuple):
    """One N-way K-shot task (or a batch of them, with a leading axis).

    A `NamedTuple`, so `tf.data` and `tf.distribute` carry it as it is.
    """

    support_images: np.ndarray | tf.Tensor
    support_labels: np.ndarray | tf.Tensor
    query_images: np.ndarray | tf.Tensor
    query_labels: np.ndarray | tf.Tensor


@dataclasses.dataclass(frozen=True)
class ClassSplits:
    """Disjoint class sets for meta-training, meta-validation and meta-test.

    Attributes:
        train: Class ids episodes are meta-trained on.
        validation: Class ids for model selection.
        test: Class ids the reported accuracy is measured on.

    Raises:
        DataError (a `ValueError`): A class appears twice, in one split or
            in two.
    """

    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for name in SPLIT_NAMES:
            classes = tuple(int(c) for c in getattr(self, name))
            object.__setattr__(self, name, classes)
            for class_id in classes:
                if class_id in seen:
                    where = ("twice in the " + name + " split"
                             if seen[class_id] == name else
                             f"in both the {seen[class_id]} and the {name} "
                             "splits")
                    raise DataError(
                        f"Class {class_id} is listed {where}: meta-learning "
                        "needs disjoint class splits. List each class in "
                        "exactly one split.")
                seen[class_id] = name


def split_classes(classes: Sequence[int], *, seed: int,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS
                  ) -> ClassSplits:
    """Splits classes into disjoint meta-train / meta-val / meta-test sets.

    The classes are shuffled with `seed`, then cut by `fractions`; the same
    classes and seed always give the same splits. For a published split,
    build `ClassSplits(train=..., validation=..., test=...)` from its lists.

    Args:
        classes: The distinct class ids of the dataset.
        seed: Seed of the shuffle.
        fractions: Shares of the train, validation and test splits (summing
            to 1); the validation and test sizes are rounded, the train split
            takes the rest. A share of 0 leaves that split empty.

    Returns:
        The `ClassSplits`, each sorted.

    Raises:
        DataError: Repeated classes, bad fractions, or a non-zero share that
            would get no class.
    """
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise DataError(
            "`classes` lists a class more than once: pass the distinct ids, "
            "e.g. np.unique(labels).")
    if (len(fractions) != 3 or any(f < 0 for f in fractions)
            or not np.isclose(sum(fractions), 1.0)):
        raise DataError(
            f"`fractions` must be three non-negative shares (train, "
            f"validation, test) summing to 1; got {tuple(fractions)}.")
    order = np.random.default_rng(seed).permutation(len(classes))
    shuffled = [classes[i] for i in order]
    validation = int(round(fractions[1] * len(classes)))
    test = int(round(fractions[2] * len(classes)))
    sizes = (len(classes) - validation - test, validation, test)
    for name, size, share in zip(SPLIT_NAMES, sizes, fractions):
        if share > 0 and size < 1:
            raise DataError(
                f"{len(classes)} classes leave the {name} split empty with "
                f"fractions {tuple(fractions)}. Use more classes or larger "
                "shares, or give the splits explicitly with ClassSplits.")
    cuts = np.cumsum(sizes)[:2]
    parts = np.split(np.asarray(shuffled, dtype=np.int64), cuts)
    return ClassSplits(*(tuple(sorted(int(c) for c in part))
                         for part in parts))


class EpisodeSampler:
    """Draws N-way K-shot episodes from the classes of one split.

    Args:
        images: The image pool, uint8 `(n, height, width, 3)`.
        labels: Class id of every image, integers `(n,)`.
        classes: The class ids this sampler may use (one split's).
        ways: Classes per episode (N).
        shots: Support images per class (K).
        queries: Query images per class (Q).
        seed: Seed of the episodes: episode `i` depends on `(seed, i)` only.

    Raises:
        DataError (a `ValueError`): Bad pool shapes or dtypes, bad counts,
            a split with fewer than `ways` classes, or a class with fewer
            than `shots + queries` images.

    Example:
    >>> sampler = EpisodeSampler(images, labels, splits.test, ways=5,
    ...                          shots=1, queries=15, seed=1)
    >>> for episode in sampler.episodes(600): ...
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 classes: Sequence[int], *, ways: int, shots: int,
                 queries: int, seed: int = 0) -> None:
        images, labels = np.asarray(images), np.asarray(labels)
        _check_pool(images, labels)
        for name, value in (("ways", ways), ("shots", shots),
                            ("queries", queries)):
            if isinstance(value, bool) or not isinstance(
                    value, (int, np.integer)) or value < 1:
                raise DataError(
                    f"`{name}` must be a positive integer; got {value!r}.")
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise DataError(
                "`classes` lists a class more than once: pass one split's "
                "distinct class ids.")
        if len(classes) < ways:
            raise DataError(
                f"A {ways}-way episode needs {ways} classes, but the split "
                f"has {len(classes)}. Lower `ways`, or give this split more "
                "classes.")
        if isinstance(seed, bool) or not isinstance(
                seed, (int, np.integer)) or seed < 0:
            raise DataError(f"`seed` must be an integer >= 0; got {seed!r}.")
        self.images = images
        self.classes = tuple(classes)
        self.ways, self.shots, self.queries = int(ways), int(shots), int(
            queries)
        self.seed = int(seed)
        self._members = {c: np.flatnonzero(labels == c) for c in classes}
        needed = self.shots + self.queries
        short = {c: len(m) for c, m in self._members.items()
                 if len(m) < needed}
        if short:
            listed = ", ".join(f"{c} ({n})" for c, n in sorted(short.items())[:5])
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise DataError(
                f"Every class needs shots + queries = {needed} images, but "
                f"classes {listed}{more} have fewer (count in brackets). "
                "Lower `shots` or `queries`, or leave those classes out of "
                "the split.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(height, width, 3)` of the images."""
        return tuple(self.images.shape[1:])

    def episode(self, index: int) -> Episode:
        """Episode number `index` (NumPy arrays), the same on every call."""
        rng = np.random.default_rng((self.seed, int(index)))
        chosen = rng.choice(len(self.classes), self.ways, replace=False)
        needed = self.shots + self.queries
        picks = np.stack([
            rng.choice(self._members[self.classes[c]], needed, replace=False)
            for c in chosen])  # (ways, shots + queries) image indices
        labels = np.arange(self.ways, dtype=np.int32)

        def part(indices: np.ndarray, per_class: int) -> tuple:
            return (self.images[indices.reshape(-1)].astype(np.float32),
                    np.repeat(labels, per_class))

        return Episode(*part(picks[:, :self.shots], self.shots),
                       *part(picks[:, self.shots:], self.queries))

    def episodes(self, count: int, *, start: int = 0) -> Iterator[Episode]:
        """Episodes `start .. start+count-1`, in order (NumPy arrays)."""
        for index in range(start, start + count):
            yield self.episode(index)

    def element_spec(self, meta_batch_size: int | None = None) -> Episode:
        """The `tf.TensorSpec`s of an episode (of a batch of them)."""
        batch = () if meta_batch_size is None else (meta_batch_size,)
        support, query = self.ways * self.shots, self.ways * self.queries
        return Episode(
            tf.TensorSpec(batch + (support, *self.image_shape), tf.float32),
            tf.TensorSpec(batch + (support,), tf.int32),
            tf.TensorSpec(batch + (query, *self.image_shape), tf.float32),
            tf.TensorSpec(batch + (query,), tf.int32))

    def dataset(self, *, meta_batch_size: int | None = None,
                count: int | None = None, start: int = 0) -> tf.data.Dataset:
        """The episodes as a `tf.data.Dataset`, e.g. for
        `strategy.experimental_distribute_dataset`.

        Args:
            meta_batch_size: Episodes per element (the meta-batch, a leading
                axis; incomplete batches are dropped); `None` for single
                episodes.
            count: How many episodes; `None` repeats without end.
            start: Index of the first episode (to resume a run).

        Returns:
            A dataset of `Episode`s of tensors, the same on every pass.
        """
        if meta_batch_size is not None and (
                isinstance(meta_batch_size, bool) or meta_batch_size < 1):
            raise DataError("`meta_batch_size` must be a positive integer or "
                            f"None; got {meta_batch_size!r}.")

        def generate() -> Iterator[Episode]:
            index = start
            while count is None or index < start + count:
                yield self.episode(index)
                index += 1

        dataset = tf.data.Dataset.from_generator(
            generate, output_signature=self.element_spec())
        if meta_batch_size is not None:
            dataset = dataset.batch(meta_batch_size, drop_remainder=True)
        return dataset.prefetch(tf.data.AUTOTUNE)


def _check_pool(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"`images` must be RGB images (n, height, width, 3); got shape "
            f"{images.shape}.")
    if images.dtype != np.uint8:
        raise DataError(
            f"`images` must be uint8 pixels in [0, 255]; got {images.dtype}. "
            "Convert with np.clip(images, 0, 255).astype(np.uint8).")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"`labels` must be integer class ids of shape (n,); got "
            f"{labels.dtype} {labels.shape}.")
    if len(labels) != len(images):
        raise DataError(
            f"{len(images)} images but {len(labels)} labels: give one label "
            "per image.")
