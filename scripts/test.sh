#!/usr/bin/env bash
# Sets up .venv and runs lint plus the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
apt_install dataset-fashion-mnist  # real images for the data and training tests
ruff check .
ruff format --check .
python -m pytest "$@"
