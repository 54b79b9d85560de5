"""The host allocator, which XLA:CPU's step time depends on as much as on the arithmetic.

XLA:CPU allocates a compiled step's temporary buffer (about 1 GiB for a MobileNetV2 train step at 128 px, batch
32) from malloc at every execution and frees it after. glibc serves allocations that large with a fresh `mmap`
and unmaps them on free, so the kernel faults in and zeroes all of the buffer again at every step: ~275,000
faults per step there, 40% of the process's CPU time. The remedies, chosen with `MNV2_HOST_ALLOCATOR`:

- `jemalloc` (`LD_PRELOAD`, found through the dynamic linker's cache; Debian's `libjemalloc2`, installed by
  `scripts/setup.sh`), told to keep freed memory (no decay) in transparent huge pages: the next step gets the
  same pages back, no faults and fewer TLB misses.
- `huge_pages`: glibc's `glibc.malloc.hugetlb=1` tunable makes malloc advise transparent huge pages for its
  mappings: 2 MiB faults, 1/250 as many, but each still zeroes fresh memory (and slows down when the kernel is
  short of free huge pages). Helps where THP is in `madvise` mode.
- `system`: the process's allocator as started.

`auto` (the default) takes the first of these that applies, and keeps an allocator already preloaded (Cloud
TPU VMs preload TCMalloc). The preload and the tunable are read when a process starts, so the `mnv2` command
re-executes itself once with them set; from Python, set them before starting the interpreter (`environment_for`
gives the variables).
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys

VARIABLE = "MNV2_HOST_ALLOCATOR"
ALLOCATORS = ("auto", "jemalloc", "huge_pages", "system")
TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc")
# The environment variables through which a process gets its allocator (besides MNV2_HOST_ALLOCATOR).
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")
# Huge pages for all of jemalloc's memory; freed pages are never handed back to the kernel (with the default
# decay the next step faults a released 1 GiB buffer in again).
_JEMALLOC_CONF = "thp:always,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def transparent_huge_pages_mode() -> str | None:
    """The kernel's THP mode (`always`, `madvise` or `never`); None where the kernel does not say."""
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@functools.cache  # `ldconfig -p` runs once per process
def find_jemalloc() -> str | None:
    """jemalloc's shared library as the dynamic linker knows it (e.g. `libjemalloc.so.2`); None off Linux."""
    return ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None


def _preloaded_allocator(environ: dict[str, str]) -> str | None:
    preloads = environ.get("LD_PRELOAD", "")
    return next((name for name in _PRELOADED_ALLOCATORS if name in preloads), None)


def allocator_in_effect(environ: dict[str, str] | None = None) -> str:
    """The allocator a process started with `environ` (default: this one's) gets: jemalloc, tcmalloc (preloaded
    by someone else), huge_pages (glibc, with THP advised by the tunable or always on) or system."""
    environ = os.environ if environ is None else environ
    preloaded = _preloaded_allocator(environ)
    if preloaded is not None:
        return preloaded
    mode = transparent_huge_pages_mode()
    tunable_set = f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "")
    if mode == "always" or (mode == "madvise" and _glibc() and tunable_set):
        return "huge_pages"
    return "system"


def environment_for(allocator: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) with what a new process needs to run with `allocator`.

    `auto` keeps an allocator the environment chooses itself (a preloaded one, or glibc's huge-page tunable),
    else adds jemalloc where it is installed, else the huge-page tunable where THP is in `madvise` mode. A
    named allocator that cannot work here is an error.
    """
    environ = dict(os.environ if environ is None else environ)
    if allocator not in ALLOCATORS:
        raise ValueError(f"{VARIABLE} must be one of {ALLOCATORS}, got {allocator!r}")
    thp_mode = transparent_huge_pages_mode()
    if allocator == "auto":
        if _preloaded_allocator(environ) is not None or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
            return environ
        if find_jemalloc() is not None:
            allocator = "jemalloc"
        elif thp_mode == "madvise" and _glibc():
            allocator = "huge_pages"
        else:
            return environ  # THP `always` needs no advice; `never` (or no THP) cannot be helped
    if allocator == "jemalloc":
        if _preloaded_allocator(environ) != "jemalloc":
            library = find_jemalloc()
            if library is None:
                raise ValueError(f"{VARIABLE}=jemalloc, but jemalloc is not installed (Debian: libjemalloc2)")
            environ["LD_PRELOAD"] = " ".join([library, *environ.get("LD_PRELOAD", "").split()])
        environ.setdefault("MALLOC_CONF", _JEMALLOC_CONF)  # a user's own settings win
    elif allocator == "huge_pages":
        if thp_mode not in ("madvise", "always") or not _glibc():
            raise ValueError(
                f"{VARIABLE}=huge_pages needs glibc and transparent huge pages in `madvise` or `always` mode "
                f"(here: THP {thp_mode or 'unavailable'}, {'glibc' if _glibc() else 'not glibc'})"
            )
        tunables = environ.get("GLIBC_TUNABLES", "")
        if TUNABLE not in tunables:
            environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
    return environ


def restart_with_allocator() -> None:
    """Re-executes this command line with the requested allocator (`MNV2_HOST_ALLOCATOR`), unless it has it.

    Call it first thing in a command-line entry point: the process image is replaced (same PID, same arguments).
    """
    environ = environment_for(os.environ.get(VARIABLE, "auto"))
    if environ == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
