"""The `km-export-packs` program, run from a checkout.

Exports a template `.tflite` + plan once and a small task pack per task
file; its flags and `main` live in `km_tf/cli/export_packs.py`, the device
side in `tflite/DEPLOY.md` ("Task packs").
"""

from km_tf.cli import export_packs

if __name__ == "__main__":
    export_packs.run()
