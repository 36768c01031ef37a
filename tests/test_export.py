"""Tests for km_tf.export and its parts, with the real LiteRT and TFLM runtimes.

One tiny base (16x16 digits 0-4, five classes, normalization inside: it
takes pixels in [0, 255]) and two three-class tasks on it (digits 5-7 and
7-9), trained a few steps: a task whose class count differs from the base's,
as users have it. Task 1 is exported once per preset for the whole module.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import km_tf
from km_tf import export, models
from km_tf.export import data as export_data
from km_tf.export import micro
from km_tf.export.edgetpu import check_edgetpu
from km_tf.export.graph import read_graph
from km_tf.export.presets import PRESETS, get_preset
from km_tf.export.litert import LiteRTModel
from support import small_convnet

INTEGER_PRESETS = ("int8", "micro", "edgetpu")
FLOAT_PRESETS = ("float32", "float16", "dynamic")
REPO = Path(__file__).resolve().parents[1]
TASK_CLASSES = 3


def digits(classes, size=16):
    """sklearn digits of `classes` as (n, size, size, 3) RGB pixels in
    [0, 255] and labels 0..len(classes)-1."""
    data = load_digits()
    keep = np.isin(data.target, classes)
    images = data.images[keep].astype(np.float32) * (255.0 / 16.0)
    images = np.kron(images, np.ones((size // 8, size // 8), np.float32))
    labels = np.searchsorted(classes, data.target[keep])
    return np.repeat(images[..., None], 3, axis=-1), labels


def fit(model, x, y, steps, seed):
    keras.utils.set_random_seed(seed)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, steps_per_epoch=steps,
              verbose=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 5-class base, two 3-class task files and an npz dataset."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("export")
    x_base, y_base = digits([0, 1, 2, 3, 4])
    base = models.add_preprocessing(
        small_convnet(input_shape=(16, 16, 3), num_classes=5), "tf")
    fit(base, x_base, y_base, steps=60, seed=0)
    base.save(root / "base.keras")
    x, y = digits([5, 6, 7])
    x_train, y_train, x_test, y_test = x[:400], y[:400], x[400:], y[400:]
    tasks, trained = [], []
    for seed, steps, classes in ((1, 30, [5, 6, 7]), (2, 10, [7, 8, 9])):
        km_model = models.build_task_model(base, TASK_CLASSES,
                                           hidden_units=8)
        fit(km_model, *digits(classes), steps, seed)
        path = root / f"task{seed}.kmtask"
        km_tf.save_task(km_model, path)
        tasks.append(path)
        trained.append(km_model)
    np.savez(root / "digits.npz", x_train=x_train, y_train=y_train,
             x_test=x_test, y_test=y_test)
    return {"root": root, "base": base, "tasks": tasks, "trained": trained,
            "train": x_train, "heldout": (x_test, y_test)}


@pytest.fixture(scope="module")
def baked(setup):
    return export.load_baked_task(setup["root"] / "base.keras",
                                  setup["tasks"][0])


@pytest.fixture(scope="module")
def exports(setup, baked):
    """Preset name -> ExportResult for task 1."""
    out = setup["root"] / "out"
    return {name: export.export_model(
        baked, name, out, "task1", calibration_data=setup["train"],
        calibration_samples=64, heldout=setup["heldout"])
        for name in PRESETS}


def read_bytes(result):
    return result.tflite_path.read_bytes()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_and_runs_in_litert(setup, exports, preset):
    model = LiteRTModel(read_bytes(exports[preset]))
    outputs = model.predict(setup["heldout"][0][:3])
    assert outputs.shape == (3, TASK_CLASSES)
    assert np.all(np.isfinite(outputs))


@pytest.mark.parametrize("preset", INTEGER_PRESETS)
def test_integer_presets_have_no_float_ops_on_path(exports, preset):
    graph = read_graph(read_bytes(exports[preset]))
    assert graph.float_ops_on_path() == []
    assert exports[preset].report["float_ops_on_path"] == []
    assert {t.dtype for t in graph.tensors if not t.constant} <= {
        "int8", "uint8", "int32"}


def test_float_model_has_float_ops_on_path(exports):
    graph = read_graph(read_bytes(exports["float32"]))
    # The input normalization (Rescaling: MUL, ADD) comes first.
    assert graph.float_ops_on_path()[:3] == ["MUL#0", "ADD#1", "CONV_2D#2"]


@pytest.mark.parametrize("preset,dtype,batch", [
    ("float32", "float32", -1), ("float16", "float32", -1),
    ("dynamic", "float32", -1), ("int8", "int8", -1), ("micro", "int8", 1),
    ("edgetpu", "uint8", 1)])
def test_preset_sets_io_type_and_batch(exports, preset, dtype, batch):
    graph = read_graph(read_bytes(exports[preset]))
    for tensor in (*graph.inputs, *graph.outputs):
        assert tensor.dtype == dtype
        assert tensor.shape_signature[0] == batch


def test_int8_preset_takes_uint8_io(setup, baked, tmp_path):
    result = export.export_model(
        baked, get_preset("int8", io_type="uint8"), tmp_path, "u8",
        calibration_data=setup["train"], calibration_samples=16)
    graph = read_graph(read_bytes(result))
    assert graph.inputs[0].dtype == graph.outputs[0].dtype == "uint8"
    assert graph.float_ops_on_path() == []


def test_float32_export_matches_keras_outputs(setup, baked, exports):
    x = setup["heldout"][0][:16]
    lite = LiteRTModel(read_bytes(exports["float32"])).predict(x)
    np.testing.assert_allclose(lite, baked.predict(x, verbose=0), atol=1e-4)
    assert exports["float32"].report["parity"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_report_has_parity_and_io_details(setup, exports, preset):
    report = exports[preset].report
    result = report["parity"]
    assert result["samples"] == len(setup["heldout"][0])
    assert result["top1_agreement"] >= 0.9
    assert 0.0 <= result["float_accuracy"] <= 1.0
    assert abs(result["accuracy_drop_points"]) <= 10
    assert report["size_bytes"] == exports[preset].tflite_path.stat().st_size
    assert "CONV_2D" in report["ops"]
    assert exports[preset].text_report_path.read_text().startswith("task1")
    if preset in INTEGER_PRESETS:
        assert "scale" in report["inputs"][0]


def test_baked_task_model_equals_the_trained_model(setup, baked):
    x = setup["heldout"][0][:8]
    assert baked.output_shape == (None, TASK_CLASSES)
    np.testing.assert_allclose(baked.predict(x, verbose=0),
                               setup["trained"][0].predict(x, verbose=0),
                               atol=1e-4)


def _top1(outputs):
    return np.asarray(outputs).argmax(axis=-1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_task_of_another_class_count_exports_like_the_trained_model(
        setup, exports, preset):
    """The 3-class task on the 5-class base, under every preset, against
    the KM model as training left it (not a reload)."""
    x = setup["heldout"][0]
    trained = setup["trained"][0].predict(x, verbose=0)
    lite = LiteRTModel(read_bytes(exports[preset])).predict(x)
    if preset == "float32":
        np.testing.assert_allclose(lite, trained, atol=1e-4)
    agreement = np.mean(_top1(lite) == _top1(trained))
    assert agreement >= (0.99 if preset in FLOAT_PRESETS else 0.95), agreement


def test_uint8_micro_model_takes_raw_pixel_bytes(setup, baked, tmp_path):
    """Camera bytes go in as they are: input scale 1, zero point 0."""
    result = export.export_model(
        baked, get_preset("micro", io_type="uint8"), tmp_path, "raw",
        calibration_data=setup["train"], calibration_samples=64)
    model_bytes = read_bytes(result)
    graph = read_graph(model_bytes)
    assert graph.inputs[0].dtype == "uint8"
    assert tuple(graph.inputs[0].scales) == (1.0,)
    assert tuple(graph.inputs[0].zero_points) == (0,)
    x = setup["heldout"][0]
    raw = micro.run_micro(model_bytes, x.astype(np.uint8)).outputs
    agreement = np.mean(_top1(raw) == _top1(baked.predict(x, verbose=0)))
    assert agreement >= 0.97, agreement


def test_micro_runs_in_tflm_and_agrees_with_litert(setup, exports):
    model_bytes = read_bytes(exports["micro"])
    lite = LiteRTModel(model_bytes)
    xq = lite.quantize_input(setup["heldout"][0][:6])
    run = micro.run_micro(model_bytes, xq)
    assert run.outputs.dtype == np.int8
    # LiteRT's reference kernels do TFLM's arithmetic: equal outputs. Its
    # default (optimized) kernels round the input MUL/ADD and the convs a
    # little differently: a few quantized units.
    reference = LiteRTModel(model_bytes, reference_kernels=True)
    np.testing.assert_array_equal(run.outputs, reference.run_raw(xq))
    np.testing.assert_allclose(run.outputs.astype(int),
                               lite.run_raw(xq).astype(int), atol=3)
    assert run.arena_used_bytes > 0
    report = exports["micro"].report["micro"]
    assert report["arena_used_bytes"] == run.arena_used_bytes
    assert report["micro_vs_litert"]["max_abs_diff_quantized"] <= 3
    assert report["micro_vs_litert_reference_kernels"][
        "max_abs_diff_quantized"] == 0


def test_micro_reports_board_fit(exports):
    boards = exports["micro"].report["micro"]["boards"]
    assert [fit["board"] for fit in boards] == list(micro.DEFAULT_BOARDS)
    assert boards[0]["fits"]  # A 16x16 toy fits 256 KB RAM / 1 MB flash.


def test_micro_arena_too_small_is_a_clear_error(setup, exports):
    model_bytes = read_bytes(exports["micro"])
    used = exports["micro"].report["micro"]["arena_used_bytes"]
    xq = LiteRTModel(model_bytes).quantize_input(setup["heldout"][0][:1])
    with pytest.raises(micro.MicroArenaTooSmallError, match="too small"):
        micro.run_micro(model_bytes, xq, arena_bytes=used // 2)
    micro.run_micro(model_bytes, xq, arena_bytes=used)  # Exactly enough.


def test_micro_refuses_a_dynamic_batch_model(setup, exports):
    # TFLM ran such an int8 model here but gave outputs far from LiteRT's.
    model_bytes = read_bytes(exports["int8"])
    xq = LiteRTModel(model_bytes).quantize_input(setup["heldout"][0][:1])
    with pytest.raises(micro.MicroRuntimeError, match="static shapes"):
        micro.run_micro(model_bytes, xq)


def test_micro_refuses_ops_tflm_lacks(setup):
    inputs = keras.Input((8, 8, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 3, activation="gelu")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    model_bytes = export.convert(model, "float32")
    assert "GELU" in read_graph(model_bytes).op_names
    with pytest.raises(micro.MicroRuntimeError, match="GELU"):
        micro.run_micro(model_bytes, np.zeros((1, 8, 8, 3), np.float32))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("compiler", ["gcc", "g++"])
def test_c_array_compiles_and_holds_the_tflite_bytes(exports, tmp_path,
                                                     compiler):
    result = exports["micro"]
    source, header = result.extra_paths
    dump = tmp_path / "dump.c"
    dump.write_text(f"""
#include <stdint.h>
#include <stdio.h>
#include "{header.name}"
int main(void) {{
  if (((uintptr_t)KM_MODEL_DATA) % 16 != 0) return 2;
  if (KM_MODEL_DATA_LEN != KM_MODEL_BYTES) return 3;
  fwrite(KM_MODEL_DATA, 1, KM_MODEL_DATA_LEN, stdout);
  return 0;
}}
""")
    language = ["-x", "c++"] if compiler == "g++" else ["-std=c11"]
    binary = tmp_path / "dump"
    subprocess.run([compiler, "-Wall", "-Werror", *language, str(source),
                    str(dump), "-I", str(header.parent), "-o", str(binary)],
                   check=True, capture_output=True)
    dumped = subprocess.run([str(binary)], check=True,
                            capture_output=True).stdout
    assert dumped == read_bytes(result)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_micro_header_registers_exactly_the_model_ops(exports, tmp_path):
    source, header = exports["micro"].extra_paths
    methods = "".join(f"  int {m}() {{ puts(\"{m}\"); return 0; }}\n"
                      for m in sorted(set(micro.MICRO_OP_RESOLVERS.values())))
    program = tmp_path / "ops.cc"
    program.write_text(f"""
#include <cstdio>
#include "{header.name}"
struct FakeResolver {{
{methods}}};
int main() {{
  FakeResolver resolver;
  KM_MODEL_REGISTER_OPS(resolver);
  static_assert(KM_MODEL_ARENA_BYTES > 0, "arena");
  return 0;
}}
""")
    binary = tmp_path / "ops"
    subprocess.run(["g++", "-Wall", str(program), "-I", str(header.parent),
                    "-o", str(binary)], check=True, capture_output=True)
    registered = subprocess.run([str(binary)], check=True, capture_output=True,
                                text=True).stdout.split()
    ops = exports["micro"].report["ops"]
    assert sorted(registered) == sorted(micro.MICRO_OP_RESOLVERS[op]
                                        for op in ops)


def test_edgetpu_check_maps_every_op_and_gives_compiler_command(exports):
    report = exports["edgetpu"].report["edgetpu"]
    assert report["fully_mapped"], report
    assert report["cpu_ops"] == []
    assert report["compiler_command"].startswith("edgetpu_compiler -s -o ")
    assert exports["edgetpu"].tflite_path.name in report["compiler_command"]


def test_edgetpu_check_sends_float_ops_to_cpu(exports):
    report = check_edgetpu(read_graph(read_bytes(exports["float32"])))
    assert not report.fully_mapped
    assert report.cpu_ops[0] == "MUL#0"
    assert any("dynamic" in issue for issue in report.issues)
    assert any("float32" in issue for issue in report.issues)


def test_edgetpu_check_cuts_graph_at_first_unsupported_op(tmp_path):
    inputs = keras.Input((8, 8, 4), batch_size=1)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Lambda(lambda t: keras.ops.exp(t))(x)  # EXP: no TPU op.
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    data = np.random.default_rng(0).random((8, 8, 8, 4), dtype=np.float32)
    graph = read_graph(export.convert(model, "edgetpu", data))
    report = check_edgetpu(graph)
    names = graph.op_names
    assert report.cpu_ops[0] == f"EXP#{names.index('EXP')}"
    assert len(report.cpu_ops) == len(names) - names.index("EXP")


def test_two_tasks_give_different_models_with_identical_graph(setup, exports,
                                                              tmp_path):
    other = export.export_model(
        export.load_baked_task(setup["base"], setup["tasks"][1]), "int8",
        tmp_path, "task2", calibration_data=setup["train"],
        calibration_samples=64)
    first, second = read_bytes(exports["int8"]), read_bytes(other)
    assert first != second
    assert read_graph(first).signature() == read_graph(second).signature()


def test_missing_task_file_is_a_clear_error(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.load_baked_task(setup["base"], tmp_path / "nope.kmtask")


def test_missing_base_file_is_a_clear_error(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="Base model"):
        export.load_baked_task(tmp_path / "nope.keras", setup["tasks"][0])


def test_wrong_base_is_a_clear_error(setup):
    other_base = models.add_preprocessing(
        small_convnet(input_shape=(16, 16, 3), num_classes=10), "tf")
    with pytest.raises(km_tf.TaskFileError, match="different base"):
        export.load_baked_task(other_base, setup["tasks"][0])


def test_base_that_is_not_a_keras_file_is_a_clear_error(setup, tmp_path):
    bad = tmp_path / "base.keras"
    bad.write_bytes(b"not a model")
    with pytest.raises(km_tf.ModelFileError, match="Cannot load base model"):
        export.load_baked_task(bad, setup["tasks"][0])


@pytest.mark.parametrize("preset", INTEGER_PRESETS)
def test_int8_preset_without_calibration_data_is_a_clear_error(baked,
                                                               preset):
    with pytest.raises(export.ExportError, match="needs calibration data"):
        export.convert(baked, preset)


def test_calibration_data_of_wrong_shape_is_a_clear_error(baked):
    with pytest.raises(export.ExportError, match="sample shape"):
        export.convert(baked, "int8", np.zeros((4, 8, 8, 3), np.float32))


@pytest.mark.parametrize("scale, looks", [
    (lambda x: x / 255.0, r"scaled to \[0, 1\]"),
    (lambda x: x / 127.5 - 1.0, "already normalized"),
    (lambda x: x * 256.0, "beyond the pixel range"),
])
def test_calibration_in_the_wrong_range_is_refused_before_any_file(
        setup, baked, tmp_path, scale, looks):
    out = tmp_path / "out"
    with pytest.raises(export.ExportError,
                       match=rf"{looks}.*takes RGB pixels in \[0, 255\]"
                       r".*--calibration_data=SPEC"):
        export.export_model(baked, "int8", out, "task1",
                            calibration_data=scale(setup["train"]),
                            heldout=setup["heldout"])
    assert not out.exists()


@pytest.mark.parametrize("data, message", [
    (np.full((4, 16, 16, 3), "a"), "dtype <U1; it must be real numbers"),
    (np.full((4, 16, 16, 3), np.nan, np.float32), "NaN or infinite"),
])
def test_calibration_that_is_not_finite_numbers_is_refused(baked, data,
                                                           message):
    with pytest.raises(export.ExportError, match=message):
        export.convert(baked, "int8", data)


def test_model_without_input_normalization_takes_any_finite_range():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    assert models.input_normalization(model) is None
    scaled = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3))
    assert export.convert(model, "int8", scaled.astype(np.float32))


@pytest.mark.parametrize("bad_heldout, message", [
    (lambda x, y: (x, y.astype(np.float32)), "dtype float32.*integer"),
    (lambda x, y: (x, np.eye(TASK_CLASSES, dtype=int)[y]), "argmax"),
    (lambda x, y: (x, y[:-1]), "labels for"),
    (lambda x, y: (x, y + 5), r"span \[5, 7\].*3 classes"),
    (lambda x, y: (x / 255.0, y), r"x_test\) spans.*scaled to \[0, 1\]"),
])
def test_malformed_heldout_is_refused_with_no_tflite_written(
        setup, baked, tmp_path, bad_heldout, message):
    x, y = setup["heldout"]
    with pytest.raises(export.ExportError, match=message):
        export.export_model(baked, "float32", tmp_path, "task1",
                            heldout=bad_heldout(x, y))
    assert not list(tmp_path.iterdir())


def test_unsupported_preset_is_a_clear_error(baked):
    with pytest.raises(ValueError, match="Unsupported export preset 'int4'"):
        export.convert(baked, "int4")


def test_io_type_a_preset_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError, match="does not take io_type 'int8'"):
        get_preset("edgetpu", io_type="int8")


def test_unbaked_km_model_is_a_clear_error(setup):
    km_model = km_tf.modulate(setup["base"], hidden_units=8)
    with pytest.raises(export.ExportError, match="bake"):
        export.convert(km_model, "float32")


def test_unknown_board_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown board"):
        micro.board_fit(1000, 1000, ["nope"])


def test_export_program_writes_one_model_and_report_per_task(setup, tmp_path):
    out = tmp_path / "models"
    flagfile = tmp_path / "export.flags"
    flagfile.write_text("\n".join([
        f"--base={setup['root'] / 'base.keras'}",
        *(f"--task={task}" for task in setup["tasks"]),
        "--preset=micro",
        f"--calibration_dataset={setup['root'] / 'digits.npz'}",
        "--calibration_samples=32", "--parity_samples=50",
        f"--output_dir={out}"]) + "\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, str(REPO / "tflite" / "export.py"),
                    f"--flagfile={flagfile}"], check=True, env=env,
                   capture_output=True, cwd=REPO)
    for task in ("task1", "task2"):
        for suffix in (".tflite", ".report.json", ".report.txt",
                       "_model_data.c", "_model_data.h"):
            assert (out / f"{task}_micro{suffix}").is_file()
    assert (out / "summary.json").is_file()


def test_export_program_reports_missing_task_clearly(setup, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tflite" / "export.py"),
         f"--base={setup['root'] / 'base.keras'}",
         f"--task={tmp_path / 'missing.kmtask'}", "--preset=float32",
         f"--output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dataset_without_x_train_is_a_clear_error(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, images=np.zeros((2, 4)))
    with pytest.raises(export.ExportError, match="no 'x_train'"):
        export_data.from_npz(path)


def test_spec_data_are_the_training_run_splits(baked):
    data = export_data.from_spec("digits:5-7", baked, seed=0,
                                 calibration_samples=50, parity_samples=1000)
    reference = km_tf.data.load("digits:5-7", image_size=16, seed=0,
                                batch_size=1000)
    x_test, y_test = next(iter(reference.test))
    np.testing.assert_array_equal(data.heldout[0], x_test.numpy())
    np.testing.assert_array_equal(data.heldout[1], y_test.numpy())
    assert data.calibration.shape == (50, 16, 16, 3)
    assert 0.0 <= data.calibration.min() and data.calibration.max() <= 255.0


def test_spec_with_another_class_count_is_a_clear_error(baked):
    with pytest.raises(export.ExportError,
                       match="has 5 classes but the model outputs 3"):
        export_data.from_spec("digits:0-4", baked, calibration_samples=8,
                              parity_samples=8)


def _run_export_program(*flags):
    return subprocess.run(
        [sys.executable, str(REPO / "tflite" / "export.py"), *flags],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_export_program_calibrates_from_the_task_dataset_spec(setup,
                                                              tmp_path):
    proc = _run_export_program(
        f"--base={setup['root'] / 'base.keras'}",
        f"--task={setup['tasks'][0]}", "--preset=int8",
        "--calibration_data=digits:5-7", "--calibration_samples=64",
        f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "task1_int8.report.json").read_text())
    assert report["source"]["data"].startswith("digits:5-7")
    assert report["calibration_samples"] == 64
    split = km_tf.data.load("digits:5-7", image_size=16, seed=0)
    assert report["parity"]["samples"] == split.counts["test"]
    assert report["parity"]["top1_agreement"] >= 0.95


def test_integer_export_without_calibration_source_says_how_to_give_one(
        setup, tmp_path):
    proc = _run_export_program(
        f"--base={setup['root'] / 'base.keras'}",
        f"--task={setup['tasks'][0]}", "--preset=int8",
        f"--output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "--calibration_data=" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_micro_export_without_heldout_runs_calibration_samples(setup, baked,
                                                               tmp_path):
    result = export.export_model(baked, "micro", tmp_path, "noheldout",
                                 calibration_data=setup["train"],
                                 calibration_samples=16)
    assert result.report["parity"] is None
    assert result.report["micro"]["arena_used_bytes"] > 0
    assert "parity: not run" in result.report_text
