"""Writing benchmark results: every file atomically, folders created; the
one-line machine summary and the provenance lines the reports print."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Mapping


def machine_summary(*, tensorflow: bool = False) -> str:
    """E.g. "x86_64, 2 CPU cores, Python 3.11.7[, TensorFlow 2.21.0]"."""
    summary = (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
               f"Python {platform.python_version()}")
    if tensorflow:
        import tensorflow as tf  # Only the benchmarks that use it import it.

        summary += f", TensorFlow {tf.__version__}"
    return summary


def provenance(results: Mapping[str, Any], *,
               default_command: str = "") -> list[str]:
    """A Markdown report's "Command:" and "Machine:" lines.

    They come from `results`' "command" (`default_command` without one)
    and "machine", and its "date" and "seconds" (the run time) when it has
    them; each line ends in a Markdown line break.
    """
    machine = str(results["machine"])
    if "date" in results:
        machine += f"; {results['date']}"
    if "seconds" in results:
        machine += f"; run {float(results['seconds']):.0f} s"
    return [f"Command: `{results.get('command', default_command)}`  ",
            f"Machine: {machine}.  "]


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_results(stem: str | os.PathLike, texts: dict[str, str]) -> None:
    """Writes `{suffix: text}` next to each other, e.g. stem.json, stem.md."""
    for suffix, text in texts.items():
        write_text(Path(stem).with_suffix(suffix), text)


def write_report(stem: str | os.PathLike, results: dict[str, Any],
                 markdown: Callable[[dict[str, Any]], str]) -> str:
    """Writes `results` as `<stem>.json` and `markdown(results)` as
    `<stem>.md`; returns the Markdown text."""
    text = markdown(results)
    write_results(stem, {".json": json.dumps(results, indent=2) + "\n",
                         ".md": text})
    return text
