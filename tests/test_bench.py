"""Tests of the transfer benchmark: method table, byte counts, smoke run."""

import json

import keras
from absl import flags

import km_tf
import transfer_suite as suite  # bench/ is on pytest's pythonpath.


def _task_model(num_classes: int = 5) -> keras.Model:
    keras.utils.set_random_seed(0)
    return suite.tiny_convnet(num_classes, 16)


def test_every_method_trains_only_its_per_task_variables():
    for name in suite.method_names():
        model = suite.METHODS[name].prepare(_task_model(), 2)
        trainable = {v.path for v in model.trainable_variables}
        assert trainable, name
        assert any("head" in path for path in trainable), name
        if name in ("head", "bn_head", "lora") or name.startswith("km"):
            assert not any(path.endswith("stem/kernel") for path in
                           trainable), (name, trainable)


def test_lora_freezes_kernels_and_leaves_depthwise_alone():
    model = suite.METHODS["lora"].prepare(_task_model(), 3)
    trainable = {v.path for v in model.trainable_variables}
    assert any("lora_kernel_a" in path for path in trainable)
    assert not any(path.startswith("dw/") for path in trainable)
    assert not any(path.endswith("stem/kernel") for path in trainable)


def test_per_task_bytes_counts_the_right_tensors():
    model = _task_model()
    full = suite.per_task_bytes(suite.METHODS["full"].prepare(
        _task_model(), 1))
    assert full == 4 * model.count_params()
    head = suite.per_task_bytes(suite.METHODS["head"].prepare(
        _task_model(), 1), num_classes=2)
    assert head == 4 * (16 + 1) * 2
    km = suite.METHODS["km"].prepare(_task_model(), 1)
    assert suite.per_task_bytes(km, 5) == km_tf.task_report(km).task_bytes


def test_lora_rank_matches_target_bytes():
    model = _task_model()
    target = suite.per_task_bytes(
        suite.METHODS["lora"].prepare(_task_model(), 4))
    assert suite.matching_lora_rank(model, target) == 4


def test_km_variants_equal_to_the_default_are_dropped():
    names = suite.method_names()
    options = [{**suite.km_defaults(),
                **(suite.METHODS[n].km_options or {})}
               for n in names if suite.METHODS[n].group == "km"]
    assert len(options) == len({json.dumps(o, sort_keys=True)
                                for o in options})
    assert {"head", "bn_head", "lora", "km", "full"} <= set(names)


def test_smoke_suite_writes_json_png_and_results(tmp_path):
    import transfer  # bench/transfer.py; importing defines its absl flags.

    output = tmp_path / "transfer"
    markdown = tmp_path / "RESULTS.md"
    flags.FLAGS(["transfer.py", "--suite=smoke", f"--output={output}",
                 f"--markdown={markdown}", "--steps=2"])
    try:
        transfer.main([])
    finally:
        flags.FLAGS.unparse_flags()
    results = json.loads(output.with_suffix(".json").read_text())
    assert set(results["methods"]) == set(suite.method_names())
    assert set(results["summary"]) == set(results["methods"])
    assert output.with_suffix(".png").stat().st_size > 10_000
    text = markdown.read_text()
    for info in results["methods"].values():
        assert info["label"] in text
    assert "transfer.png" in text
    # The pretrained base is cached next to the results for reruns.
    assert list(tmp_path.glob("base_tiny_convnet_*.keras"))
