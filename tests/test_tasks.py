"""Per-task files: round trip, every bad-file case, and the report."""

import hashlib
import json
import os
import zipfile

import keras
import numpy as np
import pytest

import km_tf
from km_tf import models
from support import (auto_named_convnet, random_images, random_labels,
                     small_convnet)


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def base():
    keras.utils.set_random_seed(0)
    return small_convnet()


@pytest.fixture(scope="module")
def trained_task(base, tmp_path_factory):
    """A KM model trained a few steps, and its saved task file."""
    km = km_tf.modulate(base, hidden_units=8)
    km.compile(keras.optimizers.Adam(0.05),
               keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    km.fit(random_images(), random_labels(), epochs=3, verbose=0)
    path = tmp_path_factory.mktemp("task") / "digits.kmtask"
    km_tf.save_task(km, path)
    return km, path


def _snapshot(model):
    return [np.array(_numpy(v)) for v in model.weights]


def _assert_unchanged(model, snapshot):
    for variable, before in zip(model.weights, snapshot):
        np.testing.assert_array_equal(_numpy(variable), before)


def _assert_refused_untouched(base, broken, match: str):
    """Loading `broken` into a fresh KM model fails and changes nothing."""
    fresh = km_tf.modulate(base, hidden_units=8)
    before = _snapshot(fresh)
    with pytest.raises(km_tf.TaskFileError, match=match):
        km_tf.load_task(fresh, broken)
    _assert_unchanged(fresh, before)


def test_round_trip_restores_the_task_outputs(base, trained_task):
    km, path = trained_task
    fresh = km_tf.modulate(base, **km_tf.read_task_options(path))
    images = random_images(seed=9)
    assert not np.allclose(_numpy(fresh(images)), _numpy(km(images)))
    km_tf.load_task(fresh, path)
    np.testing.assert_array_equal(_numpy(fresh(images)), _numpy(km(images)))


def test_file_holds_only_task_tensors(trained_task):
    km, path = trained_task
    header = km_tf.read_task_header(path)
    roles = {entry["role"] for entry in header.tensors}
    assert roles == {"modulated", "batchnorm", "head"}
    assert not any(entry["path"].endswith("stem/kernel")
                   for entry in header.tensors)
    stored = sum(int(np.prod(e["shape"])) for e in header.tensors)
    assert stored == km_tf.task_report(km).task_params


def test_options_are_recorded_without_layer_names(trained_task):
    # The default head and no skipped layer: nothing is named, so the options
    # fit a model whose layers Keras named otherwise.
    assert km_tf.read_task_options(trained_task[1]) == {
        "hidden_units": 8, "form": "hybrid", "filter_units": 1,
        "batchnorm": "train"}


def test_head_chosen_by_name_is_recorded_by_name(base, tmp_path):
    km = km_tf.modulate(base, hidden_units=8, head=["head"], skip=["dw"])
    km_tf.save_task(km, tmp_path / "named.kmtask")
    options = km_tf.read_task_options(tmp_path / "named.kmtask")
    assert options["skip"] == ["dw"]
    assert "head" not in options  # ["head"] is what the default picks.


def test_wrong_base_is_refused_and_model_unchanged(trained_task):
    _, path = trained_task
    keras.utils.set_random_seed(123)
    other = km_tf.modulate(small_convnet(), hidden_units=8)
    before = _snapshot(other)
    with pytest.raises(km_tf.TaskFileError, match="different base network"):
        km_tf.load_task(other, path)
    _assert_unchanged(other, before)


def test_other_modulator_options_are_named(base, trained_task):
    _, path = trained_task
    other = km_tf.modulate(base, hidden_units=4)
    with pytest.raises(km_tf.TaskFileError,
                       match="hidden_units: file 8 vs model 4"):
        km_tf.load_task(other, path)


def test_missing_file_is_file_not_found(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="No task file"):
        km_tf.load_task(km_tf.modulate(base), tmp_path / "absent.kmtask")


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9])
def test_truncated_file_is_refused_and_model_unchanged(base, trained_task,
                                                       tmp_path, keep):
    _, path = trained_task
    data = path.read_bytes()
    broken = tmp_path / "truncated.kmtask"
    broken.write_bytes(data[: int(len(data) * keep)])
    _assert_refused_untouched(base, broken, match="corrupt or truncated")


def test_flipped_bytes_are_caught_by_checksums(base, trained_task, tmp_path):
    _, path = trained_task
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo("t0.npy").header_offset
    data = bytearray(path.read_bytes())
    # The member's data follows its local header, whose name and extra-field
    # lengths are the little-endian shorts at bytes 26 and 28.
    name_length = int.from_bytes(data[offset + 26:offset + 28], "little")
    extra_length = int.from_bytes(data[offset + 28:offset + 30], "little")
    start = offset + 30 + name_length + extra_length
    for offset in range(start + 8, start + 16):
        data[offset] ^= 0xFF
    broken = tmp_path / "flipped.kmtask"
    broken.write_bytes(bytes(data))
    _assert_refused_untouched(base, broken, match="corrupt")


def _rewrite(path, target, edit):
    """Copies a task file, letting `edit(header, arrays)` change it."""
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    header = json.loads(arrays.pop("header").tobytes())
    edit(header, arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(target, **arrays)
    return target


def test_missing_tensor_is_named(base, trained_task, tmp_path):
    def drop_head_bias(header, arrays):
        entry = next(e for e in header["tensors"] if e["path"] == "head/bias")
        header["tensors"].remove(entry)
        arrays.pop(entry["key"])

    broken = _rewrite(trained_task[1], tmp_path / "missing.npz",
                      drop_head_bias)
    _assert_refused_untouched(base, broken, match="missing 'head/bias'")


def test_misshaped_tensor_is_named(base, trained_task, tmp_path):
    def grow_head(header, arrays):
        entry = next(e for e in header["tensors"] if e["path"] == "head/bias")
        arrays[entry["key"]] = np.zeros(5, np.float32)

    broken = _rewrite(trained_task[1], tmp_path / "shape.npz", grow_head)
    _assert_refused_untouched(
        base, broken, match=r"'head/bias'.*float32 \(5,\).*header says "
        r"float32 \(3,\).*altered")


def test_file_of_another_kind_is_refused(base, tmp_path):
    not_a_task = tmp_path / "weights.npz"
    np.savez(not_a_task, kernel=np.zeros(3))
    with pytest.raises(km_tf.TaskFileError, match="not a task file"):
        km_tf.load_task(km_tf.modulate(base), not_a_task)
    text = tmp_path / "notes.kmtask"
    text.write_text("hello")
    with pytest.raises(km_tf.TaskFileError, match="corrupt"):
        km_tf.load_task(km_tf.modulate(base), text)


def test_pickled_payload_is_never_unpickled(base, tmp_path):
    evil = tmp_path / "evil.kmtask"
    with open(evil, "wb") as stream:
        np.savez(stream, header=np.array([{"x": 1}], dtype=object))
    with pytest.raises(km_tf.TaskFileError):
        km_tf.load_task(km_tf.modulate(base), evil)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(trained_task,
                                                          tmp_path,
                                                          monkeypatch):
    km, path = trained_task
    target = tmp_path / "task.kmtask"
    km_tf.save_task(km, target)
    original = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        km_tf.save_task(km, target)
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.kmtask"]


def test_save_into_missing_folder_names_it(trained_task, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        km_tf.save_task(trained_task[0], tmp_path / "no" / "task.kmtask")


def test_task_report_counts_roles(trained_task):
    km, path = trained_task
    report = km_tf.task_report(km)
    # Hybrid form: stem, dw and dilated 3x3 kernels get spatial units
    # (9 -> 8 -> 9); the 1x1 "project" conv gets filter units (16 -> 1 -> 16).
    per_3x3, per_1x1 = 9 * 8 + 8 + 8 * 9 + 9, 16 * 1 + 1 + 1 * 16 + 16
    assert report.modulator_params == 3 * per_3x3 + per_1x1
    assert report.batchnorm_params == 4 * (8 + 16)
    assert report.head_params == 12 * 3 + 3
    assert report.base_params == small_convnet().count_params() - 39
    assert report.task_bytes == 4 * report.task_params
    assert "task / base" in str(report)
    assert report.to_dict()["task_params"] == report.task_params


def test_mobilenet_v2_modulators_are_one_to_two_percent():
    base = keras.applications.MobileNetV2((224, 224, 3), weights=None,
                                          include_top=False, pooling="avg")
    model = keras.Sequential([base, keras.layers.Dense(10, name="head")])
    report = km_tf.task_report(km_tf.modulate(model))
    assert report.base_params == base.count_params() == 2_257_984
    assert 1.0 <= report.modulator_percent_of_base <= 2.0


# Structure, not names: rebuilt models, heads of another class count, and
# version 1 files.


def _train_briefly(model, num_classes, seed=0):
    model.compile(keras.optimizers.Adam(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(random_images(seed=seed),
              random_labels(num_classes=num_classes, seed=seed), epochs=2,
              verbose=0)
    return model


@pytest.fixture(scope="module")
def three_class_task_on_five_class_base(tmp_path_factory):
    """A 5-class base with auto-named layers, and a trained 3-class task."""
    keras.utils.set_random_seed(4)
    base = auto_named_convnet(num_classes=5)
    task = _train_briefly(models.build_task_model(base, 3, hidden_units=4), 3)
    path = tmp_path_factory.mktemp("head") / "three.kmtask"
    km_tf.save_task(task, path)
    return base, task, path


def _rebuilt_in_code(base):
    """The same architecture built again (Keras names it anew) with the
    base's weights, as a user who rebuilds the base in code has it."""
    rebuilt = auto_named_convnet(num_classes=5)
    assert rebuilt.layers[-1].name != base.layers[-1].name
    rebuilt.set_weights(base.get_weights())
    return rebuilt


def test_restore_task_rebuilds_a_head_of_another_class_count(
        three_class_task_on_five_class_base):
    base, task, path = three_class_task_on_five_class_base
    restored = km_tf.restore_task(base, path)
    images = random_images(seed=5)
    assert restored.output_shape == (None, 3)
    np.testing.assert_array_equal(_numpy(restored(images)),
                                  _numpy(task(images)))
    assert base.output_shape == (None, 5)  # The base is left as it was.


def test_task_loads_into_the_architecture_rebuilt_in_code(
        three_class_task_on_five_class_base):
    base, task, path = three_class_task_on_five_class_base
    rebuilt = _rebuilt_in_code(base)
    images = random_images(seed=6)
    restored = km_tf.restore_task(rebuilt, path)
    np.testing.assert_array_equal(_numpy(restored(images)),
                                  _numpy(task(images)))
    by_hand = models.build_task_model(rebuilt, 3,
                                      **km_tf.read_task_options(path))
    km_tf.load_task(by_hand, path)
    np.testing.assert_array_equal(_numpy(by_hand(images)),
                                  _numpy(task(images)))


def test_loading_into_the_base_head_names_restore_task(
        three_class_task_on_five_class_base):
    base, _, path = three_class_task_on_five_class_base
    model = km_tf.modulate(base, hidden_units=4)
    before = _snapshot(model)
    with pytest.raises(km_tf.TaskFileError,
                       match=r"another class count.*restore_task"):
        km_tf.load_task(model, path)
    _assert_unchanged(model, before)


def test_other_structure_is_refused_naming_the_first_difference(
        three_class_task_on_five_class_base):
    _, _, path = three_class_task_on_five_class_base
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same",
                            use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(16, 1)(x)  # 12 filters in the task's base.
    x = keras.layers.GlobalAveragePooling2D()(x)
    other = keras.Model(inputs, keras.layers.Dense(5)(x))
    with pytest.raises(km_tf.TaskFileError,
                       match=r"slot 3 .*Conv2D \[\(1, 1, 8, 16\), \(16,\)\] "
                             r"in the model but Conv2D \[\(1, 1, 8, 12\), "
                             r"\(12,\)\] in the file"):
        km_tf.restore_task(other, path)


V1_FIXTURE = os.path.join(os.path.dirname(__file__), "data",
                          "task_format_v1")


def test_version_1_task_file_still_loads():
    """tests/data/task_format_v1 was written by km-tf 0.1.0: a 3-class task
    on a 5-class base, with the logits it gave on four images."""
    base = keras.saving.load_model(os.path.join(V1_FIXTURE, "base.keras"))
    path = os.path.join(V1_FIXTURE, "task.kmtask")
    assert km_tf.read_task_header(path).version == 1
    expected = np.load(os.path.join(V1_FIXTURE, "expected.npz"))
    restored = km_tf.restore_task(base, path)
    np.testing.assert_allclose(_numpy(restored(expected["images"])),
                               expected["logits"], atol=1e-6)
    by_hand = models.build_task_model(base, 3,
                                      **km_tf.read_task_options(path))
    km_tf.load_task(by_hand, path)
    np.testing.assert_allclose(_numpy(by_hand(expected["images"])),
                               expected["logits"], atol=1e-6)


# Headers bound to their tensors.


def test_swapped_tensors_of_equal_shape_are_refused(base, trained_task,
                                                    tmp_path):
    def swap(header, arrays):
        first, second = [entry for entry in header["tensors"]
                         if entry["path"].startswith("stem_bn/")][:2]
        first["key"], second["key"] = second["key"], first["key"]

    broken = _rewrite(trained_task[1], tmp_path / "swapped.npz", swap)
    _assert_refused_untouched(base, broken, match="SHA-256.*altered")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(version="2"), "version is not an integer"),
    (lambda h: h["tensors"][0].update(slot="0"), r"slot is not an integer"),
    (lambda h: h["tensors"][0].update(shape=[3.5]), "shape is not an int"),
    (lambda h: h.update(options=[]), "options is not a JSON object"),
    (lambda h: h["layers"].pop(), "names slot|lists"),
    (lambda h: h.pop("base_fingerprint"), "lacks"),
    (lambda h: h.update(tensors={}), "tensors is not a JSON list"),
])
def test_type_tampered_header_is_a_task_file_error(base, trained_task,
                                                   tmp_path, edit, message):
    broken = _rewrite(trained_task[1], tmp_path / "tampered.npz",
                      lambda header, arrays: edit(header))
    _assert_refused_untouched(base, broken, match=f"malformed header.*"
                                                  f"({message})")


def test_non_finite_weights_are_refused_at_load(base, trained_task,
                                                tmp_path):
    def poison(header, arrays):
        entry = next(e for e in header["tensors"] if e["path"] == "head/bias")
        arrays[entry["key"]] = np.full(3, np.nan, np.float32)
        entry["sha256"] = hashlib.sha256(
            arrays[entry["key"]].tobytes()).hexdigest()

    broken = _rewrite(trained_task[1], tmp_path / "nan.npz", poison)
    _assert_refused_untouched(base, broken, match="'head/bias'.*NaN")


def test_non_finite_weights_are_refused_at_save(base, tmp_path):
    km = km_tf.modulate(base, hidden_units=8)
    km.get_layer("head").bias.assign([np.inf, 0.0, 0.0])
    with pytest.raises(ValueError, match="'head/bias'.*diverged"):
        km_tf.save_task(km, tmp_path / "inf.kmtask")
    assert not list(tmp_path.iterdir())


def test_task_file_gets_the_mode_open_would_give(trained_task, tmp_path):
    old = os.umask(0o022)
    try:
        km_tf.save_task(trained_task[0], tmp_path / "shared.kmtask")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.kmtask").stat().st_mode & 0o777 == 0o644


@pytest.fixture(scope="module")
def override_task(base, tmp_path_factory):
    """A trained task whose last convolution has a filter-form modulator of
    its own width (a per-layer override), and its file."""
    path = tmp_path_factory.mktemp("override") / "override.kmtask"
    km = km_tf.modulate(base, hidden_units=8, overrides={
        "dilated": {"form": "filter", "filter_units": 3}})
    km.compile(keras.optimizers.Adam(0.05),
               keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    km.fit(random_images(), random_labels(), epochs=2, verbose=0)
    km_tf.save_task(km, path)
    return km, path


def test_per_layer_overrides_are_recorded_by_slot_and_restored(
        base, override_task):
    km, path = override_task
    layers = {layer.name: layer for layer in km.layers}
    assert (layers["dilated"].form, layers["dilated"].filter_units) == (
        "filter", 3)
    assert (layers["stem"].form, layers["project"].filter_units) == (
        "hybrid", 1)
    slot = next(slot for slot, _, layer in km_tf.walk.weighted_layers(km)
                if layer.name == "dilated")
    options = km_tf.read_task_header(path).options
    assert options["overrides"] == {str(slot): {
        "hidden_units": 8, "form": "filter", "filter_units": 3}}
    assert "overrides" not in km_tf.read_task_options(path)
    # A base rebuilt in code (other layer names) gets the same layout.
    rebuilt = small_convnet(name="rebuilt")
    rebuilt.set_weights(base.get_weights())
    restored = km_tf.restore_task(rebuilt, path)
    images = random_images(seed=4)
    np.testing.assert_array_equal(_numpy(restored(images)),
                                  _numpy(km(images)))
    # A model without the override is refused, naming the difference.
    plain = km_tf.modulate(base, hidden_units=8)
    with pytest.raises(km_tf.TaskFileError, match="overrides: file"):
        km_tf.load_task(plain, path)


@pytest.mark.parametrize("overrides, message", [
    ({"head": {"form": "filter"}}, "'head', which is not a convolution"),
    ({"nowhere": {"form": "filter"}}, "'nowhere', which is not a conv"),
    ({"dilated": {"rate": 2}}, r"sets \['rate'\]"),
    ({"dilated": {"filter_units": 0}}, "filter_units.*positive"),
    ({"dilated": {"form": "diagonal"}}, "Unknown modulator form"),
])
def test_bad_overrides_are_refused_naming_the_fix(base, overrides, message):
    with pytest.raises(ValueError, match=message):
        km_tf.modulate(base, overrides=overrides)


def test_overrides_equal_to_the_defaults_change_nothing(base):
    km = km_tf.modulate(base, overrides={"dilated": {"form": "hybrid"}})
    assert km_tf.convert.modulation_options(km)["overrides"] is None


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(overrides=[]), "overrides is not a JSON object"),
    (lambda o: o.update(overrides={"x": {}}), "not keyed by a slot"),
    (lambda o: o.update(overrides={"99": {
        "hidden_units": 8, "form": "filter", "filter_units": 3}}),
     "slot 99"),
    (lambda o: o["overrides"][next(iter(o["overrides"]))].pop("form"),
     "lacks"),
])
def test_tampered_overrides_are_a_task_file_error(base, override_task,
                                                  tmp_path, edit, message):
    broken = _rewrite(override_task[1], tmp_path / "tampered.npz",
                      lambda header, arrays: edit(header["options"]))
    with pytest.raises(km_tf.TaskFileError,
                       match=f"malformed header.*{message}"):
        km_tf.restore_task(base, broken)
