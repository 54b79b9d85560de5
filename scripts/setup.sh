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
# --no-compile: modules are byte-compiled when first imported (a fraction of TensorFlow and torch), not all at
# install; Python caches that only where PYTHONDONTWRITEBYTECODE is unset (scripts/test.sh unsets it)
"$REPO/.venv/bin/python" -m pip install --quiet --no-compile -e "$REPO[$EXTRAS]"
if [[ ",$EXTRAS," == *",export,"* || ",$EXTRAS," == *",dev,"* ]]; then
  # ONNX export. --no-deps: jax2onnx pins orbax-checkpoint<0.11.37 but works with ours; its other
  # requirements are in the `export` extra.
  "$REPO/.venv/bin/python" -m pip install --quiet --no-compile --no-deps "jax2onnx==0.17.1"
fi
export PATH="$REPO/.venv/bin:$PATH"
cd "$REPO"

# apt_install PACKAGE...: installs Debian packages when missing (as root, or through sudo).
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  if [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
    echo "warning: cannot install ${missing[*]} (not root, no sudo)" >&2
    return 0
  fi
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# g++: builds the C++ CPU kernels on first use (mnv2_jax/kernels/cpu.py); without it the XLA forms are used.
apt_install g++ || echo "warning: g++ not installed; the CPU depthwise falls back to the shifted XLA form" >&2
# jemalloc: the host allocator `mnv2` runs XLA:CPU with (mnv2_jax/host_memory.py); without it, glibc's huge pages.
apt_install libjemalloc2 || echo "warning: libjemalloc2 not installed; mnv2 falls back to glibc's allocator" >&2
