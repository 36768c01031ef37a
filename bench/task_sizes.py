"""Per-task sizes of KM models: `task_report` for each modulator setting.

Builds MobileNetV2 (1.0, 224) and ResNet50 (224) without top plus a 10-class
head (random weights: sizes do not depend on values), modulates them with each
modulator setting, and writes the `task_report` numbers to
`bench/results/task_sizes.json` and `.md`.

    .venv/bin/python bench/task_sizes.py
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import km_tf  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NETWORKS = ("MobileNetV2", "ResNet50")
SETTINGS = (
    dict(form="hybrid", hidden_units=16, filter_units=1),  # the default
    dict(form="hybrid", hidden_units=32, filter_units=1),
    dict(form="hybrid", hidden_units=16, filter_units=2),
    dict(form="spatial", hidden_units=16),
    dict(form="spatial", hidden_units=64),
    dict(form="filter", hidden_units=16, filter_units=1),
)


def classifier(name: str) -> keras.Model:
    """`name` from keras.applications, no top, 10-class Dense head."""
    trunk = getattr(keras.applications, name)(
        input_shape=(224, 224, 3), weights=None, include_top=False,
        pooling="avg")
    return keras.Sequential([trunk, keras.layers.Dense(10, name="head")],
                            name=name.lower())


def main() -> None:
    rows = []
    for name in NETWORKS:
        model = classifier(name)
        for setting in SETTINGS:
            report = km_tf.task_report(km_tf.modulate(model, **setting))
            rows.append({"network": name, **setting, **report.to_dict()})
            if setting == SETTINGS[0]:
                print(f"{name}, default settings {setting}:\n{report}\n")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "task_sizes.json"), "w") as stream:
        json.dump(rows, stream, indent=2)
    lines = ["| network | form | hidden | filter | modulator params | "
             "% of base | task params (mod + BN + head) | % of base |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['network']} | {row['form']} | {row['hidden_units']} | "
            f"{row.get('filter_units', '-')} | {row['modulator_params']:,} | "
            f"{row['modulator_percent_of_base']:.2f}% | "
            f"{row['task_params']:,} | {row['task_percent_of_base']:.2f}% |")
    table = "\n".join(lines)
    with open(os.path.join(RESULTS, "task_sizes.md"), "w") as stream:
        stream.write("# Per-task sizes\n\n`.venv/bin/python bench/task_sizes.py`"
                     "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
