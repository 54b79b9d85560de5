"""Shared fixtures: the repository root, `../shared/data`, and running `mnv2` in-process."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests that use real photos and models need it)")
    return SHARED_DATA


@pytest.fixture
def mnv2():
    """Runs `mnv2 ARGS...` in this process; returns (exit status, stdout, stderr)."""
    from mnv2_jax.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["mnv2", *map(str, args)])
        return status, out.getvalue(), err.getvalue()

    return run
