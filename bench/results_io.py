"""Writing benchmark results: every file atomically, folders created; the
one-line machine summary the reports print."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_summary(*, tensorflow: bool = False) -> str:
    """E.g. "x86_64, 2 CPU cores, Python 3.11.7[, TensorFlow 2.21.0]"."""
    summary = (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
               f"Python {platform.python_version()}")
    if tensorflow:
        import tensorflow as tf  # Only the benchmarks that use it import it.

        summary += f", TensorFlow {tf.__version__}"
    return summary


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
