"""The km-tf programs: `km-train`, `km-evaluate`, `km-tune`, `km-export`.

Each module defines its absl flags at import and a `run()` that the console
programs (pyproject.toml) and the drivers in `apps/` and `tflite/` call;
`common` holds what they share. Import one program module per process (absl
flags are global).
"""
