"""One table from several `bench/transfer.py` runs of the same suite.

The KM design study runs in parts (`--methods=...` per part, each its own
`--output`); this merges their JSON files into `bench/results/ABLATION.md`,
every row against the default KM of the first file that has it:

    .venv/bin/python bench/ablation_table.py \\
        bench/results/transfer_3seeds.json bench/results/ablation_*.json \\
        --markdown=bench/results/ABLATION.md

(those files ran under the earlier protocol: see `bench/transfer.py`).

The runs must share the suite (base, tasks, steps, rate grid, seeds);
a file of another suite is refused.
"""

import json
import sys
from pathlib import Path

from absl import app, flags

from results_io import write_text
from transfer_report import _kb
from transfer_suite import suite_differences


def define_flags() -> None:
    """The program's flags (defined only when it runs as a program: tests
    import this module next to `bench/transfer.py`, which has a
    `--markdown` of its own)."""
    flags.DEFINE_string("markdown", str(Path(__file__).resolve().parent
                                        / "results" / "ABLATION.md"),
                        "Where the merged table goes.")

def merged_rows(results: list[dict]) -> tuple[list[str], dict[str, dict]]:
    """(task names, {method: {"label", "summary"}}), first file wins.

    Raises:
        ValueError: The files come from different suites.
    """
    first = results[0]
    for other in results[1:]:
        differs = suite_differences(first, other)
        if differs:
            raise ValueError(f"Runs of different suites ({', '.join(differs)}"
                             " differ): rerun them with the same flags.")
    rows: dict[str, dict] = {}
    for result in results:
        for name, info in result["methods"].items():
            rows.setdefault(name, {"label": info["label"],
                                   "summary": result["summary"][name]})
    return list(first["tasks"]), rows


def table(tasks: list[str], rows: dict[str, dict]) -> list[str]:
    """Markdown rows: per-task mean, mean ± sd, bytes, difference to km."""
    reference = rows.get("km", {}).get("summary")
    lines = ["| setting | " + " | ".join(tasks)
             + " | mean ± sd | per-task bytes | vs KM default |",
             "|" + "---|" * (len(tasks) + 4)]
    for name, row in rows.items():
        summary = row["summary"]
        mean = 100 * summary["mean_test_accuracy"]
        delta = (f"{mean - 100 * reference['mean_test_accuracy']:+.1f}"
                 if reference and name != "km" else "")
        cells = [f"{100 * summary['tasks'][t]['test_accuracy_mean']:.1f}"
                 for t in tasks]
        lines.append(f"| {row['label']} | " + " | ".join(cells)
                     + f" | {mean:.1f} ± "
                     f"{100 * summary['mean_test_accuracy_std']:.1f} | "
                     f"{_kb(summary['mean_per_task_bytes'])} | {delta} |")
    return lines


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        sys.exit("Give the JSON files of `bench/transfer.py` runs.")
    results = [json.loads(Path(path).read_text()) for path in paths]
    tasks, rows = merged_rows(results)
    write_text(flags.FLAGS.markdown, "\n".join([
        "# KM design study",
        "",
        "Merged from: " + ", ".join(f"`{path}`" for path in paths)
        + ". Same suite, protocol and seeds as `RESULTS.md`; test accuracy"
        " in %, mean over 3 seeds per task.",
        "",
        *table(tasks, rows),
        "",
    ]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
