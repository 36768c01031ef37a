"""The C applier (tflite/packs/km_apply.c) against the Python one.

Built with the system C compiler and called through ctypes, as an app calls
it through JNI or Swift. One tiny base (16x16 digits 0-4, five classes) and
two tasks with other class counts (three classes with per-task BatchNorm,
two with the base's BatchNorm), exported as packs for templates of several
presets, in exact mode (plan holds the base kernels) and compact mode.
"""

import ctypes
import dataclasses
import hashlib
import subprocess
import time
import zlib

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import c_applier
import km_tf
from km_tf import models
from km_tf.deploy import applier, export, formats
from km_tf.deploy.locate import first_difference
from km_tf.errors import PackError
from support import packable_convnet
from test_export import digits, fit

TEMPLATE_CLASSES = 5
# case -> (preset, what the plan holds of the base kernels)
CASES = {"micro-compact": ("micro", "none"),
         "micro-exact": ("micro", "float32"),
         "micro-residual": ("micro", "residual"),
         "float32-exact": ("float32", "float32"),
         "float16-compact": ("float16", "none")}
# (seed, digits, modulate options): a task with per-task BatchNorm and one
# that keeps the base's.
TASKS = ((1, [5, 6, 7], {}), (2, [8, 9], {"batchnorm": "freeze"}))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return c_applier.build(tmp_path_factory.mktemp("c_applier"))


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return c_applier.cli(tmp_path_factory.mktemp("c_cli"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The base, the task files and calibration / held-out images."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("packs_c")
    base = models.add_preprocessing(
        packable_convnet((16, 16, 3), TEMPLATE_CLASSES), "tf")
    fit(base, *digits([0, 1, 2, 3, 4]), steps=25, seed=0)
    tasks = []
    for seed, classes, options in TASKS:
        task = models.build_task_model(base, len(classes), hidden_units=8,
                                       **options)
        x, y = digits(classes)
        fit(task, x, y, steps=10, seed=seed)
        path = root / f"task{seed}.kmtask"
        km_tf.save_task(task, path)
        tasks.append((path, x[:200], x[-24:]))
    return {"root": root, "base": base, "tasks": tasks,
            "calibration": digits([0, 1, 2, 3, 4])[0][:200]}


@pytest.fixture(scope="module")
def case(trained):
    """case name -> {"template", "plan", "packs": [(bytes, PackResult)]},
    exported on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            preset, plan_kernels = CASES[name]
            out = trained["root"] / name
            files = export.export_template(
                trained["base"], preset, out, "base",
                classes=TEMPLATE_CLASSES,
                calibration_data=trained["calibration"],
                plan_kernels=plan_kernels)
            packs = []
            for index, (task_path, calibration, _) in enumerate(
                    trained["tasks"]):
                result = export.export_pack(
                    trained["base"], task_path, files, out, f"task{index}",
                    calibration_data=calibration)
                packs.append((result.pack_path.read_bytes(), result))
            cache[name] = {"template": files.tflite_path.read_bytes(),
                           "plan": files.plan_path.read_bytes(),
                           "files": files, "packs": packs}
        return cache[name]

    return get


# ----------------------------------------------- synthetic template, plan, pack

def synthetic(weight_type, exact, storage, seed=0):
    """A made-up template (random bytes, with the base's encoded weights
    where the plan points), its plan and a pack: layers much larger than
    the tiny models' (up to 36,864 weights, units of 1,152), an all-zero
    channel, a layer without bias tensor (float templates) and every pack
    array type. No TensorFlow."""
    rng = np.random.default_rng(seed)
    int8 = weight_type == "int8"
    f32 = np.float32
    # (kind, Keras kernel shape, unit_axes or None: unmodulated, hidden).
    # Depthwise kernels have spatial units only (km_tf.layers.modulator_plan;
    # whole-filter units would cut across output channels, which packs
    # refuse).
    specs = [(0, (3, 3, 64, 64), 2, 16), (0, (1, 1, 256, 64), 3, 32),
             (1, (3, 3, 64, 1), 2, 8), (1, (5, 5, 32, 2), 2, 4),
             (0, (3, 3, 128, 16), 3, 8), (0, (3, 3, 16, 8), None, 0)]
    template = bytearray(rng.integers(0, 256, 64, np.uint8).tobytes())

    def place(data):
        template.extend(b"\0" * (-len(template) % 16))
        template.extend(data)
        return len(template) - len(data)

    activations, input_scales = [], []
    for _ in range(4 if int8 else 0):
        input_scales.append(f32(rng.uniform(0.01, 0.1)))
        activations.append((place(input_scales[-1].tobytes()),
                            place(np.int64(rng.integers(-128, 127))
                                  .tobytes())))
    layers, values = [], []
    for slot, (kind, shape, unit_axes, hidden) in enumerate(specs):
        cout = shape[3] if kind == 0 else shape[2] * shape[3]
        kernel = rng.normal(0, 0.1, shape).astype(f32)
        if slot == 0:
            kernel[..., 3] = 0  # int8: the scale 5e-7 / 127
        layer = formats.LayerPlan(
            kind, shape, cout, slot, 0, 0, 0, 0,
            slot % 4 if int8 else formats.NO_ACTIVATION,
            rng.uniform(0.5, 1.5, cout).astype(f32),
            rng.normal(0, 0.1, cout).astype(f32),
            rng.normal(0, 0.1, cout).astype(f32), kernel)
        folded, bias = applier.folded_layer(
            b"", weight_type, layer, formats.LayerPack(2, 1, None, None))
        encoded = applier.encode_weights(
            weight_type, applier.template_layout(layer, folded), bias,
            3 if kind == 1 else 0,
            input_scales[layer.input_activation] if int8 else None)
        has_bias = int8 or unit_axes is not None
        layers.append(dataclasses.replace(
            layer, kernel_offset=place(encoded.kernel.tobytes()),
            bias_offset=place(encoded.bias.tobytes()) if has_bias else 0,
            kernel_scale_offset=(place(encoded.kernel_scales.tobytes())
                                 if int8 else 0),
            bias_scale_offset=(place(encoded.bias_scales.tobytes())
                               if int8 else 0),
            base_kernel=kernel if exact is True else None,
            kernel_residual=(rng.integers(-127, 128, layer.template_shape)
                             .astype(np.int8) if exact == "residual"
                             else None)))
        modulator = None
        if unit_axes:
            units = int(np.prod(shape[:unit_axes]))
            modulator = (rng.normal(0, 0.5, (hidden, units)).astype(f32),
                         rng.normal(0, 0.2, hidden).astype(f32),
                         rng.normal(0, 0.2, (units, hidden)).astype(f32),
                         rng.normal(0, 0.1, units).astype(f32))
        batchnorm = None
        if slot % 2 == 0:
            batchnorm = (rng.uniform(0.5, 1.5, cout).astype(f32),
                         rng.normal(0, 0.1, cout).astype(f32))
        values.append(formats.LayerPack(unit_axes or 2, hidden or 1,
                                        modulator, batchnorm))
    classes, features, task_classes = 10, 64, 7
    size = {"float32": 4, "float16": 2, "int8": 1}[weight_type]
    head = formats.HeadPlan(
        place(rng.integers(0, 127, classes * features * size,
                           np.uint8).tobytes()),
        place(np.ones(classes, "<f4").tobytes()) if int8 else 0,
        place(bytes((2 if size == 2 else 4) * classes)),
        place(np.ones(classes, "<f4").tobytes()) if int8 else 0,
        3 if int8 else formats.NO_ACTIVATION)
    template = bytes(template)
    fingerprint = hashlib.sha256(template).digest()
    plan = formats.Plan(fingerprint, len(template), formats.crc32(template),
                        weight_type, tuple(layers), head, classes, features,
                        tuple(activations))
    pack = formats.Pack(
        fingerprint, task_classes,
        rng.normal(0, 0.3, (features, task_classes)).astype(f32),
        rng.normal(0, 0.3, task_classes).astype(f32), tuple(values),
        tuple((float(f32(rng.uniform(0.01, 0.2))),
               int(rng.integers(-128, 127))) for _ in activations))
    modulators, batchnorms, heads = storage
    return template, formats.write_plan(plan), formats.write_pack(
        pack, modulator_type=modulators, batchnorm_type=batchnorms,
        head_type=heads)


STORAGE = {"f32": ("float32",) * 3, "f16": ("float16",) * 3,
           "i8": ("int8", "float16", "int8")}


@pytest.mark.parametrize("storage", sorted(STORAGE))
@pytest.mark.parametrize("weight_type, exact", [
    *((w, e) for w in ("float32", "float16", "int8") for e in (True, False)),
    ("int8", "residual")])
def test_synthetic_large_layers_equal_the_python_applier(lib, weight_type,
                                                         exact, storage):
    template, plan, pack = synthetic(weight_type, exact, STORAGE[storage])
    start = time.perf_counter()
    python = applier.apply_pack(template, plan, pack)
    middle = time.perf_counter()
    c = c_applier.apply(lib, template, plan, pack)
    end = time.perf_counter()
    mode = {True: "exact", False: "compact"}.get(exact, exact)
    print(f"\n{weight_type} {mode} {storage}: "
          f"{len(template):,} B template, Python {1e3 * (middle - start):.1f}"
          f" ms, C {1e3 * (end - middle):.1f} ms")
    changed = np.frombuffer(c, np.uint8) != np.frombuffer(template, np.uint8)
    assert changed.sum() > len(template) // 2
    wrong = np.flatnonzero(np.frombuffer(c, np.uint8)
                           != np.frombuffer(python, np.uint8))
    assert wrong.size == 0, f"{wrong.size} bytes differ, from {wrong[0]}"


# ------------------------------------------------------ helpers in isolation

def test_crc32_matches_zlib(lib):
    rng = np.random.default_rng(0)
    c = c_applier.load(lib)
    for size in (0, 1, 3, 4, 15, 16, 17, 255, 4096, 100_003):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        buf = c_applier.buffer(data)
        assert c.km_crc32(0, ctypes.cast(buf, ctypes.POINTER(
            ctypes.c_uint8)), size) == zlib.crc32(data)
    # Chaining: crc32(b, crc32(a)) == crc32(a + b), like zlib.
    a, b = b"kernel ", b"modulation"
    first = c.km_crc32(0, ctypes.cast(c_applier.buffer(a),
                                      ctypes.POINTER(ctypes.c_uint8)), len(a))
    assert c.km_crc32(first, ctypes.cast(c_applier.buffer(b), ctypes.POINTER(
        ctypes.c_uint8)), len(b)) == zlib.crc32(a + b)


def test_half_to_float_matches_numpy_for_every_half(lib):
    c = c_applier.load(lib)
    halves = np.arange(65536, dtype=np.uint16)
    expected = halves.view(np.float16).astype(np.float32)
    got = np.array([c.km_half_to_float(int(h)) for h in halves], np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32),
                          expected[~nan].view(np.uint32))


def test_float_to_half_rounds_like_numpy(lib):
    """Every half's neighbourhood (the value, the midpoints to its
    neighbours and one float32 ulp either side: all ties and near-ties,
    subnormals, overflow), plus random float32 bit patterns."""
    c = c_applier.load(lib)
    finite = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = np.sort(finite[np.isfinite(finite)].astype(np.float64))
    mids = (finite[:-1] + finite[1:]) / 2  # exact in float64 and float32
    mids32 = mids.astype(np.float32)
    values = np.concatenate([
        finite.astype(np.float32), mids32,
        np.nextafter(mids32, np.float32(np.inf)),
        np.nextafter(mids32, np.float32(-np.inf)),
        np.array([65504, 65519.996, 65520, 65536, 1e30, np.inf, -np.inf,
                  2.0 ** -25, 2.0 ** -26, 1.5 * 2.0 ** -25, 0.0, -0.0],
                 np.float32),
        np.random.default_rng(1).integers(0, 2 ** 32, 30_000,
                                          dtype=np.uint32).view(np.float32)])
    values = values[~np.isnan(values)]
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    got = np.array([c.km_float_to_half(float(v)) for v in values], np.uint16)
    wrong = np.flatnonzero(got != expected)
    assert wrong.size == 0, [(float(values[i]), hex(got[i]),
                              hex(expected[i])) for i in wrong[:5]]
    nan_bits = c.km_float_to_half(float("nan"))
    assert np.isnan(np.uint16(nan_bits).view(np.float16))


def test_status_messages_name_the_problem(lib):
    assert c_applier.message(lib, 0) == "ok"
    messages = [c_applier.message(lib, s) for s in range(1, 15)]
    assert len(set(messages)) == 14
    assert "another template" in messages[9]
    assert "unknown" in c_applier.message(lib, 99)


# -------------------------------------------------- the C applier vs Python

@pytest.mark.parametrize("name", sorted(CASES))
def test_c_output_equals_the_python_applier(lib, case, name):
    files = case(name)
    for pack, result in files["packs"]:
        python = applier.apply_pack(files["template"], files["plan"], pack)
        c = c_applier.apply(lib, files["template"], files["plan"], pack)
        assert len(c) == len(python)
        if c != python:
            first = next(i for i, (a, b) in enumerate(zip(c, python))
                         if a != b)
            diff = sum(a != b for a, b in zip(c, python))
            pytest.fail(f"{name} {result.pack_path.name}: {diff} bytes "
                        f"differ, the first at {first}")
        if CASES[name][1] == "float32":
            # Exact mode: the converter's export itself (up to tensor
            # names, which carry per-process suffixes).
            assert first_difference(c, result.reference_tflite) is None
        else:
            assert c != files["template"]


@pytest.mark.parametrize("name", ["micro-compact", "float32-exact"])
def test_in_place_equals_a_copy(lib, case, name):
    files = case(name)
    for pack, _ in files["packs"]:
        assert (c_applier.apply(lib, files["template"], files["plan"], pack,
                                in_place=True)
                == c_applier.apply(lib, files["template"], files["plan"],
                                   pack))


def test_a_patched_image_is_not_a_template(lib, case):
    """A device keeps the template and patches a copy per task switch: a
    task's image is refused as a template (its CRC is not the plan's)."""
    files = case("micro-exact")
    (first, first_result), (second, second_result) = files["packs"]
    image = bytearray(files["template"])
    image = c_applier.apply(lib, image, files["plan"], second)
    with pytest.raises(RuntimeError, match="template is not the plan's"):
        c_applier.apply(lib, image, files["plan"], first, in_place=True)
    assert first_difference(c_applier.apply(
        lib, files["template"], files["plan"], first),
        first_result.reference_tflite) is None


def test_scratch_formula_and_any_alignment(lib, case):
    files = case("micro-compact")
    template, plan = files["template"], files["plan"]
    pack = files["packs"][0][0]
    need = c_applier.scratch_bytes(lib, plan, pack)
    # The header's formula: 7 + max over layers of roundup8(4 * one output
    # channel's weights) + 8 * hidden (modulated layers).
    parsed = formats.read_plan(plan)
    values = formats.read_pack(pack, parsed)
    assert need == 7 + max(
        -(-4 * (layer.kernel_size // layer.cout) // 8) * 8
        + (8 * task.hidden if task.modulator is not None else 0)
        for layer, task in zip(parsed.layers, values.layers))
    expected = c_applier.apply(lib, template, plan, pack)
    c = c_applier.load(lib)
    u8p = ctypes.POINTER(ctypes.c_uint8)
    t, p, k = (c_applier.buffer(b) for b in (template, plan, pack))
    for shift in range(8):
        raw = (ctypes.c_uint8 * (need + 8))()
        scratch = ctypes.cast(ctypes.addressof(raw) + shift, ctypes.c_void_p)
        out = (ctypes.c_uint8 * len(template))()
        status = c.km_apply(ctypes.cast(t, u8p), len(template),
                            ctypes.cast(p, u8p), len(plan),
                            ctypes.cast(k, u8p), len(pack),
                            ctypes.cast(out, u8p), len(template), scratch,
                            need)
        assert status == 0
        assert bytes(out) == expected


def _sentinel(size):
    return (ctypes.c_uint8 * size).from_buffer_copy(b"\xa5" * size)


def test_scratch_one_byte_short_is_refused_and_writes_nothing(lib, case):
    files = case("micro-compact")
    pack = files["packs"][0][0]
    need = c_applier.scratch_bytes(lib, files["plan"], pack)
    out = _sentinel(len(files["template"]))
    status = c_applier.apply_into(lib, files["template"], files["plan"], pack,
                                  out, scratch=need - 1)
    assert "scratch buffer too small" in c_applier.message(lib, status)
    assert bytes(out) == b"\xa5" * len(out)


def _flip(data, at):
    data = bytearray(data)
    data[at] ^= 0x40
    return bytes(data)


def _refusals(case):
    """name -> (template, plan, pack, expected message part)."""
    micro, other = case("micro-exact"), case("float32-exact")
    template, plan = micro["template"], micro["plan"]
    pack = micro["packs"][0][0]
    return {
        "pack for another template": (template, plan, other["packs"][0][0],
                                      "made for another template"),
        "corrupt pack payload": (template, plan, _flip(pack, len(pack) - 30),
                                 "pack is corrupt"),
        "corrupt pack header": (template, plan, _flip(pack, 66),
                                "pack is corrupt"),
        "truncated pack": (template, plan, pack[:-1], "pack is truncated"),
        "pack header only": (template, plan, pack[:40], "pack is truncated"),
        "not a pack": (template, plan, plan, "not a km pack"),
        "truncated plan": (template, plan[:-4], pack, "plan is truncated"),
        "corrupt plan": (template, _flip(plan, len(plan) - 9), pack,
                         "plan is corrupt"),
        "wrong template": (other["template"], plan, pack,
                           "template is not the plan's"),
        "one template byte changed": (_flip(template, len(template) // 2),
                                      plan, pack,
                                      "template is not the plan's"),
    }


REFUSALS = ["pack for another template", "corrupt pack payload",
            "corrupt pack header", "truncated pack", "pack header only",
            "not a pack", "truncated plan", "corrupt plan", "wrong template",
            "one template byte changed"]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_refusals_write_nothing(lib, cli, case, refusal, tmp_path):
    template, plan, pack, message = _refusals(case)[refusal]
    out = _sentinel(len(template))
    status = c_applier.apply_into(lib, template, plan, pack, out)
    assert status != 0
    assert message in c_applier.message(lib, status)
    assert bytes(out) == b"\xa5" * len(out)
    # km_scratch_bytes (no template given) refuses a bad plan or pack too.
    assert (c_applier.scratch_bytes(lib, plan, pack) == 0) == (
        "template" not in refusal or "another" in refusal)
    # In place: the template buffer itself stays as it was.
    buf = c_applier.buffer(template)
    c = c_applier.load(lib)
    u8p = ctypes.POINTER(ctypes.c_uint8)
    p, k = c_applier.buffer(plan), c_applier.buffer(pack)
    scratch = (ctypes.c_uint8 * (1 << 16))()
    assert c.km_apply(ctypes.cast(buf, u8p), len(template),
                      ctypes.cast(p, u8p), len(plan), ctypes.cast(k, u8p),
                      len(pack), ctypes.cast(buf, u8p), len(template),
                      scratch, len(scratch)) == status
    assert bytes(buf)[:len(template)] == template
    # The Python applier refuses the same files.
    with pytest.raises(PackError):
        applier.apply_pack(template, plan, pack)
    # The CLI prints the message, exits 1 and writes no file.
    paths = []
    for label, data in (("t.tflite", template), ("p.kmplan", plan),
                        ("k.kmpack", pack)):
        paths.append(tmp_path / label)
        paths[-1].write_bytes(data)
    output = tmp_path / "task.tflite"
    done = subprocess.run([str(cli), *map(str, paths), str(output)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert message in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "k.kmpack", "p.kmplan", "t.tflite"]


def test_cli_writes_the_library_output(lib, cli, case, tmp_path):
    files = case("micro-compact")
    pack, result = files["packs"][1]
    output = tmp_path / "task.tflite"
    done = subprocess.run([str(cli), str(files["files"].tflite_path),
                           str(files["files"].plan_path),
                           str(result.pack_path), str(output)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert output.read_bytes() == c_applier.apply(lib, files["template"],
                                                  files["plan"], pack)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.tflite"]
    usage = subprocess.run([str(cli)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


# --------------------------------------------------------------- phone path

def _run(model_bytes, images):
    interpreter = Interpreter(model_content=bytes(model_bytes))
    interpreter.allocate_tensors()
    given, taken = (interpreter.get_input_details()[0],
                    interpreter.get_output_details()[0])
    outputs = []
    for image in images:
        x = image[None].astype(np.float32)
        if given["dtype"] != np.float32:
            scale, zero = given["quantization"]
            info = np.iinfo(given["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        interpreter.set_tensor(given["index"], x.astype(given["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(taken["index"])[0].copy())
    return np.asarray(outputs)


@pytest.mark.parametrize("name", ["micro-exact", "micro-compact",
                                  "float32-exact"])
def test_phone_path(lib, case, trained, name):
    """What an app does to switch tasks, with the C library as it calls it
    through JNI / Swift: read the three files, ask km_scratch_bytes,
    km_apply into its own buffer, load the result in LiteRT."""
    files = case(name)
    c = c_applier.load(lib)
    u8p = ctypes.POINTER(ctypes.c_uint8)
    template = c_applier.buffer(files["files"].tflite_path.read_bytes())
    plan = c_applier.buffer(files["files"].plan_path.read_bytes())
    size, plan_size = len(files["template"]), len(files["plan"])
    for index, (_, result) in enumerate(files["packs"]):
        pack_bytes = result.pack_path.read_bytes()
        pack = c_applier.buffer(pack_bytes)
        start = time.perf_counter()
        need = c.km_scratch_bytes(ctypes.cast(plan, u8p), plan_size,
                                  ctypes.cast(pack, u8p), len(pack_bytes))
        scratch = (ctypes.c_uint8 * need)()
        out = (ctypes.c_uint8 * size)()
        status = c.km_apply(ctypes.cast(template, u8p), size,
                            ctypes.cast(plan, u8p), plan_size,
                            ctypes.cast(pack, u8p), len(pack_bytes),
                            ctypes.cast(out, u8p), size, scratch, need)
        applied = time.perf_counter()
        assert status == 0, c_applier.message(lib, status)
        interpreter = Interpreter(model_content=bytes(out))
        interpreter.allocate_tensors()
        ready = time.perf_counter()
        print(f"\n{name} task{index}: km_apply {1e3 * (applied - start):.2f}"
              f" ms, + Interpreter + allocate_tensors "
              f"{1e3 * (ready - start):.2f} ms (template {size:,} B, pack "
              f"{len(pack_bytes):,} B, scratch {need:,} B)")
        images = trained["tasks"][index][2]
        classes = result.report["classes"]
        ours = _run(out, images)[:, :classes]
        reference = _run(result.reference_tflite, images)[:, :classes]
        if CASES[name][1] == "float32":
            np.testing.assert_array_equal(ours, reference)
        else:
            agreement = np.mean(ours.argmax(-1) == reference.argmax(-1))
            print(f"{name} task{index}: top-1 agreement with the "
                  f"conversion {agreement:.3f}")
            assert agreement >= 0.8
