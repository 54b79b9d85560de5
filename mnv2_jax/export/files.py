"""Crash-safe output: write under a temporary name beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from mnv2_jax.errors import UserError


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary path (not yet existing) to write `path`, a file or a directory, into.

    On success the temporary output replaces `path`; on any error it is removed
    and an existing `path` is left untouched.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror}") from None
    tmp = os.path.join(staging, os.path.basename(path))
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):  # os.replace cannot replace a directory
            old = os.path.join(staging, "previous")
            os.rename(path, old)
        os.replace(tmp, path)
    finally:
        _remove(staging)


def write_json(path: str, data: Any, overwrite: bool = True) -> None:
    """Writes `data` as indented JSON through `atomic_output`."""
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
