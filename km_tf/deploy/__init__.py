"""Task packs: one template per device, one small pack per task.

`applier` (numpy only) turns template + plan + pack into a task `.tflite`;
`formats` reads and writes plans and packs; `export` (TensorFlow) writes
templates, plans and packs; `locate` finds byte offsets in a `.tflite`.
The byte-level contract: `tflite/packs/FORMAT.md`.
"""
