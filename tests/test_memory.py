"""bench/memory.py, and what it shows: a KM step holds less than full FT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memory  # bench/memory.py; bench/ is on pytest's pythonpath.

FOOTPRINT_SCRIPT = Path(__file__).with_name("memory_footprint.py")
BENCH = Path(memory.__file__).parent


@pytest.fixture(scope="module")
def footprints() -> dict:
    # The script imports `memory` from bench/, as the bench scripts do.
    pythonpath = [str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = subprocess.run(
        [sys.executable, str(FOOTPRINT_SCRIPT)],
        env={**os.environ, **memory.EXACT_CPU_COUNTS,
             "CUDA_VISIBLE_DEVICES": "",
             "PYTHONPATH": os.pathsep.join(pythonpath)},
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("measure,device", [
    (memory.peak_bytes, "CPU:0"),
    (memory.peak_tensor_bytes, "CPU:0"),
    (memory.peak_tensor_bytes, "/device:CPU:0"),
])
def test_cpu_counts_without_the_counting_allocator_are_refused(
        monkeypatch, measure, device):
    for name in memory.EXACT_CPU_COUNTS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="TF_CPU_ALLOCATOR_USE_BFC=true"):
        measure(lambda: None, device=device)


def test_counting_allocator_counts_small_tensors(footprints):
    assert footprints["small_tensors"] >= 10 * 100_000


def test_tensor_peak_counts_the_bytes_tensors_asked_for(footprints):
    peaks = footprints["three_kept_of_four"]
    assert peaks["tensor"] == 4 * 3_996_000
    assert peaks["allocator"] > peaks["tensor"]  # Chunks are rounded up.


def test_full_fine_tuning_holds_gradients_and_adam_slots(footprints):
    assert footprints["full"] >= 4 * footprints["weight_bytes"]


@pytest.mark.parametrize("batchnorm", ["train", "freeze"])
def test_km_step_holds_less_than_full_fine_tuning_with_adam(footprints,
                                                            batchnorm):
    """Full FT keeps a gradient and two Adam slots per weight; KM keeps one
    modulated kernel and recomputes its modulator in the backward pass."""
    km = footprints[f"km_{batchnorm}"]
    assert km < footprints["full"] - footprints["weight_bytes"]
