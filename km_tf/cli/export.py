"""Exports KM tasks to TFLite: one `.tflite` and one report per task file.

    km-export --base=base.keras --task=a.kmtask --task=b.kmtask \\
        --preset=int8 --calibration_data=digits:5-9 --output_dir=out/

Each task is rebuilt from the base and its file (`km_tf.restore_task`),
baked into a plain Keras model and converted with the chosen preset (see
`km_tf/export/presets.py`). Calibration and parity data come from the
task's dataset spec (`--calibration_data`, the same spec and `--seed` as
training: calibration on the training split, parity on the test split) or
from an `.npz` (`--calibration_dataset`). For every model the program writes
`<task>_<preset>.tflite`, `<task>_<preset>.report.json` and `.report.txt`
(size, ops, IO types and scales, float-vs-TFLite parity on held-out data);
`micro` adds a C array + header and the TFLite Micro arena, `edgetpu` the
Edge TPU compatibility check and the `edgetpu_compiler` command. Without
`--task` the base itself is exported. Long flag sets go in `--flagfile`.
"""

from pathlib import Path

from absl import flags, logging

from km_tf import export, models
from km_tf.cli import common
from km_tf.export.micro import BOARDS, DEFAULT_BOARDS
from km_tf.export.presets import INTEGER_IO_TYPES, PRESETS, get_preset

# Inputs.
flags.DEFINE_string("base", None, "The base network's .keras file (the plain "
                    "pretrained model the tasks were trained on).")
flags.DEFINE_multi_string("task", [], "A task file from km_tf.save_task; "
                          "repeat for several tasks (one .tflite each). "
                          "Omit to export the base itself.")
common.define_export_data_flags()
# Conversion.
flags.DEFINE_enum("preset", "float32", sorted(PRESETS),
                  "; ".join(f"{p.name}: {p.summary}"
                            for p in PRESETS.values()))
flags.DEFINE_enum("io_type", None, list(INTEGER_IO_TYPES),
                  "Input/output type of the int8/micro presets (default: "
                  "the preset's; edgetpu is always uint8).")
# Outputs.
flags.DEFINE_string("output_dir", None, "Folder for models and reports.")
flags.DEFINE_list("boards", list(DEFAULT_BOARDS),
                  f"micro: boards to check the arena/flash against "
                  f"({', '.join(sorted(BOARDS))}).")
flags.DEFINE_string("c_symbol", "model",
                    "micro: C name of the model array in the generated source.")
flags.mark_flags_as_required(["base", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}.")
    preset = get_preset(flags.FLAGS.preset, flags.FLAGS.io_type)
    base = models.load_base(flags.FLAGS.base)
    summary, data_for = [], {}  # Data read once per input and class shape.
    for task in flags.FLAGS.task or [None]:
        name = Path(task).stem if task else Path(flags.FLAGS.base).stem
        logging.info("Exporting %s with preset %s.", name, preset.name)
        model = export.load_baked_task(base, task) if task else base
        shapes = (model.input_shape, model.output_shape)
        if shapes not in data_for:
            data_for[shapes] = common.export_data_from_flags(model)
        data = data_for[shapes]
        result = export.export_model(
            model, preset, flags.FLAGS.output_dir, name,
            calibration_data=None if data is None else data.calibration,
            calibration_samples=flags.FLAGS.calibration_samples,
            heldout=None if data is None else data.heldout,
            parity_samples=flags.FLAGS.parity_samples,
            boards=flags.FLAGS.boards, c_symbol=flags.FLAGS.c_symbol,
            source={"base": flags.FLAGS.base, "task": task or "",
                    "data": "" if data is None else data.source})
        print(result.report_text)
        summary.append(result.report)
    export.write_summary(summary, flags.FLAGS.output_dir)


def run() -> None:
    """The `km-export` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
