"""Shared fixtures: the repository root, the suite's outside inputs, a compilation cache, `mnv2` in-process.

Outside inputs (`../shared/data`, the Debian Fashion-MNIST package, jemalloc, g++, the TFLite interpreter,
scikit-learn) are declared once in `REQUIREMENTS`. A test that needs one calls `require(name)`: on a developer's
machine a missing input skips the test; under CI (`CI=true`) it is a failure, and the session stops before
collecting anything, naming every missing input and how to install it, so that no claim silently loses its test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import pathlib
import shutil
import sys
from collections.abc import Callable

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(os.environ.get("MNV2_TEST_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite compiles far more than it runs (a few steps of tiny networks), so its processes compile fast: XLA's
# backend optimisation level 0 with the CPU backend's legacy (non-MLIR) fusion emitters, which together compile the
# trainer tests' train step in about 0.4x the default time (`benchmarks/test_compile.py`, docs/benchmarks.md
# §6). The tests whose claim is the users' default path, or that run hundreds of steps, get XLA's defaults through
# `xla_flags(optimized=True)` (tests/test_one_device.py, the digits recipe).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
USER_FLAGS = os.environ.get("XLA_FLAGS", "")


def xla_flags(device_count: int, optimized: bool = False) -> str:
    """XLA_FLAGS for a process of the suite with `device_count` forced CPU devices."""
    flags = [USER_FLAGS, f"--xla_force_host_platform_device_count={device_count}"]
    return " ".join(flag for flag in [*flags, "" if optimized else FAST_COMPILE] if flag)


# Eight CPU devices for the mesh tests (1, 3 and 8 devices); must be set before jax is imported.
os.environ["XLA_FLAGS"] = xla_flags(8)
# One persistent compilation cache for the session, its xdist workers and the `mnv2` subprocesses it starts: the
# crash, resume and multi-process tests compile the same programs in several processes. Under the repository
# (`.pytest_cache` is git-ignored), so a fresh clone starts cold; MNV2_TEST_COMPILATION_CACHE moves it.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get("MNV2_TEST_COMPILATION_CACHE", str(REPO / ".pytest_cache" / "jax_compilation")),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# For runs of several processes: JAX writes cache entries from process 0 only, and each process's program has its own
# devices (its own key), so process 0 would load while the others compile, and reach the first collective more than
# Gloo's 30 s before them.
WITHOUT_COMPILATION_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


@dataclasses.dataclass(frozen=True)
class Requirement:
    what: str
    present: Callable[[], bool]
    how: str


def _jemalloc_present() -> bool:
    from mnv2_jax import host_memory

    return host_memory.find_jemalloc() is not None


def fashion_mnist_dir() -> pathlib.Path:
    from mnv2_jax.data import local_datasets

    return pathlib.Path(local_datasets.FASHION_MNIST_DIR)


REQUIREMENTS = {
    "shared_data": Requirement(
        f"the shared test data at {SHARED_DATA}",
        lambda: (
            (SHARED_DATA / "coral" / "mobilenet_v2_1.0_224_quant.tflite").is_file() and (SHARED_DATA / "bccd").is_dir()
        ),
        "CI copies the project's shared/ folder to ../shared beside the repository; put it there",
    ),
    "fashion_mnist": Requirement(
        "Fashion-MNIST from the Debian package dataset-fashion-mnist",
        lambda: (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file(),
        "apt-get install dataset-fashion-mnist (scripts/test.sh does, as root or through sudo)",
    ),
    "jemalloc": Requirement(
        "jemalloc (libjemalloc.so.2 in the dynamic linker's cache)",
        _jemalloc_present,
        "apt-get install libjemalloc2 (scripts/setup.sh does, as root or through sudo)",
    ),
    "g++": Requirement(
        "g++, which builds the C++ CPU kernels",
        lambda: shutil.which("g++") is not None,
        "apt-get install g++ (scripts/setup.sh does, as root or through sudo)",
    ),
    "ai_edge_litert": Requirement(
        "the TFLite interpreter (Python package ai-edge-litert)",
        lambda: importlib.util.find_spec("ai_edge_litert") is not None,
        "pip install -e .[dev] (scripts/setup.sh does)",
    ),
    "sklearn": Requirement(
        "scikit-learn, which ships the handwritten digits dataset",
        lambda: importlib.util.find_spec("sklearn") is not None,
        "pip install -e .[dev] (scripts/setup.sh does)",
    ),
    "gcs_emulator": Requirement(
        "the Cloud Storage emulator's packages (gcp-storage-emulator, trustme, google-cloud-storage)",
        lambda: not __import__("gcs_emulator").missing_modules(),
        "pip install -e .[dev] (scripts/setup.sh does)",
    ),
    "slurm": Requirement(
        "SLURM and munge, whose daemons the live-cluster tests start (as root)",
        lambda: __import__("slurm_cluster").missing() is None,
        "apt-get install slurm-wlm munge (scripts/test.sh does, as root or through sudo)",
    ),
}


def missing_requirements() -> list[str]:
    return [name for name, requirement in REQUIREMENTS.items() if not requirement.present()]


def require(name: str) -> None:
    """Skips the calling test when input `name` is missing, or fails it under CI."""
    requirement = REQUIREMENTS[name]
    if requirement.present():
        return
    message = f"{requirement.what} is missing; {requirement.how}"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI, stops at once, naming every missing input, before anything is collected or compiled."""
    if not IN_CI or hasattr(session.config, "workerinput"):  # the xdist controller checks for its workers
        return
    missing = missing_requirements()
    if missing:
        lines = [f"  - {REQUIREMENTS[name].what}: {REQUIREMENTS[name].how}" for name in missing]
        pytest.exit("CI=true, and inputs of the test suite are missing:\n" + "\n".join(lines), returncode=4)


def one_device_environment(optimized: bool = True, **variables: str) -> dict[str, str]:
    """This process's environment for a subprocess with one CPU device, plus `variables`: with XLA's defaults (what
    `mnv2` users on a CPU get) or, unless `optimized`, the suite's fast-compile flags."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1, optimized), "JAX_PLATFORMS": "cpu", **variables}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first: the xdist workers then end together instead of one finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Tests marked `xdist_group` share a module fixture that takes minutes: they must run on one worker. xdist marks
    their ids with `@group`; where it does not (pytest-dev/pytest-xdist#1386), stop rather than run them spread."""
    if node.config.getoption("dist") == "loadgroup" and not any("@" in nodeid for nodeid in ids):
        grouped = [nodeid for nodeid in ids if nodeid.startswith("tests/test_one_device.py")]
        if grouped:
            raise pytest.UsageError(
                f"xdist's --dist loadgroup did not group {grouped[0]} (see the pytest pin in pyproject.toml)"
            )


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    require("shared_data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fashion_mnist_files() -> pathlib.Path:
    require("fashion_mnist")
    return fashion_mnist_dir()


def mnv2_command(*args: str) -> list[str]:
    """`mnv2 ARGS...` as a command line for a subprocess (run with `cwd=REPO`)."""
    return [sys.executable, "-m", "mnv2_jax.cli.main", *map(str, args)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small synthetic image folder (40 train, 13 test images, 3 classes) for the training tests."""
    from datasets import synthetic_imagefolder

    return synthetic_imagefolder(tmp_path_factory.mktemp("folder"), {"train": 40, "test": 13})


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
