"""The `km-export` program, run from a checkout: `python tflite/export.py`.

Exports KM tasks to TFLite (presets float32, float16, dynamic, int8, micro,
edgetpu); its flags and `main` live in `km_tf/cli/export.py`, deployment
steps in `tflite/DEPLOY.md`. `make setup` (or `pip install -e .`) installs
km_tf.
"""

from km_tf.cli import export

if __name__ == "__main__":
    export.run()
