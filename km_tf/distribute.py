"""Distribution strategies by name, and where each worker may write.

`make_strategy("mirrored")` etc. returns a `tf.distribute.Strategy`; build
the model and its optimizer inside `strategy.scope()` and Keras' `fit`
distributes the batches. With several workers every worker runs the same
program: only the chief writes the real outputs, the others write to
throw-away folders (`output_dir_for`) because saving may need all workers.

Example:
>>> strategy = make_strategy("mirrored")
>>> with strategy.scope():
...     model = build_model(...)
...     model.compile(...)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import tensorflow as tf

from km_tf.errors import ClusterError

# How long a TPU may take to accept a connection before the run gives up.
CONNECT_TIMEOUT_S = 30.0

STRATEGY_NAMES = ("default", "mirrored", "multi_worker", "tpu")
_CHIEF_TYPES = ("chief", "master")


def make_strategy(name: str = "default", *,
                  tpu: str | None = None) -> tf.distribute.Strategy:
    """Builds a distribution strategy from its name.

    Args:
        name: `"default"` (one device: the first GPU, else the CPU),
            `"mirrored"` (every local GPU, synchronous), `"multi_worker"`
            (synchronous over the workers listed in the `TF_CONFIG`
            environment variable) or `"tpu"`.
        tpu: TPU address for `"tpu"`: a name (`"my-tpu"`), a
            `grpc://host:8470` address, or `"local"`; `None` lets
            `TPUClusterResolver` find it from the environment (TPU VMs).

    Returns:
        The strategy. Create models and optimizers in its `scope()`.

    Raises:
        ValueError: An unknown name, `tpu` with another strategy, or
            `"multi_worker"` without a usable `TF_CONFIG`.
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Unknown strategy {name!r}; choose one of "
            f"{', '.join(STRATEGY_NAMES)}.")
    if tpu and name != "tpu":
        raise ValueError(
            f"A TPU address ({tpu!r}) was given with strategy {name!r}: pass "
            "strategy='tpu' too, or drop the address.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    _check_reachable(resolver.master(), "--tpu")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _check_reachable(address: str, what: str,
                     timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fails fast, naming `address`, when nothing answers there: TensorFlow
    itself waits without end for a TPU that is not listening."""
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    if not host or not port.isdigit():
        return  # Local or resolved by TensorFlow in its own way.
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ClusterError(
            f"Nothing answers at {address} ({error}) within {timeout:g} s. "
            f"Check {what} (name or grpc://host:port) and that the TPU is "
            "up and reachable from this machine.") from error


def _check_tf_config() -> None:
    """Raises a ValueError saying what is wrong with `TF_CONFIG`."""
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
               '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\'')
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "strategy 'multi_worker' needs the TF_CONFIG environment variable "
            f"on every worker, e.g. {example} (index 1 on the second).")
    try:
        config = json.loads(raw)
        workers = config["cluster"]
        task = config["task"]
        task["type"], task["index"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"TF_CONFIG is not valid ({error!r}); it must be JSON with "
            f"'cluster' and 'task' ('type', 'index'), e.g. {example}."
        ) from None
    if not isinstance(workers, dict) or not workers:
        raise ValueError(f"TF_CONFIG lists no cluster; e.g. {example}.")


def task_type_and_id(strategy: tf.distribute.Strategy
                     ) -> tuple[str | None, int]:
    """This worker's `(task type, index)`; `(None, 0)` off a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True where final files belong: the chief, or worker 0 without one.

    Single-machine strategies (and TPUs, driven by one host) always count
    as chief.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = task_type_and_id(strategy)
    if task_type is None or task_type in _CHIEF_TYPES:
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    has_chief = any(kind in cluster for kind in _CHIEF_TYPES)
    return task_type == "worker" and task_id == 0 and not has_chief


def backup_dir_for(directory: str, strategy: tf.distribute.Strategy) -> str:
    """A lasting `BackupAndRestore` folder of this worker's own.

    Every worker must restore the same epoch after a restart, so every
    worker keeps its backup (the chief in `directory`, worker `i` in
    `directory-worker{i}`); folders never collide on a shared disk.
    """
    if is_chief(strategy):
        return directory
    task_type, task_id = task_type_and_id(strategy)
    return f"{directory.rstrip(os.sep)}-{task_type}{task_id}"


@contextlib.contextmanager
def output_dir_for(output_dir: str, strategy: tf.distribute.Strategy
                   ) -> Iterator[str]:
    """Yields where this worker writes its outputs.

    The chief gets `output_dir` (created if needed). Other workers get a
    fresh temporary folder, removed on exit: they must still save (saving
    can take part in collective ops) but their files are thrown away.
    """
    if is_chief(strategy):
        os.makedirs(output_dir, exist_ok=True)
        yield output_dir
        return
    task_type, task_id = task_type_and_id(strategy)
    temporary = tempfile.mkdtemp(prefix=f"km_tf_{task_type}{task_id}_")
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def patch_keras_multi_worker(model) -> None:
    """Lets Keras 3 `fit` / `evaluate` run under `MultiWorkerMirroredStrategy`.

    Keras 3 (up to at least 3.15) fails there twice (keras-team/keras#20585,
    tensorflow/tensorflow#72388):

    - it builds the metrics from a first batch that it averages with
      `strategy.reduce(MEAN, (x, y))`, which the strategy rejects ("Attempt
      to convert a value (PerReplica...)"); the batch only lends its shapes,
      so this model takes the first local replica's part instead;
    - it averages each step's scalar logs with `reduce(MEAN, axis=0)`,
      invalid for scalars ("Invalid reduction dimension 0"); scalars are
      averaged with `axis=None` instead (Keras' trainer module is patched
      once, for multi-worker strategies only).

    A no-op under other strategies. Remove it once Keras fixes the bug: the
    multi-worker test in tests/test_distribute.py will tell.
    """
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    _patch_keras_scalar_reduction()

    def local_part(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local_part, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build


def _patch_keras_scalar_reduction() -> None:
    """Makes Keras' `reduce_per_replica` average multi-worker scalars."""
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, "km_tf_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if (reduction not in ("auto", "mean") or not isinstance(
                strategy, tf.distribute.MultiWorkerMirroredStrategy)):
            return original(values, strategy, reduction)

        def reduce(value):
            if not isinstance(value, tf.distribute.DistributedValues):
                return value
            local = strategy.experimental_local_results(value)[0]
            if local.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    reduce_per_replica.km_tf_patched = True
    trainer.reduce_per_replica = reduce_per_replica
