"""Builds the C++ XLA:CPU kernels next to this file on first use, loads them and registers their FFI targets.

The library is compiled for the host's CPU (`-march=native`: about 20% faster than portable multiversioned code
here) once per source, flags, compiler, jaxlib and CPU into a cache directory (`$MNV2_KERNEL_CACHE`, default
`~/.cache/mnv2_jax/kernels`) with `$CXX` (default `g++`) against the XLA FFI headers that ship with jaxlib, and
reused by later processes. Without a working compiler `available()` is False (with one warning) and the `auto`
implementations keep to XLA ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

SOURCE = Path(__file__).with_name("depthwise_cpu.cc")
TARGETS = ("Mnv2DepthwiseForward", "Mnv2DepthwiseInputGradient", "Mnv2DepthwiseKernelGradient")
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where built libraries are kept: `$MNV2_KERNEL_CACHE`, else `$XDG_CACHE_HOME/mnv2_jax/kernels`."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnv2_jax" / "kernels"
    return Path(os.environ.get("MNV2_KERNEL_CACHE", default))


def build(directory: Path, compiler: str) -> Path:
    """Compiles SOURCE into `directory` (once per source, flags, compiler, jaxlib and CPU); returns the library."""
    inputs = (" ".join(COMPILE_FLAGS), compiler, jaxlib.__version__, _cpu_identity())
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), *(text.encode() for text in inputs)])).hexdigest()[:16]
    library = directory / f"{SOURCE.stem}-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:  # concurrent builders each rename a whole file
        partial = Path(scratch) / library.name
        command = [compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise KernelBuildError(
                f"no C++ compiler {compiler!r} (set CXX, or install g++) to build {SOURCE.name}"
            ) from None
        if result.returncode:
            raise KernelBuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


def _cpu_identity() -> str:
    """The CPU model and features (`-march=native` code runs only where they match)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels once per process; returns the error message, or None."""
    try:
        library = ctypes.CDLL(str(build(cache_dir(), os.environ.get("CXX", "g++"))))
        handlers = {target: getattr(library, target) for target in TARGETS}
    except (KernelBuildError, OSError, AttributeError) as error:
        return str(error)
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def load() -> None:
    """Makes the kernels callable; raises KernelBuildError with the compiler's message if they cannot be built."""
    error = _load()
    if error is not None:
        raise KernelBuildError(error)


def available() -> bool:
    """Whether the kernels build and load here (warns once with the reason when they do not)."""
    error = _load()
    if error is not None:
        _warn_once(error)
    return error is None


@functools.cache
def _warn_once(error: str) -> None:
    warnings.warn(f"C++ CPU kernels unavailable, using XLA ops instead: {error}", stacklevel=3)
