"""Tests for km_tf.training and km_tf.reporting."""

import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import km_tf
from km_tf import data, models, recipes, reporting, training
from km_tf.distribute import make_strategy
from support import small_convnet

SHAPE = (16, 16, 3)
NUM_CLASSES = 3


def array_datasets(n: int = 48, batch_size: int = 8, seed: int = 0,
                   shuffle: bool = True) -> data.ImageDatasets:
    """Learnable random images (the class sets the mean) as ImageDatasets."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = (rng.normal(0, 0.3, (n, *SHAPE))
              + labels[:, None, None, None] - 1).astype("float32")

    def split(part: slice, shuffle: bool) -> tf.data.Dataset:
        dataset = tf.data.Dataset.from_tensor_slices(
            (images[part], labels[part]))
        if shuffle:
            dataset = dataset.shuffle(n, seed=seed)
        return dataset.batch(batch_size)

    third = n // 3
    return data.ImageDatasets(
        train=split(slice(0, third), shuffle=shuffle),
        validation=split(slice(third, 2 * third), shuffle=False),
        test=split(slice(2 * third, n), shuffle=False),
        num_classes=NUM_CLASSES, class_names=("a", "b", "c"),
        image_size=SHAPE[:2],
        counts={"train": third, "validation": third, "test": n - 2 * third})


def fit_small(tmp_path, *, epochs=2, callbacks=(), build=None, **options):
    """One `fit_and_evaluate` stage of the small KM convnet."""
    base = small_convnet(SHAPE, NUM_CLASSES)
    return training.fit_and_evaluate(
        build or (lambda: km_tf.modulate(base, hidden_units=4)),
        array_datasets(), strategy=make_strategy("default"),
        optimizer=training.OptimizerOptions(learning_rate=1e-2),
        epochs=epochs, backup_dir=tmp_path / "backup", write_dir=tmp_path,
        stage="task", verbose=0, callbacks=callbacks, **options)


class EpochRecorder(keras.callbacks.Callback):
    """Records the (1-based) epochs that begin."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch + 1)


class KillMidEpoch(keras.callbacks.Callback):
    """Raises like a killed job after `batches` batches of `epoch`."""

    def __init__(self, epoch: int, batches: int):
        super().__init__()
        self.epoch, self.batches, self.current = epoch, batches, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch + 1 == self.batches:
            raise KeyboardInterrupt("killed")


def test_constant_schedule_without_warmup_is_a_plain_rate():
    options = training.OptimizerOptions(learning_rate=0.1,
                                        schedule="constant")
    assert training.learning_rate_schedule(options, 100) == 0.1


@pytest.mark.parametrize("schedule, end", [("cosine", 0.0),
                                           ("constant", 0.1)])
def test_schedule_warms_up_linearly_then_follows_its_shape(schedule, end):
    options = training.OptimizerOptions(learning_rate=0.1,
                                        schedule=schedule, warmup_steps=10)
    rate = training.learning_rate_schedule(options, 110)
    assert float(rate(0)) == pytest.approx(0.1 / 11)
    assert float(rate(5)) < float(rate(10)) == pytest.approx(0.1)
    assert float(rate(110)) == pytest.approx(end, abs=1e-7)


@pytest.mark.parametrize("name, kind", [("adam", keras.optimizers.Adam),
                                        ("sgd", keras.optimizers.SGD),
                                        ("adamw", keras.optimizers.AdamW)])
def test_make_optimizer_builds_the_named_optimizer(name, kind):
    optimizer = training.make_optimizer(
        training.OptimizerOptions(name=name), total_steps=10)
    assert type(optimizer) is kind


@pytest.mark.parametrize("options, message", [
    ({"name": "lamb"}, "adam, sgd, adamw"),
    ({"schedule": "step"}, "constant, cosine"),
    ({"learning_rate": 0.0}, "positive"),
])
def test_bad_optimizer_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        training.OptimizerOptions(**options)


def test_modulators_train_at_their_rate_factor(tmp_path):
    """One Adam step moves each weight by about the rate (m/sqrt(v) is
    +-1 at the first step), so with `modulator_rate_factor=0.1` the
    modulators' first step is 0.1x the one without, and the head's and
    BatchNorm's are the same."""
    base = small_convnet(SHAPE, NUM_CLASSES)
    initial = km_tf.modulate(base, hidden_units=4)
    for _, layer in km_tf.walk.walk_layers(initial):  # Non-zero gradients
        if isinstance(layer, km_tf.layers.KM_LAYERS):  # everywhere.
            layer.modulator.output_kernel.assign(0.1 * np.ones(
                layer.modulator.output_kernel.shape))
    weights = initial.get_weights()

    def first_step(factor):
        def build():
            model = km_tf.modulate(base, hidden_units=4)
            model.set_weights(weights)
            return model
        result = training.fit_and_evaluate(
            build, array_datasets(), strategy=make_strategy("default"),
            optimizer=training.OptimizerOptions(
                learning_rate=1e-2, schedule="constant",
                modulator_rate_factor=factor),
            epochs=1, steps_per_epoch=1, backup_dir=tmp_path / f"b{factor}",
            write_dir=tmp_path, stage="task", verbose=0)
        return {v.path: np.asarray(v) - before for v, before
                in zip(result.model.weights, weights)}

    plain, scaled = first_step(1.0), first_step(0.1)
    modulators = {v.path for v in training.modulator_variables(initial)}
    assert modulators and all("/modulator/" in p for p in modulators)
    for path, step in plain.items():
        if "moving_" in path or not np.any(step):
            continue  # Moving statistics follow the data, not the rate.
        factor = 0.1 if path in modulators else 1.0
        np.testing.assert_allclose(scaled[path], factor * step, rtol=1e-3,
                                   atol=1e-6, err_msg=path)
    assert all(np.any(plain[path]) for path in modulators)
    with pytest.raises(ValueError, match="modulator_rate_factor"):
        training.OptimizerOptions(modulator_rate_factor=0.0)


def test_fit_and_evaluate_trains_reports_and_checkpoints(tmp_path):
    result = fit_small(tmp_path, epochs=3)
    assert result.epochs == [1, 2, 3]
    assert set(result.accuracy) == {"validation", "test"}
    assert result.accuracy["test"] > 1 / NUM_CLASSES
    assert (tmp_path / "checkpoints" / "task.weights.h5").is_file()
    assert not (tmp_path / "backup").exists()  # Removed once fit completes.


def test_killed_run_resumes_without_repeating_finished_epochs(tmp_path):
    first = EpochRecorder()
    with pytest.raises(KeyboardInterrupt):
        fit_small(tmp_path, epochs=4, callbacks=[first, KillMidEpoch(2, 2)])
    assert first.epochs == [1, 2]
    assert (tmp_path / "backup").is_dir()

    second = EpochRecorder()
    result = fit_small(tmp_path, epochs=4, callbacks=[second])
    assert second.epochs == [2, 3, 4]  # Epoch 1 is not trained again.
    assert result.epochs == [2, 3, 4]
    assert not (tmp_path / "backup").exists()


def test_resumed_run_starts_from_the_backed_up_weights(tmp_path):
    models_built = []

    def build():
        model = km_tf.modulate(small_convnet(SHAPE, NUM_CLASSES),
                               hidden_units=4)
        models_built.append(model)
        return model

    with pytest.raises(KeyboardInterrupt):
        fit_small(tmp_path, epochs=3, build=build,
                  callbacks=[KillMidEpoch(2, 1)])
    backup = tmp_path / "backup" / "latest.weights.h5"
    saved = km_tf.modulate(small_convnet(SHAPE, NUM_CLASSES), hidden_units=4)
    saved.load_weights(backup)  # The state at the end of epoch 1.

    class CheckRestored(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0 and not hasattr(self, "checked"):
                self.checked = True
                for a, b in zip(self.model.get_weights(),
                                saved.get_weights()):
                    np.testing.assert_array_equal(a, b)

    fit_small(tmp_path, epochs=3, build=build, callbacks=[CheckRestored()])


@pytest.mark.parametrize("images, batchnorm, factor", [
    (1, "freeze", 0.03), (5, "freeze", 0.03), (15.5, "freeze", 0.03),
    (recipes.FEW_IMAGES_PER_CLASS, "train", 1.0), (40, "train", 1.0)])
def test_km_recipe_freezes_batchnorm_below_16_and_slows_modulators(
        images, batchnorm, factor):
    recipe = recipes.km_recipe(images)
    assert (recipe.batchnorm, recipe.modulator_rate_factor) == (batchnorm,
                                                                factor)
    assert recipe.reason.startswith(f"{images:g} training images per class")
    assert ("BatchNorm frozen" if batchnorm == "freeze"
            else "BatchNorm trained") in recipe.reason


@pytest.mark.parametrize("images", [0, -3, float("nan")])
def test_km_recipe_refuses_image_counts_that_are_not_positive(images):
    with pytest.raises(ValueError, match="images_per_class. must be positive"):
        recipes.km_recipe(images)


def test_training_images_per_class_is_the_smallest_class():
    assert recipes.training_images_per_class((40, 7, 40)) == 7
    with pytest.raises(ValueError, match="class_counts"):
        recipes.training_images_per_class(())


def test_resolve_recipe_follows_the_rule_unless_a_value_is_given():
    auto = recipes.resolve_recipe(images_per_class=5)
    assert (auto.batchnorm, auto.modulator_rate_factor) == ("freeze", 0.03)
    assert auto.reason.startswith("auto: 5 training images per class < 16")
    rate_given = recipes.resolve_recipe("auto", 0.5, images_per_class=5)
    assert (rate_given.batchnorm, rate_given.modulator_rate_factor) == (
        "freeze", 0.5)
    assert "0.5x the head's rate as given" in rate_given.reason
    # An explicit BatchNorm mode: no rule, one rate unless one is given.
    given = recipes.resolve_recipe("train", images_per_class=5)
    assert (given.batchnorm, given.modulator_rate_factor) == ("train", 1.0)
    both = recipes.resolve_recipe("freeze", 0.3)
    assert (both.batchnorm, both.modulator_rate_factor) == ("freeze", 0.3)
    assert "batchnorm='freeze' as given" in both.reason


@pytest.mark.parametrize("arguments, message", [
    ((), "needs the task's `images_per_class`"),
    (("bogus",), r"one of \('auto', 'train', 'freeze'\)"),
    (("train", 0.0), "modulator_rate_factor. must be positive"),
])
def test_resolve_recipe_names_what_is_wrong(arguments, message):
    with pytest.raises(ValueError, match=message):
        recipes.resolve_recipe(*arguments)


def test_modulate_says_where_auto_batchnorm_is_resolved():
    with pytest.raises(ValueError, match="km_recipe"):
        km_tf.modulate(small_convnet(SHAPE, NUM_CLASSES), batchnorm="auto")


def test_evaluate_accuracy_compiles_an_uncompiled_model():
    model = small_convnet(SHAPE, NUM_CLASSES)
    accuracy = training.evaluate_accuracy(model, array_datasets().test)
    assert 0.0 <= accuracy <= 1.0


def test_restore_task_gives_the_trained_outputs_of_a_new_head(tmp_path):
    base = small_convnet(SHAPE, NUM_CLASSES)
    task = models.build_task_model(base, NUM_CLASSES + 1, hidden_units=4)
    for variable in task.trainable_variables:
        variable.assign(np.random.default_rng(1).normal(
            0, 0.1, variable.shape).astype("float32"))
    path = str(tmp_path / "t.kmtask")
    km_tf.save_task(task, path)
    restored = km_tf.restore_task(base, path)
    assert restored.output_shape == (None, NUM_CLASSES + 1)
    images = np.random.default_rng(2).random((4, *SHAPE), np.float32)
    np.testing.assert_allclose(restored(images), task(images), atol=1e-5)


def test_write_report_writes_json_and_text(tmp_path):
    task = km_tf.task_report(km_tf.modulate(small_convnet(), hidden_units=4))
    stage = reporting.StageReport(
        stage="task", data="digits:5-9", train_images=10, epochs=[1, 2],
        accuracy={"test": 0.875}, seconds=1.5, output="x.kmtask", task=task)
    report = reporting.RunReport(settings={"mode": "task"}, stages=[stage],
                                 seconds=2.0)
    json_path, text_path = reporting.write_report(report, str(tmp_path))
    loaded = json.loads(open(json_path).read())
    assert loaded["stages"][0]["accuracy"] == {"test": 0.875}
    assert loaded["stages"][0]["task"]["task_bytes"] == task.task_bytes
    text = open(text_path).read()
    assert "test 87.5%" in text and "task / base" in text
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.txt"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_a_line_per_epoch_in_a_log():
    assert training.progress_verbosity("auto", _Terminal()) == 1
    assert training.progress_verbosity("auto", io.StringIO()) == 2
    assert training.progress_verbosity(0, _Terminal()) == 0
    assert training.progress_verbosity("1", io.StringIO()) == 1
