"""The final report of a training run: JSON for tools, text for people."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from km_tf.files import write_atomically
from km_tf.tasks import TaskReport


@dataclasses.dataclass
class StageReport:
    """One stage of a run (pretraining the base, or one KM task).

    Attributes:
        stage: `"pretrain"` or `"task"`.
        data: The dataset spec trained on.
        train_images: Training images (per pass).
        epochs: The epochs this run trained (1-based; a resumed run lacks
            the ones finished before it stopped).
        accuracy: Accuracy per split (`"validation"`, `"test"`).
        seconds: Wall time of the stage.
        output: The file the stage wrote (`.keras` base or `.kmtask`).
        task: The task's size next to its base (task stages only).
    """

    stage: str
    data: str
    train_images: int
    epochs: list[int]
    accuracy: dict[str, float]
    seconds: float
    output: str
    task: TaskReport | None = None

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["task"] = self.task.to_dict() if self.task else None
        return fields

    def __str__(self) -> str:
        accuracy = ", ".join(f"{split} {100 * value:.1f}%"
                             for split, value in self.accuracy.items())
        epochs = (f"epochs {self.epochs[0]}-{self.epochs[-1]}"
                  if self.epochs else "no epochs left to train")
        lines = [f"[{self.stage}] {self.data}: {self.train_images} training "
                 f"images, {epochs}, {self.seconds:.1f} s",
                 f"  accuracy: {accuracy}",
                 f"  wrote {self.output}"]
        if self.task is not None:
            lines += ["  " + line for line in str(self.task).splitlines()]
        return "\n".join(lines)


@dataclasses.dataclass
class RunReport:
    """A whole run: its settings, stages and total time."""

    settings: dict[str, Any]
    stages: list[StageReport]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings,
                "stages": [stage.to_dict() for stage in self.stages],
                "seconds": round(self.seconds, 3)}

    def __str__(self) -> str:
        header = ", ".join(f"{key}={value}" for key, value
                           in sorted(self.settings.items()))
        body = "\n".join(str(stage) for stage in self.stages)
        return (f"km-tf training report ({header})\n{body}\n"
                f"total time {self.seconds:.1f} s")


def write_report(report: RunReport, directory: str,
                 name: str = "report") -> tuple[str, str]:
    """Writes `{name}.json` and `{name}.txt` into `directory`, atomically.

    Returns:
        The two paths.
    """
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"{name}.json")
    text_path = os.path.join(directory, f"{name}.txt")
    write_atomically(json_path, (json.dumps(report.to_dict(), indent=2)
                                  + "\n").encode())
    write_atomically(text_path, (str(report) + "\n").encode())
    return json_path, text_path
