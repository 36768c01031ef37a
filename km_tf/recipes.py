"""The KM default for a task's size: BatchNorm mode and modulator rate.

`modulate` needs a BatchNorm mode and the optimizer a modulator rate; which
pair trains a task best depends on how many training images each class
has (BUILD.md, "Choosing the default (measured)"). `km_recipe(n)` gives the
measured rule's pair for `n` training images per class; `resolve_recipe`
adds what a caller sets explicitly (km-train's `--batchnorm` and
`--modulator_rate_factor`), and `training_images_per_class` says what `n`
is for a training split. `modulate` itself takes only `"train"` or
`"freeze"`: the rule needs the data, so it is resolved where the data is.

Example:
>>> data = km_tf.data.load("digits:5-9", image_size=32, shots=5)
>>> n = training_images_per_class(data.class_counts["train"])
>>> recipe = km_recipe(n)
>>> recipe.batchnorm, recipe.modulator_rate_factor
('freeze', 0.03)
>>> task = km_tf.models.build_task_model(base, data.num_classes,
...                                      batchnorm=recipe.batchnorm)
>>> options = km_tf.training.OptimizerOptions(
...     modulator_rate_factor=recipe.modulator_rate_factor)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from km_tf.convert import BATCHNORM_MODES

# Below this many training images per class, KM trains best with BatchNorm
# frozen; from it on, with BatchNorm trained. Measured in BUILD.md,
# "Choosing the default (measured)" (tables in bench/results/ABLATION.md and
# bench/results/fewshot_check.md): on the main suite the 20-way glyph tasks
# (5 and 10 images per class) score 18.5 / 30.7 this way against 8.9 / 14.0
# with BatchNorm trained, while its tasks of 18 to 50 images per class
# (smallest class; photos has 18 to 27) do better on the whole with
# BatchNorm trained (against frozen: digits +13.7, photos +8.6, textures
# +5.0, faces -5.0); on 5-shot digits, textures and photos the two are
# within the noise (61.7 against 60.9). 16 is a round value in the gap
# between 10 and 18, not a measured optimum, and the rule was chosen on the
# same suites it is reported on.
FEW_IMAGES_PER_CLASS = 16
# The modulators' learning rate, as a multiple of the head's, on tasks of
# fewer than FEW_IMAGES_PER_CLASS images per class (from it on they share
# the head's and BatchNorm's rate). Measured on the main suite's two glyph
# tasks (BUILD.md, "Choosing the default"): 1/30 (21.4% / 31.2%), 1/100
# (19.2 / 32.8) and 0.03 (19.7 / 30.8) against 0.1 (16.0 / 30.8), and so on
# validation; 0.03 scores 20.9 / 36.6 in the rerun table
# (bench/results/RESULTS.md). A factor of 0.3 on the other four tasks led on validation
# (+1.0 and +1.6 points a task in two runs) but not on test (-1.5 and
# +0.3): within the noise, so those keep one rate.
FEW_IMAGES_MODULATOR_RATE_FACTOR = 0.03
# `resolve_recipe`'s BatchNorm choice that follows the rule.
AUTO = "auto"
BATCHNORM_CHOICES = (AUTO, *BATCHNORM_MODES)
_BATCHNORM_WORDS = {"freeze": "BatchNorm frozen", "train": "BatchNorm trained"}


@dataclasses.dataclass(frozen=True)
class KMRecipe:
    """How a KM task trains: what `modulate` and the optimizer are given.

    Attributes:
        batchnorm: `modulate(batchnorm=)`: `"train"` or `"freeze"`.
        modulator_rate_factor: The modulators' learning rate as a multiple
            of the head's (`OptimizerOptions.modulator_rate_factor`).
        reason: One line saying why, for reports.
    """

    batchnorm: str
    modulator_rate_factor: float
    reason: str


def km_recipe(images_per_class: float) -> KMRecipe:
    """The measured rule: KM's settings for a task of this size.

    Below `FEW_IMAGES_PER_CLASS` training images per class BatchNorm is
    frozen and the modulators step at `FEW_IMAGES_MODULATOR_RATE_FACTOR`
    times the head's rate; otherwise BatchNorm trains and every per-task
    variable shares one rate. The rule was chosen on the benchmark suites
    it is reported on (BUILD.md).

    Args:
        images_per_class: Training images per class; for a training split,
            `training_images_per_class(counts)` (its smallest class).

    Returns:
        A `KMRecipe`.

    Raises:
        ValueError: `images_per_class` is not a positive number.
    """
    if not images_per_class > 0:  # Also refuses NaN.
        raise ValueError(
            f"`images_per_class` must be positive; got {images_per_class!r}. "
            "Pass the training images of the task's smallest class "
            "(km_tf.recipes.training_images_per_class).")
    if images_per_class < FEW_IMAGES_PER_CLASS:
        batchnorm, factor = "freeze", FEW_IMAGES_MODULATOR_RATE_FACTOR
    else:
        batchnorm, factor = "train", 1.0
    return KMRecipe(batchnorm, factor,
                    f"{_size_words(images_per_class)}: "
                    f"{_BATCHNORM_WORDS[batchnorm]} and {_rate_words(factor)}")


def _size_words(images_per_class: float) -> str:
    """E.g. "5 training images per class < 16"."""
    side = "<" if images_per_class < FEW_IMAGES_PER_CLASS else ">="
    return (f"{images_per_class:g} training images per class {side} "
            f"{FEW_IMAGES_PER_CLASS}")


def _rate_words(factor: float) -> str:
    """E.g. "modulators at 0.03x the head's rate"."""
    return ("modulators at the head's rate" if factor == 1.0
            else f"modulators at {factor:g}x the head's rate")


def training_images_per_class(class_counts: Sequence[int]) -> int:
    """The images per class that `km_recipe` takes, for a training split.

    The smallest class's count, not the mean. On the tasks the rule was
    measured on the classes are (nearly) balanced, so both agree there; on
    an imbalanced task the smallest class is the one a few-image setting
    is for, and the mean of a large class and a tiny one would train
    BatchNorm on a task where one class has only a few images.

    Args:
        class_counts: Training images of each class
            (`ImageDatasets.class_counts["train"]`).

    Returns:
        `min(class_counts)`.

    Raises:
        ValueError: No classes are given.
    """
    if not len(class_counts):
        raise ValueError("`class_counts` is empty: pass the training images "
                         "of each class (ImageDatasets.class_counts['train'])."
                         )
    return int(min(class_counts))


def resolve_recipe(batchnorm: str = AUTO,
                   modulator_rate_factor: float | None = None, *,
                   images_per_class: float | None = None) -> KMRecipe:
    """A task's settings: values given explicitly win, the rest by rule.

    Args:
        batchnorm: `"auto"` (by `km_recipe`), `"train"` or `"freeze"`.
        modulator_rate_factor: The modulators' rate as a multiple of the
            head's; `None`: by the rule with `batchnorm="auto"`, else 1.0.
        images_per_class: The task's training images per class (see
            `training_images_per_class`); needed for `batchnorm="auto"`.

    Returns:
        A `KMRecipe` whose reason says what was given and what the rule
        chose.

    Raises:
        ValueError: An unknown `batchnorm`, a `modulator_rate_factor` that is
            not positive, or `"auto"` without a positive `images_per_class`.
    """
    if batchnorm not in BATCHNORM_CHOICES:
        raise ValueError(f"`batchnorm` must be one of {BATCHNORM_CHOICES}; "
                         f"got {batchnorm!r}.")
    if modulator_rate_factor is not None and not modulator_rate_factor > 0:
        raise ValueError("`modulator_rate_factor` must be positive; got "
                         f"{modulator_rate_factor!r}.")
    if batchnorm != AUTO:
        given = modulator_rate_factor is not None
        factor = modulator_rate_factor if given else 1.0
        how = (" as given" if given
               else " (the rule applies with batchnorm='auto')")
        return KMRecipe(batchnorm, factor,
                        f"batchnorm={batchnorm!r} as given "
                        f"({_BATCHNORM_WORDS[batchnorm]}); "
                        f"{_rate_words(factor)}{how}")
    if images_per_class is None:
        raise ValueError("batchnorm='auto' needs the task's "
                         "`images_per_class` (km_tf.recipes."
                         "training_images_per_class of its training split), "
                         "or pass 'train' or 'freeze'.")
    rule = km_recipe(images_per_class)
    if modulator_rate_factor is None:
        return dataclasses.replace(rule, reason=f"auto: {rule.reason}")
    return KMRecipe(rule.batchnorm, modulator_rate_factor,
                    f"auto: {_size_words(images_per_class)}: "
                    f"{_BATCHNORM_WORDS[rule.batchnorm]}; "
                    f"{_rate_words(modulator_rate_factor)} as given")
