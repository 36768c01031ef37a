"""Exports task packs: one template per preset, one small pack per task.

    km-export-packs --base=base.keras --task=a.kmtask --task=b.kmtask \\
        --preset=int8 --preset=float16 --calibration_data=digits:5-9 \\
        --output_dir=packs/

A device keeps the template (`base_<preset>.tflite` + `.kmplan`) once and
receives only each task's `<task>_<preset>.kmpack`; the applier
(`km_tf.deploy.applier`, or `tflite/packs/km_apply.c`) rebuilds the task's
`.tflite` from the two (`tflite/DEPLOY.md`, "Task packs"). The template's
head holds `--classes` outputs, by default the most any of the tasks has.
Repeat `--preset` for one template (and one set of packs) per deployment
target; `--template=` writes packs for a template already on devices
instead of new ones. Every pack is applied once here and checked against
the converter's export of the task. The program writes `packs.report.json` and
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
from km_tf.deploy.formats import ARRAY_TYPES, PLAN_KERNELS
from km_tf.export.presets import INTEGER_IO_TYPES, PRESETS, get_preset
from km_tf.files import write_atomically

flags.DEFINE_string("base", None, "The base network's .keras file (the plain "
                    "pretrained model the tasks were trained on).")
flags.DEFINE_multi_string("task", [], "A task file from km_tf.save_task; "
                          "repeat for several tasks (one pack each).")
PACK_PRESETS = sorted(set(PRESETS) - {"dynamic"})
flags.DEFINE_multi_enum("preset", ["float32"], PACK_PRESETS,
                        "Template preset; repeat for one template per "
                        "preset: " + "; ".join(
                            f"{PRESETS[name].name}: {PRESETS[name].summary}"
                            for name in PACK_PRESETS))
flags.DEFINE_enum("io_type", None, list(INTEGER_IO_TYPES),
                  "Input/output type of the int8 and micro templates.")
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
flags.DEFINE_list("pack_types", None, "How packs store the modulators, the "
                  "folded BatchNorm and the head kernel, three of float32, "
                  "float16, int8 (default by template: float32 packs for "
                  "float32, float16 for float16, int8,float16,int8 for int8 "
                  "templates; BUILD.md, \"Task packs\").")
flags.register_validator(
    "pack_types", lambda value: value is None or (
        len(value) == 3 and set(value) <= set(ARRAY_TYPES)),
    "--pack_types takes three of float32, float16, int8, e.g. "
    "--pack_types=float16,float16,int8.")
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
        templates = [deploy.TemplateFiles.load(FLAGS.template)]
    else:
        classes = FLAGS.classes or max(model.output_shape[-1]
                                       for model in tasks.values())
        data = common.export_data_from_flags(base)
        templates = []
        for name in dict.fromkeys(FLAGS.preset):
            io_type = (FLAGS.io_type if FLAGS.io_type in PRESETS[name].io_types
                       else None)
            logging.info("Exporting the %d-class %s template.", classes, name)
            templates.append(deploy.export_template(
                base, get_preset(name, io_type), output_dir,
                Path(FLAGS.base).stem, classes=classes,
                calibration_data=None if data is None else data.calibration,
                plan_kernels=FLAGS.plan_kernels))
    data_for = {task: common.export_data_from_flags(model)
                for task, model in tasks.items()}
    report = []
    for template in templates:
        packs = []
        for task, data in data_for.items():
            name = Path(task).stem
            logging.info("Packing %s for %s.", name,
                         template.tflite_path.name)
            result = deploy.export_pack(
                base, task, template, output_dir, name,
                calibration_data=None if data is None else data.calibration,
                pack_types=(tuple(FLAGS.pack_types) if FLAGS.pack_types
                            else None),
                heldout=None if data is None or data.heldout is None
                else data.heldout[0])
            packs.append(result.report)
        report.append({"template": json.loads(template.info_path.read_text()),
                       "packs": packs})
    write_atomically(str(output_dir / "packs.report.json"),
                     json.dumps(report, indent=2).encode())
    text = format_report(report)
    write_atomically(str(output_dir / "packs.report.txt"), text.encode())
    print(text)


def format_report(report: list[dict[str, Any]]) -> str:
    """The readable size report: per template, its packs."""
    lines = []
    for entry in report:
        template = entry["template"]
        lines.append(
            f"template {template['tflite']}: {template['tflite_bytes']:,} "
            f"bytes (preset {template['preset']}, {template['classes']} "
            f"classes); plan {template['plan']}: "
            f"{template['plan_bytes']:,} bytes (base kernels: "
            f"{template['plan_kernels']})")
        for pack in entry["packs"]:
            line = (f"  {pack['pack']}: {pack['pack_bytes']:,} bytes = "
                    f"{100 * pack['pack_to_tflite']:.2f}% of the task's "
                    f".tflite ({pack['task_tflite_bytes']:,} bytes); "
                    f"{pack['classes']} classes; applied = converter export: "
                    f"{'yes' if pack['applied_equals_conversion'] else 'no'}")
            agreement = pack.get("agreement")
            if agreement:
                line += (f"; top-1 agreement with the trained task "
                         f"{100 * agreement['applied_vs_trained_top1']:.1f}% "
                         f"on {agreement['samples']} held-out images")
            lines.append(line)
    return "\n".join(lines) + "\n"


def run() -> None:
    """The `km-export-packs` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
