"""Builds and registers the native CPU kernels (`cpu_qmatmul.cc`, `cpu_attention.cc`) as XLA FFI targets.

A kernel's shared library is compiled from its .cc on first use (g++, a few seconds) into a folder keyed by the
hash of its source, the headers beside it and the flags, so a changed source rebuilds and an unchanged one loads
at once. `load` says why a kernel cannot run here (no compiler, no AVX512 + VNNI, not x86-64) instead of raising:
the callers fall back to XLA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
             "-mavx512vnni", "-mf16c", "-mfma")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build(source: Path, build_dir: Path) -> Path:
    """Compiles `source` into build_dir/<hash>/ (atomically: concurrent processes may race) and returns the .so."""
    include = jax.ffi.include_dir()
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(CXX_FLAGS).encode() + include.encode())
    lib = build_dir / key.hexdigest()[:16] / f"lib{source.stem}.so"
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        proc = subprocess.run([cxx, *CXX_FLAGS, "-isystem", include, "-I", str(source.parent), str(source),
                               "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr[-2000:]}")
        os.replace(out, lib)
    return lib


_registered: dict[str, str | None] = {}  # FFI target -> None (registered) or why it cannot be


def load(source_name: str, symbol: str, target: str, build_dir: str) -> str | None:
    """Builds (once per source hash) `source_name` and registers its handler `symbol` as the CPU FFI target
    `target`; returns None if it is usable, else why not.

    NOTE: once per process and target, whatever `build_dir` later calls name: XLA refuses a second handler for
    a registered target, and the first one keeps serving."""
    if target in _registered:
        return _registered[target]
    why = None
    if platform.machine() not in ("x86_64", "AMD64"):
        why = f"needs x86-64, not {platform.machine()}"
    elif missing := [f for f in CPU_FLAGS if f not in _cpu_flags()]:
        why = f"the CPU lacks {', '.join(missing)}"
    else:
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build(HERE / source_name, Path(build_dir))))
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        except Exception as e:  # noqa: BLE001 (any build or load failure means: use XLA)
            why = f"build or load failed: {e}"
    _registered[target] = why
    return why


_warned: set[str] = set()


def available(source_name: str, symbol: str, target: str, build_dir: str | os.PathLike, what: str) -> bool:
    """True if the kernel is built and registered for the CPU backend; logs why not, once per reason."""
    why = load(source_name, symbol, target, str(build_dir))
    if why is not None and (what, why) not in _warned:
        _warned.add((what, why))
        log.warning("native CPU %s unavailable (%s); using XLA", what, why)
    return why is None
