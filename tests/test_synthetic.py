"""Tests of the offline generators (glyphs, fractals) and their specs."""

import os

import numpy as np
import pytest

from km_tf import data
from km_tf.errors import DataError
from km_tf.synthetic import cache, fractals, glyphs


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test draws into its own cache folder."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_glyph_scripts_have_many_distinct_letters():
    counts = glyphs.scripts()
    assert set(counts) == set(glyphs.SCRIPTS)
    assert sum(counts.values()) > 2000
    assert min(counts.values()) >= 20
    letters = glyphs.letters(["all"])
    assert len(letters) == len(set(letters)) == sum(counts.values())
    # Letters that look exactly like an earlier script's are left out.
    assert "A" in letters and "\u0391" not in letters  # Greek capital alpha
    assert all(glyphs.script_of(c) == "armenian"
               for c in glyphs.letters(["armenian"]))


def test_glyph_images_are_deterministic_and_independent_of_the_selection(
        fresh_cache):
    alone, labels, names = glyphs.glyph_images(["ogham"], instances=3)
    assert alone.shape == (3 * len(names), glyphs.GLYPH_SIZE,
                           glyphs.GLYPH_SIZE, 1)
    assert alone.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(len(names)), 3))
    assert list(fresh_cache.glob("synthetic/glyphs_*ogham*.npz"))
    # Drawn again without the cache, and together with another script.
    both, both_labels, both_names = glyphs.glyph_images(
        ["nko", "ogham"], instances=3)
    first = both_names.index(names[0])
    np.testing.assert_array_equal(both[3 * first:3 * (first + len(names))],
                                  alone)
    # Instances differ from each other (distortions, fonts, noise).
    assert not np.array_equal(alone[0], alone[1])
    # Dark ink on light paper.
    assert alone[..., 0].mean() > 128


def test_unknown_script_and_bad_counts_are_refused():
    with pytest.raises(DataError, match="Unknown glyph script.*latin"):
        glyphs.glyph_images(["klingon"])
    with pytest.raises(DataError, match="instances"):
        glyphs.glyph_images(["ogham"], instances=0)
    with pytest.raises(DataError, match="class count"):
        data.load("fractals:many")
    with pytest.raises(DataError, match=">= 2 classes"):
        fractals.fractal_images(1)


def test_fractal_classes_are_stable_prefixes():
    four, labels, names = fractals.fractal_images(4, instances=5)
    six, _, _ = fractals.fractal_images(6, instances=5)
    np.testing.assert_array_equal(six[:20], four)
    assert four.shape == (20, fractals.FRACTAL_SIZE, fractals.FRACTAL_SIZE, 3)
    assert names == [f"fractal_{c:04d}" for c in range(4)]
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 5))
    # Every instance shows an attractor: lit pixels, not an empty frame.
    lit = (four.max(axis=-1) > 64).mean(axis=(1, 2))
    assert lit.min() > 0.02
    # Classes differ more between than within (mean images).
    means = four.reshape(4, 5, -1).astype(float).mean(axis=1)
    assert np.linalg.matrix_rank(means) == 4


def test_class_system_is_contractive_and_fills_the_frame():
    maps, probabilities = fractals.class_system(3)
    assert probabilities.sum() == pytest.approx(1.0)
    used = probabilities > 0
    assert 2 <= used.sum() <= 4
    gains = np.linalg.svd(maps[used, :, :2], compute_uv=False)[:, 0]
    assert gains.max() < 1.0


def test_a_torn_cache_file_is_regenerated(fresh_cache):
    first, _, _ = fractals.fractal_images(2, instances=2)
    [path] = fresh_cache.glob("synthetic/fractals_*.npz")
    path.write_bytes(path.read_bytes()[:100])
    again, _, _ = fractals.fractal_images(2, instances=2)
    np.testing.assert_array_equal(again, first)
    assert os.path.getsize(path) > 100


def test_specs_load_glyphs_fractals_and_photos():
    armenian = data.load("glyphs:armenian:0-4", image_size=16, shots=3,
                         batch_size=8)
    assert armenian.num_classes == 5
    assert armenian.class_names == tuple(glyphs.letters(["armenian"])[:5])
    assert armenian.counts["train"] == 15
    images, labels = next(iter(armenian.train))
    assert images.shape[1:] == (16, 16, 3) and images.dtype.name == "float32"
    assert set(labels.numpy()) <= set(range(5))
    fractal = data.load("fractals:3", image_size=16)
    assert fractal.num_classes == 3
    photos = data.load("skimage:photos", image_size=32)
    assert photos.class_names == data.PHOTO_IMAGES
    assert min(photos.counts.values()) >= len(data.PHOTO_IMAGES)
    images, _ = next(iter(photos.test))
    # Colour photographs: the channels differ.
    assert float(np.abs(images[..., 0] - images[..., 2]).mean()) > 1.0
