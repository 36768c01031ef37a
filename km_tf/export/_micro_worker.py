"""Child process of `km_tf.export.micro.run_micro`: runs TFLite Micro.

    python -P _micro_worker.py DIRECTORY ARENA_BYTES

Reads `DIRECTORY/model.tflite` and `inputs.npy`, runs each input row as a
batch of 1 in the `tflite-micro` interpreter, writes `outputs.npy` and prints
the interpreter's allocation table (the parent reads the arena size from it).
Imports only numpy and `tflite_micro`: no km_tf, no TensorFlow, so it starts
fast, and a crash of the interpreter takes only this process down.
"""

import sys
from pathlib import Path

import numpy as np


def run(directory: str, arena_bytes: int) -> None:
    """Child process: run inputs.npy through TFLM, save outputs.npy."""
    from tflite_micro.python.tflite_micro import runtime

    model = Path(directory, "model.tflite").read_bytes()
    inputs = np.load(Path(directory, "inputs.npy"))
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
    outputs = []
    for row in inputs:
        interpreter.set_input(row[None], 0)
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_output(0))[0])
    np.save(Path(directory, "outputs.npy"), np.stack(outputs))
    sys.stdout.flush()
    interpreter.print_allocations()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
