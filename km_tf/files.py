"""Files the project reads and writes: existence checks and atomic writes."""

from __future__ import annotations

import os
import tempfile


def existing_file(path: str | os.PathLike, what: str, fix: str) -> str:
    """`path` as a string, or a FileNotFoundError naming `what` and `fix`.

    Example:
    >>> existing_file("base.keras", "Base model", "Pass the .keras file.")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist. {fix}")
    return path


def write_atomically(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a fsynced temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write {path!r}: folder {folder!r} does not exist. "
            "Create it first.")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                                         suffix=os.path.basename(path))
    try:
        # mkstemp creates 0600; give the file what open() would give.
        os.fchmod(handle, 0o666 & ~_current_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
