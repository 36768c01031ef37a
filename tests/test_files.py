"""Tests for km_tf.files: atomic writes survive kills and keep the umask."""

import os
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from km_tf import files
from support import random_images, small_convnet

# A child process that saves a model over the same file again and again.
_SAVE_FOREVER = textwrap.dedent("""
    import sys
    import keras
    from km_tf import files
    model = keras.saving.load_model(sys.argv[1])
    print("saving", flush=True)
    while True:
        files.save_model_atomically(model, sys.argv[1])
""")


def test_killed_model_save_leaves_the_previous_model_loadable(tmp_path):
    target = tmp_path / "base.keras"
    model = small_convnet()
    files.save_model_atomically(model, target)
    images = random_images(n=2)
    expected = keras.ops.convert_to_numpy(model(images))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for delay in (0.05, 0.4, 1.1):
        child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER,
                                  str(target)], stdout=subprocess.PIPE,
                                 text=True, env=env)
        try:
            assert child.stdout.readline().strip() == "saving"
            time.sleep(delay)  # Somewhere inside a save.
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        loaded = keras.saving.load_model(target)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images)),
                                   expected, atol=1e-6)
    leftovers = files.remove_stale_temporaries(tmp_path, older_than=0)
    assert all(os.path.basename(p).startswith(".tmp-") for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.keras"]


@pytest.mark.parametrize("write", ["bytes", "model"])
def test_written_files_get_the_mode_open_would_give(tmp_path, write):
    old = os.umask(0o022)
    try:
        if write == "bytes":
            files.write_atomically(str(tmp_path / "report.json"), b"{}")
        else:
            files.save_model_atomically(small_convnet(),
                                        tmp_path / "base.keras")
    finally:
        os.umask(old)
    written, = tmp_path.iterdir()
    assert written.stat().st_mode & 0o777 == 0o644


def test_only_stale_temporaries_are_removed(tmp_path):
    stale, fresh = tmp_path / ".tmp-old.keras", tmp_path / ".tmp-new.keras"
    other = tmp_path / "notes.txt"
    for path in (stale, fresh, other):
        path.write_bytes(b"x")
    hour_ago = time.time() - 2 * files.STALE_TEMPORARY_SECONDS
    os.utime(stale, (hour_ago, hour_ago))
    assert files.remove_stale_temporaries(tmp_path) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-new.keras", "notes.txt"]
