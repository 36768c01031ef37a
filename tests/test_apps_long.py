"""The longest app runs, in their own file so that `pytest -n 2 --dist
loadfile` can give them a worker of their own (helpers: tests/test_apps.py).
"""

import json
import subprocess

import pytest

from test_apps import (APP_ENVIRONMENT, _export_parity, app_command, check,
                       kill_after_first_backup, run_app)


@pytest.mark.slow
def test_caffe_base_and_new_class_count_train_evaluate_export(tmp_path):
    """ResNet50 (caffe normalization inside, RGB->BGR folded) with a 3-class
    task on its 5-class base: no normalization flag anywhere, and evaluate
    and export reproduce the training run's test accuracy. (MobileNetV2 is
    the default run's.) The task freezes BatchNorm and steps its modulators
    at 0.1x the head's rate (the few-images setting)."""
    out = tmp_path / "run"
    check(run_app("train", "--model=resnet50", "--alpha=1.0",
                  "--task_data=digits:5-7", "--pretrain_epochs=1",
                  "--task_epochs=1", "--steps_per_epoch=2",
                  "--batchnorm=freeze", "--modulator_rate_factor=0.1",
                  f"--output_dir={out}", timeout=900))
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["batchnorm"] == "freeze"
    assert report["settings"]["modulator_rate_factor"] == 0.1
    # Given explicitly, both win over the rule (digits 5-7: trained, 1x).
    assert report["settings"]["recipe"].startswith(
        "batchnorm='freeze' as given")
    assert "0.1x the head's rate as given" in report["settings"]["recipe"]
    test_accuracy = report["stages"][1]["accuracy"]["test"]
    evaluation = tmp_path / "eval.json"
    check(run_app("evaluate", f"--base={out / 'base.keras'}",
                  f"--task={out / 'task.kmtask'}", "--data=digits:5-7",
                  f"--output={evaluation}"))
    assert json.loads(evaluation.read_text())["accuracy"] == pytest.approx(
        test_accuracy, abs=1e-6)
    parity = _export_parity(out, "digits:5-7", tmp_path / "export")
    assert parity["float_accuracy"] == pytest.approx(test_accuracy, abs=1e-6)
    assert parity["tflite_accuracy"] == pytest.approx(test_accuracy,
                                                      abs=0.01)


@pytest.mark.slow
def test_killed_run_resumes_after_its_last_finished_epoch_with_every_stage(
        tmp_path):
    """mode=all killed in its task stage: the rerun reuses the base, trains
    only the missing task epochs and reports both stages."""
    output = tmp_path / "out"
    epochs = 6
    command = app_command("train", "--pretrain_epochs=1", "--steps_per_epoch=3",
                          f"--task_epochs={epochs}", f"--output_dir={output}")
    finished = kill_after_first_backup(
        command, output / "backup" / "task" / "training_metadata.json")
    assert 1 <= finished < epochs
    assert not (output / "task.kmtask").exists()

    check(subprocess.run(command, env=APP_ENVIRONMENT, capture_output=True,
                         text=True, timeout=600))
    pretrain, task = json.loads((output / "report.json").read_text()
                                )["stages"]
    assert pretrain["stage"] == "pretrain" and pretrain["epochs"] == [1]
    assert task["epochs"] == list(range(finished + 1, epochs + 1))
    assert (output / "task.kmtask").is_file()
    assert not (output / "backup").exists()
