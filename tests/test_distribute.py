"""Tests for km_tf.distribute: strategies by name, mirrored, multi-worker.

The mirrored and multi-worker runs need their own processes (logical
devices and collectives are set up once per process): this file is also
the script they run, `python tests/test_distribute.py MODE OUTPUT_DIR`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import finish, loopback_cluster

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
EPOCHS = 2


def test_unknown_strategy_names_the_choices():
    from km_tf.distribute import make_strategy
    with pytest.raises(ValueError, match="default, mirrored, multi_worker"):
        make_strategy("horovod")


def test_tpu_address_where_nothing_listens_fails_fast_naming_it():
    import km_tf
    from km_tf.distribute import make_strategy
    with socket.socket() as probe:  # A loopback port nobody listens on.
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"grpc://127.0.0.1:{port}"
    with pytest.raises(km_tf.ClusterError, match=f"{address}.*--tpu"):
        make_strategy("tpu", tpu=address)


def test_multi_worker_without_tf_config_says_how_to_set_it(monkeypatch):
    from km_tf.distribute import make_strategy
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG.*cluster"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid"):
        make_strategy("multi_worker")


def test_tpu_address_needs_the_tpu_strategy():
    from km_tf.distribute import make_strategy
    with pytest.raises(ValueError, match="strategy='tpu'"):
        make_strategy("mirrored", tpu="grpc://10.0.0.2:8470")


def test_single_worker_is_chief_and_writes_into_the_output_dir(tmp_path):
    from km_tf import distribute
    strategy = distribute.make_strategy("default")
    assert distribute.is_chief(strategy)
    assert distribute.backup_dir_for("out/backup", strategy) == "out/backup"
    with distribute.output_dir_for(str(tmp_path / "out"), strategy) as path:
        assert path == str(tmp_path / "out")
    assert (tmp_path / "out").is_dir()


def run_script(mode: str, output_dir: Path, env: dict | None = None,
               ) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT),
                   "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
                   **(env or {})}
    return subprocess.Popen(
        [sys.executable, __file__, mode, str(output_dir)], env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_mirrored_over_two_devices_matches_the_default_loss_curve(tmp_path):
    finish(run_script("mirrored", tmp_path))
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["replicas"] == {"default": 1, "mirrored": 2}
    default, mirrored = losses["default"], losses["mirrored"]
    assert len(default) == len(mirrored) == EPOCHS
    assert default[-1] < default[0]  # It trained.
    assert mirrored == pytest.approx(default, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_two_workers_train_a_task_and_only_the_chief_writes(tmp_path):
    output_dir = tmp_path / "out"
    processes = [run_script("worker", output_dir,
                            env={"TF_CONFIG": tf_config})
                 for tf_config in loopback_cluster(2)]
    outputs = [finish(process) for process in processes]
    assert "chief=True" in outputs[0] and "chief=False" in outputs[1]
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "base.keras", "checkpoints", "report.json", "report.txt", "task.kmtask"]
    report = json.loads((output_dir / "report.json").read_text())
    assert report["settings"]["replicas"] == 2
    assert report["stages"][0]["epochs"] == list(range(1, EPOCHS + 1))
    # Both workers trained the same replicated model.
    accuracies = [line for out in outputs for line in out.splitlines()
                  if line.startswith("test_accuracy=")]
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1]
    # The task file loads into the base it was trained on.
    import keras

    import km_tf
    base = keras.saving.load_model(output_dir / "base.keras")
    km_tf.restore_task(base, output_dir / "task.kmtask")


# The worker side: run as a script.


def _train_losses(strategy) -> list[float]:
    """Trains the small KM model one stage; returns the loss per epoch."""
    import keras

    import km_tf
    from km_tf import training
    from support import small_convnet
    from test_training import array_datasets

    keras.utils.set_random_seed(0)  # The same shuffling and weights.
    # Unshuffled: distributing a dataset rewrites it, and its shuffle order
    # with it; the same global batches must reach both strategies.
    datasets = array_datasets(batch_size=8, shuffle=False)
    base = small_convnet((16, 16, 3), 3)
    with strategy.scope():
        # BatchNorm frozen: per-replica batch statistics would differ.
        model = km_tf.modulate(base, hidden_units=4, batchnorm="freeze")
        training.compile_classifier(model, training.make_optimizer(
            training.OptimizerOptions(learning_rate=1e-2), STEPS * EPOCHS))
    history = model.fit(datasets.train.repeat(), epochs=EPOCHS,
                        steps_per_epoch=STEPS, shuffle=False, verbose=0)
    return history.history["loss"]


def _mirrored(output_dir: Path) -> None:
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from km_tf.distribute import make_strategy

    default = make_strategy("default")
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    losses = {
        "default": _train_losses(default),
        "mirrored": _train_losses(mirrored),
        "replicas": {"default": default.num_replicas_in_sync,
                     "mirrored": mirrored.num_replicas_in_sync},
    }
    (output_dir / "losses.json").write_text(json.dumps(losses))


def _worker(output_dir: Path) -> None:
    import keras

    import km_tf
    from km_tf import distribute, reporting, training
    from support import small_convnet
    from test_training import array_datasets

    strategy = distribute.make_strategy("multi_worker")
    keras.utils.set_random_seed(0)
    base = small_convnet((16, 16, 3), 3)
    backup = distribute.backup_dir_for(str(output_dir / "backup"), strategy)
    with distribute.output_dir_for(str(output_dir), strategy) as write_dir:
        base.save(os.path.join(write_dir, "base.keras"))
        result = training.fit_and_evaluate(
            lambda: km_tf.modulate(base, hidden_units=4), array_datasets(),
            strategy=strategy,
            optimizer=training.OptimizerOptions(learning_rate=1e-2),
            epochs=EPOCHS, backup_dir=backup, write_dir=write_dir,
            stage="task", verbose=0)
        km_tf.save_task(result.model, os.path.join(write_dir, "task.kmtask"))
        stage = reporting.StageReport(
            stage="task", data="arrays", train_images=16,
            epochs=result.epochs, accuracy=result.accuracy,
            seconds=result.seconds, output="task.kmtask",
            task=km_tf.task_report(result.model))
        reporting.write_report(reporting.RunReport(
            settings={"replicas": strategy.num_replicas_in_sync},
            stages=[stage], seconds=result.seconds), write_dir, "report")
    print(f"chief={distribute.is_chief(strategy)}")
    print(f"test_accuracy={result.accuracy['test']:.6f}")


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    {"mirrored": _mirrored, "worker": _worker}[mode](directory)
