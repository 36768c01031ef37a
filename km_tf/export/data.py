"""Calibration and held-out data for an export: a dataset spec or an `.npz`.

    --calibration_data=digits:5-9     the task's own data, by the spec it was
                                      trained on (`km_tf.data`): calibration
                                      from the training split, parity on the
                                      test split (same seed, same split)
    --calibration_dataset=x.npz       arrays prepared by hand

Both give model inputs as the model takes them: km-tf models normalize
inside (`km_tf.models.add_preprocessing`), so these are RGB pixels in
[0, 255], float32.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from km_tf import data
from km_tf.errors import ExportError
from km_tf.files import existing_file

# Images per batch while reading a spec's splits into memory.
_READ_BATCH = 256


@dataclasses.dataclass(frozen=True)
class ExportData:
    """What an export calibrates on and checks parity with.

    Attributes:
        calibration: Model inputs from the task's training data (float32).
        heldout: `(x, y)` held-out inputs and labels (`y` may be None), or
            None for no parity check.
        source: Where they came from, for the report.
    """

    calibration: np.ndarray
    heldout: tuple[np.ndarray, np.ndarray | None] | None
    source: str


def from_spec(spec: str, model: keras.Model, *, seed: int = 0,
              calibration_samples: int, parity_samples: int,
              data_dir: str | None = None) -> ExportData:
    """Reads a dataset spec's training and test splits for `model`.

    The splits are the ones training used for the same spec and seed
    (`km_tf.data.load` carves them deterministically), at the model's input
    size, without augmentation.

    Args:
        spec: A `km_tf.data` spec, e.g. `"digits:5-9"` or `"folder:PATH"`.
        model: The model to export; its input size and class count must
            match the data.
        seed: The training run's `--seed` (it chose the split).
        calibration_samples: Training images to keep.
        parity_samples: Test images to keep.
        data_dir: tensorflow-datasets folder (`tfds:` specs).

    Returns:
        An `ExportData`.

    Raises:
        ExportError: The data has another class count than the model.
        ValueError, FileNotFoundError: A bad spec (from `km_tf.data.load`).
    """
    height, width = model.input_shape[1:3]
    if height is None or width is None:
        raise ExportError(
            f"Model {model.name!r} has no fixed input size "
            f"({model.input_shape}); export needs one.")
    datasets = data.load(spec, image_size=(height, width),
                         batch_size=_READ_BATCH, seed=seed, data_dir=data_dir)
    classes = model.output_shape[-1]
    if datasets.num_classes != classes:
        raise ExportError(
            f"--calibration_data={spec!r} has {datasets.num_classes} classes "
            f"but the model outputs {classes}: pass the spec the task was "
            "trained on (see its report.json).")
    calibration, _ = _first(datasets.train, calibration_samples)
    x_test, y_test = _first(datasets.test, parity_samples)
    return ExportData(calibration, (x_test, y_test),
                      f"{spec} (seed {seed}: train / test splits)")


def from_npz(path: str | os.PathLike) -> ExportData:
    """Reads calibration and held-out arrays from an `.npz` file.

    The file holds model inputs: `x_train` (calibration; from the task's
    training data) and optionally `y_train`, `x_test`, `y_test` (held-out
    data for the parity check).

    Raises:
        FileNotFoundError: No file at `path`.
        ExportError: Not an npz file, or no `x_train` array.
    """
    path = existing_file(
        path, "Calibration dataset", "Pass an .npz with x_train (and "
        "x_test/y_test for parity), or --calibration_data= the task's "
        "dataset spec.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # numpy raises several types for bad files.
        raise ExportError(f"Cannot read {path!r} as an .npz file ({error})."
                          ) from error
    if "x_train" not in arrays:
        raise ExportError(
            f"{path!r} has arrays {sorted(arrays)} but no 'x_train'. Save it "
            "with np.savez(path, x_train=..., y_train=..., x_test=..., "
            "y_test=...).")
    heldout = None
    if "x_test" in arrays:
        heldout = (arrays["x_test"], arrays.get("y_test"))
    return ExportData(arrays["x_train"], heldout, path)


def _first(dataset: tf.data.Dataset, count: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images and labels of a batched dataset."""
    images, labels = [], []
    for batch_images, batch_labels in dataset.unbatch().take(
            count).batch(_READ_BATCH).as_numpy_iterator():
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        raise ExportError("The dataset split holds no images.")
    return (np.concatenate(images).astype(np.float32),
            np.concatenate(labels))
