"""Few-shot meta-learning: episodes, the KM-MAML learner and its gradients.

Tiny networks (8 px, a few filters) and synthetic pools keep every test fast;
the gradient checks run in float64.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import km_tf
from km_tf import meta, models
from km_tf.training import modulator_variables
from km_tf.layers import KM_LAYERS
from km_tf.meta import loop
from km_tf.walk import walk_layers

IMAGE_SIZE = 8
WAYS, SHOTS, QUERIES = 3, 2, 2


def tiny_base(num_classes=5, *, dtype="float32", activation="relu"):
    """A four-layer ConvNet with every layer kind KM touches, taking pixels
    in [0, 255] like every km_tf base; no dropout (deterministic passes)."""
    layers = keras.layers
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=dtype,
                         name=models.INPUT_NAME)
    x = layers.Rescaling(1 / 127.5, offset=-1.0, dtype=dtype,
                         name=models.INPUT_NORMALIZATION_NAME)(inputs)
    x = layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False,
                      dtype=dtype, name="stem")(x)
    x = layers.BatchNormalization(dtype=dtype, name="stem_bn")(x)
    x = layers.Activation(activation, dtype=dtype)(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                               dtype=dtype, name="dw")(x)
    x = layers.BatchNormalization(dtype=dtype, name="dw_bn")(x)
    x = layers.Activation(activation, dtype=dtype)(x)
    x = layers.Conv2D(6, 1, activation=activation, dtype=dtype,
                      name="project")(x)
    x = layers.GlobalAveragePooling2D(dtype=dtype)(x)
    outputs = layers.Dense(num_classes, dtype=dtype, name=models.HEAD_NAME)(x)
    return keras.Model(inputs, outputs, name="tiny_base")


def image_pool(num_classes=10, per_class=6, seed=0):
    """uint8 images whose channel 0 is the class id and channel 1 the image's
    index in the pool, so a sampled image tells where it came from."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.integers(0, 256, (len(labels), IMAGE_SIZE, IMAGE_SIZE, 3),
                          dtype=np.uint8)
    images[..., 0] = labels[:, None, None]
    images[..., 1] = np.arange(len(labels))[:, None, None]
    return images, labels


SPLITS = meta.ClassSplits(train=(0, 1, 2, 3, 4), validation=(5, 6),
                          test=(7, 8, 9))


def sampler(split="train", seed=0, **counts):
    images, labels = image_pool()
    counts = {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, **counts}
    return meta.EpisodeSampler(images, labels, getattr(SPLITS, split),
                               seed=seed, **counts)


def episode_batch(count=2, seed=0):
    return next(iter(sampler(seed=seed).dataset(meta_batch_size=count)))


def options(**changes):
    return meta.MetaOptions(**{"inner_steps": 1, "inner_learning_rate": 0.1,
                               **changes})


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def randomize_modulators(model, scale=0.3, seed=1):
    """Gives every modulator a non-identity output layer, as meta-training
    would (at the identity, the hidden layer gets no gradient)."""
    rng = np.random.default_rng(seed)
    for _, layer in walk_layers(model):
        if isinstance(layer, KM_LAYERS):
            for weight in (layer.modulator.output_kernel,
                           layer.modulator.output_bias):
                weight.assign(scale * rng.standard_normal(weight.shape))


# -- Episodes -------------------------------------------------------------


def test_split_classes_is_disjoint_complete_and_deterministic():
    splits = meta.split_classes(range(20), seed=3)
    assert (len(splits.train), len(splits.validation),
            len(splits.test)) == (13, 3, 4)
    parts = [set(splits.train), set(splits.validation), set(splits.test)]
    assert set.union(*parts) == set(range(20))
    assert sum(map(len, parts)) == 20
    assert meta.split_classes(range(20), seed=3) == splits
    assert meta.split_classes(range(20), seed=4) != splits


def test_class_splits_refuse_overlap_and_repeats():
    with pytest.raises(ValueError, match="both the train and the test"):
        meta.ClassSplits(train=(0, 1), validation=(2,), test=(1,))
    with pytest.raises(ValueError, match="twice in the validation"):
        meta.ClassSplits(train=(0,), validation=(2, 2), test=())
    with pytest.raises(ValueError, match="more than once"):
        meta.split_classes([0, 1, 1, 2], seed=0)


def test_episodes_are_exact_n_way_k_shot_from_their_split_only():
    train, test = sampler("train"), sampler("test")
    for source, split in ((train, SPLITS.train), (test, SPLITS.test)):
        for episode in source.episodes(20):
            images = (episode.support_images, episode.query_images)
            labels = (episode.support_labels, episode.query_labels)
            for part, per_class in zip(images, (SHOTS, QUERIES)):
                assert part.shape == (WAYS * per_class, IMAGE_SIZE,
                                      IMAGE_SIZE, 3)
                assert part.dtype == np.float32
                assert part.min() >= 0 and part.max() <= 255
            for part, per_class in zip(labels, (SHOTS, QUERIES)):
                assert part.dtype == np.int32
                np.testing.assert_array_equal(
                    np.bincount(part, minlength=WAYS), [per_class] * WAYS)
            classes = [part[:, 0, 0, 0].astype(int) for part in images]
            assert set(np.concatenate(classes)) <= set(split)
            # One class per label, the same in support and query.
            for label in range(WAYS):
                owners = {c for part_classes, part_labels in
                          zip(classes, labels)
                          for c in part_classes[part_labels == label]}
                assert len(owners) == 1
            # Every image of an episode is a different pool image.
            indices = np.concatenate([part[:, 0, 0, 1] for part in images])
            assert len(set(indices)) == len(indices)
    assert not set(SPLITS.train) & set(SPLITS.test)


def test_episodes_are_deterministic_from_the_seed():
    first = list(sampler(seed=5).episodes(3))
    again = list(sampler(seed=5).episodes(3))
    other = list(sampler(seed=6).episodes(3))
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a.support_images, b.support_images)
               for a, b in zip(first, other))
    # Episode i depends on (seed, i) only: a run can resume anywhere.
    resumed = next(sampler(seed=5).episodes(1, start=2))
    np.testing.assert_array_equal(resumed.query_images, first[2].query_images)


def test_dataset_yields_meta_batches_of_the_same_episodes():
    source = sampler(seed=2)
    dataset = source.dataset(meta_batch_size=2, count=5)
    batches = list(dataset)
    assert len(batches) == 2  # The incomplete last batch is dropped.
    assert dataset.element_spec == source.element_spec(2)
    episodes = list(source.episodes(4))
    for b, batch in enumerate(batches):
        assert isinstance(batch, meta.Episode)
        assert batch.support_images.shape == (2, WAYS * SHOTS, IMAGE_SIZE,
                                              IMAGE_SIZE, 3)
        assert batch.query_labels.shape == (2, WAYS * QUERIES)
        for i in range(2):
            for got, want in zip(batch, episodes[2 * b + i]):
                np.testing.assert_array_equal(numpy(got[i]), want)


def test_sampler_refuses_small_splits_and_classes_with_the_fix():
    images, labels = image_pool()
    with pytest.raises(ValueError, match="needs 4 classes, but the split "
                                         "has 3. Lower `ways`"):
        meta.EpisodeSampler(images, labels, SPLITS.test, ways=4, shots=1,
                            queries=1)
    few = labels != 8
    few[np.flatnonzero(labels == 8)[:3]] = True  # Class 8 keeps 3 images.
    with pytest.raises(ValueError, match=r"classes 8 \(3\) have fewer.*"
                                         "Lower `shots` or `queries`"):
        meta.EpisodeSampler(images[few], labels[few], SPLITS.test, ways=3,
                            shots=2, queries=2)
    with pytest.raises(ValueError, match="uint8"):
        meta.EpisodeSampler(images.astype(np.float32), labels, SPLITS.test,
                            ways=3, shots=1, queries=1)


# -- The learner ----------------------------------------------------------


def test_run_model_computes_and_updates_what_the_model_does():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4)
    model = learner.model
    randomize_modulators(model)
    x = sampler().episode(0).query_images
    values = {id(v): tf.convert_to_tensor(v) for v in learner.parameters}
    for training in (False, True):
        outputs, updates = meta.run_model(model, values, x,
                                          training=training)
        statistics = {v.path: numpy(v).copy() for v in model.variables
                      if id(v) in updates}
        np.testing.assert_allclose(numpy(outputs),
                                   numpy(model(x, training=training)),
                                   rtol=1e-5, atol=1e-5)
        # The same moving statistics as the layers assign (unchanged by
        # run_model itself).
        assert {v.path for v in model.variables if id(v) in updates} == (
            {v.path for v in model.variables if "moving_" in v.path}
            if training else set())
        for variable in model.variables:
            if id(variable) in updates:
                assert not np.array_equal(statistics[variable.path],
                                          numpy(variable))
                np.testing.assert_allclose(numpy(updates[id(variable)]),
                                           numpy(variable), rtol=1e-5,
                                           atol=1e-6, err_msg=variable.path)


def test_run_model_enters_nested_sequential_models():
    layers = keras.layers
    trunk = keras.Sequential([
        keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
        layers.Conv2D(4, 3, padding="same", name="conv"),
        layers.BatchNormalization(name="bn"), layers.ReLU()], name="trunk")
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    outputs = layers.Dense(WAYS, name="head")(
        layers.GlobalAveragePooling2D()(trunk(inputs)))
    model = km_tf.modulate(keras.Model(inputs, outputs))
    randomize_modulators(model)
    x = sampler().episode(0).query_images
    kernel = model.get_layer("trunk").get_layer("conv").base_kernel
    value = tf.convert_to_tensor(kernel)
    with tf.GradientTape() as tape:
        tape.watch(value)
        outputs, updates = meta.run_model(model, {id(kernel): value}, x,
                                          training=True)
        loss = tf.reduce_sum(outputs ** 2)
    # Entered: the nested KM layer is differentiable in its base kernel.
    assert tape.gradient(loss, value) is not None
    assert len(updates) == 2  # The nested BatchNorm's moving statistics.
    np.testing.assert_allclose(numpy(outputs),
                               numpy(model(x, training=True)),
                               rtol=1e-5, atol=1e-5)


def batchnorm_input_moments(model, images):
    """`{id(moving statistic): value}`: the mean and variance of every
    BatchNorm layer's input in a training-mode pass of the Keras model
    itself, computed in NumPy."""
    moments = {}
    for _, layer in walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            trunk = keras.Model(model.inputs, layer.input)
            x = numpy(trunk(images, training=True)).astype(np.float64)
            moments[id(layer.moving_mean)] = x.mean(axis=(0, 1, 2))
            moments[id(layer.moving_variance)] = x.var(axis=(0, 1, 2))
    return moments


def test_run_model_with_momentum_zero_returns_the_batch_moments():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4)
    randomize_modulators(learner.model)
    x = sampler().episode(0).query_images
    _, updates = meta.run_model(learner.model, {}, x, training=True,
                                momentum=0.0)
    expected = batchnorm_input_moments(learner.model, x)
    assert set(updates) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(numpy(updates[key]), value, rtol=1e-4,
                                   atol=1e-5)
    # Keras' renormalizing BatchNorm keeps its own momentum: refused.
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    outputs = keras.layers.BatchNormalization(renorm=True)(
        keras.layers.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="renorm.*leave `momentum`"):
        meta.run_model(keras.Model(inputs, outputs), {}, x, training=True,
                       momentum=0.0)


def test_support_statistics_are_the_support_sets_moments_when_adapted():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options())
    randomize_modulators(learner.model)
    episode = sampler("test").episode(0)
    adapted = learner.adapt(learner.parameter_values(),
                            episode.support_images, episode.support_labels,
                            steps=2)
    before = [numpy(v).copy() for v in learner.model.variables]
    statistics = learner.support_statistics(adapted, episode.support_images)
    for variable, old in zip(learner.model.variables, before):
        np.testing.assert_array_equal(numpy(variable), old)
    # The moments of the adapted network (its weights assigned to the Keras
    # model) on the support set, for every BatchNorm layer.
    for variable, value in zip(learner.parameters, adapted):
        variable.assign(value)
    expected = batchnorm_input_moments(learner.model, episode.support_images)
    assert set(statistics) == set(expected) and len(expected) == 4
    for key, value in expected.items():
        np.testing.assert_allclose(numpy(statistics[key]), value,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapt_head, adapt_batchnorm",
                         [(True, False), (True, True), (False, False)])
def test_an_inner_step_changes_only_modulators_and_head(adapt_head,
                                                       adapt_batchnorm):
    """... and BatchNorm's gamma and beta with adapt_batchnorm; only the
    modulators by default (adapt_head=False)."""
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           adapt_head=adapt_head,
                           adapt_batchnorm=adapt_batchnorm)
    randomize_modulators(learner.model)
    model_before = [numpy(v).copy() for v in learner.model.variables]
    episode = sampler().episode(0)
    values = learner.parameter_values()
    adapted = learner.adapt(values, episode.support_images,
                            episode.support_labels, steps=1)
    inner = {id(v) for v in learner.inner_variables}
    adapts = set()
    for variable, old, new in zip(learner.parameters, values, adapted):
        if not np.array_equal(numpy(old), numpy(new)):
            adapts.add(variable.path)
        assert (variable.path in adapts) == (id(variable) in inner), (
            variable.path)
    expected = {v.path for v in learner.model.variables
                if "/modulator/" in v.path
                or (adapt_head and v.path.startswith("head/"))
                or (adapt_batchnorm and v.path.endswith(("/gamma", "/beta")))}
    assert adapts == expected
    assert any(path.endswith("/gamma") for path in adapts) == (
        adapt_batchnorm)
    # Adapting is a pure function: no variable of the model moved.
    for variable, old in zip(learner.model.variables, model_before):
        np.testing.assert_array_equal(numpy(variable), old)


def test_modulators_step_at_their_own_inner_rate():
    """One inner step at rate r moves a weight by r * gradient: with the
    head adapting, the modulators' step at the default rate (0.1x the
    head's) is 0.1x the one at the head's rate; the head's is the same."""
    episode = sampler().episode(0)
    steps = {}
    for rate in (0.01, None):
        keras.utils.set_random_seed(0)
        learner = meta.km_maml(tiny_base(), WAYS, adapt_head=True,
                               last_filter_units=None,
                               hidden_units=4, options=meta.MetaOptions(
                                   inner_learning_rate=0.01,
                                   modulator_learning_rate=rate))
        randomize_modulators(learner.model)
        values = learner.parameter_values()
        adapted = learner.adapt(values, episode.support_images,
                                episode.support_labels, steps=1)
        inner = {id(v) for v in learner.inner_variables}
        steps[rate] = {v.path: numpy(new) - numpy(old) for v, old, new
                       in zip(learner.parameters, values, adapted)
                       if id(v) in inner}
    assert {"/modulator/" in path for path in steps[0.01]} == {True, False}
    for path, step in steps[0.01].items():
        factor = 0.1 if "/modulator/" in path else 1.0
        # Steps of ~1e-5 on weights of ~0.3: float32 round-off is ~3e-8.
        np.testing.assert_allclose(steps[None][path], factor * step,
                                   rtol=1e-3, atol=1e-7, err_msg=path)
        assert np.abs(step).max() > 1e-6, path  # Each moved, measurably.
    with pytest.raises(ValueError, match="modulator_learning_rate"):
        meta.MetaOptions(modulator_learning_rate=0.0)


def test_body_only_tasks_step_the_last_filter_modulator_at_its_rate():
    """The default, adapt_head=False: tasks adapt the modulators alone and
    the head is meta-trained; last_filter_units puts a filter-form
    modulator on the last convolution. Rates left None are the inner rate
    for the modulators and 10x it for that last one."""
    episode = sampler().episode(0)
    steps, learners = {}, {}
    for rate, last_rate in ((0.02, 0.05), (None, None)):
        keras.utils.set_random_seed(0)
        learner = meta.km_maml(
            tiny_base(), WAYS, hidden_units=4, last_filter_units=3,
            options=meta.MetaOptions(
                inner_learning_rate=0.01, modulator_learning_rate=rate,
                last_modulator_learning_rate=last_rate))
        randomize_modulators(learner.model)
        values = learner.parameter_values()
        adapted = learner.adapt(values, episode.support_images,
                                episode.support_labels, steps=1)
        steps[rate] = {v.path: numpy(new) - numpy(old) for v, old, new
                       in zip(learner.parameters, values, adapted)}
        learners[rate] = learner
    assert (learners[None].options.modulator_learning_rate,
            learners[None].options.last_modulator_learning_rate) == (
                0.01, pytest.approx(0.1))
    learner = learners[0.02]
    project = learner.model.get_layer("project")
    assert (project.form, project.filter_units) == ("filter", 3)
    assert learner.model.get_layer("stem").form == "hybrid"
    head = {id(v) for v in meta.head_variables(learner.model)}
    assert head and not head & {id(v) for v in learner.inner_variables}
    assert head <= {id(v) for v in learner.outer_variables}
    moved = {path for path, step in steps[0.02].items() if np.any(step)}
    assert moved == {v.path for v in learner.inner_variables}
    assert all("/modulator/" in path for path in moved)
    for path in moved:
        factor = 0.5 if path.startswith("project/") else 2.0
        np.testing.assert_allclose(steps[0.02][path],
                                   factor * steps[None][path],
                                   rtol=1e-3, atol=1e-7, err_msg=path)
    before = [numpy(v).copy() for v in meta.head_variables(learner.model)]
    learner.meta_train_step(episode_batch())
    assert all(not np.array_equal(numpy(v), old) for v, old in
               zip(meta.head_variables(learner.model), before))
    with pytest.raises(ValueError, match="last_modulator_learning_rate"):
        meta.MetaOptions(last_modulator_learning_rate=-1.0)
    with pytest.raises(ValueError, match="pass adapt_head=True"):
        meta.km_maml(tiny_base(), WAYS,
                     options=meta.MetaOptions(zero_head=True))


def test_a_base_ending_in_a_depthwise_convolution_needs_no_filter_form():
    """The filter-form override and the last modulator's rate both go to
    the last modulated convolution; a DepthwiseConv2D there has no whole
    filters to modulate, so the default is refused with the fix."""
    layers = keras.layers
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name=models.INPUT_NAME)
    x = layers.Conv2D(4, 3, name="stem")(inputs)
    x = layers.DepthwiseConv2D(3, name="last_dw")(x)
    x = layers.GlobalAveragePooling2D()(x)
    base = keras.Model(inputs, layers.Dense(3, name=models.HEAD_NAME)(x),
                       name="depthwise_last")
    with pytest.raises(ValueError, match=(
            "DepthwiseConv2D 'last_dw'.*pass last_filter_units=None")):
        meta.km_maml(base, WAYS)
    learner = meta.km_maml(base, WAYS, last_filter_units=None)
    assert learner.model.get_layer("stem").form == "hybrid"


def test_an_outer_step_meta_trains_base_kernels_and_modulator_init():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options())
    before = {v.path: numpy(v).copy() for v in learner.model.variables}
    result = learner.meta_train_step(episode_batch())
    assert np.isfinite(float(result["loss"]))
    moved = {v.path for v in learner.model.variables
             if not np.array_equal(numpy(v), before[v.path])}
    km_layers = [layer for _, layer in walk_layers(learner.model)
                 if isinstance(layer, KM_LAYERS)]
    base_weights = {w.path for layer in km_layers
                    for w in [layer.base_kernel] + ([layer.bias]
                                                    if layer.use_bias else [])}
    assert base_weights and not any(
        w.trainable for layer in km_layers for w in [layer.base_kernel])
    assert base_weights <= moved  # Frozen for Keras, meta-trained here.
    modulators = {w.path for layer in km_layers
                  for w in layer.modulator.weights}
    assert modulators <= moved
    statistics = {v.path for v in learner.model.variables
                  if "moving_" in v.path}
    # Everything else meta-trains; moving statistics follow the batches.
    assert moved == {v.path for v in learner.parameters} | statistics
    assert int(learner.optimizer.iterations) == 1


def test_meta_train_step_runs_the_same_in_a_tf_function():
    learners = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        learners.append(meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                                     options=options()))
    eager, graph = learners
    batch = episode_batch(count=1)
    eager.meta_train_step(batch)
    tf.function(graph.meta_train_step)(batch)
    for a, b in zip(eager.model.variables, graph.model.variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-4, atol=1e-5,
                                   err_msg=a.path)


def _float64_learner(first_order, **changes):
    keras.utils.set_random_seed(3)
    # The new head follows the global policy (the fixture resets it).
    keras.mixed_precision.set_global_policy("float64")
    learner = meta.km_maml(
        tiny_base(dtype="float64", activation="tanh"), WAYS, hidden_units=3,
        options=options(inner_steps=2, inner_learning_rate=0.5,
                        first_order=first_order, **changes))
    randomize_modulators(learner.model)
    return learner


def test_second_order_meta_gradients_match_finite_differences():
    """Central differences of the meta-objective along random directions
    (all weights; base kernels only) in float64: the second-order gradient
    agrees to ~1e-10, the first-order one (and one through TensorFlow's own
    BatchNorm moments, off by ~1e-3) would not."""
    learner = _float64_learner(first_order=False)
    fomaml = meta.MetaLearner(
        learner.model, inner_variables=learner.inner_variables,
        outer_variables=learner.outer_variables,
        options=dataclasses.replace(learner.options, first_order=True))
    assert learner.outer_variables == learner.parameters
    batch = episode_batch(count=1)
    values = [tf.cast(v, tf.float64) for v in learner.parameter_values()]
    kernels = {id(layer.base_kernel) for _, layer in
               walk_layers(learner.model) if isinstance(layer, KM_LAYERS)}
    rng = np.random.default_rng(0)
    directions = {
        "all": [rng.standard_normal(v.shape) for v in values],
        "base kernels": [rng.standard_normal(v.shape)
                         if id(p) in kernels else np.zeros(v.shape)
                         for p, v in zip(learner.parameters, values)]}

    def objective(shift):
        return float(learner.meta_gradients(
            [v + s for v, s in zip(values, shift)], batch).loss)

    second = learner.meta_gradients(values, batch).gradients
    first = fomaml.meta_gradients(values, batch).gradients
    epsilon = 1e-6
    for name, direction in directions.items():
        numeric = (objective([epsilon * d for d in direction])
                   - objective([-epsilon * d for d in direction])) / (
                       2 * epsilon)
        exact = sum(float(np.sum(numpy(g) * d))
                    for g, d in zip(second, direction))
        approx = sum(float(np.sum(numpy(g) * d))
                     for g, d in zip(first, direction))
        error = abs(exact - numeric)
        assert error <= 1e-8 * max(1.0, abs(numeric)), (name, exact, numeric)
        assert abs(approx - numeric) > 1e-3 * max(1.0, abs(numeric)), (
            name, approx, numeric)


def test_learned_inner_rates_start_fixed_and_get_exact_meta_gradients():
    """With learn_inner_rates, the rates are one outer variable that starts
    at the fixed rates (so the first adaptation is the fixed-rate one), its
    meta-gradient matches central differences in float64, and an outer
    step moves every rate."""
    learner = _float64_learner(first_order=False, learn_inner_rates=True)
    fixed = _float64_learner(first_order=False)
    modulators = {id(v) for v in modulator_variables(learner.model)}
    assert learner.outer_variables[-1] is learner.parameters[-1] is (
        learner.inner_rates)
    # km_maml's default rates: the modulators at the inner rate, the
    # filter-form last one ("project") at 10x.
    assert modulators == {id(v) for v in learner.inner_variables}
    assert learner.inner_step_sizes() == pytest.approx(
        [5.0 if v.path.startswith("project/") else 0.5
         for v in learner.inner_variables])
    assert learner.inner_step_sizes() == pytest.approx(
        fixed.inner_step_sizes())
    episode = sampler().episode(0)
    ours = learner.adapt(learner.parameter_values(), episode.support_images,
                         episode.support_labels, steps=2)
    theirs = fixed.adapt(fixed.parameter_values(), episode.support_images,
                         episode.support_labels, steps=2)
    for mine, other in zip(ours[:-1], theirs):
        np.testing.assert_allclose(numpy(mine), numpy(other), rtol=1e-6,
                                   atol=1e-9)

    batch = episode_batch(count=1)
    values = [tf.cast(v, tf.float64) for v in learner.parameter_values()]
    direction = np.random.default_rng(1).standard_normal(values[-1].shape)

    def objective(shift):
        return float(learner.meta_gradients(
            values[:-1] + [values[-1] + shift * direction], batch).loss)

    gradient = numpy(learner.meta_gradients(values, batch).gradients[-1])
    epsilon = 1e-6
    numeric = (objective(epsilon) - objective(-epsilon)) / (2 * epsilon)
    exact = float(np.sum(gradient * direction))
    assert abs(exact - numeric) <= 1e-8 * max(1.0, abs(numeric)), (
        exact, numeric)
    assert np.all(gradient != 0)

    before = numpy(learner.inner_rates).copy()
    learner.meta_train_step(batch)
    assert np.all(numpy(learner.inner_rates) != before)


def test_learned_inner_rates_are_checkpointed_and_refused_where_unusable(
        tmp_path):
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options(learn_inner_rates=True))
    stage = loop.meta_stage(learner, sampler(), meta_batch_size=1)
    assert stage.variables["rates"] == [learner.inner_rates]
    checkpoint = loop.Checkpoint(tmp_path / "checkpoint.npz",
                                      stage.variables)
    checkpoint.save({"step": 1})
    saved = numpy(learner.inner_rates).copy()
    learner.inner_rates.assign(np.zeros_like(saved))
    assert checkpoint.restore() == {"step": 1}
    np.testing.assert_array_equal(numpy(learner.inner_rates), saved)
    with pytest.raises(ValueError, match="drop --first_order|"
                       "first_order=False"):
        options(learn_inner_rates=True, first_order=True)
    with pytest.raises(ValueError, match="learn_inner_rates=False"):
        meta.finetune(tiny_base(), WAYS, options=options(
            learn_inner_rates=True))


def test_a_cosine_outer_schedule_anneals_to_zero_and_resumes(tmp_path):
    """outer_optimizer("cosine") starts at the rate, is half of it half-way
    and zero at the end, and a checkpointed run goes on where it was."""
    def rate(optimizer):
        return float(numpy(optimizer.learning_rate))

    def stage_of(optimizer):
        learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                               options=options(), optimizer=optimizer)
        return loop.meta_stage(learner, sampler(), meta_batch_size=1)

    optimizer = loop.outer_optimizer(0.01, steps=4, schedule="cosine")
    stage = stage_of(optimizer)
    assert rate(optimizer) == pytest.approx(0.01)
    rates = []
    for _ in range(4):
        stage.step(episode_batch(count=1))
        rates.append(rate(optimizer))
    assert rates == pytest.approx([0.01 * (1 + np.cos(np.pi * s / 4)) / 2
                                   for s in range(1, 5)], abs=1e-9)
    assert rates[1] == pytest.approx(0.005) and rates[-1] == pytest.approx(
        0.0, abs=1e-9)
    checkpoint = loop.Checkpoint(tmp_path / "checkpoint.npz",
                                 stage.variables)
    checkpoint.save({"step": 2})
    fresh = loop.outer_optimizer(0.01, steps=4, schedule="cosine")
    resumed = loop.Checkpoint(tmp_path / "checkpoint.npz",
                              stage_of(fresh).variables)
    assert rate(fresh) == pytest.approx(0.01)
    resumed.restore()
    assert rate(fresh) == pytest.approx(0.0, abs=1e-9)
    assert rate(loop.outer_optimizer(0.01, steps=4)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="choose one of constant, cosine"):
        loop.outer_optimizer(0.01, steps=4, schedule="linear")


def test_first_order_gradients_are_query_gradients_at_adapted_weights():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options(inner_steps=2, first_order=True))
    randomize_modulators(learner.model)
    batch = episode_batch(count=2)
    values = learner.parameter_values()
    result = learner.meta_gradients(values, batch)
    expected = [np.zeros(v.shape) for v in learner.outer_variables]
    for index in range(2):
        episode = meta.Episode(*(part[index] for part in batch))
        adapted = learner.adapt(values, episode.support_images,
                                episode.support_labels, steps=2)
        with tf.GradientTape() as tape:
            tape.watch(adapted)
            loss = meta.cross_entropy(episode.query_labels, learner.forward(
                adapted, episode.query_images, training=True))
        for i, gradient in enumerate(tape.gradient(loss, adapted)):
            expected[i] += numpy(gradient) / 2
    assert learner.outer_variables == learner.parameters
    for variable, got, want in zip(learner.outer_variables,
                                   result.gradients, expected):
        np.testing.assert_allclose(numpy(got), want, rtol=1e-4, atol=1e-6,
                                   err_msg=variable.path)


@pytest.mark.parametrize("adapt_head, adapt_batchnorm, last_filter_units",
                         [(True, False, None), (True, True, None),
                          (False, False, 3)])
def test_an_adapted_task_saves_and_restores_as_a_task_file(
        tmp_path, adapt_head, adapt_batchnorm, last_filter_units):
    base = tiny_base()
    learner = meta.km_maml(base, WAYS, hidden_units=4, options=options(),
                           adapt_head=adapt_head,
                           adapt_batchnorm=adapt_batchnorm,
                           last_filter_units=last_filter_units)
    learner.meta_train_step(episode_batch())
    meta_base = meta.meta_trained_base(learner)
    assert not any(isinstance(layer, KM_LAYERS)
                   for _, layer in walk_layers(meta_base))
    episode = sampler("test").episode(0)
    adapted = learner.adapt(learner.parameter_values(),
                            episode.support_images, episode.support_labels,
                            steps=2)
    path = tmp_path / "task.kmtask"
    header = meta.save_adapted_task(learner, adapted, meta_base, path)
    # The file holds the head even when tasks share it (a task file is a
    # whole task); the bytes a task adds count only what it adapts.
    assert {t["role"] for t in header.tensors} == {"modulated", "head"} | (
        {"batchnorm"} if adapt_batchnorm else set())
    storage = meta.task_storage(learner)
    assert storage.contents == " + ".join(
        ["modulators"] + ["batchnorm"] * adapt_batchnorm
        + ["head"] * adapt_head)
    meta_base.save(tmp_path / "base.keras")
    loaded = keras.saving.load_model(tmp_path / "base.keras")
    restored = km_tf.restore_task(loaded, path)
    x = episode.query_images
    np.testing.assert_allclose(
        numpy(restored(x, training=False)),
        numpy(learner.forward(adapted, x, training=False)),
        rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="meta-trained weights"):
        meta.save_adapted_task(learner, adapted,
                               models.replace_head(base, WAYS), path)


def test_a_task_with_support_statistics_restores_to_their_scores(tmp_path):
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options(eval_inner_steps=2))
    learner.meta_train_step(episode_batch())
    meta_base = meta.meta_trained_base(learner)
    episode = sampler("test").episode(0)
    adapted = learner.adapt(learner.parameter_values(),
                            episode.support_images, episode.support_labels)
    statistics = learner.support_statistics(adapted, episode.support_images)
    path = tmp_path / "task.kmtask"
    header = meta.save_adapted_task(learner, adapted, meta_base, path,
                                    statistics=statistics)
    assert {t["role"] for t in header.tensors} == {"modulated", "batchnorm",
                                                   "head"}
    meta_base.save(tmp_path / "base.keras")
    restored = km_tf.restore_task(
        keras.saving.load_model(tmp_path / "base.keras"), path)
    x = episode.query_images
    logits = numpy(restored(x, training=False))
    np.testing.assert_allclose(
        logits, numpy(learner.forward(adapted, x, training=False,
                                      statistics=statistics)),
        rtol=1e-5, atol=1e-5)
    # Not what the base's statistics give: the task carries its own.
    assert not np.allclose(logits, numpy(learner.forward(
        adapted, x, training=False)), atol=1e-3)
    # And `evaluate` scores what the restored task predicts.
    score = learner.evaluate([episode], statistics="support")
    assert score[0] == pytest.approx(np.mean(
        np.argmax(logits, -1) == episode.query_labels))


def test_evaluate_scores_under_each_statistics_and_refuses_others():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options())
    episodes = list(sampler("test").episodes(3))
    scores = learner.evaluate_with(episodes, steps=1)
    assert set(scores) == set(meta.STATISTICS)
    for name in meta.STATISTICS:
        np.testing.assert_array_equal(
            scores[name], learner.evaluate(episodes, steps=1,
                                           statistics=name))
    # The default is the options' mode: transductive for MAML-style ones.
    np.testing.assert_array_equal(learner.evaluate(episodes, steps=1),
                                  scores["query"])
    with pytest.raises(ValueError, match="Unknown BatchNorm statistics.*"
                                         "query, moving, support"):
        learner.evaluate(episodes, statistics="batch")


def test_evaluate_gives_an_accuracy_per_episode():
    learner = meta.km_maml(tiny_base(), WAYS, hidden_units=4,
                           options=options())
    before = [numpy(v).copy() for v in learner.model.variables]
    accuracies = learner.evaluate(sampler("test").episodes(3), steps=1)
    assert accuracies.shape == (3,)
    # Each is a count of right answers out of WAYS * QUERIES.
    counts = accuracies * WAYS * QUERIES
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-5)
    assert np.all((accuracies >= 0) & (accuracies <= 1))
    for variable, old in zip(learner.model.variables, before):
        np.testing.assert_array_equal(numpy(variable), old)


def test_mean_confidence_interval():
    mean, half_width = meta.mean_confidence_interval([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert half_width == pytest.approx(1.96 * np.std([0.5, 0.7], ddof=1)
                                       / np.sqrt(2))
    with pytest.raises(ValueError, match="at least 2 episodes"):
        meta.mean_confidence_interval([0.5])


def test_each_method_adapts_and_meta_trains_its_own_variables():
    base = tiny_base()
    head = lambda learner: [v for v in learner.model.trainable_variables
                            if v.path.startswith("head/")]
    anil = meta.anil(base, WAYS)
    assert anil.inner_variables == head(anil)
    assert anil.outer_variables == anil.model.trainable_variables
    maml = meta.maml(base, WAYS)
    assert maml.inner_variables == maml.model.trainable_variables
    assert maml.outer_variables == maml.model.trainable_variables
    finetune = meta.finetune(base, WAYS)
    assert finetune.inner_variables == head(finetune)
    assert finetune.outer_variables == []
    assert not finetune.options.batch_statistics
    with pytest.raises(ValueError, match="meta-trains nothing"):
        finetune.meta_train_step(episode_batch())
    everything = meta.finetune(base, WAYS, all_layers=True)
    assert everything.inner_variables == everything.model.trainable_variables
    km = meta.make_learner("km_maml", base, WAYS)
    assert all("/modulator/" in v.path or v.path.startswith("head/")
               for v in km.inner_variables)
    assert {v.path for v in km.outer_variables} == {
        v.path for v in km.model.variables if "moving_" not in v.path}
    with pytest.raises(ValueError, match="choose one of km_maml"):
        meta.make_learner("reptile", base, WAYS)
    with pytest.raises(ValueError, match="Only a km_maml learner"):
        meta.save_adapted_task(anil, anil.parameter_values(), base,
                               "never-written.kmtask")


@pytest.mark.parametrize("method", ["km_maml", "maml", "finetune"])
def test_zero_head_starts_every_task_from_a_zero_head(method):
    keras.utils.set_random_seed(3)
    learner = meta.make_learner(
        method, tiny_base(), WAYS, options=options(zero_head=True),
        **({"adapt_head": True} if method == "km_maml" else {}))
    head = [v for v in learner.model.trainable_variables
            if v.path.startswith("head/")]
    head_paths = {v.path for v in head}
    assert head and not head_paths & {v.path for v in
                                      learner.outer_variables}
    assert all(not np.any(numpy(v)) for v in head)  # What tasks start at.
    episode = sampler().episode(0)
    # No step: the task's head is zero, so every class scores the same.
    start = learner.adapt(learner.parameter_values(), episode.support_images,
                          episode.support_labels, steps=0)
    logits = numpy(learner.forward(start, episode.query_images))
    np.testing.assert_allclose(logits, 0.0, atol=1e-6)
    # One step from zero: the head is the rate times minus its gradient at
    # zero, whatever the variables' own head holds.
    one = learner.adapt(learner.parameter_values(), episode.support_images,
                        episode.support_labels, steps=1)
    for variable in head:
        variable.assign(numpy(variable) + 5.0)
    again = learner.adapt(learner.parameter_values(),
                          episode.support_images, episode.support_labels,
                          steps=1)
    for i, variable in enumerate(learner.parameters):
        if variable.path in head_paths:
            assert np.any(numpy(one[i]) != 0)
            np.testing.assert_allclose(numpy(one[i]), numpy(again[i]),
                                       atol=1e-6)
    if method == "finetune":
        return  # It meta-trains nothing.
    # Meta-training moves the body and leaves the unused head alone.
    before = {v.path: numpy(v).copy() for v in learner.model.variables}
    learner.meta_train_step(episode_batch())
    moved = {v.path for v in learner.model.variables
             if not np.array_equal(numpy(v), before[v.path])}
    assert moved and not moved & head_paths


def test_zero_head_needs_the_inner_loop_to_adapt_the_head():
    model = tiny_base()
    body = [v for v in model.trainable_variables
            if not v.path.startswith("head/")]
    with pytest.raises(ValueError, match="must adapt the whole head"):
        meta.MetaLearner(model, inner_variables=body, outer_variables=body,
                         options=options(zero_head=True))
