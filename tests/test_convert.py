"""modulate() / bake() on whole models."""

import keras
import numpy as np
import pytest

import km_tf
from km_tf.layers import KM_LAYERS
from km_tf.walk import walk_layers
from support import random_images, random_labels, small_convnet


def _numpy(x):
    return keras.ops.convert_to_numpy(x).astype("float32")


def _train(model, steps=3, seed=0):
    model.compile(keras.optimizers.Adam(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, labels = random_images(seed=seed), random_labels(seed=seed)
    model.fit(images, labels, epochs=steps, batch_size=8, verbose=0)


def test_modulated_model_equals_base_at_init():
    base = small_convnet()
    images = random_images()
    km = km_tf.modulate(base, hidden_units=8)
    np.testing.assert_array_equal(_numpy(km(images)), _numpy(base(images)))
    kinds = [type(layer) for _, layer in walk_layers(km)]
    assert kinds.count(km_tf.KernelModulatedConv2D) == 3
    assert kinds.count(km_tf.KernelModulatedDepthwiseConv2D) == 1


def test_only_task_variables_train_and_base_kernels_stay_bit_identical():
    base = small_convnet()
    km = km_tf.modulate(base, hidden_units=8)
    trainable = {v.path for v in km.trainable_variables}
    assert trainable == {
        *(f"{n}/modulator/{w}" for n in ("stem", "dw", "project", "dilated")
          for w in ("hidden_kernel", "hidden_bias", "output_kernel",
                    "output_bias")),
        "stem_bn/gamma", "stem_bn/beta", "dw_bn/gamma", "dw_bn/beta",
        "head/kernel", "head/bias"}
    frozen = {path: _numpy(layer.base_kernel).copy()
              for path, layer in walk_layers(km) if isinstance(layer, KM_LAYERS)}
    biases = {path: _numpy(layer.bias).copy() for path, layer in
              walk_layers(km) if isinstance(layer, KM_LAYERS) and layer.use_bias}
    _train(km, steps=1)
    for path, layer in walk_layers(km):
        if isinstance(layer, KM_LAYERS):
            np.testing.assert_array_equal(_numpy(layer.base_kernel),
                                          frozen[path])
            if layer.use_bias:
                np.testing.assert_array_equal(_numpy(layer.bias), biases[path])


def test_batchnorm_freeze_keeps_statistics_and_head_option_limits_training():
    base = small_convnet()
    km = km_tf.modulate(base, batchnorm="freeze", head=["head"])
    bn = km.get_layer("stem_bn")
    mean = _numpy(bn.moving_mean).copy()
    _train(km, steps=1)
    np.testing.assert_array_equal(_numpy(bn.moving_mean), mean)
    assert not any("bn" in v.path for v in km.trainable_variables)


def test_bake_matches_trained_km_model_and_uses_plain_layers():
    km = km_tf.modulate(small_convnet(), hidden_units=8)
    _train(km)
    images = random_images(seed=5)
    assert np.abs(_numpy(km(images)) - _numpy(small_convnet()(images))).max() > 0
    baked = km_tf.bake(km)
    np.testing.assert_allclose(_numpy(baked(images)), _numpy(km(images)),
                               rtol=1e-5, atol=1e-5)
    assert not any(isinstance(layer, KM_LAYERS)
                   for _, layer in walk_layers(baked))
    assert [layer.name for _, layer in walk_layers(baked)] == [
        layer.name for _, layer in walk_layers(km)]


def test_keras_file_round_trip_needs_no_custom_objects(tmp_path):
    km = km_tf.modulate(small_convnet(), hidden_units=8, form="filter")
    _train(km, steps=2)
    path = tmp_path / "km.keras"
    km.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = random_images(seed=3)
    np.testing.assert_allclose(_numpy(loaded(images)), _numpy(km(images)),
                               rtol=1e-6, atol=1e-6)
    assert {v.path for v in loaded.trainable_variables} == {
        v.path for v in km.trainable_variables}


def test_baked_model_config_names_no_km_class():
    km = km_tf.modulate(small_convnet())
    assert "km_tf>KernelModulatedConv2D" in str(km.get_config())
    assert "km_tf" not in str(km_tf.bake(km).get_config())


def test_mixed_precision_trains_and_bakes():
    keras.mixed_precision.set_global_policy("mixed_float16")
    base = small_convnet()
    km = km_tf.modulate(base, hidden_units=8)
    images = random_images()
    np.testing.assert_array_equal(_numpy(km(images)), _numpy(base(images)))
    _train(km, steps=2)
    assert km(images).dtype == "float16"
    np.testing.assert_allclose(_numpy(km_tf.bake(km)(images)),
                               _numpy(km(images)), rtol=1e-2, atol=1e-2)


def test_nested_sequential_model_is_entered():
    inner = small_convnet(name="backbone")
    outer = keras.Sequential([keras.Input((16, 16, 3)), inner,
                              keras.layers.Dense(2, name="task_head")])
    km = km_tf.modulate(outer, head=["task_head"])
    paths = [path for path, layer in walk_layers(km)
             if isinstance(layer, KM_LAYERS)]
    assert paths == ["backbone/stem", "backbone/dw", "backbone/project",
                     "backbone/dilated"]
    images = random_images()
    np.testing.assert_array_equal(_numpy(km(images)), _numpy(outer(images)))


def test_skip_leaves_a_layer_plain_and_frozen():
    km = km_tf.modulate(small_convnet(), skip=["project"])
    layer = km.get_layer("project")
    assert type(layer) is keras.layers.Conv2D and not layer.trainable


@pytest.mark.parametrize("layer,kind", [
    (keras.layers.SeparableConv2D(4, 3, name="sep"), "SeparableConv2D"),
    (keras.layers.Conv2DTranspose(4, 3, name="sep"), "Conv2DTranspose"),
])
def test_unsupported_layer_is_named_with_the_fix(layer, kind):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layer(keras.layers.Conv2D(3, 1)(inputs)))
    with pytest.raises(km_tf.UnsupportedLayerError,
                       match=f"'sep' is a {kind}.*skip=\\['sep'\\]"):
        km_tf.modulate(model)
    km = km_tf.modulate(model, skip=["sep"])
    assert type(km.get_layer("sep")) is type(layer)


def test_conv1d_is_rejected():
    inputs = keras.Input((8, 3))
    model = keras.Model(inputs, keras.layers.Conv1D(2, 3, name="c1")(inputs))
    with pytest.raises(km_tf.UnsupportedLayerError, match="'c1' is a Conv1D"):
        km_tf.modulate(model)


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(km_tf.UnsupportedLayerError, match="subclassed"):
        km_tf.modulate(net)


def test_already_modulated_model_is_rejected():
    km = km_tf.modulate(small_convnet())
    with pytest.raises(km_tf.UnsupportedLayerError, match="already"):
        km_tf.modulate(km)


def test_unknown_layer_names_are_reported():
    with pytest.raises(ValueError, match="'nope'"):
        km_tf.modulate(small_convnet(), skip=["nope"])


@pytest.mark.parametrize("application", ["MobileNetV2", "ResNet50"])
def test_modulate_keras_applications_and_train_one_step(application):
    base = getattr(keras.applications, application)(
        input_shape=(32, 32, 3), weights=None, classes=4)
    km = km_tf.modulate(base, hidden_units=4)
    convs = [layer for _, layer in walk_layers(base)
             if isinstance(layer, (keras.layers.Conv2D,
                                   keras.layers.DepthwiseConv2D))]
    modulated = [layer for _, layer in walk_layers(km)
                 if isinstance(layer, KM_LAYERS)]
    assert len(modulated) == len(convs) > 0
    images, labels = random_images(4, (32, 32, 3)), random_labels(4, 4)
    np.testing.assert_allclose(_numpy(km(images)), _numpy(base(images)),
                               atol=1e-6)
    km.compile("adam", "sparse_categorical_crossentropy")
    history = km.fit(images, labels, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_xla_compiled_training_matches_plain_training():
    """TPUs (and Keras' jit_compile on GPUs) run the train step through XLA;
    the modulator's hand-written gradient must compile and agree."""
    losses = {}
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = km_tf.modulate(small_convnet(), hidden_units=4)
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), jit_compile=jit_compile)
        history = model.fit(random_images(32), random_labels(32), epochs=3,
                            batch_size=8, shuffle=False, verbose=0)
        losses[jit_compile] = history.history["loss"]
    assert losses[True][-1] < losses[True][0]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
