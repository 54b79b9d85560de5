#!/usr/bin/env bash
# Creates .venv (if needed) and installs mnv2_jax with the given extras; sourced by the other scripts.
# Usage: source scripts/setup.sh [EXTRAS]   (default extras: dev)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-dev}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"mnv2_jax needs Python >= 3.11, found {sys.version.split()[0]}; set PYTHON=/path/to/python3.11")
PY
if [ ! -x "$REPO/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$REPO/.venv"
fi
"$REPO/.venv/bin/python" -m pip install --quiet --upgrade pip
"$REPO/.venv/bin/python" -m pip install --quiet -e "$REPO[$EXTRAS]"
export PATH="$REPO/.venv/bin:$PATH"
cd "$REPO"
