"""Test support: builds the C applier (tflite/packs/km_apply.c) and calls it
through ctypes, the way an app calls it through JNI or Swift.

`build(tmp_dir)` compiles `libkm_apply.so` (and `cli(tmp_dir)` the
`km_apply` command) with the Makefile's flags, skipping the calling test
when there is no C compiler. `apply` runs `km_scratch_bytes` + `km_apply`
into a caller-owned buffer and raises `RuntimeError(km_status_message)`.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE_DIR = Path(__file__).resolve().parents[1] / "tflite" / "packs"
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic",
          "-ffp-contract=off"]
_u8p = ctypes.POINTER(ctypes.c_uint8)


def _compiler() -> str:
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    pytest.skip("no C compiler (cc, gcc or clang) on PATH")


def _compile(output: Path, sources: list[str], extra: list[str]) -> Path:
    command = [_compiler(), *CFLAGS, *extra, "-o", str(output),
               *(str(SOURCE_DIR / source) for source in sources), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return output


def build(tmp_dir) -> Path:
    """Compiles `libkm_apply.so` into `tmp_dir`; returns its path."""
    return _compile(Path(tmp_dir) / "libkm_apply.so", ["km_apply.c"],
                    ["-fPIC", "-shared"])


def cli(tmp_dir) -> Path:
    """Compiles the `km_apply` command into `tmp_dir`; returns its path."""
    return _compile(Path(tmp_dir) / "km_apply",
                    ["km_apply_main.c", "km_apply.c"], [])


_LIBRARIES: dict[str, ctypes.CDLL] = {}


def load(lib_path) -> ctypes.CDLL:
    """The library with its function prototypes declared (cached)."""
    key = str(lib_path)
    if key not in _LIBRARIES:
        lib = ctypes.CDLL(key)
        lib.km_scratch_bytes.argtypes = [_u8p, ctypes.c_size_t, _u8p,
                                         ctypes.c_size_t]
        lib.km_scratch_bytes.restype = ctypes.c_size_t
        lib.km_apply.argtypes = [_u8p, ctypes.c_size_t, _u8p,
                                 ctypes.c_size_t, _u8p, ctypes.c_size_t,
                                 _u8p, ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_size_t]
        lib.km_apply.restype = ctypes.c_int
        lib.km_status_message.argtypes = [ctypes.c_int]
        lib.km_status_message.restype = ctypes.c_char_p
        lib.km_crc32.argtypes = [ctypes.c_uint32, _u8p, ctypes.c_size_t]
        lib.km_crc32.restype = ctypes.c_uint32
        lib.km_float_to_half.argtypes = [ctypes.c_float]
        lib.km_float_to_half.restype = ctypes.c_uint16
        lib.km_half_to_float.argtypes = [ctypes.c_uint16]
        lib.km_half_to_float.restype = ctypes.c_float
        _LIBRARIES[key] = lib
    return _LIBRARIES[key]


def buffer(data: bytes | bytearray) -> ctypes.Array:
    """A C-owned copy of `data` (a uint8 array)."""
    return (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(
        bytes(data) or b"\0")


def _ptr(array: ctypes.Array):
    return ctypes.cast(array, _u8p)


def message(lib_path, status: int) -> str:
    return load(lib_path).km_status_message(status).decode()


def scratch_bytes(lib_path, plan: bytes, pack: bytes) -> int:
    """`km_scratch_bytes` (0 for a malformed plan or pack)."""
    plan_c, pack_c = buffer(plan), buffer(pack)
    return load(lib_path).km_scratch_bytes(_ptr(plan_c), len(plan),
                                           _ptr(pack_c), len(pack))


def apply_into(lib_path, template: bytes, plan: bytes, pack: bytes,
               out: ctypes.Array | None, *, scratch: int | None = None
               ) -> int:
    """`km_apply` into `out` (None: in place, into a copy of `template`
    that is then `out`); returns the status. `scratch`: bytes to give
    (default: what km_scratch_bytes asks for)."""
    lib = load(lib_path)
    template_c, plan_c, pack_c = buffer(template), buffer(plan), buffer(pack)
    if scratch is None:
        scratch = lib.km_scratch_bytes(_ptr(plan_c), len(plan), _ptr(pack_c),
                                       len(pack))
    scratch_c = (ctypes.c_uint8 * max(scratch, 1))()
    target = template_c if out is None else out
    return lib.km_apply(_ptr(template_c), len(template), _ptr(plan_c),
                        len(plan), _ptr(pack_c), len(pack), _ptr(target),
                        len(target) if out is not None else len(template),
                        scratch_c, scratch)


def apply(lib_path, template: bytes, plan: bytes, pack: bytes,
          in_place: bool = False) -> bytes:
    """The task's `.tflite` bytes computed by the C applier.

    Raises:
        RuntimeError: km_apply refused (the message is km_status_message).
    """
    lib = load(lib_path)
    template_c, plan_c, pack_c = buffer(template), buffer(plan), buffer(pack)
    need = lib.km_scratch_bytes(_ptr(plan_c), len(plan), _ptr(pack_c),
                                len(pack))
    scratch_c = (ctypes.c_uint8 * max(need, 1))()
    out = template_c if in_place else (ctypes.c_uint8 * len(template))()
    status = lib.km_apply(_ptr(template_c), len(template), _ptr(plan_c),
                          len(plan), _ptr(pack_c), len(pack), _ptr(out),
                          len(template), scratch_c, need)
    if status != 0:
        raise RuntimeError(lib.km_status_message(status).decode())
    return bytes(out)[:len(template)]
