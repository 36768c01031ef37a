"""Tests of the transfer benchmark: method table, byte counts, smoke run."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import km_tf
import transfer_suite as suite  # bench/ is on pytest's pythonpath.


def _task_model(num_classes: int = 5) -> keras.Model:
    keras.utils.set_random_seed(0)
    return suite.tiny_convnet(num_classes, 16)


def test_every_method_trains_only_its_per_task_variables():
    for name in suite.method_names(["all"]):
        model = suite.METHODS[name].prepare(_task_model(), 2)
        trainable = {v.path for v in model.trainable_variables}
        assert trainable, name
        assert any("head" in path for path in trainable), name
        if name != "full":
            assert not any(path.endswith("stem/kernel") for path in
                           trainable), (name, trainable)


def test_bitfit_trains_biases_and_head_only():
    model = suite.METHODS["bitfit"].prepare(_task_model(), 0)
    trainable = {v.path.split("/", 1)[1] if "/" in v.path else v.path
                 for v in model.trainable_variables}
    assert {"beta", "kernel", "bias"} == trainable, trainable
    assert all(v.path.startswith("head/") for v in model.trainable_variables
               if not v.path.endswith("beta"))


def test_method_groups_expand_and_unknown_names_are_refused():
    assert suite.method_names() == list(suite.MAIN_METHODS)
    assert set(suite.method_names(["ablation"])) <= set(
        suite.ABLATION_METHODS)
    with pytest.raises(ValueError, match="Unknown methods"):
        suite.method_names(["lora_x9"])


def test_rate_factors_split_modulators_from_head_and_batchnorm():
    """Adam's first step moves every weight with a gradient by ~the rate:
    with factors (1, 10) the head and BatchNorm move 10x as far as the
    modulators (the library's `modulator_rate_factor` grouping)."""
    model = suite.METHODS["km_head10"].prepare(_task_model(), 0)
    trainer = suite.Trainer(model, 5, rate_factors=(1.0, 10.0))
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3))
    labels = np.arange(8) % 5
    dataset = tf.data.Dataset.from_tensors((images.astype("float32"),
                                            labels.astype("int32")))
    trainer.train(dataset, 5, steps=1, peak_rate=1e-3)
    moves = {v.path: float(np.abs(keras.ops.convert_to_numpy(v) - b).max())
             for v, b in zip(model.trainable_variables, before)}
    head = max(m for path, m in moves.items() if path.startswith("head/"))
    batchnorm = max(m for path, m in moves.items()
                    if path.endswith(("gamma", "beta")))
    modulators = max(m for path, m in moves.items() if "modulator" in path)
    assert head == pytest.approx(1e-2, rel=0.05)
    assert batchnorm == pytest.approx(1e-2, rel=0.05)
    assert modulators == pytest.approx(1e-3, rel=0.05)


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
    for method in ("lora", "lora_bn"):
        target = suite.per_task_bytes(
            suite.METHODS[method].prepare(_task_model(), 4))
        assert suite.matching_lora_rank(_task_model(), target, method) == 4


def test_km_variants_equal_to_the_default_are_dropped():
    names = suite.method_names(["all"])
    settings = [{**suite.km_defaults(), **(suite.METHODS[n].km_options or {}),
                 "rate_factors": suite.METHODS[n].rate_factors,
                 "recipe": suite.METHODS[n].recipe}
                for n in names if suite.METHODS[n].group == "km"]
    assert len(settings) == len({json.dumps(o, sort_keys=True)
                                 for o in settings})
    assert set(suite.MAIN_METHODS) <= set(names)
    # The default follows the rule; the fixed BatchNorm rows stay apart.
    assert {"km", "km_bntrain", "km_bnfreeze_mlr10"} <= set(names)


def test_km_default_takes_batchnorm_and_rates_from_the_rule_per_task():
    km = suite.METHODS["km"]
    assert km.recipe and km.label == "KM default (hybrid h16/f1, BN by rule)"
    few, many = km.for_task(5), km.for_task(40)
    assert (few.km_options["batchnorm"], few.rate_factors) == ("freeze",
                                                               (0.03, 1.0))
    assert (many.km_options["batchnorm"], many.rate_factors) == ("train",
                                                                 (1.0, 1.0))
    for variant, bn_trains in ((few, False), (many, True)):
        trainable = {v.path for v in variant.prepare(_task_model(), 0)
                     .trainable_variables}
        assert any("modulator" in path for path in trainable)
        assert any(path.startswith("stem_bn/") for path in trainable) == (
            bn_trains)
    fixed = suite.METHODS["km_bntrain"]
    assert fixed.for_task(5) is fixed
    tasks = [suite.TaskSpec(spec) for spec in ("a", "b", "c")]
    groups = suite.task_variants(km, tasks, {"a": 40, "b": 5, "c": 16})
    assert [([t.spec for t in members], variant.rate_factors)
            for variant, members in groups] == [(["a", "c"], (1.0, 1.0)),
                                                (["b"], (0.03, 1.0))]


def test_lora_control_takes_the_km_rules_rates_and_keeps_its_batchnorm():
    """`lora_rule` gives LoRA + head the KM default's two rates: its
    factors step at the rule's multiple, the head at the swept rate, and
    BatchNorm stays frozen on every task."""
    control = suite.METHODS["lora_rule"]
    few, many = control.for_task(5), control.for_task(40)
    assert (few.rate_factors, many.rate_factors) == ((0.03, 1.0), (1.0, 1.0))
    model = few.prepare(_task_model(), 2)
    adapters = {v.path for v in suite.adapter_variables(model)}
    assert adapters and all("lora_kernel" in path for path in adapters)
    assert not any(path.endswith(("gamma", "beta"))
                   for path in (v.path for v in model.trainable_variables))
    trainer = suite.Trainer(model, 5, few.rate_factors)
    assert ({v.path for v in trainer.groups[0]}, trainer.factors) == (
        adapters, [0.03, 1.0])


def test_transfer_program_fixes_threads_and_determinism():
    """What `bench/transfer.py` (and `bench/meta.py`) do first, in a fresh
    process: one thread per pool and op determinism, so a row rerun alone
    (on any number of cores) reproduces the full run."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    code = ("import meta, transfer, tensorflow as tf\n"
            "from tensorflow.python.framework import config\n"
            "assert transfer.make_reproducible is meta.make_reproducible\n"
            "transfer.make_reproducible(1)\n"
            "tf.constant(1.0) + 1.0\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(),"
            " tf.config.threading.get_inter_op_parallelism_threads(),"
            " config.is_op_determinism_enabled())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=bench,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["1", "1", "True"]


def _sweep_run(seed: int, rate: float, val: float, phase: str = "sweep",
               test: float = 0.5) -> dict:
    return {"method": "m", "task": "t", "seed": seed, "learning_rate": rate,
            "phase": phase, "validation_accuracy": val,
            "validation_loss": 1.0 - val, "test_accuracy": test}


def test_the_rate_is_chosen_on_the_mean_over_the_sweep_seeds():
    # 0.1 wins at seed 0 by luck; 0.01 wins on the mean over three seeds.
    runs = [_sweep_run(0, 0.01, 0.80, test=0.7), _sweep_run(0, 0.1, 0.90),
            _sweep_run(1, 0.01, 0.85, test=0.8), _sweep_run(1, 0.1, 0.60),
            _sweep_run(2, 0.01, 0.80, test=0.9), _sweep_run(2, 0.1, 0.70),
            _sweep_run(3, 0.01, 0.0, "seed", test=0.6)]
    assert suite.chosen_rate(runs[:6]) == 0.01
    chosen = suite.selected_runs({"runs": runs}, "m", "t")
    assert [(r["seed"], r["test_accuracy"]) for r in chosen] == [
        (0, 0.7), (1, 0.8), (2, 0.9), (3, 0.6)]
    # Results written before sweep seeds existed: seed 0 alone swept.
    assert [r["seed"] for r in suite.selected_runs(
        {"runs": [runs[0], runs[1], {**runs[2], "phase": "seed"}]}, "m",
        "t")] == [0, 1]
    offline = suite.SUITES["offline"]
    assert suite.runs_per_task(offline) == (
        len(offline.learning_rates) * offline.sweep_seeds
        + offline.seeds - offline.sweep_seeds)
    with pytest.raises(ValueError, match="sweep_seeds"):
        dataclasses.replace(offline, seeds=2)


def test_smoke_suite_writes_json_png_and_results(tmp_path):
    import transfer  # bench/transfer.py; importing defines its absl flags.
    import transfer_report

    output = tmp_path / "transfer"
    markdown = tmp_path / "RESULTS.md"
    # TensorFlow already runs in this process, so its thread counts are
    # fixed: --threads=0 (test_transfer_program_fixes_threads covers them).
    flags.FLAGS(["transfer.py", "--suite=smoke", f"--output={output}",
                 f"--markdown={markdown}", "--steps=2", "--threads=0",
                 f"--cache_dir={tmp_path / 'cache'}"])
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
    # The pretrained base is cached for reruns.
    assert list((tmp_path / "cache").glob("base_tiny_convnet_*.keras"))
    # Runs of disjoint methods (e.g. one process per core) merge into the
    # results of one run.
    names = list(results["methods"])
    parts = [{**results, "methods": {n: results["methods"][n] for n in half},
              "runs": [r for r in results["runs"] if r["method"] in half]}
             for half in (names[:2], names[2:])]
    assert transfer.merged_results(parts)["summary"] == results["summary"]
    # Rows come in the method table's order, whatever the parts' order.
    assert list(transfer.merged_results(parts[::-1])["methods"]) == names
    # A rerun of one row replaces that row's runs and nothing else.
    rerun = names[0]
    changed = {**results, "methods": {rerun: results["methods"][rerun]},
               "runs": [{**r, "test_accuracy": 0.0} for r in results["runs"]
                        if r["method"] == rerun]}
    merged = transfer.merged_results([results, changed])
    assert merged["summary"][rerun]["mean_test_accuracy"] == 0.0
    assert len(merged["runs"]) == len(results["runs"])
    assert {n: merged["summary"][n] for n in names[1:]} == {
        n: results["summary"][n] for n in names[1:]}
    with pytest.raises(ValueError, match="different suite"):
        transfer.merged_results([results, {**results, "suite": {
            **results["suite"], "steps": 999}}])
    with pytest.raises(ValueError, match="sweep_seeds"):
        transfer.merged_results([results, {**results, "suite": {
            **results["suite"], "sweep_seeds": 2}}])
    # A file written before `sweep_seeds` existed swept at seed 0 alone:
    # it merges with a one-seed sweep and is described as one.
    older = {**results, "suite": {key: value for key, value
                                  in results["suite"].items()
                                  if key != "sweep_seeds"}}
    assert results["suite"]["sweep_seeds"] == 1
    assert transfer.merged_results([results, older])["summary"] == (
        results["summary"])
    assert " at seed 0; " in (
        transfer_report.markdown(older, "transfer.png"))


def test_offline_suite_runs_on_a_tiny_budget(tmp_path, monkeypatch):
    """The real offline suite's data (generated pretraining classes, all six
    target tasks) through the whole program, on a tiny network and budget."""
    import transfer

    monkeypatch.setenv("KM_TF_CACHE_DIR", str(tmp_path / "generated"))
    output = tmp_path / "transfer"
    flags.FLAGS(["transfer.py", f"--output={output}", "--threads=0",
                 f"--markdown={tmp_path / 'RESULTS.md'}", "--steps=2",
                 "--model=tiny_convnet", "--image_size=16",
                 "--pretrain=fractals:4 glyphs:ogham", "--pretrain_steps=3",
                 "--seeds=1", "--learning_rates=0.01",
                 "--methods=head,lora,km", f"--cache_dir={tmp_path / 'cache'}"])
    try:
        transfer.main([])
    finally:
        flags.FLAGS.unparse_flags()
    results = json.loads(output.with_suffix(".json").read_text())
    assert [t.name for t in suite.OFFLINE_TASKS] == list(results["tasks"])
    assert results["base"]["classes"] == 4 + 26
    assert results["tasks"]["armenian_0-19"]["classes"] == 20
    assert results["methods"]["lora"]["lora_rank"] >= 1
    # The KM default follows the rule per task: the glyph tasks (5 and 10
    # images per class) freeze BatchNorm and slow the modulators.
    km = results["methods"]["km"]
    chosen = {task: (r["images_per_class"], r["batchnorm"],
                     r["modulator_rate_factor"])
              for task, r in km["recipe"].items()}
    assert chosen["armenian_0-19"] == (5, "freeze", 0.03)
    assert chosen["hebrew_0-19"] == (10, "freeze", 0.03)
    assert chosen["digits_5-9"] == (40, "train", 1.0)
    assert km["trainable_variables"]["armenian_0-19"] < (
        km["trainable_variables"]["digits_5-9"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Target" in text and "KM default vs LoRA + head" in text
    assert "KM default: 5 training images per class < 16" in text


def _result(methods: dict[str, float], steps: int = 60) -> dict:
    """A results dict of `bench/transfer.py`'s shape (one task)."""
    suite_fields = {"base": {"model": "m"}, "tasks": [], "steps": steps,
                    "batch_size": 32, "learning_rates": [0.01], "seeds": 3,
                    "augment": 0.0}
    return {"suite": suite_fields, "tasks": {"t": {}},
            "methods": {name: {"label": name.upper()} for name in methods},
            "summary": {name: {"mean_test_accuracy": accuracy,
                               "mean_test_accuracy_std": 0.01,
                               "mean_per_task_bytes": 2048,
                               "tasks": {"t": {"test_accuracy_mean":
                                               accuracy}}}
                        for name, accuracy in methods.items()}}


def test_ablation_table_merges_runs_against_the_default():
    import ablation_table  # bench/ablation_table.py

    tasks, rows = ablation_table.merged_rows(
        [_result({"km": 0.5, "head": 0.4}), _result({"km_f4": 0.55,
                                                     "km": 0.1})])
    assert list(rows) == ["km", "head", "km_f4"]
    lines = ablation_table.table(tasks, rows)
    assert lines[-1].startswith("| KM_F4 | 55.0 | 55.0 ± 1.0 | 2.0 KB | +5.0")
    with pytest.raises(ValueError, match="steps"):
        ablation_table.merged_rows([_result({"km": 0.5}),
                                    _result({"km": 0.5}, steps=2)])


def test_a_methods_runs_do_not_depend_on_the_other_methods_run(tmp_path):
    """One row rerun alone reproduces that row of the full run: every run
    gets its own data pipeline, so no method's batches depend on how often
    another method iterated the same shuffled dataset first."""
    smoke = dataclasses.replace(suite.SUITES["smoke"], steps=3, seeds=2,
                                sweep_seeds=1, learning_rates=(3e-3, 1e-2))

    def runs(methods: tuple[str, ...]) -> list[dict]:
        results = suite.run_suite(
            dataclasses.replace(smoke, methods=methods),
            tmp_path, progress=lambda message: None)
        return [r for r in results["runs"] if r["method"] == "km"]

    together, alone = runs(("head", "km")), runs(("km",))
    keys = ("seed", "learning_rate", "final_train_loss",
            "validation_accuracy", "validation_loss", "test_accuracy")
    assert [[r[k] for k in keys] for r in together] == [
        [r[k] for k in keys] for r in alone]


def test_report_provenance_names_command_machine_date_and_run_time():
    from results_io import provenance

    full = provenance({"command": "python bench/x.py --flag", "machine":
                       "x86_64, 2 CPU cores", "date": "2026-11-27",
                       "seconds": 61.6})
    assert full == ["Command: `python bench/x.py --flag`  ",
                    "Machine: x86_64, 2 CPU cores; 2026-11-27; run 62 s.  "]
    bare = provenance({"machine": "m"}, default_command="measure()")
    assert bare == ["Command: `measure()`  ", "Machine: m.  "]
