"""Calibration and held-out data for an export: a dataset spec or an `.npz`.

    --calibration_data=digits:5-9     the task's own data, by the spec it was
                                      trained on (`km_tf.data`): calibration
                                      from the training split, parity on the
                                      test split (same seed, same split)
    --calibration_dataset=x.npz       arrays prepared by hand

Both give model inputs as the model takes them: km-tf models normalize
inside (`km_tf.models.add_preprocessing`), so these are RGB pixels in
[0, 255], float32.

`check_inputs` and `check_heldout` validate such data against the model
before anything is converted or written (`km_tf.export.export_model` calls
them): real numbers, finite, the model's sample shape, labels that are class
ids, and, for a model that normalizes inside, pixels in [0, 255] rather than
data already scaled to [0, 1] or normalized to [-1, 1]. For a model without
in-model normalization the range is not guessed.
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
from km_tf.models import input_normalization

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


def check_inputs(x, model: keras.Model, what: str) -> np.ndarray:
    """Checks model inputs (calibration or held-out images) against `model`.

    Args:
        x: Samples, `(n, *model.input_shape[1:])`, real numbers.
        model: The model they are for.
        what: How the message names them, e.g. `"Calibration data"`.

    Returns:
        `x` as a numpy array (its dtype kept: convert after selecting).

    Raises:
        ExportError: `x` is not a real-number array, has no samples, has
            another sample shape, holds NaN or infinity, or (for a model
            that normalizes inside) is not in the pixel range [0, 255].
    """
    x = _real_array(x, what)
    expected = tuple(model.input_shape[1:])
    if x.ndim != len(expected) + 1 or any(
            size is not None and size != got
            for size, got in zip(expected, x.shape[1:])):
        raise ExportError(
            f"{what} has sample shape {x.shape[1:]}, the model expects "
            f"{expected}. Preprocess it as for training (or pass "
            "--calibration_data=SPEC with the task's dataset spec).")
    if len(x) == 0:
        raise ExportError(f"{what} holds no samples; pass some.")
    low, high = float(x.min()), float(x.max())  # NaN propagates.
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        raise ExportError(
            f"{what} holds NaN or infinite values in {int((~finite).sum())} "
            f"of {len(x)} samples (first: sample {int(np.argmin(finite))}); "
            "remove or repair those samples.")
    _check_pixel_range(low, high, model, what)
    return x


def check_heldout(heldout: tuple[np.ndarray, np.ndarray | None] | None,
                  model: keras.Model, samples: int
                  ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Checks held-out `(x, y)` for the parity check and keeps `samples`.

    `x` gets the checks of `check_inputs`; labels `y` (optional) must be
    integer class ids, one per sample of `x`, in `[0, num_classes)`.

    Args:
        heldout: `(x, y)` with `y` possibly None, or None.
        model: The model they are for (its output size is the class count).
        samples: Keep at most this many samples.

    Returns:
        `(x[:samples] as float32, y[:samples] or None)`, or None.

    Raises:
        ExportError: Malformed `x` (see `check_inputs`) or labels.
    """
    if heldout is None:
        return None
    x, y = heldout
    x = check_inputs(x, model, "Held-out data (x_test)")
    if y is not None:
        y = _check_labels(y, len(x), model.output_shape[-1])[:samples]
    return x[:samples].astype(np.float32), y


def _real_array(x, what: str) -> np.ndarray:
    """`x` as a numpy array of real numbers (bool is not one).

    Raises:
        ExportError: `x` is ragged or not of an integer or float dtype.
    """
    try:
        array = np.asarray(x)
    except ValueError as error:  # Ragged nested sequences.
        raise ExportError(f"{what} is not an array ({error}); pass one "
                          "numpy array of samples.") from error
    if array.dtype.kind not in "iuf":
        raise ExportError(
            f"{what} has dtype {array.dtype}; it must be real numbers "
            "(float or integer pixels): pass a numeric numpy array, e.g. "
            "x.astype(np.float32).")
    return array


def _check_pixel_range(low: float, high: float, model: keras.Model,
                       what: str) -> None:
    """Refuses inputs outside [0, 255] (`low`, `high`: their range) for a
    model that takes pixels.

    A model whose `input_normalization` is a mode takes RGB pixels in
    [0, 255]; data scaled to [0, 1] or normalized (e.g. to [-1, 1]) would
    calibrate and check a model that sees different numbers on the device.
    For other models the range is the model's own business: accepted.

    Raises:
        ExportError: `model` normalizes inside and `x` is not in [0, 255].
    """
    mode = input_normalization(model)
    if mode is None:
        return
    if low < 0.0:
        looks = "looks already normalized (e.g. to [-1, 1])"
    elif high <= 1.0:
        looks = "looks scaled to [0, 1]"
    elif high > 255.0:
        looks = "goes beyond the pixel range"
    else:
        return
    raise ExportError(
        f"{what} spans [{low:g}, {high:g}]: it {looks}, but model "
        f"{model.name!r} normalizes its input itself ({mode!r}) and takes RGB "
        "pixels in [0, 255]. Pass pixels in [0, 255] as training read them "
        "(undo the scaling; km_tf.data.load without normalization=), or "
        "--calibration_data=SPEC with the task's dataset spec.")


def _check_labels(y, count: int, num_classes: int) -> np.ndarray:
    """Held-out labels: integer, 1-D, `count` of them, in [0, num_classes).

    Raises:
        ExportError: Any of these fails; the message says how to fix it.
    """
    what = "Held-out labels (y_test)"
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise ExportError(
            f"{what} have dtype {y.dtype}; they must be integer class ids "
            "(0..num_classes-1): pass y.astype(int) if they are whole "
            "numbers, or the labels as training read them.")
    if y.ndim != 1:
        hint = ("one-hot? pass y.argmax(axis=-1)" if y.ndim == 2
                and y.shape[-1] == num_classes and num_classes > 1
                else "pass y.reshape(-1)")
        raise ExportError(
            f"{what} have shape {y.shape}; they must be 1-D, one class id "
            f"per sample ({hint}).")
    if len(y) != count:
        raise ExportError(
            f"{what} hold {len(y)} labels for {count} samples of x_test; "
            "pass one label per sample, in the same order.")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ExportError(
            f"{what} span [{y.min()}, {y.max()}], but the model has "
            f"{num_classes} classes (ids 0-{num_classes - 1}): pass the "
            "labels of the task's own classes, re-indexed from 0 as "
            "training read them (km_tf.data.load does).")
    return y


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
