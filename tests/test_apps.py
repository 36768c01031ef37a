"""Tests for apps/train.py and apps/evaluate.py, run as programs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
# The default run (pretrain on digits 0-4, a KM task on digits 5-9) on a
# budget small enough for CI: it checks the wiring, not the accuracy.
SMALL_BUDGET = """\
--pretrain_epochs=1
--task_epochs=2
--steps_per_epoch=2
"""


def app_command(name: str, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "apps" / f"{name}.py"), *flags]


APP_ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                   "CUDA_VISIBLE_DEVICES": ""}


def run_app(name: str, *flags: str, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    return subprocess.run(app_command(name, *flags), env=APP_ENVIRONMENT,
                          capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The default train run on a small budget, flags from a --flagfile,
    its output going to a log file."""
    folder = tmp_path_factory.mktemp("run")
    flagfile = folder / "small.flags"
    flagfile.write_text(SMALL_BUDGET)
    log = folder / "train.log"
    with open(log, "w") as stream:
        result = subprocess.run(
            app_command("train", f"--flagfile={flagfile}",
                        f"--output_dir={folder / 'out'}"),
            env=APP_ENVIRONMENT, stdout=stream, stderr=subprocess.STDOUT,
            text=True, timeout=600, umask=0o022)
    assert result.returncode == 0, log.read_text()[-4000:]
    return folder / "out"


@pytest.mark.slow
def test_run_logs_one_line_per_epoch_to_a_file(default_run):
    text = (default_run.parent / "train.log").read_text()
    # Not a progress bar redrawn with \b or \r, thousands of fragments.
    assert "\b" not in text and "\r" not in text
    assert text.count("Epoch 1/2") == text.count("Epoch 2/2") == 1


@pytest.mark.slow
def test_default_run_writes_the_base_task_file_and_report(default_run):
    assert {"base.keras", "task.kmtask", "report.json", "report.txt"} <= {
        p.name for p in default_run.iterdir()}
    assert not (default_run / "backup").exists()
    report = json.loads((default_run / "report.json").read_text())
    pretrain, task = report["stages"]
    assert (pretrain["stage"], pretrain["data"]) == ("pretrain", "digits:0-4")
    assert (task["stage"], task["data"]) == ("task", "digits:5-9")
    assert task["epochs"] == [1, 2]
    assert set(task["accuracy"]) == {"validation", "test"}
    assert task["task"]["task_bytes"] == 4 * task["task"]["task_params"]
    assert 0 < task["task"]["task_percent_of_base"] < 100
    assert report["settings"]["mode"] == "all"
    assert report["settings"]["image_size"] == 32
    # --batchnorm=auto (the default) resolved from the training split:
    # digits 5-9 has over 100 training images per class.
    settings = report["settings"]
    assert (settings["batchnorm"], settings["modulator_rate_factor"]) == (
        "train", 1.0)
    assert settings["recipe"].startswith("auto: ")
    assert ">= 16: BatchNorm trained" in settings["recipe"]
    text = (default_run / "report.txt").read_text()
    assert "task / base" in text and "[task] digits:5-9" in text
    assert "recipe=auto: " in text


@pytest.mark.slow
def test_evaluate_scores_the_task_as_training_did(default_run, tmp_path):
    output = tmp_path / "eval.json"
    stdout = check(run_app(
        "evaluate", f"--base={default_run / 'base.keras'}",
        f"--task={default_run / 'task.kmtask'}", "--data=digits:5-9",
        f"--output={output}"))
    assert "accuracy" in stdout
    result = json.loads(output.read_text())
    report = json.loads((default_run / "report.json").read_text())
    expected = report["stages"][1]["accuracy"]["test"]
    assert result["accuracy"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_evaluate_scores_the_base_alone(default_run, tmp_path):
    output = tmp_path / "eval.json"
    check(run_app("evaluate", f"--base={default_run / 'base.keras'}",
                  "--data=digits:0-4", f"--output={output}"))
    report = json.loads((default_run / "report.json").read_text())
    expected = report["stages"][0]["accuracy"]["test"]
    assert json.loads(output.read_text())["accuracy"] == pytest.approx(
        expected, abs=1e-6)


def _export_parity(out: Path, spec: str, export_dir: Path) -> dict:
    """Exports a run's task (float32, data from `spec`); its parity."""
    check(subprocess.run(
        [sys.executable, str(ROOT / "tflite" / "export.py"),
         f"--base={out / 'base.keras'}", f"--task={out / 'task.kmtask'}",
         "--preset=float32", f"--calibration_data={spec}",
         f"--output_dir={export_dir}"],
        env=APP_ENVIRONMENT, capture_output=True, text=True, timeout=600))
    return json.loads((export_dir / "task_float32.report.json").read_text()
                      )["parity"]


@pytest.mark.slow
def test_export_reproduces_the_training_test_accuracy(default_run, tmp_path):
    report = json.loads((default_run / "report.json").read_text())
    test_accuracy = report["stages"][1]["accuracy"]["test"]
    parity = _export_parity(default_run, "digits:5-9", tmp_path)
    assert parity["float_accuracy"] == pytest.approx(test_accuracy, abs=1e-6)
    assert parity["tflite_accuracy"] == pytest.approx(test_accuracy,
                                                      abs=0.01)


@pytest.mark.slow
def test_task_image_size_other_than_the_base_is_named(default_run, tmp_path):
    result = run_app("train", "--mode=task",
                     f"--base={default_run / 'base.keras'}",
                     "--image_size=64", f"--output_dir={tmp_path / 'x'}")
    assert result.returncode != 0
    assert "--image_size=64" in result.stderr and "32" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_task_mode_without_a_base_file_says_what_to_pass(tmp_path):
    result = run_app("train", "--mode=task", f"--base={tmp_path / 'no.keras'}",
                     f"--output_dir={tmp_path}")
    assert result.returncode != 0
    assert "--mode=pretrain" in result.stderr


def kill_after_first_backup(command: list[str], metadata: Path,
                            timeout: float = 300) -> int:
    """Starts `command`, SIGKILLs it once its first epoch is backed up (it is
    then inside its next epoch) and returns the epochs the backup holds."""
    process = subprocess.Popen(command, env=APP_ENVIRONMENT,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not metadata.is_file():
            assert process.poll() is None, (
                "the run ended before its first backup:\n"
                + process.stderr.read()[-3000:])
            assert time.monotonic() < deadline, "no backup appeared"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    return json.loads(metadata.read_text())["epoch"]


@pytest.mark.slow
def test_resume_with_other_flags_is_refused_and_restart_starts_afresh(
        default_run, tmp_path):
    output = tmp_path / "out"
    epochs = 4
    flags = ["--mode=task", f"--base={default_run / 'base.keras'}",
             f"--task_epochs={epochs}", "--steps_per_epoch=5",
             f"--output_dir={output}"]
    kill_after_first_backup(
        app_command("train", *flags),
        output / "backup" / "task" / "training_metadata.json")

    changed = [*flags, "--task_data=digits:0-4", "--hidden_units=8",
               "--shots=5"]
    refused = run_app("train", *changed)
    assert refused.returncode != 0
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("train.py: error:")
    for name in ("--task_data", "--hidden_units", "--shots", "--restart",
                 str(output / "backup")):
        assert name in error
    assert (output / "backup" / "task").is_dir()  # Nothing was lost.

    check(run_app("train", *changed, "--restart"))
    report = json.loads((output / "report.json").read_text())
    assert report["stages"][-1]["epochs"] == list(range(1, epochs + 1))
    assert report["stages"][-1]["data"] == "digits:0-4"
    # 5 images per class: --batchnorm=auto froze BatchNorm and slowed the
    # modulators, and the task file holds no BatchNorm.
    settings = report["settings"]
    assert (settings["batchnorm"], settings["modulator_rate_factor"]) == (
        "freeze", 0.03)
    assert settings["recipe"].startswith(
        "auto: 5 training images per class < 16: BatchNorm frozen")
    assert report["stages"][-1]["task"]["batchnorm_params"] == 0


@pytest.mark.parametrize("flags, message", [
    (["--mode=pretrain", "--pretrain_data=folder:{one_class}"],
     "has 1 class"),
    (["--mode=pretrain", "--pretrain_data=folder:{corrupt}"],
     "broken.jpg"),
    (["--task_data=nope:1"], "Unknown data source 'nope'"),
    (["--task_data=folder:/no/such/folder"], "'/no/such/folder'"),
    (["--mode=task", "--base={text}"], "Cannot load base model"),
    (["--batch_size=0"], "batch_size"),
    (["--steps_per_epoch=0"], "steps_per_epoch"),
    (["--task_learning_rate=-1"], "learning_rate"),
    (["--modulator_rate_factor=0"], "modulator_rate_factor"),
])
def test_bad_input_is_one_line_and_creates_no_output(tmp_path, flags,
                                                     message):
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    folders = {"one_class": tmp_path / "one", "corrupt": tmp_path / "two"}
    for folder, classes in ((folders["one_class"], ["a"]),
                            (folders["corrupt"], ["a", "b"])):
        for name in classes:
            (folder / name).mkdir(parents=True)
            for i in range(4):
                _write_png(folder / name / f"{i}.png", seed=i)
    (folders["corrupt"] / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    output = tmp_path / "out"
    result = run_app("train", *(f.format(text=text, **folders)
                                for f in flags), f"--output_dir={output}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


@pytest.mark.slow
def _write_png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)
    path.write_bytes(tf.io.encode_png(pixels).numpy())


def test_outputs_are_readable_by_others_under_umask_022(default_run):
    for name in ("base.keras", "task.kmtask", "report.json", "report.txt"):
        assert (default_run / name).stat().st_mode & 0o777 == 0o644, name
