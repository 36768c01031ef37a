"""Exports task packs: one template per preset, one small pack per task.

    km-export-packs --base=base.keras --task=a.kmtask --task=b.kmtask \\
        --preset=int8 --calibration_data=digits:5-9 --output_dir=packs/

A device keeps the template (`base_<preset>.tflite` + `.kmplan`) once and
receives only each task's `<task>_<preset>.kmpack`; the applier
(`km_tf.deploy.applier`, or `tflite/packs/km_apply.c`) rebuilds the task's
`.tflite` from the two (`tflite/DEPLOY.md`, "Task packs"). The template's
head holds `--classes` outputs, by default the most any of the tasks has.
`--template=` writes packs for a template already on devices instead of a
new one. Every pack is applied once here and checked against the
converter's export of the task. The program writes `packs.report.json` and
`packs.report.txt`: template, plan and pack sizes, and each pack's size as a
share of the task's own `.tflite`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import flags, logging

from km_tf import models
from km_tf.restore import restore_task
from km_tf.cli import common
from km_tf.deploy import export as deploy
from km_tf.deploy.formats import PLAN_KERNELS
from km_tf.export.presets import INTEGER_IO_TYPES, PRESETS, get_preset
from km_tf.files import write_atomically

flags.DEFINE_string("base", None, "The base network's .keras file (the plain "
                    "pretrained model the tasks were trained on).")
flags.DEFINE_multi_string("task", [], "A task file from km_tf.save_task; "
                          "repeat for several tasks (one pack each).")
flags.DEFINE_enum("preset", "float32", sorted(set(PRESETS) - {"dynamic"}),
                  "Template preset: " + "; ".join(
                      f"{p.name}: {p.summary}" for p in PRESETS.values()
                      if p.name != "dynamic"))
flags.DEFINE_enum("io_type", None, list(INTEGER_IO_TYPES),
                  "Input/output type of the int8/micro presets.")
flags.DEFINE_integer("classes", None, "Outputs of the template's head: the "
                     "most classes a pack for it may have (default: the most "
                     "any --task has).")
flags.DEFINE_string("template", None, "An existing template .tflite (with "
                    "its .kmplan and .template.json): write packs for it "
                    "instead of a new template.")
flags.DEFINE_enum("plan_kernels", "float32", list(PLAN_KERNELS),
                  "What the plan holds of the base kernels: float32 (exact "
                  "packs; plan ~4x the int8 weights), residual (int8 "
                  "templates, e.g. microcontrollers: one byte per weight "
                  "refines the template's weights) or none (smallest plan; "
                  "the applier starts from the template's rounded weights).")
common.define_export_data_flags()
flags.DEFINE_string("output_dir", None, "Folder for the template, the packs "
                    "and the report.")
flags.mark_flags_as_required(["base", "output_dir"])

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}.")
    if not FLAGS.task:
        raise ValueError("Pass at least one --task=FILE to pack.")
    base = models.load_base(FLAGS.base)
    output_dir = Path(FLAGS.output_dir)
    tasks = {task: restore_task(base, task) for task in FLAGS.task}
    if FLAGS.template:
        template = deploy.TemplateFiles.load(FLAGS.template)
    else:
        classes = FLAGS.classes or max(model.output_shape[-1]
                                           for model in tasks.values())
        data = common.export_data_from_flags(base)
        logging.info("Exporting the %d-class template.", classes)
        template = deploy.export_template(
            base, get_preset(FLAGS.preset, FLAGS.io_type), output_dir,
            Path(FLAGS.base).stem, classes=classes,
            calibration_data=None if data is None else data.calibration,
            plan_kernels=FLAGS.plan_kernels)
    info = json.loads(template.info_path.read_text())
    packs = []
    for task, task_model in tasks.items():
        name = Path(task).stem
        logging.info("Packing %s for %s.", name, template.tflite_path.name)
        data = common.export_data_from_flags(task_model)
        result = deploy.export_pack(
            base, task, template, output_dir, name,
            calibration_data=None if data is None else data.calibration,
            heldout=None if data is None or data.heldout is None
            else data.heldout[0])
        packs.append(result.report)
    report = {"template": info, "packs": packs}
    write_atomically(str(output_dir / "packs.report.json"),
                     json.dumps(report, indent=2).encode())
    text = format_report(report)
    write_atomically(str(output_dir / "packs.report.txt"), text.encode())
    print(text)


def format_report(report: dict[str, Any]) -> str:
    """The readable size report."""
    template = report["template"]
    lines = [
        f"template {template['tflite']}: {template['tflite_bytes']:,} bytes "
        f"(preset {template['preset']}, {template['classes']} classes); plan "
        f"{template['plan']}: {template['plan_bytes']:,} bytes "
        f"(base kernels: {template['plan_kernels']})",
    ]
    for pack in report["packs"]:
        line = (f"  {pack['pack']}: {pack['pack_bytes']:,} bytes = "
                f"{100 * pack['pack_to_tflite']:.2f}% of the task's "
                f".tflite ({pack['task_tflite_bytes']:,} bytes); "
                f"{pack['classes']} classes; applied = converter export: "
                f"{'yes' if pack['applied_equals_conversion'] else 'no'}")
        agreement = pack.get("agreement")
        if agreement:
            line += (f"; top-1 agreement with the trained task "
                     f"{100 * agreement['applied_vs_trained_top1']:.1f}% on "
                     f"{agreement['samples']} held-out images")
        lines.append(line)
    return "\n".join(lines) + "\n"


def run() -> None:
    """The `km-export-packs` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
