"""Measures the accuracy of a base network, or of a KM task on it.

    km-evaluate --base=runs/main/base.keras \\
        --task=runs/main/task.kmtask --data=digits:5-9
    km-evaluate --base=runs/main/base.keras --data=digits:0-4

With `--task` the task model is rebuilt from the base and the task file
(`km_tf.restore_task`: the task's own head and modulators) and scored;
without, the base itself is scored. Images are fed as RGB pixels in
[0, 255] at the base's input size: km-tf models normalize inside. Use the
same `--data` and `--seed` as training so that the held-out split is the
same one. Prints the accuracy and writes it as JSON with `--output`.
"""

import json
import os

import keras
from absl import flags

import km_tf
from km_tf import data, files, models, training
from km_tf.cli import common

SPLITS = ("train", "validation", "test")

# Model.
flags.DEFINE_string("base", None, "The base network's .keras file.")
flags.DEFINE_string("task", None, "A .kmtask file trained on --base; omit to "
                    "evaluate the base alone.")
flags.DEFINE_enum("normalization", None, list(models.NORMALIZATIONS),
                  "Only for a base without in-model normalization: "
                  "normalize the images this way in the input pipeline.")
# Data.
flags.DEFINE_string("data", None, "Dataset spec (see km_tf.data), e.g. "
                    "digits:5-9.")
flags.DEFINE_enum("split", "test", list(SPLITS), "Split to score.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder.")
flags.DEFINE_integer("seed", 0, "Seed of the split (as in training).")
# Output.
flags.DEFINE_string("output", None, "Also write the result to this JSON file.")
flags.mark_flags_as_required(["base", "data"])

FLAGS = flags.FLAGS


def _normalization(base: keras.Model) -> str | None:
    """Pipeline normalization: none for a base that normalizes inside."""
    inside = models.input_normalization(base)
    if inside and FLAGS.normalization:
        raise ValueError(
            f"--normalization={FLAGS.normalization} would normalize twice: "
            f"base {FLAGS.base!r} normalizes its inputs itself ({inside!r}). "
            "Drop the flag.")
    return FLAGS.normalization


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}.")
    base = models.load_base(FLAGS.base)
    dataset = data.load(FLAGS.data, image_size=models.input_size(base),
                        normalization=_normalization(base),
                        batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                        data_dir=FLAGS.data_dir)
    model = base
    if FLAGS.task:
        model = km_tf.restore_task(base, FLAGS.task)
    if model.output_shape[-1] != dataset.num_classes:
        raise ValueError(
            f"--data={FLAGS.data} has {dataset.num_classes} classes but "
            f"{FLAGS.task or FLAGS.base} outputs {model.output_shape[-1]}: "
            "pass the dataset spec it was trained on.")
    accuracy = training.evaluate_accuracy(model, getattr(dataset,
                                                         FLAGS.split))
    result = {"base": FLAGS.base, "task": FLAGS.task, "data": FLAGS.data,
              "split": FLAGS.split, "images": dataset.counts[FLAGS.split],
              "accuracy": accuracy}
    print(f"{FLAGS.task or FLAGS.base} on {FLAGS.data} ({FLAGS.split}, "
          f"{result['images']} images): accuracy {100 * accuracy:.2f}%")
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)),
                    exist_ok=True)
        files.write_atomically(FLAGS.output,
                                (json.dumps(result, indent=2) + "\n").encode())


def run() -> None:
    """The `km-evaluate` program."""
    common.run_program(main)


if __name__ == "__main__":
    run()
