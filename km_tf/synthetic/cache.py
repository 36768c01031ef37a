"""A disk cache of generated numpy arrays (`.npz`, written atomically).

Generated datasets cost seconds to minutes to draw; they are kept under
`cache_dir()` keyed by a name that changes whenever the generated arrays
would. Files hold plain arrays only and are read with `allow_pickle=False`.
A cache file that does not read (torn by a crash before atomic writes, or a
disk error) is regenerated, with a warning.
"""

import io
import os
import zipfile
from typing import Callable

import numpy as np
from absl import logging

from km_tf.files import write_atomically

CACHE_ENV = "KM_TF_CACHE_DIR"


def cache_dir() -> str:
    """The cache folder: `$KM_TF_CACHE_DIR`, else `~/.cache/km_tf`."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "km_tf")


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
    """Returns the arrays cached as `name`, building and storing them once.

    Args:
        name: File name inside `cache_dir()/synthetic` (without `.npz`); it
            must encode every parameter the arrays depend on.
        build: Makes the arrays when they are not cached.

    Returns:
        The arrays by key.
    """
    folder = os.path.join(cache_dir(), "synthetic")
    path = os.path.join(folder, name + ".npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            logging.warning("Regenerating the unreadable cache file %s (%s).",
                            path, error)
    arrays = build()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomically(path, buffer.getvalue())
    except OSError as error:  # A read-only home still gets the data.
        logging.warning("Could not cache %s (%s); it is regenerated next "
                        "time. Set %s to a writable folder.", path, error,
                        CACHE_ENV)
    return arrays
