#!/usr/bin/env bash
# Sets up .venv and runs lint plus the whole test suite: MNV2_TEST_WORKERS pytest-xdist workers (default 2, one per
# core of the CI machine; 0 runs in this process), the 30 slowest tests listed. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
apt_install dataset-fashion-mnist  # real images for the data and training tests
ruff check .
ruff format --check .
python -m pytest -n "${MNV2_TEST_WORKERS:-2}" --dist loadgroup --durations=30 "$@"
