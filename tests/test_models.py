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
    "conv4": 0.125,
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
    """RGB pixels in [0, 255], what every km_tf model takes, and labels."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")
    return images, rng.integers(0, NUM_CLASSES, n)


def preprocessed(images, mode):
    """Keras' own normalisation (it edits numpy inputs in place)."""
    return keras.applications.imagenet_utils.preprocess_input(
        images.copy(), mode=mode)


def assert_same_on_pixels(pixels_model, model, mode, rtol=1e-4):
    """`pixels_model(x)` equals `model(preprocess_input(x, mode))`."""
    images, _ = batch(2)
    expected = model.predict(preprocessed(images, mode), verbose=0)
    np.testing.assert_allclose(pixels_model.predict(images, verbose=0),
                               expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max())


def padded_conv_net(first=None, name="padded_conv") -> keras.Model:
    """Input -> ZeroPadding2D -> strided Conv2D (ResNet50's stem) -> pool."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.ZeroPadding2D(3)(inputs)
    x = (first or keras.layers.Conv2D(8, 7, strides=2, name="stem"))(x)
    x = keras.layers.Conv2D(4, 3, name="second")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, outputs, name=name)


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
    with pytest.raises(km_tf.WeightsUnavailableError) as error:
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


@pytest.mark.parametrize("mode", ["tf", "torch"])
def test_normalization_layer_equals_keras_preprocess_input(mode):
    images, _ = batch()
    layer = models.normalization_layer(mode)
    np.testing.assert_allclose(layer(images), preprocessed(images, mode),
                               rtol=1e-5, atol=1e-5)


def test_caffe_layer_subtracts_the_mean_in_rgb_order():
    images, _ = batch()
    layer = models.normalization_layer("caffe")
    bgr = preprocessed(images, "caffe")
    np.testing.assert_allclose(layer(images), bgr[..., ::-1], atol=1e-4)


def test_normalization_layer_rejects_unknown_modes():
    with pytest.raises(ValueError, match="caffe"):
        models.normalization_layer("imagenet")


def test_caffe_swap_folded_into_a_padded_conv_is_exact():
    model = padded_conv_net()
    pixels_model = models.add_preprocessing(model, "caffe")
    assert_same_on_pixels(pixels_model, model, "caffe")
    # Only the conv reading the input is reversed.
    np.testing.assert_array_equal(
        pixels_model.get_layer("stem").kernel.numpy(),
        model.get_layer("stem").kernel.numpy()[:, :, ::-1, :])
    np.testing.assert_array_equal(
        pixels_model.get_layer("second").kernel.numpy(),
        model.get_layer("second").kernel.numpy())


def test_caffe_preprocessing_of_resnet50_matches_keras_preprocess_input():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, include_top=False,
                                        input_shape=(SIZE, SIZE, 3))
    assert_same_on_pixels(models.add_preprocessing(model, "caffe"), model,
                          "caffe")


def test_add_preprocessing_gives_mobilenet_v2_outputs_on_pixels():
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35,
                                           input_shape=(SIZE, SIZE, 3))
    weights_before = [w.copy() for w in model.get_weights()]
    pixels_model = models.add_preprocessing(model, "tf")
    assert_same_on_pixels(pixels_model, model, "tf", rtol=1e-5)
    assert not any(isinstance(layer, keras.Model)
                   for layer in pixels_model.layers)
    assert pixels_model.layers[1].name == models.INPUT_NORMALIZATION_NAME
    assert models.input_normalization(pixels_model) == "tf"
    # The original is untouched.
    assert models.input_normalization(model) is None
    assert len(model.layers) == len(pixels_model.layers) - 1
    for before, after in zip(weights_before, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_add_preprocessing_reaches_a_base_nested_in_a_sequential():
    inner = padded_conv_net()
    outer = keras.Sequential([keras.Input((SIZE, SIZE, 3)), inner,
                              keras.layers.Dense(2)])
    assert_same_on_pixels(models.add_preprocessing(outer, "caffe"), outer,
                          "caffe")


def test_add_preprocessing_refuses_a_model_that_normalizes_already():
    with pytest.raises(ValueError, match="already normalises"):
        models.add_preprocessing(small_model("resnet18"), "tf")
    v3 = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(SIZE, SIZE, 3), include_top=False,
        include_preprocessing=True)
    with pytest.raises(ValueError, match="already normalises"):
        models.add_preprocessing(v3, "tf")


@pytest.mark.parametrize("first, culprit", [
    (keras.layers.DepthwiseConv2D(7, strides=2, name="stem"),
     "DepthwiseConv2D"),
    (keras.layers.Conv2D(6, 7, groups=3, name="stem"), "grouped"),
])
def test_caffe_swap_is_refused_where_it_cannot_be_folded(first, culprit):
    model = padded_conv_net(first)
    kernel = model.get_layer("stem").kernel.numpy().copy()
    with pytest.raises(ValueError, match=culprit) as error:
        models.add_preprocessing(model, "caffe")
    assert "normalization='caffe'" in str(error.value)
    np.testing.assert_array_equal(model.get_layer("stem").kernel.numpy(),
                                  kernel)


def test_caffe_swap_is_refused_when_the_input_feeds_a_merge():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(3, 1, name="stem")(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="skip")([inputs, x]))
    with pytest.raises(ValueError, match="'skip'"):
        models.fold_channel_swap(model)


def test_fold_channel_swap_twice_restores_the_kernels():
    model = padded_conv_net()
    kernel = model.get_layer("stem").kernel.numpy().copy()
    assert models.fold_channel_swap(model) == ("stem",)
    assert not np.array_equal(model.get_layer("stem").kernel.numpy(), kernel)
    models.fold_channel_swap(model)
    np.testing.assert_array_equal(model.get_layer("stem").kernel.numpy(),
                                  kernel)


def test_input_normalization_of_models_without_a_layer_is_none():
    assert models.input_normalization(padded_conv_net()) is None
    scaled = keras.Sequential([keras.Input((SIZE, SIZE, 3)),
                               keras.layers.Rescaling(1 / 255.0)])
    assert models.input_normalization(scaled) is None  # not one of ours


def test_input_normalization_looks_into_a_nested_base():
    trunk = models.build_base("resnet18", image_size=SIZE, alpha=0.25)
    outer = keras.Sequential([keras.Input((SIZE, SIZE, 3)), trunk])
    assert models.input_normalization(outer) == "tf"


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_builder_takes_pixels_through_its_normalization_layer(name):
    model = small_model(name)
    assert model.inputs[0].name == models.INPUT_NAME
    assert model.layers[1].name == models.INPUT_NORMALIZATION_NAME
    assert models.input_normalization(model) == models.normalization_for(name)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)


@pytest.mark.parametrize("mode", models.NORMALIZATIONS)
def test_saved_and_cloned_models_keep_the_normalization_layer(tmp_path, mode):
    model = models.add_preprocessing(padded_conv_net(), mode)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    clone = keras.models.clone_model(loaded)
    clone.set_weights(loaded.get_weights())
    images, _ = batch()
    expected = model.predict(images, verbose=0)
    for copy in (loaded, clone):
        assert models.input_normalization(copy) == mode
        np.testing.assert_allclose(copy.predict(images, verbose=0), expected,
                                   rtol=1e-6, atol=1e-6)


def test_imagenet_weights_of_a_caffe_base_get_the_swap_folded(monkeypatch):
    """The BGR-trained stem must give Keras' caffe result on RGB pixels."""
    reference = padded_conv_net(name="bgr_trained")
    trained = reference.get_weights()

    def trunk(inputs, *, weights=None):
        x = keras.layers.ZeroPadding2D(3)(inputs)
        x = keras.layers.Conv2D(8, 7, strides=2, name="stem")(x)
        x = keras.layers.Conv2D(4, 3, name="second")(x)
        model = keras.Model(keras.utils.get_source_inputs(inputs), x)
        if weights == "imagenet":  # as a download of BGR-trained weights
            model.set_weights(trained)
        return model

    monkeypatch.setitem(models.MODELS, "caffe_net",
                        models.ModelSpec(trunk, "caffe", False))
    base = models.build_base("caffe_net", image_size=SIZE,
                             weights="imagenet")
    images, _ = batch()
    features = base.predict(images, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(
        features,
        reference.predict(preprocessed(images, "caffe"), verbose=0),
        rtol=1e-4, atol=1e-4)


def test_weights_saved_before_in_model_normalization_still_load(tmp_path):
    """Old bases had no normalisation layer; it has no weights to load."""
    trunk = keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3), alpha=0.25, include_top=False,
        weights=None)
    old = models.add_head(trunk, NUM_CLASSES, name="mobilenet_v1")
    old.get_layer("head").kernel.assign(
        np.full(old.get_layer("head").kernel.shape, 0.5, "float32"))
    old.save_weights(tmp_path / "old.weights.h5")
    new = small_model("mobilenet_v1", weights=str(tmp_path / "old.weights.h5"))
    images, _ = batch()
    np.testing.assert_allclose(
        new.predict(images, verbose=0),
        old.predict(preprocessed(images, "tf"), verbose=0), atol=1e-5)


@pytest.mark.slow
def test_base_pretrained_briefly_on_digits_scores_in_inference_mode():
    from km_tf import data

    name = "mobilenet_v2"
    digits = data.load("digits:0-4", image_size=SIZE, batch_size=32)
    base = models.build_model(name, digits.num_classes, image_size=SIZE,
                              alpha=0.35)
    base.compile(keras.optimizers.Adam(3e-3),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"], jit_compile=False)
    base.fit(digits.train, epochs=5, verbose=0)  # ~100 steps
    # Needs BatchNorm moving statistics that have left their initial values
    # (Keras' momentum of 0.999 leaves them near 0/1 and scores ~chance).
    assert base.evaluate(digits.test, verbose=0)[1] > 0.85


def test_input_size_is_the_model_input_and_names_a_contradiction():
    model = small_model("mobilenet_v2")
    assert models.input_size(model) == (SIZE, SIZE)
    assert models.input_size(model, expected=SIZE) == (SIZE, SIZE)
    with pytest.raises(ValueError, match=rf"--image_size=64 .*{SIZE}x{SIZE}"):
        models.input_size(model, expected=64, what="--image_size")
