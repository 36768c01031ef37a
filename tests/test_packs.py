"""Task packs: one template on the device, a small pack per task.

Three tasks of 3, 4 and 2 classes on a 5-class base (BatchNorm trained per
task in two of them, frozen in one) go through every preset packs serve.
The applied pack must equal the converter's export of the task, and runs
in LiteRT and (micro) the real TFLite Micro interpreter; bad files are
refused before anything is written.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import km_tf
from km_tf import models
from km_tf.convert import bake
from km_tf.deploy import applier, formats
from km_tf.deploy import export as deploy
from km_tf.deploy.locate import first_difference
from km_tf.export.edgetpu import check_edgetpu
from km_tf.export.graph import read_graph
from km_tf.export.litert import LiteRTModel
from km_tf.export.micro import run_micro
from km_tf.export.pipeline import convert
from support import packable_convnet, small_convnet
from test_export import digits, fit

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("float32", "float16", "int8", "micro", "edgetpu")
# (digit classes, BatchNorm mode, modulator form) of the three tasks.
TASKS = (([5, 6, 7], "train", "hybrid"), ([3, 4, 8, 9], "freeze", "hybrid"),
         ([0, 9], "train", "spatial"))
TEMPLATE_CLASSES = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    base = models.add_preprocessing(
        packable_convnet(input_shape=(16, 16, 3), num_classes=5), "tf")
    fit(base, *digits([0, 1, 2, 3, 4]), steps=80, seed=0)
    tasks = []
    for seed, (classes, batchnorm, form) in enumerate(TASKS, start=1):
        task = models.build_task_model(base, len(classes), hidden_units=8,
                                       batchnorm=batchnorm, form=form)
        fit(task, *digits(classes), steps=40, seed=seed)
        path = root / f"task{seed}.kmtask"
        km_tf.save_task(task, path)
        tasks.append(path)
    x, _ = digits([5, 6, 7, 8, 9])
    rng = np.random.default_rng(0)
    x = x[rng.permutation(len(x))]
    return {"root": root, "base": base, "tasks": tasks,
            "calibration": x[:200], "heldout": x[200:500]}


def _export(setup, preset, plan_kernels):
    out = setup["root"] / f"{preset}_{plan_kernels}"
    template = deploy.export_template(
        setup["base"], preset, out, "base", classes=TEMPLATE_CLASSES,
        calibration_data=setup["calibration"], plan_kernels=plan_kernels)
    packs = [deploy.export_pack(setup["base"], task, template, out,
                                task.stem, calibration_data=setup[
                                    "calibration"], heldout=setup["heldout"])
             for task in setup["tasks"]]
    return template, packs


@pytest.fixture(scope="module")
def exact(setup):
    """Preset -> (template, pack results), plans with base kernels."""
    return {preset: _export(setup, preset, "float32") for preset in PRESETS}


@pytest.fixture(scope="module")
def compact(setup):
    """(preset, plan kernels) -> (template, pack results), for plans
    without the float32 base kernels."""
    return {(preset, kernels): _export(setup, preset, kernels)
            for preset in ("int8", "micro") for kernels in ("residual",
                                                              "none")}


def _applied(template, result):
    return applier.apply_pack(template.template_bytes,
                              template.plan_path.read_bytes(),
                              result.pack_path.read_bytes())


@pytest.mark.parametrize("preset", PRESETS)
def test_applied_pack_equals_the_converters_export(exact, preset):
    template, results = exact[preset]
    for result in results:
        applied = _applied(template, result)
        assert first_difference(applied, result.reference_tflite) is None
        assert len(applied) == template.plan.template_bytes
        assert result.report["applied_equals_conversion"]


@pytest.mark.parametrize("preset", ("float32", "float16"))
def test_float_pack_runs_like_the_tasks_own_export(setup, exact, preset):
    """The applied model in LiteRT vs `tflite/export.py`'s export of the
    unpadded task: the task's own outputs agree to 1e-5."""
    template, results = exact[preset]
    x = setup["heldout"][:64]
    for task, result in zip(setup["tasks"], results):
        # float16 packs store the task rounded to float16, as the float16
        # .tflite stores its weights: compare with that task's export.
        own = (convert(bake(km_tf.restore_task(setup["base"], task)),
                       preset) if preset == "float32"
               else result.reference_tflite)
        classes = result.report["classes"]
        expected = LiteRTModel(own).predict(x)
        outputs = LiteRTModel(_applied(template, result)).predict(x)
        assert outputs.shape == (len(x), TEMPLATE_CLASSES)
        np.testing.assert_allclose(outputs[:, :classes],
                                   expected[:, :classes], atol=1e-5)
        np.testing.assert_array_equal(outputs[:, classes:], 0.0)


# Least top-1 agreement with the task's export on held-out images, by what
# the plan holds (ties in the int8 outputs count for either class). With
# residuals: 0.997-1.0 per task over 4 trainings of this tiny net; without
# kernels: 0.93-1.0, below issue 14's 99% (BUILD.md, "Task packs").
COMPACT_AGREEMENT = {"residual": 0.99, "none": 0.9}


@pytest.mark.parametrize("kernels", sorted(COMPACT_AGREEMENT))
@pytest.mark.parametrize("preset", ("int8", "micro"))
def test_compact_plan_agrees_on_heldout_images(setup, compact, preset,
                                               kernels):
    template, results = compact[preset, kernels]
    assert template.plan.kernels == kernels
    x = setup["heldout"]
    for result in results:
        classes = result.report["classes"]
        applied = LiteRTModel(_applied(template, result)).predict(x)
        reference = LiteRTModel(result.reference_tflite).predict(x)
        agreement = deploy.top1_agreement(applied[:, :classes],
                                          reference[:, :classes])
        assert agreement >= COMPACT_AGREEMENT[kernels], (
            result.pack_path.name, agreement)


def test_residual_plan_is_the_size_of_the_templates_weights(compact):
    template, _ = compact["int8", "residual"]
    weights = sum(layer.kernel_size for layer in template.plan.layers)
    plan_bytes = template.plan_path.stat().st_size
    assert weights < plan_bytes < weights + 4 * weights // 10 + 4096


def test_micro_pack_runs_in_tflite_micro(setup, exact):
    """The applied model in the real TFLite Micro interpreter gives what the
    task's own micro export gives there, to the last quantized unit."""
    template, results = exact["micro"]
    lite = LiteRTModel(template.template_bytes)
    xq = lite.quantize_input(setup["heldout"][:16])
    for result in results:
        applied = run_micro(_applied(template, result), xq).outputs
        reference = run_micro(result.reference_tflite, xq).outputs
        np.testing.assert_array_equal(applied, reference)
        # LiteRT's reference kernels agree within one unit (seen: 1 of 64).
        lite_outputs = LiteRTModel(result.reference_tflite,
                                   reference_kernels=True).run_raw(xq)
        assert np.max(np.abs(applied.reshape(lite_outputs.shape).astype(int)
                             - lite_outputs)) <= 1


def test_applied_edgetpu_model_passes_the_static_check_like_its_export(
        exact):
    """Coral: apply the pack, then compile; the applied model is what
    edgetpu_compiler would get from tflite/export.py."""
    template, results = exact["edgetpu"]
    for result in results:
        applied = check_edgetpu(read_graph(_applied(template, result)))
        assert applied == check_edgetpu(read_graph(result.reference_tflite))
        assert applied.fully_mapped


def test_packs_are_a_small_share_of_a_task_tflite(exact):
    for preset, (template, results) in exact.items():
        for result in results:
            assert result.report["pack_bytes"] < 0.2 * len(
                result.reference_tflite), (preset, result.report)


def test_int8_weights_round_like_the_converter_at_a_tie():
    """A MobileNetV2 weight where w / scale is 72.49999... in float64 but
    the converter's float32 w * (1 / scale) is 72.5: the converter writes
    73 (found by bench/packs.py at 224 px)."""
    peak, weight = np.array([0x3F0F8611, 0x3EA3DD9A], np.uint32).view(
        np.float32)
    q, _ = applier.quantize_per_channel(np.array([[peak, weight]]), 0)
    assert q[0, 1] == 73


def test_pack_dtypes_round_trip_as_stored():
    values = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    assert np.array_equal(formats.round_trip(values, "float32"), values)
    half = formats.round_trip(values, "float16")
    assert np.array_equal(half, values.astype(np.float16).astype(np.float32))
    q = formats.round_trip(values, "int8")
    assert np.max(np.abs(q - values)) <= np.max(np.abs(values)) / 254 + 1e-7


# ---------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def files(exact):
    template, results = exact["int8"]
    return (template.template_bytes, template.plan_path.read_bytes(),
            results[0].pack_path.read_bytes())


def _flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0xFF
    return bytes(changed)


@pytest.mark.parametrize("case, pattern", [
    ("corrupt pack", "corrupt"),
    ("truncated pack", "truncated"),
    ("pack header", "corrupt"),
    ("not a pack", "not a km-tf task pack"),
    ("corrupt plan", "corrupt"),
    ("truncated plan", "truncated"),
    ("wrong template", "not the one this plan was written for"),
])
def test_bad_files_are_refused_and_nothing_is_written(files, tmp_path, case,
                                                      pattern):
    template, plan, pack = files
    if case == "corrupt pack":
        pack = _flip(pack, len(pack) - 3)
    elif case == "truncated pack":
        pack = pack[:-10]
    elif case == "pack header":
        pack = _flip(pack, 60)
    elif case == "not a pack":
        pack = b"\x89PNG\r\n\x1a\n" + pack[8:]
    elif case == "corrupt plan":
        plan = _flip(plan, len(plan) - 5)
    elif case == "truncated plan":
        plan = plan[:len(plan) // 2]
    elif case == "wrong template":
        template = _flip(template, len(template) // 2)
    paths = []
    for name, data in (("t.tflite", template), ("t.kmplan", plan),
                       ("p.kmpack", pack)):
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    with pytest.raises(km_tf.PackError, match=pattern):
        applier.apply_pack_files(*paths, tmp_path / "task.tflite")
    assert not (tmp_path / "task.tflite").exists()


def test_pack_for_another_template_is_refused(setup, exact, files):
    other, _ = exact["micro"]  # Another template of the same base.
    with pytest.raises(km_tf.PackError, match="made for another template"):
        applier.apply_pack(other.template_bytes, other.plan_path.read_bytes(),
                           files[2])


def test_task_with_more_classes_than_the_template_is_refused(setup, exact):
    template, _ = exact["float32"]
    task = models.build_task_model(setup["base"], TEMPLATE_CLASSES + 1)
    path = setup["root"] / "wide.kmtask"
    km_tf.save_task(task, path)
    with pytest.raises(km_tf.ExportError, match="--classes=5"):
        deploy.export_pack(setup["base"], path, template, setup["root"],
                           "wide")
    assert not (setup["root"] / "wide_float32.kmpack").exists()


def test_untrained_head_is_refused_with_the_reason(setup, exact):
    template, _ = exact["float32"]
    task = models.build_task_model(setup["base"], 3)  # Bias still zeros.
    path = setup["root"] / "untrained.kmtask"
    km_tf.save_task(task, path)
    with pytest.raises(km_tf.ExportError, match="all zero"):
        deploy.export_pack(setup["base"], path, template, setup["root"],
                           "untrained")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1"])
def test_registry_bases_take_exact_packs(tmp_path, name):
    """Bases of `km_tf.models` other than the MobileNetV2 the benchmark
    uses: ResNet (convolutions with biases) and MobileNetV1."""
    rng = np.random.default_rng(0)

    def perturb(layers):
        for layer in layers:
            layer.set_weights([w + rng.uniform(0.0, 0.1, w.shape).astype(
                np.float32) for w in layer.get_weights()])

    base = models.build_model(name, 4, image_size=32, alpha=0.25
                              if name.startswith("mobilenet") else 1.0)
    batchnorms = [layer for layer in base.layers
                  if isinstance(layer, keras.layers.BatchNormalization)]
    perturb(batchnorms)  # A pretrained-looking base (BatchNorm not at init).
    task = models.build_task_model(base, 3, batchnorm="train")
    perturb([layer.modulator for layer in task.layers
             if hasattr(layer, "modulator")]
            + [layer for layer in task.layers if layer.name == "head"
               or isinstance(layer, keras.layers.BatchNormalization)])
    km_tf.save_task(task, tmp_path / "task.kmtask")
    template = deploy.export_template(base, "float32", tmp_path, "base",
                                      classes=4)
    result = deploy.export_pack(base, tmp_path / "task.kmtask", template,
                                tmp_path, "task")
    assert result.report["applied_equals_conversion"]


def test_mobilenet_v3_is_refused_with_the_reason(tmp_path):
    """Its squeeze-excite hard sigmoid makes the converter fold more than
    BatchNorm into a convolution's bias."""
    base = models.build_model("mobilenet_v3_small", 4, image_size=32,
                              alpha=0.75)
    with pytest.raises(km_tf.ExportError, match="beyond BatchNorm folding"):
        deploy.export_template(base, "float32", tmp_path, "base", classes=4)


def test_dilated_base_is_refused_with_the_reason(tmp_path):
    base = models.add_preprocessing(small_convnet(num_classes=3), "tf")
    with pytest.raises(km_tf.UnsupportedLayerError, match="dilation_rate"):
        deploy.export_template(base, "float32", tmp_path, "base", classes=3)


# ---------------------------------------------------------------- programs

_NO_TENSORFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'absl'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from km_tf.deploy import apply_program
sys.exit(apply_program.main(sys.argv[1:]))
"""


def _apply_without_tensorflow(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, *map(
        str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_apply_program_runs_without_tensorflow(exact, tmp_path):
    template, results = exact["int8"]
    output = tmp_path / "task.tflite"
    run = _apply_without_tensorflow(template.tflite_path,
                                    results[1].pack_path, output)
    assert run.returncode == 0, run.stderr
    assert output.read_bytes() == _applied(template, results[1])
    bad = tmp_path / "bad.kmpack"
    bad.write_bytes(results[1].pack_path.read_bytes()[:100])
    run = _apply_without_tensorflow(template.tflite_path, bad,
                                    tmp_path / "none.tflite")
    assert run.returncode == 1
    assert "truncated" in run.stderr and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "none.tflite").exists()


def test_export_packs_program_writes_template_packs_and_report(setup,
                                                               tmp_path):
    base_path = tmp_path / "base.keras"
    setup["base"].save(base_path)
    np.savez(tmp_path / "data.npz", x_train=setup["calibration"],
             x_test=setup["heldout"][:50])
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "tflite" / "export_packs.py"),
         f"--base={base_path}", *(f"--task={t}" for t in setup["tasks"][:2]),
         "--preset=int8", "--preset=float16",
         f"--calibration_dataset={tmp_path / 'data.npz'}",
         f"--output_dir={out}"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for preset in ("int8", "float16"):
        assert (out / f"base_{preset}.tflite").is_file()
        assert (out / f"base_{preset}.kmplan").is_file()
        for task in setup["tasks"][:2]:
            assert (out / f"{task.stem}_{preset}.kmpack").is_file()
    report = (out / "packs.report.txt").read_text()
    assert report.count("template base_") == 2
    assert report.count("% of the task's .tflite") == 4
    assert report.count("applied = converter export: yes") == 4
