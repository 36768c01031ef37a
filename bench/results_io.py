"""Writing benchmark results: every file atomically, folders created."""

from __future__ import annotations

import os
from pathlib import Path


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
