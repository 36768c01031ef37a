"""Files the project reads and writes: existence checks and atomic writes.

Every file km-tf writes (task files, models, reports, `.tflite`, C sources)
goes through `write_atomically` or `save_model_atomically`: the data go to a
temporary file `.tmp-*` in the target's folder, are fsynced and renamed over
the target, so a reader (or a run killed mid-write) sees the old file or the
new one, never a torn one. The file gets the mode a plain `open()` would
give under the current umask. `remove_stale_temporaries` clears what a
killed writer left behind.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Only a type: this module also runs on devices
    import keras   # without TensorFlow (km_tf.deploy.applier).

TEMPORARY_PREFIX = ".tmp-"
# Temporaries older than this are a killed writer's, never a live one's.
STALE_TEMPORARY_SECONDS = 3600


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
    with _replacing(path) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(data)


def save_model_atomically(model: keras.Model, path: str | os.PathLike
                          ) -> None:
    """`model.save(path)`, atomically: a kill mid-save keeps the old file.

    Keras' own `save` opens the target for writing, so a process killed
    while saving leaves a torn `.keras` file where the previous model was.

    Args:
        model: The Keras model.
        path: A `.keras` file; its folder must exist.
    """
    with _replacing(path) as temporary:
        model.save(temporary)


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; then fsyncs it, gives
    it the mode `open()` would give and renames it over `path`. On any
    error the temporary goes and `path` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write {path!r}: folder {folder!r} does not exist. "
            "Create it first.")
    # The suffix keeps the target's extension (Keras requires ".keras").
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX,
                                         suffix=os.path.basename(path))
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        # mkstemp creates 0600.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def remove_stale_temporaries(folder: str | os.PathLike,
                             older_than: float = STALE_TEMPORARY_SECONDS
                             ) -> list[str]:
    """Deletes temporaries a killed writer left in `folder`.

    Args:
        folder: A folder km-tf writes into (missing is fine).
        older_than: Only temporaries not modified for this many seconds go,
            so a writer still running elsewhere keeps its own.

    Returns:
        The deleted paths.
    """
    now, removed = time.time(), []
    for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)),
                                       TEMPORARY_PREFIX + "*")):
        try:
            if now - os.path.getmtime(path) >= older_than:
                os.remove(path)
                removed.append(path)
        except OSError:
            continue  # Gone already, or not ours to remove.
    return removed


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
