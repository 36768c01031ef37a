"""Tests for km_tf.data: spec parsing, sources, splits, pipelines, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

import km_tf
from km_tf import data

SIZE = 16
# Folder test data: one constant colour per class (RGB, 0-255).
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
IMAGES_PER_CLASS = 6


def labels_of(dataset) -> np.ndarray:
    return np.concatenate([labels for _, labels in dataset.as_numpy_iterator()])


def images_of(dataset) -> np.ndarray:
    return np.concatenate([images for images, _ in dataset.as_numpy_iterator()])


def pairs_of(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from one pass (the train split reshuffles)."""
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope="module")
def digits_task():
    return data.load("digits:5-9", image_size=SIZE, batch_size=64)


def write_class_folder(root, name, count=IMAGES_PER_CLASS):
    """`root/name/000.png...`: `count` images of the class's colour."""
    (root / name).mkdir()
    for i in range(count):
        shape = (20 + i, 24, 3)  # sizes differ, as in real folders
        image = np.broadcast_to(np.array(COLOURS[name], np.uint8), shape)
        png = tf.io.encode_png(image).numpy()
        (root / name / f"{i:03d}.png").write_bytes(png)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for name in COLOURS:
        write_class_folder(root, name)
    grey = tf.io.encode_png(np.full((8, 8, 1), 200, np.uint8)).numpy()
    (root / "red" / "nested").mkdir()
    (root / "red" / "nested" / "grey.PNG").write_bytes(grey)
    (root / "red" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("spec, expected", [
    ("digits", data.DataSpec("digits", "digits")),
    ("digits:0-4", data.DataSpec("digits", "digits", (0, 1, 2, 3, 4))),
    ("digits:1,3,8-9", data.DataSpec("digits", "digits", (1, 3, 8, 9))),
    ("skimage:faces:non_face,face",
     data.DataSpec("skimage", "faces", ("non_face", "face"))),
    ("tfds:oxford_flowers102", data.DataSpec("tfds", "oxford_flowers102")),
    ("folder:/data/a:b", data.DataSpec("folder", "/data/a:b")),
])
def test_parse_spec_reads_every_form(spec, expected):
    assert data.parse_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("mnist", "Unknown data source 'mnist'"),
    ("folder:", "lacks the path"),
    ("tfds:", "lacks the dataset name"),
])
def test_malformed_specs_say_how_to_write_them(spec, message):
    with pytest.raises(ValueError, match=message):
        data.parse_spec(spec)


def test_class_subset_is_reindexed_from_zero(digits_task):
    assert digits_task.class_names == ("5", "6", "7", "8", "9")
    assert digits_task.num_classes == 5
    for split in data.SPLITS:
        assert set(labels_of(getattr(digits_task, split))) == set(range(5))


def test_splits_partition_the_selected_classes(digits_task):
    expected = int(np.sum(load_digits().target >= 5))
    assert sum(digits_task.counts.values()) == expected
    for split in data.SPLITS:
        labels = labels_of(getattr(digits_task, split))
        assert len(labels) == digits_task.counts[split]
        assert digits_task.class_counts[split] == tuple(
            np.bincount(labels, minlength=5))
    assert digits_task.counts["validation"] == pytest.approx(
        0.15 * expected, abs=5)


def test_batches_are_float_rgb_pixels_at_the_image_size_by_default(
        digits_task):
    images, labels = next(iter(digits_task.validation))
    assert images.shape[1:] == (SIZE, SIZE, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int32
    assert float(tf.reduce_min(images)) == 0.0
    assert 250.0 < float(tf.reduce_max(images)) <= 255.0
    assert digits_task.image_size == (SIZE, SIZE)


def test_a_normalization_mode_normalises_in_the_pipeline(digits_task):
    pixels = images_of(digits_task.test)
    scaled = data.load("digits:5-9", image_size=SIZE, batch_size=64,
                       normalization="tf")
    np.testing.assert_allclose(images_of(scaled.test), pixels / 127.5 - 1.0,
                               atol=1e-5)
    caffe = data.load("digits:5-9", image_size=SIZE, batch_size=64,
                      normalization="caffe")
    np.testing.assert_allclose(
        images_of(caffe.test),
        pixels[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-3)


def test_evaluation_splits_keep_their_order_and_train_reshuffles(digits_task):
    np.testing.assert_array_equal(labels_of(digits_task.test),
                                  labels_of(digits_task.test))
    assert not np.array_equal(labels_of(digits_task.train),
                              labels_of(digits_task.train))


def test_same_seed_gives_the_same_split_and_another_seed_does_not(
        digits_task):
    again = data.load("digits:5-9", image_size=SIZE, batch_size=64)
    other = data.load("digits:5-9", image_size=SIZE, batch_size=64, seed=1)
    np.testing.assert_array_equal(images_of(again.test),
                                  images_of(digits_task.test))
    assert not np.array_equal(images_of(other.test)[:50],
                              images_of(digits_task.test)[:50])


def test_few_shot_keeps_n_training_images_per_class():
    few = data.load("digits", classes=[0, 1, 2], shots=4, image_size=SIZE)
    assert few.counts["train"] == 12
    np.testing.assert_array_equal(np.bincount(labels_of(few.train)), [4, 4, 4])
    assert few.class_counts["train"] == (4, 4, 4)
    assert few.counts["test"] > 12


def test_too_many_shots_names_the_class():
    with pytest.raises(ValueError, match="shots=500"):
        data.load("digits:0-1", shots=500, image_size=SIZE)


def test_classes_by_name_follow_the_given_order():
    faces = data.load("skimage:faces", classes=["non_face", "face"],
                      image_size=SIZE)
    assert faces.class_names == ("non_face", "face")
    assert faces.num_classes == 2 and sum(faces.counts.values()) == 200


@pytest.mark.parametrize("spec, kwargs, message", [
    ("digits:10", {}, "Class 10 is not in"),
    ("digits:0-4", {"classes": [1]}, "Classes given twice"),
    ("digits:1,1", {}, "repeat"),
    ("skimage:cats", {}, "faces, textures"),
    ("digits", {"augment": 2.0}, "augment"),
    ("digits", {"normalization": "imagenet"}, "caffe"),
])
def test_bad_requests_raise_clear_errors(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load(spec, image_size=SIZE, **kwargs)


def test_textures_cut_one_class_per_skimage_image():
    textures = data.load("skimage:textures", image_size=SIZE)
    assert textures.class_names == data.TEXTURE_IMAGES
    counts = np.bincount(labels_of(textures.test))
    assert len(counts) == len(data.TEXTURE_IMAGES) and counts.min() > 5


def test_augmentation_changes_training_images_only():
    plain = data.load("skimage:textures:0,1", image_size=SIZE, cache=False)
    augmented = data.load("skimage:textures:0,1", image_size=SIZE,
                          augment=1.0)
    assert not np.allclose(np.sort(images_of(augmented.train), axis=None),
                           np.sort(images_of(plain.train), axis=None))
    np.testing.assert_allclose(images_of(augmented.test),
                               images_of(plain.test))


def test_folder_images_keep_their_class(image_folder):
    folder = data.load(f"folder:{image_folder}", image_size=SIZE,
                       validation_fraction=0.2, test_fraction=0.2)
    assert folder.class_names == ("blue", "green", "red")
    assert sum(folder.counts.values()) == 3 * IMAGES_PER_CLASS + 1
    images, labels = pairs_of(folder.train)
    for label, name in enumerate(folder.class_names):
        channel_means = images[labels == label].mean(axis=(0, 1, 2))
        if name != "red":  # "red" also holds the grey image
            expected = np.array(COLOURS[name], "float32")  # pixels
            np.testing.assert_allclose(channel_means, expected, atol=1e-5)


def test_folder_class_subset_by_name(image_folder):
    folder = data.load(f"folder:{image_folder}", classes=["red", "blue"],
                       image_size=SIZE, shots=2)
    assert folder.class_names == ("red", "blue")
    assert folder.counts["train"] == 4


def test_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'nowhere'}")


def test_folder_without_class_subfolders_explains_the_layout(tmp_path):
    (tmp_path / "loose.png").write_bytes(
        tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
    with pytest.raises(ValueError, match="no class sub-folders.*sub-folder"):
        data.load(f"folder:{tmp_path}")


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="cats.*holds no images"):
        data.load(f"folder:{tmp_path}")


@pytest.fixture
def folder_with_bad_files(tmp_path):
    """Two classes of good PNGs, a truncated JPEG and a text file `.png`."""
    for name in ("blue", "red"):
        write_class_folder(tmp_path, name)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    jpeg = tf.io.encode_jpeg(image).numpy()
    (tmp_path / "red" / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "blue" / "notes.png").write_text("not an image")
    return tmp_path


def test_folder_with_one_class_is_refused_naming_it(tmp_path):
    write_class_folder(tmp_path, "red")
    with pytest.raises(km_tf.DataError, match=r"has 1 class \(\['red'\]"
                       r".*at least two.*sub-folder"):
        data.load(f"folder:{tmp_path}", image_size=SIZE)


def test_spec_selecting_one_class_is_refused():
    with pytest.raises(km_tf.DataError,
                       match="'digits:3' selects 1 class.*at least two"):
        data.load("digits:3", image_size=SIZE)


def test_classes_argument_selecting_one_class_is_refused(image_folder):
    with pytest.raises(km_tf.DataError, match="at least two"):
        data.load(f"folder:{image_folder}", classes=["red"], image_size=SIZE)


def test_undecodable_files_are_named_in_one_error_at_load(
        folder_with_bad_files):
    with pytest.raises(km_tf.DataError) as raised:
        data.load(f"folder:{folder_with_bad_files}", image_size=SIZE)
    message = str(raised.value)
    assert message.startswith("2 of 14 image files")
    assert str(folder_with_bad_files / "red" / "truncated.jpg") in message
    assert str(folder_with_bad_files / "blue" / "notes.png") in message
    assert "Unknown image file format" in message
    assert "skip_bad_images=True" in message
    assert isinstance(raised.value, ValueError)


def test_error_lists_a_few_bad_files_and_counts_the_rest(tmp_path):
    for name in ("blue", "red"):
        write_class_folder(tmp_path, name)
    for i in range(data.SHOWN_BAD_FILES + 3):
        (tmp_path / "red" / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(km_tf.DataError, match="; and 3 more. Delete"):
        data.load(f"folder:{tmp_path}", image_size=SIZE)


def test_skip_bad_images_trains_on_the_rest_and_warns(folder_with_bad_files,
                                                       caplog):
    folder = data.load(f"folder:{folder_with_bad_files}", image_size=SIZE,
                       skip_bad_images=True, batch_size=4)
    assert sum(folder.counts.values()) == 2 * IMAGES_PER_CLASS
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "Skipping 2 of 14" in warnings[0]
    assert "truncated.jpg" in warnings[0] and "notes.png" in warnings[0]
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    history = model.fit(folder.train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_class_left_empty_by_skipping_is_named(tmp_path):
    write_class_folder(tmp_path, "blue")
    (tmp_path / "red").mkdir()
    (tmp_path / "red" / "broken.png").write_text("not an image")
    with pytest.raises(km_tf.DataError,
                       match="red.*no images that decode"):
        data.load(f"folder:{tmp_path}", skip_bad_images=True)


def test_tfds_mock_mnist_subset_with_carved_validation(tmp_path):
    with tfds.testing.mock_data(num_examples=100):
        mnist = data.load("tfds:mnist:0-4", image_size=SIZE, batch_size=8,
                          data_dir=str(tmp_path))
        assert mnist.class_names == ("0", "1", "2", "3", "4")
        for split in data.SPLITS:
            labels = labels_of(getattr(mnist, split))
            assert len(labels) == mnist.counts[split] > 0
            assert labels.max() < 5
        images, _ = next(iter(mnist.train))
        assert images.shape[1:] == (SIZE, SIZE, 3)


def test_unknown_tfds_name_points_to_the_catalog():
    with pytest.raises(ValueError, match="list_builders"):
        data.load("tfds:no_such_dataset_xyz")


def test_tfds_download_failure_says_how_to_work_offline(monkeypatch, tmp_path):
    def offline(self, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        offline)
    with pytest.raises(RuntimeError, match="offline.*tfds build mnist"):
        data.load("tfds:mnist", data_dir=str(tmp_path))
