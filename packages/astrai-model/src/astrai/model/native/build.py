"""Build, cache and load a C kernel as a shared library, for this CPU, on first use.

A kernel is one C source file compiled with the machine's C compiler (`$CC`, else `cc`, `gcc`) for this CPU
(`-march=native`), with OpenMP, and the folder of `simd.h` on the include path. The library is kept in
`$ASTRAI_CACHE_DIR/kernels` (default `~/.cache/astrai/kernels`) under a name that hashes the source, the shared
header, the compiler, the flags and the CPU, so an edit or another machine builds afresh; it is built aside and
renamed, so a crash mid-build never leaves a half-written library. Kernels run their parallel loops on the
OpenMP runtime torch already loaded (the same `libgomp.so.1`), so they share torch's threads rather than
starting a second pool.

`load_library` returns None, and the caller runs its torch reference instead, where there is no compiler, no
OpenMP in torch, not Linux, or the build fails (a warning says why); `ASTRAI_NATIVE_KERNELS=0` turns every
kernel off on purpose.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

HEADER = Path(__file__).with_name("simd.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def available_compiler() -> str | None:
    """The C compiler kernels are built with, or None where they are not built at all (see the module doc)."""
    if os.environ.get("ASTRAI_NATIVE_KERNELS", "1") == "0" or not torch.backends.openmp.is_available():
        return None
    if platform.system() != "Linux":
        return None
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def load_library(source: Path, what: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The loaded library of `source` (built with `FLAGS` plus `flags`), or None with a warning naming `what`
    when it cannot be built. Callers cache the result (a failed build is not retried in the same process)."""
    compiler = available_compiler()
    if compiler is None:
        return None
    try:
        return ctypes.CDLL(str(build(source, compiler, flags)))
    except (OSError, subprocess.SubprocessError) as err:  # no compiler, a failed or timed-out build
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"{what} not built ({detail}); torch runs its reference instead", stacklevel=3)
        return None


def build(source: Path, compiler: str, flags: tuple[str, ...] = ()) -> Path:
    """The shared library for this source, header, compiler, flags and CPU: built once, then found."""
    all_flags = (*FLAGS, *flags, f"-I{HEADER.parent}")
    parts = [source.read_bytes(), HEADER.read_bytes(), compiler.encode(), " ".join(all_flags).encode(), _cpu_id()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    folder = Path(os.environ.get("ASTRAI_CACHE_DIR") or Path.home() / ".cache" / "astrai") / "kernels"
    target = folder / f"{source.stem}-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: never half-written
            built = Path(tmp) / target.name
            subprocess.run([compiler, *all_flags, str(source), "-o", str(built), "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
            os.replace(built, target)
    return target


def _cpu_id() -> bytes:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    lines = info.splitlines()
    return "\n".join(
        next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")
    ).encode()
