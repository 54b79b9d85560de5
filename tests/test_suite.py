"""The suite's own guarantees: under CI a missing input fails the run, naming it; elsewhere it skips."""

import os
import subprocess
import sys

from conftest import REPO


def pytest_in_a_new_process(tmp_path, **variables: str) -> subprocess.CompletedProcess:
    """`pytest tests/test_docs.py` (fast, needs no input) in a new process with `variables` set."""
    env = {**os.environ, **variables}
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "tests/test_docs.py"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_under_ci_a_missing_input_stops_the_run_naming_it(tmp_path):
    missing = tmp_path / "no_shared_data"
    finished = pytest_in_a_new_process(tmp_path, CI="true", MNV2_TEST_SHARED_DATA=str(missing))
    assert finished.returncode == 4, finished.stdout[-3000:] + finished.stderr[-3000:]
    output = finished.stdout + finished.stderr
    assert "CI=true, and inputs of the test suite are missing" in output
    assert f"the shared test data at {missing}" in output and "../shared" in output
    assert "passed" not in output  # stopped before running anything

    finished = pytest_in_a_new_process(tmp_path, CI="false", MNV2_TEST_SHARED_DATA=str(missing))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
