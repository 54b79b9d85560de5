#!/usr/bin/env bash
# Sets up .venv and runs the main job. Until the training engine lands, that is: the model summary, then
# the authors' released MobileNetV2 (TFLite, ../shared/data/coral) imported and run on the shared photos.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" export
WORKDIR="${WORKDIR:-workdirs/coral_mobilenet_v2_1.0_224}"
CORAL="${CORAL:-../shared/data/coral}"

mnv2 summary --config configs/imagenet.py:num_classes=1001
if [ ! -f "$CORAL/mobilenet_v2_1.0_224_quant.tflite" ]; then
  echo "no $CORAL/mobilenet_v2_1.0_224_quant.tflite: skipping import and predict (set CORAL=/path/to/coral)"
  exit 0
fi
if [ ! -d "$WORKDIR/checkpoints" ]; then
  mnv2 import --from tflite "$CORAL/mobilenet_v2_1.0_224_quant.tflite" \
    --config configs/imagenet.py:num_classes=1001 --workdir "$WORKDIR"
fi
mnv2 predict --workdir "$WORKDIR" --labels "$CORAL/imagenet_labels.txt" \
  "$CORAL"/{grace_hopper,cat,bird,dragonfly}.bmp "$CORAL"/{parrot,owl,hot_dog,pets,face}.jpg
