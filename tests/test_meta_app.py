"""km-meta-train (apps/meta_train.py) as a program, its tfds data,
bench/meta.py and bench/meta_adaptation.py, all on tiny budgets.

The program runs start together in one module fixture (each is mostly
single-threaded TensorFlow start-up and tracing, so two cores overlap
them): an uninterrupted run logging to a file, the same run SIGKILLed
after its first checkpoint, refused a resume with another flag and started
again, a run whose tasks adapt the head too, that run on two mirrored
logical CPUs and as two worker processes of a multi-worker cluster on
loopback, a MAML run, and runs with bad flags.
"""

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from support import finish, loopback_cluster

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "meta_train.py"
ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
               "CUDA_VISIBLE_DEVICES": ""}
# Three small glyph scripts (26 to 32 letters, 20 images each), 8 px, a
# Conv-4 of 8 filters: it checks the wiring, not the accuracy.
DATA = "glyphs:nko/old_italic/ogham"
SIZE, WAYS, STEPS = 8, 3, 12
TINY = [f"--data={DATA}", f"--image_size={SIZE}", "--alpha=0.125",
        f"--ways={WAYS}", "--queries=2", "--meta_batch_size=2",
        "--inner_steps=1", "--hidden_units=4", f"--meta_steps={STEPS}",
        "--log_every=2", "--checkpoint_every=2", "--eval_every=6",
        "--val_episodes=3", "--eval_episodes=6"]
# Tasks adapt the head too, and the last modulator is like the others (the
# default runs tasks that adapt the modulators alone, the last one
# filter-form and faster).
HEAD_ADAPTING = ["--adapt_head", "--last_filter_units=0"]
BAD_FLAGS = {
    # ogham, the meta-test script, has 26 letters.
    "ways": (["--ways=30"], "meta-test split of 'glyphs:nko/old_italic/"
             "ogham' has 26. Lower --ways"),
    "replicas": (["--strategy=mirrored", "--cpu_replicas=2",
                  "--meta_batch_size=3"],
                 "--meta_batch_size=3 cannot be split evenly over 2 "
                 "replicas"),
    "size": (["--model=mobilenet_v2", "--image_size=28"],
             "--model=mobilenet_v2 needs --image_size of 32 or more"),
    "rates": (["--learn_inner_rates", "--first_order"],
              "--learn_inner_rates needs second-order meta-gradients"),
    "zero_head": (["--zero_head"], "tasks must adapt the head, and km_maml "
                  "shares one meta-trained head by default: add "
                  "--adapt_head"),
}


def start(output: Path, *flags: str, log: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts the program with the tiny flags (later flags win)."""
    stream = open(log, "w") if log else subprocess.PIPE
    process = subprocess.Popen(
        [sys.executable, str(APP), *TINY, *flags, f"--output_dir={output}"],
        env={**ENVIRONMENT, **(env or {})}, stdout=stream,
        stderr=subprocess.STDOUT, text=True)
    if log:
        stream.close()
    return process


def kill_and_resume(process: subprocess.Popen, output: Path, result: dict,
                    timeout: float = 300) -> None:
    """SIGKILLs `process` as soon as its first checkpoint exists, records
    the step that checkpoint holds, tries to resume with another outer
    schedule (`result["changed"]`: output, return code, whether the
    checkpoint is untouched) and starts the same command again
    (`result["resumed"]`)."""
    checkpoint = output / "backup" / "checkpoint.npz"
    deadline = time.monotonic() + timeout
    while not checkpoint.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            result["error"] = "the run ended (or hung) before a checkpoint"
            process.kill()
            return
        time.sleep(0.01)
    process.kill()  # SIGKILL
    process.communicate()
    with np.load(checkpoint) as stored:
        result["step"] = json.loads(stored["progress.json"].tobytes())["step"]
    result["killed_report"] = (output / "meta.report.json").exists()
    saved = checkpoint.read_bytes()
    changed = start(output, "--outer_schedule=cosine")
    text, _ = changed.communicate(timeout=timeout)
    result["changed"] = {"output": text, "returncode": changed.returncode,
                         "checkpoint_kept": checkpoint.read_bytes() == saved}
    result["resumed"] = start(output)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_app")
    processes = {
        "plain": start(root / "plain", log=root / "plain.log"),
        "maml": start(root / "maml", "--method=maml"),
        "head_adapting": start(root / "head_adapting", *HEAD_ADAPTING),
        "distributed": start(root / "distributed", *HEAD_ADAPTING,
                             "--strategy=mirrored", "--cpu_replicas=2"),
        **{f"worker{index}": start(root / "workers", *HEAD_ADAPTING,
                                   "--strategy=multi_worker",
                                   env={"TF_CONFIG": tf_config})
           for index, tf_config in enumerate(loopback_cluster(2))},
        "killed": start(root / "killed"),
        **{f"bad_{name}": start(root / f"bad_{name}", *flags)
           for name, (flags, _) in BAD_FLAGS.items()},
    }
    killed: dict = {}
    killer = threading.Thread(target=kill_and_resume, args=(
        processes["killed"], root / "killed", killed))
    killer.start()
    yield {"root": root, "processes": processes, "killer": killer,
           "killed": killed}
    killer.join()
    if "resumed" in killed:
        processes["resumed"] = killed["resumed"]
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def report(output: Path) -> dict:
    return json.loads((output / "meta.report.json").read_text())


def weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path).get_weights()


def task_contents(path: Path) -> dict[str, bytes]:
    """A task file's members (the zip's timestamps aside)."""
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# The in-process tests come first and take the `runs` fixture, so that
# the programs run meanwhile.


def test_tfds_pools_split_classes_of_all_splits(runs, tmp_path):
    import tensorflow_datasets as tfds

    from km_tf.meta import pools as meta_pools

    with tfds.testing.mock_data(num_examples=60):
        pools = meta_pools.load_pools("tfds:mnist", 8,
                                      data_dir=str(tmp_path))
        counted = meta_pools.load_pools("tfds:mnist:4/3/3", 8,
                                        data_dir=str(tmp_path))
        with pytest.raises(ValueError, match="asks for 12 classes"):
            meta_pools.load_pools("tfds:mnist:4/4/4", 8,
                                  data_dir=str(tmp_path))
    assert pools.images.shape == (120, 8, 8, 3)  # train + test, grey as RGB
    assert pools.images.dtype == np.uint8
    present = set(np.unique(pools.labels).tolist())
    for split_pools, sizes in ((pools, (6, 2, 2)), (counted, (4, 3, 3))):
        parts = [set(getattr(split_pools.splits, name))
                 for name in ("train", "validation", "test")]
        assert tuple(map(len, parts)) == sizes
        assert set.union(*parts) == present and sum(sizes) == len(present)
    episode = pools.sampler("test", ways=2, shots=1, queries=1,
                            seed=0).episode(0)
    assert episode.support_images.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="Unknown meta-learning data"):
        meta_pools.load_pools("digits", 8)


def test_the_benchmark_runs_on_a_tiny_budget(runs, tmp_path):
    import meta as bench  # bench/meta.py; bench/ is on pytest's pythonpath.

    config = bench.Config(
        data=DATA, shots=(1,), ways=2, queries=1, alpha=0.125, image_size=8,
        meta_steps=2, meta_batch_size=1, inner_steps=1, eval_inner_steps=1,
        finetune_steps=2, hidden_units=4, eval_episodes=3, log_every=1,
        verbose=0)
    results = bench.measure(config)
    bench.write(results, tmp_path / "meta")
    written = json.loads((tmp_path / "meta.json").read_text())
    runs = {run["method"]: run for run in written["runs"]}
    assert set(runs) == set(bench.METHODS)
    assert {method: run["task_storage"]["contents"]
            for method, run in runs.items()} == {
                "km_maml": "modulators", "anil": "head",
                "maml": "whole network", "finetune": "head"}
    for run in runs.values():
        assert 0 <= run["accuracy"] <= 1 and run["episodes"] == 3
    # The meta-learners are scored transductively and as deployed, with
    # the moving statistics and with their support set's.
    for key in ("deployed_accuracy", "support_accuracy"):
        assert [method for method, run in runs.items() if key in run] == [
            "km_maml", "anil", "maml"]
    assert not runs["finetune"]["transductive"]
    # A task with its own statistics stores them: a mean and a variance
    # per channel of the alpha 0.125 Conv-4's four BatchNorm layers (8
    # channels each), in float32.
    for method in ("km_maml", "anil"):
        storage = runs[method]["support_task_storage"]
        assert storage["contents"] == (
            runs[method]["task_storage"]["contents"]
            + " + batchnorm statistics")
        assert storage["task_bytes"] - runs[method]["task_storage"][
            "task_bytes"] == 4 * 8 * 2 * 4
    assert runs["maml"]["support_task_storage"] == runs["maml"][
        "task_storage"]
    text = (tmp_path / "meta.md").read_text()
    assert "| 1-shot | km_maml |" in text and "95% CI" in text
    assert "support statistics" in text


def test_run_logs_a_line_per_interval_and_reports(runs):
    root = runs["root"]
    finish(runs["processes"]["plain"])
    text = (root / "plain.log").read_text()
    # Not a progress bar redrawn with \b or \r.
    assert "\b" not in text and "\r" not in text
    for step in range(2, STEPS + 1, 2):
        assert text.count(f"meta-train step {step}/{STEPS}: loss") == 1
    assert "meta-test: 6/6 episodes" in text
    out = root / "plain"
    assert {"meta_base.keras", "meta_init.kmtask", "example_task.kmtask",
            "meta.report.json", "meta.report.txt"} == {
                p.name for p in out.iterdir()}
    result = report(out)
    assert result["settings"]["method"] == "km_maml"
    assert result["data"]["classes"] == {"train": 32, "validation": 31,
                                         "test": 26}
    assert result["training"]["resumed_after"] == 0
    history = result["training"]["history"]
    assert [r["step"] for r in history] == list(range(2, STEPS + 1, 2))
    assert [r["step"] for r in history if "val_accuracy" in r] == [6, 12]
    test = result["test"]
    assert test["episodes"] == 6 and 0 <= test["accuracy"] <= 1
    assert test["ci95"] >= 0
    # Also scored as deployed tasks compute.
    assert set(test["deployed"]) == {"moving", "support"}
    assert all(0 <= score["accuracy"] <= 1
               for score in test["deployed"].values())
    # The default tasks adapt the modulators alone and keep their support
    # set's BatchNorm statistics.
    settings = result["settings"]
    assert (settings["adapt_head"], settings["last_filter_units"]) == (
        False, 8)
    storage = result["task_storage"]
    assert storage["contents"] == "modulators + batchnorm statistics"
    assert 0 < storage["task_bytes"] < storage["base_bytes"]
    # The inner rates tasks adapt with: fixed, the modulators at the inner
    # rate, the filter-form last one at 10x.
    rates = {rate["variable"]: rate["rate"] for rate in result["inner_rates"]}
    assert all("/modulator/" in variable for variable in rates), rates
    assert {rate for variable, rate in rates.items()
            if variable.startswith("block4_conv/")} == {1.0}
    assert {rate for variable, rate in rates.items()
            if not variable.startswith("block4_conv/")} == {0.1}
    text = (out / "meta.report.txt").read_text()
    assert "95% CI" in text
    assert "as deployed, with statistics re-estimated on the support set" in (
        text)


@pytest.mark.parametrize("name", ["plain", "head_adapting"])
def test_the_adapted_example_task_restores_with_restore_task(runs, name):
    import keras

    import km_tf
    from km_tf.meta import pools as meta_pools

    out = runs["root"] / name
    finish(runs["processes"][name])
    example = report(out)["outputs"]["example_task"]
    assert example["statistics"] == "support"
    base = keras.saving.load_model(out / "meta_base.keras")
    task = km_tf.restore_task(base, out / "example_task.kmtask")
    last = task.get_layer("block4_conv")
    assert (last.form, last.filter_units) == (
        ("filter", 8) if name == "plain" else ("hybrid", 1))
    pools = meta_pools.load_pools(DATA, SIZE)
    episode = pools.sampler("test", ways=WAYS, shots=1, queries=2,
                            seed=example["episode_seed"]).episode(0)
    predicted = np.argmax(task.predict(episode.query_images, verbose=0), -1)
    assert np.mean(predicted == episode.query_labels) == pytest.approx(
        example["query_accuracy"])
    # The meta-learned initialisation is a task file of the same base.
    km_tf.restore_task(base, out / "meta_init.kmtask")


def test_head_adapting_tasks_step_the_modulators_at_a_tenth(runs):
    out = runs["root"] / "head_adapting"
    finish(runs["processes"]["head_adapting"])
    result = report(out)
    settings = result["settings"]
    assert (settings["adapt_head"], settings["last_filter_units"]) == (
        True, None)
    rates = result["inner_rates"]
    assert {rate["modulator"] for rate in rates} == {True, False}
    assert all(rate["rate"] == (0.01 if rate["modulator"] else 0.1)
               for rate in rates), rates
    assert {rate["variable"].split("/")[0] for rate in rates
            if not rate["modulator"]} == {"head"}
    assert result["task_storage"]["contents"] == (
        "modulators + head + batchnorm statistics")


def run_adaptation_bench(run_dir: Path, stem: Path, *flags: str
                         ) -> subprocess.CompletedProcess:
    """bench/meta_adaptation.py on `run_dir`, 6 episodes per split."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "meta_adaptation.py"),
         f"--run_dir={run_dir}", "--episodes=6", f"--output={stem}", *flags],
        env=ENVIRONMENT, timeout=600, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["plain", "maml", "head_adapting"])
def test_adaptation_bench_scores_a_run_with_parts_of_its_network(
        runs, tmp_path, name):
    out = runs["root"] / name
    finish(runs["processes"][name])
    stem = tmp_path / "adaptation"
    run_adaptation_bench(out, stem).check_returncode()
    results = json.loads(stem.with_suffix(".json").read_text())
    test = results["scores"]["test"]
    convolutions = [f"head + block{i}_conv" for i in range(1, 5)]
    assert list(test) == ["as meta-trained", "head only",
                          "head + BatchNorm", *convolutions]
    # The rebuilt learner reproduces the run's own meta-test score (the
    # same episodes), and differences are paired.
    as_trained = test["as meta-trained"]
    assert as_trained["query"]["accuracy"] == pytest.approx(
        report(out)["test"]["accuracy"], abs=1e-4)
    for adaptation in test.values():
        for statistics in ("query", "support"):
            assert adaptation[statistics]["gain"] == pytest.approx(
                adaptation[statistics]["accuracy"]
                - as_trained[statistics]["accuracy"], abs=1e-4)
    # What each adaptation adapts: km_maml a convolution's modulator (the
    # default's last one: 8 hidden units over 3x3x8 filters; head_adapting's:
    # 4 over 3x3 units), maml its kernel (8 filters of 3x3x8, no bias:
    # BatchNorm follows).
    weights = results["adapted_weights"]
    head = weights["head only"]
    own = weights["head + block4_conv"] - head
    assert own == {"maml": 3 * 3 * 8 * 8, "plain": 2 * 8 * 72 + 8 + 72,
                   "head_adapting": 2 * 4 * 9 + 4 + 9}[name], own
    assert weights["as meta-trained"] > weights["head + block4_conv"]
    assert "## Meta-test" in stem.with_suffix(".md").read_text()


def test_task_rank_bench_truncates_the_last_kernels_change(runs, tmp_path):
    out = runs["root"] / "maml"
    finish(runs["processes"]["maml"])
    stem = tmp_path / "rank"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "meta_task_rank.py"),
         f"--run_dir={out}", "--episodes=6", f"--output={stem}"],
        env=ENVIRONMENT, timeout=600, capture_output=True,
        text=True).check_returncode()
    results = json.loads(stem.with_suffix(".json").read_text())
    assert results["layer"] == "block4_conv"
    assert results["change_shape"] == [3, 3, 8, 8]
    ranks = results["rank"]
    # Rank 0 keeps the meta-trained kernel; rank 8 (every filter) is the
    # whole change, so it scores what the whole change scores.
    assert ranks["0"]["energy"] == 0.0
    assert ranks["8"]["energy"] == pytest.approx(1.0)
    assert ranks["8"]["accuracy"] == pytest.approx(
        results["full_change"]["accuracy"])
    # At most as many shared directions as meta-validation changes.
    assert [int(k) for k in results["shared"]] == [0, 4]
    assert "| rank 4 |" in stem.with_suffix(".md").read_text()
    refused = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "meta_task_rank.py"),
         f"--run_dir={runs['root'] / 'plain'}", "--episodes=6",
         f"--output={stem}"], env=ENVIRONMENT, timeout=600,
        capture_output=True, text=True)
    assert refused.returncode != 0
    assert "Pass a --method=maml run" in refused.stderr


def test_adaptation_bench_refuses_an_unfinished_run(runs, tmp_path):
    failed = run_adaptation_bench(runs["root"] / "missing",
                                  tmp_path / "adaptation")
    assert failed.returncode != 0 and "is missing" in failed.stderr


def test_a_killed_run_resumes_to_the_same_weights_and_metrics(runs):
    """Resuming with another flag is refused first, keeping the backup."""
    root = runs["root"]
    runs["killer"].join()
    killed = runs["killed"]
    assert "error" not in killed, killed
    assert 2 <= killed["step"] < STEPS
    assert not killed["killed_report"]
    changed = killed["changed"]
    assert changed["returncode"] != 0
    assert changed["checkpoint_kept"]
    assert ("--outer_schedule: 'constant' then, 'cosine' now"
            in changed["output"]), changed["output"][-2000:]
    assert "--restart" in changed["output"]
    out = root / "killed"
    resumed = finish(killed["resumed"])
    assert f"resuming after step {killed['step']}" in resumed
    finish(runs["processes"]["plain"])
    plain, again = report(root / "plain"), report(out)
    assert again["training"]["resumed_after"] == killed["step"]
    assert again["training"]["history"] == [
        {**r, "seconds_per_step": a["seconds_per_step"]}
        for r, a in zip(plain["training"]["history"],
                        again["training"]["history"])]
    assert again["test"]["accuracy"] == plain["test"]["accuracy"]
    for ours, theirs in zip(weights(out / "meta_base.keras"),
                            weights(root / "plain" / "meta_base.keras")):
        np.testing.assert_array_equal(ours, theirs)
    for name in ("meta_init.kmtask", "example_task.kmtask"):
        assert task_contents(out / name) == task_contents(
            root / "plain" / name)
    assert not (out / "backup").exists()


def assert_same_meta_training(output: Path, root: Path) -> None:
    """The base meta-trained into `output` equals the single-device run's
    (head_adapting's flags).

    Each replica adapts to its part of every meta-batch; the averaged
    meta-gradient is the single device's. BatchNorm moving statistics
    differ (each replica's chain of updates is averaged), so the rest is
    compared. The runs use head_adapting's smaller modulator rates: the
    default ones amplify the round-off of summing over replicas in another
    order (one BatchNorm beta of the two-worker run ended 1.3e-4 from the
    single device's after 12 steps, above the 1e-4 compared).
    """
    import keras

    ours = keras.saving.load_model(output / "meta_base.keras")
    theirs = keras.saving.load_model(
        root / "head_adapting" / "meta_base.keras")
    compared = 0
    for mine, other in zip(ours.weights, theirs.weights):
        if "moving_" not in mine.path:
            np.testing.assert_allclose(np.asarray(mine), np.asarray(other),
                                       atol=1e-4, err_msg=mine.path)
            compared += 1
    assert compared >= 9  # Four kernels, four gammas and betas, the head.


def test_a_run_on_two_mirrored_cpus_matches_the_single_device_run(runs):
    root = runs["root"]
    finish(runs["processes"]["distributed"])
    finish(runs["processes"]["head_adapting"])
    assert report(root / "distributed")["settings"]["replicas"] == 2
    assert_same_meta_training(root / "distributed", root)


def test_two_workers_match_the_single_device_run_and_only_the_chief_writes(
        runs):
    root = runs["root"]
    chief = finish(runs["processes"]["worker0"])
    other = finish(runs["processes"]["worker1"])
    finish(runs["processes"]["head_adapting"])
    assert "km-tf meta-learning report" in chief
    assert "km-tf meta-learning report" not in other
    assert sorted(p.name for p in (root / "workers").iterdir()) == [
        "example_task.kmtask", "meta.report.json", "meta.report.txt",
        "meta_base.keras", "meta_init.kmtask"]
    result = report(root / "workers")
    assert result["settings"]["strategy"] == "multi_worker"
    assert result["settings"]["replicas"] == 2
    assert_same_meta_training(root / "workers", root)


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flags_are_one_line_naming_the_fix(runs, name):
    process = runs["processes"][f"bad_{name}"]
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-3000:]
    assert BAD_FLAGS[name][1] in output
    assert "meta_train.py: error:" in output and "Traceback" not in output
    assert not (runs["root"] / f"bad_{name}").exists()
