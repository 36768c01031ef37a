"""Where image datasets come from: one reader per data source.

A reader takes a dataset name (or a folder path) and `ReadOptions` and
returns a `Source`: the class names and one `Pool` per native split
("all" for sources without splits, tfds' "train", "validation", "test").
A pool holds the labels in memory and gives images on demand, so
`km_tf.data` can select classes and carve splits before any image is
decoded. `read(kind, name, options)` picks the reader of a spec's source
(`km_tf.data.parse_spec`); `km_tf.meta.pools` reads tfds sources with it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from km_tf.errors import DataError

SPLITS = ("train", "validation", "test")
SKIMAGE_DATASETS = ("faces", "textures", "photos")
# skimage.data images that ship in the wheel, one class each.
TEXTURE_IMAGES = ("brick", "grass", "gravel", "immunohistochemistry")
PHOTO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket",
                "hubble_deep_field", "retina")
TEXTURE_PATCH = 32
PHOTO_SIDE = 192
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Undecodable image files named in an error or warning; the rest are counted.
SHOWN_BAD_FILES = 5


@dataclasses.dataclass(frozen=True)
class Pool:
    """Examples of one native split: labels in memory, images on demand.

    `take(indices)` returns a dataset of `(uint8 image HxWxC, label)` for
    the given example indices, in index order.
    """

    labels: np.ndarray
    take: Callable[[np.ndarray], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset before selection: its class names and native splits."""

    class_names: tuple[str, ...]
    pools: dict[str, Pool]  # "all", or tfds splits ("train", "test", ...)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How a source reads its data (each source uses what applies to it).

    Attributes:
        data_dir: tensorflow-datasets data directory (`tfds:`).
        skip_bad_images: Drop image files that do not decode instead of
            refusing the folder (`folder:`).
    """

    data_dir: str | None = None
    skip_bad_images: bool = False


def _array_pool(images: np.ndarray, labels: np.ndarray) -> Pool:
    """A pool over uint8 images held in memory."""
    labels = np.asarray(labels, np.int64)
    return Pool(
        labels,
        lambda indices: tf.data.Dataset.from_tensor_slices(
            (images[indices], labels[indices])
        ),
    )


def _to_uint8_rgb(images: np.ndarray, max_value: float) -> np.ndarray:
    """Grayscale `(n, h, w)` in `[0, max_value]` -> uint8 `(n, h, w, 3)`."""
    scaled = np.round(np.asarray(images, np.float64) * (255.0 / max_value))
    gray = np.clip(scaled, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _digits_source(name: str, options: ReadOptions) -> Source:
    """scikit-learn's 8x8 digits (values 0-16), classes '0'..'9'."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return Source(
        tuple(str(c) for c in range(10)),
        {"all": _array_pool(_to_uint8_rgb(digits.images, 16.0),
                            digits.target)},
    )


def _skimage_source(name: str, options: ReadOptions) -> Source:
    """`skimage.data`: 'faces' (lfw_subset), 'textures' or 'photos' (patches)."""
    import skimage.data
    from skimage.util import img_as_float

    if name == "faces":
        faces = img_as_float(skimage.data.lfw_subset())
        labels = np.repeat([0, 1], len(faces) // 2)  # 100 faces first
        return Source(("face", "non_face"),
                       {"all": _array_pool(_to_uint8_rgb(faces, 1.0), labels)})
    if name == "textures":
        from skimage.color import rgb2gray

        patches, labels = [], []
        for class_id, image_name in enumerate(TEXTURE_IMAGES):
            image = img_as_float(getattr(skimage.data, image_name)())
            if image.ndim == 3:
                image = rgb2gray(image[..., :3])
            tiles = _tiles(image, TEXTURE_PATCH)
            patches.append(tiles)
            labels.append(np.full(len(tiles), class_id))
        return Source(
            TEXTURE_IMAGES,
            {"all": _array_pool(_to_uint8_rgb(np.concatenate(patches), 1.0),
                                np.concatenate(labels))},
        )
    if name == "photos":
        return _photos_source()
    raise DataError(
        f"Unknown skimage dataset {name!r}; choose one of "
        f"{', '.join(SKIMAGE_DATASETS)} ('skimage:faces')."
    )


def _tiles(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping `size` x `size` tiles of a 2-D (or HxWxC) image."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    image = image[: rows * size, : cols * size]
    return image.reshape(rows, size, cols, size, *image.shape[2:]).swapaxes(
        1, 2).reshape(-1, size, size, *image.shape[2:])


def _photos_source() -> Source:
    """Colour patches of the photographs in `skimage.data` (`PHOTO_IMAGES`)."""
    import skimage.data
    from skimage.transform import rescale

    patches, labels = [], []
    for class_id, image_name in enumerate(PHOTO_IMAGES):
        image = getattr(skimage.data, image_name)()[..., :3]
        image = rescale(image, PHOTO_SIDE / min(image.shape[:2]),
                        channel_axis=-1, anti_aliasing=True)
        tiles = _tiles(np.round(image * 255).astype(np.uint8),
                       TEXTURE_PATCH)
        patches.append(tiles)
        labels.append(np.full(len(tiles), class_id))
    return Source(PHOTO_IMAGES,
                   {"all": _array_pool(np.concatenate(patches),
                                       np.concatenate(labels))})


def _glyphs_source(name: str, options: ReadOptions) -> Source:
    """Letters of the fonts inside matplotlib (`km_tf.synthetic.glyphs`)."""
    from km_tf.synthetic import glyphs

    images, labels, letters = glyphs.glyph_images(name.split("+"))
    return Source(tuple(letters), {"all": _array_pool(images, labels)})


def _fractals_source(name: str, options: ReadOptions) -> Source:
    """FractalDB-style fractals (`km_tf.synthetic.fractals`)."""
    from km_tf.synthetic import fractals

    if not name.isdigit():
        raise DataError(f"'fractals:{name}' needs a class count: "
                        "'fractals:N', e.g. 'fractals:100'.")
    images, labels, names = fractals.fractal_images(int(name))
    return Source(tuple(names), {"all": _array_pool(images, labels)})


def _folder_source(path: str, options: ReadOptions) -> Source:
    """One sub-folder of images per class; names sorted alphabetically.

    Every image file is decoded once here, so a bad file is named now
    rather than aborting `fit` later.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Image folder {path!r} does not exist.")
    class_names = sorted(
        entry.name for entry in os.scandir(path)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    layout = (f"put each class's images in its own sub-folder, e.g. "
              f"{os.path.join(path, 'cat', '001.png')} and "
              f"{os.path.join(path, 'dog', '001.png')}")
    if not class_names:
        raise DataError(
            f"Image folder {path!r} has no class sub-folders: {layout}."
        )
    files = {name: _image_files(os.path.join(path, name))
             for name in class_names}
    _check_not_empty(path, files, layout, skipped=False)
    bad = _undecodable([file for names in files.values() for file in names])
    if bad:
        _refuse_or_warn(path, bad, sum(map(len, files.values())),
                        options.skip_bad_images)
        files = {name: [file for file in names if file not in bad]
                 for name, names in files.items()}
        _check_not_empty(path, files, layout, skipped=True)
    paths = np.array([file for names in files.values() for file in names])
    labels = np.concatenate([np.full(len(names), class_id, np.int64)
                             for class_id, names in enumerate(files.values())])

    def take(indices: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(
            (paths[indices], labels[indices])
        ).map(lambda file, label: (_decode(file), label),
              num_parallel_calls=tf.data.AUTOTUNE)

    return Source(tuple(class_names), {"all": Pool(labels, take)})


def _check_not_empty(path: str, files: dict[str, list[str]], layout: str,
                     *, skipped: bool) -> None:
    """Refuses a class sub-folder without (decodable) images.

    Raises:
        DataError: A class of `files` has no files.
    """
    for class_name, names in files.items():
        if names:
            continue
        what = ("no images that decode (the bad ones were skipped)" if skipped
                else f"no images ({', '.join(IMAGE_EXTENSIONS)})")
        raise DataError(
            f"Class folder {os.path.join(path, class_name)!r} holds {what}; "
            f"add some or remove it: {layout}."
        )


def _undecodable(files: Sequence[str]) -> dict[str, str]:
    """The files TensorFlow cannot read or decode, with the reason for each.

    Decodes each file eagerly with the pipeline's own decoder (`_decode`):
    what passes here decodes in `fit`. About 0.15 ms per small PNG, 1 ms per
    256x256 JPEG (see BUILD.md, "Data validation").
    """
    bad = {}
    for file in files:
        try:
            _decode(tf.constant(file))
        except tf.errors.OpError as error:
            bad[file] = _reason(error)
    return bad


def _reason(error: tf.errors.OpError) -> str:
    """TensorFlow's message without `{{function_node ...}}` and `[Op:...]`."""
    text = re.sub(r"\{\{.*?\}\}\s*", "", error.message)
    text = re.sub(r"\s*\[Op:\w+\].*", "", text, flags=re.S).strip()
    return text or type(error).__name__


def _refuse_or_warn(path: str, bad: dict[str, str], total: int,
                    skip: bool) -> None:
    """Names the undecodable files: in a `DataError`, or a warning if `skip`.

    Raises:
        DataError: `bad` files and not `skip`.
    """
    shown = [f"{file} ({reason})"
             for file, reason in list(bad.items())[:SHOWN_BAD_FILES]]
    if len(bad) > len(shown):
        shown.append(f"and {len(bad) - len(shown)} more")
    listing = "; ".join(shown)
    if skip:
        logging.warning("Skipping %d of %d image files in %s that do not "
                        "decode: %s.", len(bad), total, path, listing)
        return
    raise DataError(
        f"{len(bad)} of {total} image files in folder {path!r} do not "
        f"decode: {listing}. Delete or replace them, or pass "
        "`skip_bad_images=True` to train on the rest."
    )


def _image_files(folder: str) -> list[str]:
    """Image files below `folder` (recursively), sorted."""
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _decode(file: tf.Tensor) -> tf.Tensor:
    """Reads and decodes one image file to uint8 RGB."""
    return tf.io.decode_image(
        tf.io.read_file(file), channels=3, expand_animations=False
    )


def _tfds_source(name: str, options: ReadOptions) -> Source:
    """A tensorflow-datasets image dataset with (image, label) keys."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=options.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"Unknown tensorflow-datasets dataset {name!r}: check the name in "
            "the tfds catalog (`tfds.list_builders()`), e.g. "
            "'tfds:oxford_flowers102'."
        ) from None
    try:
        builder.download_and_prepare()
    except Exception as error:
        raise RuntimeError(
            f"Could not download and prepare tfds dataset {name!r} into "
            f"data_dir={builder.data_dir!r} ({error}). This machine may be "
            f"offline: run `tfds build {name} --data_dir DIR` where there is "
            "network, copy DIR here and pass `data_dir=DIR`, or use a "
            "'folder:', 'digits' or 'skimage:' spec."
        ) from error
    info = builder.info
    if info.supervised_keys is None or len(info.supervised_keys) != 2:
        raise DataError(
            f"tfds dataset {name!r} has no (image, label) supervised keys."
        )
    image_key, label_key = info.supervised_keys
    # An unprepared (or mocked) builder lists no splits: assume the usual.
    available = set(info.splits.keys()) or {"train", "test"}
    return Source(
        tuple(info.features[label_key].names),
        {split: _tfds_pool(builder, split, image_key)
         for split in SPLITS if split in available},
    )


def _tfds_pool(builder, split: str, image_key: str) -> Pool:
    """A pool over one tfds split; images are decoded only when taken."""
    import tensorflow_datasets as tfds

    def read() -> tf.data.Dataset:
        return builder.as_dataset(
            split=split,
            as_supervised=True,
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )

    labels = np.concatenate(
        [np.zeros(0, np.int64)]
        + list(read().map(lambda _, label: label).batch(4096)
               .as_numpy_iterator())
    )
    feature = builder.info.features[image_key]

    def take(indices: np.ndarray) -> tf.data.Dataset:
        mask = np.zeros(len(labels), bool)
        mask[indices] = True
        mask = tf.constant(mask)
        return (
            read()
            .enumerate()
            .filter(lambda i, example: tf.gather(mask, i))
            .map(lambda i, example: (feature.decode_example(example[0]),
                                     example[1]),
                 num_parallel_calls=tf.data.AUTOTUNE)
        )

    return Pool(labels, take)


READERS: dict[str, Callable[[str, ReadOptions], Source]] = {
    "digits": _digits_source,
    "skimage": _skimage_source,
    "glyphs": _glyphs_source,
    "fractals": _fractals_source,
    "tfds": _tfds_source,
    "folder": _folder_source,
}


def read(kind: str, name: str, options: ReadOptions = ReadOptions()
         ) -> Source:
    """The source of one data spec: `read("tfds", "omniglot")`,
    `read("folder", "/data/birds")`.

    Args:
        kind: A key of `READERS` (a spec's part before the first colon).
        name: The dataset's name, or the folder's path.
        options: What the readers use (tfds' data folder, bad images).

    Raises:
        DataError: An unknown `kind` or dataset, or bad folder contents
            (see `km_tf.data.load`).
    """
    if kind not in READERS:
        raise DataError(f"Unknown data source {kind!r}; choose one of "
                        f"{', '.join(READERS)}.")
    return READERS[kind](name, options)
