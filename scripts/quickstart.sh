#!/usr/bin/env bash
# Sets up .venv and runs the main job: train MobileNetV2 on Fashion-MNIST (from Debian's dataset-fashion-mnist
# package, no download), evaluate it on the 10,000 test images and checkpoint it. Extra arguments go to
# `mnv2 train` (e.g. --config.num_epochs=1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
apt_install dataset-fashion-mnist
WORKDIR="${WORKDIR:-workdirs/quickstart}"
time mnv2 train --config configs/quickstart.py --workdir "$WORKDIR" "$@"
echo "checkpoints: $WORKDIR/checkpoints   metrics: $WORKDIR/metrics.jsonl"
echo "TensorBoard: tensorboard --logdir $WORKDIR/tensorboard"
