"""One TensorFlow thread per pool and op determinism, for the benchmarks.

TensorFlow sizes its thread pools by the cores a process may use, and float
reductions (BatchNorm's statistics, gradient sums) add in the pool's order.
On the benchmarks' small tasks, 60 steps at high rates turn those last-bit
differences into points of accuracy (BUILD.md, "A protocol that can
decide"), so `bench/transfer.py` and `bench/meta.py` call
`make_reproducible` (their `--threads` flag) before TensorFlow runs an op.
"""

import tensorflow as tf

THREADS_HELP = ("TensorFlow intra-op and inter-op threads, with op "
                "determinism on: float reductions then add in one order "
                "however many cores the process gets, so a part rerun alone "
                "reproduces the full run. 0: TensorFlow's defaults (one "
                "thread per core), without determinism.")


def make_reproducible(threads: int) -> None:
    """Fixes TensorFlow's thread counts and turns op determinism on.

    Must run before TensorFlow executes its first op.

    Args:
        threads: Threads of each pool; 0 leaves TensorFlow's defaults and
            determinism off.
    """
    if threads == 0:
        return
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.experimental.enable_op_determinism()
