"""Training footprints measured by bench/memory.py, printed as JSON.

Run by tests/test_memory.py in a fresh process started with
`memory.EXACT_CPU_COUNTS`, as every exact CPU measurement must be, and with
bench/ on `PYTHONPATH` (for `import memory`).
"""

import gc
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import km_tf  # noqa: E402
from memory import (peak_bytes, peak_tensor_bytes,  # noqa: E402
                    training_device)

# One thread: parallel op scheduling moves the peaks by as much as the
# margins the tests check (seen: 1.36-1.79 MB for one KM model); serial
# execution keeps them within a few percent.
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)


def weight_heavy_convnet() -> keras.Model:
    """Big kernels on tiny images: weights dominate the training footprint."""
    inputs = keras.Input((6, 6, 32))
    x = keras.layers.Conv2D(192, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(768, 1)(x)
    x = keras.layers.Conv2D(192, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def bytes_in_use() -> int:
    return tf.config.experimental.get_memory_info(training_device())[
        "current"]


def training_footprint(prepare) -> int:
    """Peak bytes of building `prepare(model)` and training it 3 Adam steps,
    over the bytes in use before."""
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    before = bytes_in_use()

    def train() -> None:
        keras.utils.set_random_seed(0)
        model = prepare(weight_heavy_convnet())
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        rng = np.random.default_rng(0)
        images = rng.normal(size=(2, 6, 6, 32)).astype("float32")
        for _ in range(3):
            model.train_on_batch(images, np.array([0, 1]))

    return peak_bytes(train) - before


def small_tensors() -> int:
    """Peak bytes of ten 100 kB tensors, under the 256 KiB oneDNN cut-off."""
    return peak_bytes(lambda: [tf.zeros((100, 250)) for _ in range(10)])


def three_kept_of_four() -> dict[str, int]:
    """Peaks of four 3,996,000-byte tensors, three kept. The allocator
    rounds every chunk up to 256 bytes (and may hand out more)."""
    before = bytes_in_use()

    def run():
        return [tf.zeros((999, 1000)) + 1.0 for _ in range(3)]

    return {"tensor": peak_tensor_bytes(run) - before,
            "allocator": peak_bytes(run) - before}


def main() -> None:
    print(json.dumps({
        "small_tensors": small_tensors(),
        "three_kept_of_four": three_kept_of_four(),
        "weight_bytes": 4 * weight_heavy_convnet().count_params(),
        "full": training_footprint(lambda model: model),
        "km_train": training_footprint(
            lambda model: km_tf.modulate(model, batchnorm="train")),
        "km_freeze": training_footprint(
            lambda model: km_tf.modulate(model, batchnorm="freeze")),
    }))


if __name__ == "__main__":
    main()
