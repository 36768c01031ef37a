"""Tests for km_tf.models: builders, heads, weights, normalisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import km_tf
from km_tf import models

SIZE = 32
NUM_CLASSES = 3
# The smallest width each builder accepts, to keep one train step cheap.
SMALL_ALPHA = {
    "mobilenet_v1": 0.25,
    "mobilenet_v2": 0.35,
    "mobilenet_v3_small": 0.75,
    "mobilenet_v3_large": 0.75,
    "resnet18": 0.25,
    "resnet34": 0.25,
    "resnet50": 1.0,
}


def small_model(name="mobilenet_v2", **options) -> keras.Model:
    return models.build_model(
        name, NUM_CLASSES, image_size=SIZE, alpha=SMALL_ALPHA[name], **options
    )


def compile_for_logits(model: keras.Model) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return model


def batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype("float32")
    return images, rng.integers(0, NUM_CLASSES, n)


def test_every_model_has_a_builder_and_a_normalization():
    assert set(SMALL_ALPHA) == set(models.MODEL_NAMES)
    for name in models.MODEL_NAMES:
        assert models.normalization_for(name) in models.NORMALIZATIONS


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_builder_trains_one_step_at_32px(name):
    model = compile_for_logits(small_model(name))
    head_before = model.get_layer(models.HEAD_NAME).get_weights()[0].copy()
    loss = model.train_on_batch(*batch())
    assert model.output_shape == (None, NUM_CLASSES)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert np.isfinite(loss)
    head_after = model.get_layer(models.HEAD_NAME).get_weights()[0]
    assert not np.allclose(head_before, head_after)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="mobilenet_v2"):
        models.build_model("mobilenet_v9", 3)


def test_resnet50_rejects_a_width_multiplier():
    with pytest.raises(ValueError, match="no width multiplier"):
        models.build_base("resnet50", image_size=SIZE, alpha=0.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_basic_resnets_have_no_imagenet_weights(name):
    with pytest.raises(ValueError, match="local"):
        models.build_base(name, image_size=SIZE, weights="imagenet")


def test_basic_resnet18_follows_the_paper_layout():
    trunk = models.build_base("resnet18", image_size=64)
    convs = [layer for layer in trunk.layers
             if isinstance(layer, keras.layers.Conv2D)]
    # Stem + 8 blocks x 2 convs + 3 projection shortcuts.
    assert len(convs) == 1 + 16 + 3
    assert all(not conv.use_bias for conv in convs)
    assert trunk.output_shape == (None, 2, 2, 512)
    assert trunk.get_layer("conv1_conv").kernel_size == (7, 7)


def test_imagenet_download_failure_says_to_pass_a_local_path(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", offline)
    with pytest.raises(models.WeightsUnavailableError) as error:
        models.build_model("mobilenet_v2", 3, image_size=96, alpha=0.35,
                           weights="imagenet")
    message = str(error.value)
    assert "offline" in message and ".weights.h5" in message
    assert "weights=" in message


def test_keras_argument_errors_pass_through_with_imagenet():
    with pytest.raises(ValueError, match="alpha"):
        models.build_base("mobilenet_v2", image_size=96, alpha=0.3,
                          weights="imagenet")


def test_bn_momentum_is_rewritten_and_saved(tmp_path):
    model = small_model("mobilenet_v2", bn_momentum=0.8)
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.momentum == 0.8 for layer in norms)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer(norms[0].name).momentum == 0.8


def test_bn_momentum_none_keeps_the_keras_value():
    model = small_model("mobilenet_v2", bn_momentum=None)
    assert model.get_layer("bn_Conv1").momentum == 0.999
    assert small_model("mobilenet_v2").get_layer("bn_Conv1").momentum == (
        models.DEFAULT_BN_MOMENTUM
    )


def test_bn_momentum_reaches_nested_models():
    inner = small_model("resnet18", bn_momentum=None)
    outer = keras.Sequential([keras.Input((SIZE, SIZE, 3)), inner])
    assert models.set_batchnorm_momentum(outer, 0.5) > 0
    assert inner.get_layer("conv1_bn").momentum == 0.5


@pytest.mark.parametrize("filename", ["base.keras", "base.weights.h5"])
def test_weights_path_loads_a_saved_classifier(tmp_path, filename):
    model = small_model("mobilenet_v1")
    model.get_layer("head").kernel.assign(
        np.full(model.get_layer("head").kernel.shape, 0.5, "float32"))
    path = tmp_path / filename
    if filename.endswith(".keras"):
        model.save(path)
    else:
        model.save_weights(path)
    loaded = small_model("mobilenet_v1", weights=str(path))
    images, _ = batch()
    np.testing.assert_allclose(loaded.predict(images, verbose=0),
                               model.predict(images, verbose=0), atol=1e-5)


def test_weights_path_must_be_a_keras_file(tmp_path):
    with pytest.raises(ValueError, match=".weights.h5"):
        small_model("mobilenet_v1", weights=str(tmp_path / "base.h5"))
    with pytest.raises(FileNotFoundError):
        small_model("mobilenet_v1", weights=str(tmp_path / "none.keras"))


def test_replace_head_gives_a_fresh_head_and_leaves_the_base_alone():
    base = small_model("resnet18")
    images, _ = batch()
    before = base.predict(images, verbose=0)
    task = models.replace_head(base, 7)
    assert task.output_shape == (None, 7)
    assert task.get_layer("head").units == 7
    assert base.get_layer("head").units == NUM_CLASSES
    compile_for_logits(task).train_on_batch(images, np.arange(4))
    np.testing.assert_allclose(base.predict(images, verbose=0), before)


def test_replace_head_names_the_missing_layer():
    with pytest.raises(ValueError, match="head_layer"):
        models.replace_head(small_model("resnet18"), 2, head_layer="logits")


def test_build_task_model_trains_only_task_weights():
    if not hasattr(km_tf, "modulate"):
        pytest.skip("km_tf.modulate has not landed yet")
    base = small_model("mobilenet_v2")
    task = models.build_task_model(base, 5, hidden_units=8)
    assert task.output_shape == (None, 5)
    trainable = sum(int(np.prod(v.shape)) for v in task.trainable_variables)
    assert 0 < trainable < base.count_params() / 2
    images, _ = batch()
    loss = compile_for_logits(task).train_on_batch(images, np.arange(4) % 5)
    assert np.isfinite(loss)


def test_normalize_tf_maps_pixels_to_minus_one_one():
    images = tf.constant([[[[0.0, 127.5, 255.0]]]])
    np.testing.assert_allclose(models.normalize(images, "tf"),
                               [[[[-1.0, 0.0, 1.0]]]])


def test_normalize_caffe_flips_to_bgr_and_centres():
    images = tf.constant([[[[255.0, 0.0, 0.0]]]])  # pure red
    bgr = models.normalize(images, "caffe").numpy()[0, 0, 0]
    assert bgr[2] > 100 and bgr[0] < 0 and bgr[1] < 0


def test_normalize_rejects_unknown_modes():
    with pytest.raises(ValueError, match="caffe"):
        models.normalize(tf.zeros([1, 2, 2, 3]), "imagenet")


@pytest.mark.slow
def test_base_pretrained_briefly_on_digits_scores_in_inference_mode():
    from km_tf import data

    name = "mobilenet_v2"
    digits = data.load("digits:0-4", image_size=SIZE, batch_size=32,
                       normalization=models.normalization_for(name))
    base = models.build_model(name, digits.num_classes, image_size=SIZE,
                              alpha=0.35)
    base.compile(keras.optimizers.Adam(3e-3),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"], jit_compile=False)
    base.fit(digits.train, epochs=5, verbose=0)  # ~100 steps
    # Needs BatchNorm moving statistics that have left their initial values
    # (Keras' momentum of 0.999 leaves them near 0/1 and scores ~chance).
    assert base.evaluate(digits.test, verbose=0)[1] > 0.85
