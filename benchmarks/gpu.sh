#!/usr/bin/env bash
# One-command GPU benchmark for a machine lent through the `device` tool (its image has jax, flax, optax, torch,
# torchvision and timm, not ml_collections): `bash benchmarks/gpu.sh` from the repo root; results in $OUT.
# Before calling, put the missing pure-Python wheels in .whl/ here (git-ignored, travels with the tree):
#   python3 -m pip download --no-deps --dest .whl ml-collections
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import ml_collections" 2>/dev/null || python3 -m pip install --quiet --no-deps .whl/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "${OUT:-.}/gpu.txt"
PYTHONPATH=. python3 benchmarks/gpu.py --json "${OUT:-.}/gpu.json" 2>&1 | tee "${OUT:-.}/gpu.log"
