"""Transparent huge pages for the host allocator, which XLA:CPU's step time depends on.

XLA:CPU allocates a compiled step's temporary buffer (about 1 GiB for a MobileNetV2 train step at 128 px, batch
32) from malloc at every execution. glibc maps allocations that large with a fresh `mmap` and unmaps them on
free, so the kernel faults in and zeroes every 4 KiB page of the buffer again at every step: ~275,000 faults
per step there, 40% of the process's CPU time. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc advise
transparent huge pages for its mappings (2 MiB pages: 512x fewer faults and fewer TLB misses). Tunables are
read when a process starts, so the `mnv2` command restarts itself once with the tunable set.
`MNV2_HUGE_PAGES=0` turns this off.
"""

from __future__ import annotations

import os
import sys

OPT_OUT = "MNV2_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def huge_pages_in_effect(environ: dict[str, str] | None = None) -> bool:
    """Whether large host allocations of a process with this environment get huge pages."""
    environ = os.environ if environ is None else environ
    mode = transparent_huge_pages_mode()
    return mode == "always" or (mode == "madvise" and _glibc() and f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", ""))


def environment_with_huge_pages(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) with glibc's huge-page tunable added, unless it sets one already."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT, "1") != "0" and TUNABLE not in tunables:
        environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
    return environ


def restart_with_huge_pages() -> None:
    """Re-executes this command line with the tunable set, where that gives huge pages and is not set yet.

    Call it first thing in a command-line entry point: the process image is replaced (same PID, same arguments).
    """
    if transparent_huge_pages_mode() != "madvise" or not _glibc():
        return  # `always` needs no advice; `never` (or no THP) cannot be helped
    environ = environment_with_huge_pages()
    if environ.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return  # already set (by us or the user), or turned off with MNV2_HUGE_PAGES=0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
