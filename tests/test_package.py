"""The installable package: a wheel built from the checkout, installed
elsewhere, with its four console programs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = {"km-train": "train", "km-evaluate": "evaluate",
            "km-tune": "tune", "km-export": "export",
            "km-export-packs": "export_packs", "km-meta-train": "meta_train"}
# A flag each program's help must list.
KEY_FLAG = {"km-train": "--output_dir", "km-evaluate": "--task",
            "km-tune": "--max_task_percent", "km-export": "--calibration_data",
            "km-export-packs": "--plan_kernels", "km-meta-train": "--shots"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --target` of a wheel built from the repository (no
    dependencies: they come from this environment)."""
    root = tmp_path_factory.mktemp("package")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--no-build-isolation", "--wheel-dir", str(root / "wheels"),
         str(REPO)], check=True, capture_output=True)
    wheel, = (root / "wheels").glob("km_tf-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(root / "site"), str(wheel)],
        check=True, capture_output=True)
    return wheel, root / "site"


def test_wheel_holds_every_library_module_and_the_programs(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {path.relative_to(REPO).as_posix()
               for path in (REPO / "km_tf").rglob("*.py")}
    assert sources <= names
    entry_points = next(name for name in names
                        if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for program, module in PROGRAMS.items():
        assert f"{program} = km_tf.cli.{module}:run" in text
    assert "km-apply-pack = km_tf.deploy.apply_program:run" in text
    assert not any(name.startswith(("apps/", "tflite/", "bench/", "tests/"))
                   for name in names)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_help_works_from_another_directory(installed, tmp_path,
                                                   program):
    _, site = installed
    module = PROGRAMS[program]
    # What the console script does: import the module's `run` and call it.
    code = (f"import sys; sys.argv = [{program!r}, '--help']; "
            f"import km_tf; assert km_tf.__file__.startswith({str(site)!r})"
            f", km_tf.__file__; from km_tf.cli.{module} import run; run()")
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, text=True,
        capture_output=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(site),
             "TF_CPP_MIN_LOG_LEVEL": "3"})
    # absl prints the help on stdout and exits with status 1 after it.
    assert result.returncode == 1, result.stderr[-3000:]
    assert KEY_FLAG[program] in result.stdout
    assert program in result.stdout  # The program's docstring.
    assert "Traceback" not in result.stderr


def test_apply_program_help_needs_no_tensorflow(installed, tmp_path):
    """`km-apply-pack` (argparse, numpy only) from the installed wheel."""
    _, site = installed
    code = ("import sys; sys.argv = ['km-apply-pack', '--help']; "
            "from km_tf.deploy.apply_program import run; run()")
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, text=True,
        capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "km-apply-pack" in result.stdout and "--plan" in result.stdout
    assert "tensorflow" not in result.stderr.lower()
