"""Running `.tflite` models in LiteRT (`ai_edge_litert`): predict and time.

`LiteRTModel` hides the two things every caller otherwise repeats: integer
models take quantized inputs and give quantized outputs, and static-batch
models (micro, Edge TPU) take one sample per invoke.
"""

from __future__ import annotations

import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from km_tf.export.graph import dequantize, quantize, read_graph


class LiteRTModel:
    """A `.tflite` model loaded in the LiteRT interpreter.

    Args:
        model_bytes: The flatbuffer.
        num_threads: Interpreter threads (None: LiteRT's default).
        reference_kernels: Use TFLite's reference kernels (no XNNPACK, no
            optimized kernels): the same arithmetic as TFLite Micro's.

    Example:
    >>> model = LiteRTModel(open("task.tflite", "rb").read())
    >>> probs = model.predict(x_test)  # float in, float out
    """

    def __init__(self, model_bytes: bytes, num_threads: int | None = None,
                 reference_kernels: bool = False):
        self._graph = read_graph(model_bytes)
        self._interpreter = Interpreter(
            model_content=bytes(model_bytes), num_threads=num_threads,
            experimental_op_resolver_type=(
                OpResolverType.BUILTIN_REF if reference_kernels
                else OpResolverType.AUTO))
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = None  # Current batch size of a dynamic-batch model.

    @property
    def static_batch(self) -> bool:
        """True when the model's batch dimension is fixed."""
        return int(self._input["shape_signature"][0]) != -1

    @property
    def input_dtype(self) -> np.dtype:
        """The input tensor's dtype."""
        return np.dtype(self._input["dtype"])

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float model inputs -> values for the input tensor."""
        return quantize(x, self._graph.inputs[0])

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        """Raw output tensor values -> float."""
        return dequantize(q, self._graph.outputs[0])

    def _invoke(self, xq: np.ndarray) -> np.ndarray:
        if not self.static_batch and self._batch != len(xq):
            self._interpreter.resize_tensor_input(
                self._input["index"], [len(xq), *xq.shape[1:]])
            self._interpreter.allocate_tensors()
            self._batch = len(xq)
        self._interpreter.set_tensor(self._input["index"], xq)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()

    def run_raw(self, xq: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Runs already-typed inputs; returns raw (possibly int) outputs."""
        step = 1 if self.static_batch else batch_size
        xq = np.asarray(xq, dtype=self.input_dtype)
        return np.concatenate([self._invoke(xq[i:i + step])
                               for i in range(0, len(xq), step)])

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Float inputs -> float outputs (quantizing and dequantizing)."""
        return self.dequantize_output(
            self.run_raw(self.quantize_input(x), batch_size))

    def latency_ms(self, sample: np.ndarray, runs: int = 50,
                   warmup: int = 5) -> float:
        """Median wall time of one batch-1 invoke, in milliseconds."""
        xq = self.quantize_input(sample[:1])
        for _ in range(warmup):
            self._invoke(xq)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self._invoke(xq)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)
