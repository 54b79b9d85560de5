"""Shared fixtures: the repository root, `../shared/data`, and running `mnv2` in-process."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Eight CPU devices for the mesh tests (1, 3 and 8 devices); must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests that use real photos and models need it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fashion_mnist_files() -> pathlib.Path:
    from mnv2_jax.data import local_datasets

    path = pathlib.Path(local_datasets.FASHION_MNIST_DIR)
    if not (path / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {path} (apt-get install dataset-fashion-mnist)")
    return path


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
