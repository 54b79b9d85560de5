"""The suite's own guarantees: under CI a missing input fails the run, naming it; elsewhere it skips."""

import os
import subprocess
import sys

import conftest
import pytest
from conftest import REPO

NEEDS_SHARED_DATA = """
from conftest import require


def test_needs_the_shared_data():
    require("shared_data")
"""


def pytest_in_a_new_process(tmp_path, **variables: str) -> subprocess.CompletedProcess:
    """pytest, in a new process with `variables` set and this suite's conftest as a plugin, on one test that calls
    `require("shared_data")`."""
    test = tmp_path / "test_needs_shared_data.py"
    test.write_text(NEEDS_SHARED_DATA)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), **variables}
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-p", "conftest", "-rs"]
    return subprocess.run([*command, str(test)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_under_ci_a_missing_input_stops_the_run_naming_it(tmp_path):
    missing = tmp_path / "no_shared_data"
    finished = pytest_in_a_new_process(tmp_path, CI="true", MNV2_TEST_SHARED_DATA=str(missing))
    assert finished.returncode == 4, finished.stdout[-3000:] + finished.stderr[-3000:]
    output = finished.stdout + finished.stderr
    assert "CI=true, and inputs of the test suite are missing" in output
    assert f"the shared test data at {missing}" in output and "../shared" in output
    assert "passed" not in output and "skipped" not in output  # stopped before running anything


def test_outside_ci_a_missing_input_skips_the_test_naming_it(tmp_path):
    missing = tmp_path / "no_shared_data"
    finished = pytest_in_a_new_process(tmp_path, CI="false", MNV2_TEST_SHARED_DATA=str(missing))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    reason = (
        f"the shared test data at {missing} is missing; CI copies the project's shared/ folder to ../shared beside "
        "the repository; put it there"
    )
    skipped = [line for line in finished.stdout.splitlines() if line.startswith("SKIPPED [1] ")]
    assert len(skipped) == 1 and skipped[0].endswith(f": {reason}"), finished.stdout
    assert "1 skipped in" in finished.stdout and "failed" not in finished.stdout


def outcome_of_require(name: str) -> BaseException | None:
    """What `require(name)` raised (pytest's skip and fail are BaseExceptions, caught here so neither ends this
    test), or None."""
    try:
        conftest.require(name)
    except BaseException as e:
        return e
    return None


def test_require_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """`require` itself, for an input missing at run time (under CI the session start stops first when it is
    missing at the start)."""
    absent = conftest.Requirement("an input", lambda: False, "install it")
    monkeypatch.setitem(conftest.REQUIREMENTS, "absent", absent)
    monkeypatch.setattr(conftest, "IN_CI", True)
    failed = outcome_of_require("absent")
    assert type(failed) is pytest.fail.Exception and failed.msg == "CI=true: an input is missing; install it"
    monkeypatch.setattr(conftest, "IN_CI", False)
    skipped = outcome_of_require("absent")
    assert type(skipped) is pytest.skip.Exception and skipped.msg == "an input is missing; install it"
