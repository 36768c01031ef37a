"""Small models, data and process helpers shared by the tests."""

import json
import socket
import subprocess

import keras
import numpy as np
import pytest


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Waits for a program started with `stdout=PIPE`; returns its output.

    Fails the test with the output's tail if it times out or exits non-zero.
    """
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the program timed out:\n{(output or '')[-3000:]}")
    assert process.returncode == 0, (output or "")[-4000:]
    return output or ""


def small_convnet(input_shape=(16, 16, 3), num_classes=3,
                  name="small_convnet") -> keras.Model:
    """A functional ConvNet with every layer kind KM touches."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                            name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(12, 1, name="project")(x)
    x = keras.layers.Conv2D(12, 3, dilation_rate=2, padding="valid",
                            name="dilated")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def auto_named_convnet(input_shape=(16, 16, 3), num_classes=3
                       ) -> keras.Model:
    """A ConvNet whose layers all carry Keras' auto-generated names, as in
    most user code: building it twice gives `dense` and `dense_1`."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same",
                            use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(12, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def random_images(n=8, shape=(16, 16, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def random_labels(n=8, num_classes=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def packable_convnet(input_shape=(16, 16, 3), num_classes=3,
                     name="packable_convnet") -> keras.Model:
    """A small MobileNet-like ConvNet that task packs can patch: BatchNorm
    after every convolution but the last, which has its own bias; no
    dilation (TFLite lowers a dilated convolution to several ops)."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                            name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(12, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="mix")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def loopback_cluster(workers: int) -> list[str]:
    """`TF_CONFIG` values of a cluster of `workers` workers on free local
    ports, one per worker process."""
    sockets = [socket.socket() for _ in range(workers)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    for sock in sockets:
        sock.close()
    return [json.dumps({"cluster": {"worker": addresses},
                        "task": {"type": "worker", "index": index}})
            for index in range(workers)]
