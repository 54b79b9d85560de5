#!/usr/bin/env bash
# Sets up .venv and runs lint plus the whole test suite: MNV2_TEST_WORKERS pytest-xdist workers (default 2, one per
# core of the CI machine; 0 runs in this process), the 30 slowest tests listed. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
# Cache the byte code of what the suite imports (in .venv and the repository): with PYTHONDONTWRITEBYTECODE set, as
# some environments do, each of its ~30 Python processes compiled TensorFlow's, JAX's and Flax's sources again,
# about 8 s a process (README "Development").
unset PYTHONDONTWRITEBYTECODE
apt_install dataset-fashion-mnist  # real images for the data and training tests
apt_install slurm-wlm munge  # the live one-node SLURM cluster of tests/test_slurm_cluster.py
ruff check .
ruff format --check .
python -m pytest -n "${MNV2_TEST_WORKERS:-2}" --dist loadgroup --durations=30 "$@"
