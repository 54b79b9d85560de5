"""The published MobileNetV2 weights by name: where each file is, how it is checked, the config it needs.

Every entry is data: its URL, its checksum and where that checksum comes from, the importer that reads it and the
config fields its model needs (so `mnv2 import NAME` derives the config instead of asking for one). Published
accuracies are the publishers' figures (`../shared/reference/mobilenet_v2.md` §6, §11), not measured here.

Checksums: torchvision's file names carry the first 8 hex digits of the file's SHA-256 (torch.hub checks the same
prefix); the google-coral files are hashed from `../shared/data/coral` (the same commit as the URLs); the slim
release and Keras publish none, so their digest is recorded at the first download and every later use is checked
against it (`mnv2_jax.weights.download`); the Hub's safetensors are checked against the LFS SHA-256 that
huggingface_hub names their cached blob by (`mnv2_jax.weights.hf_hub`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from mnv2_jax import config as config_lib
from mnv2_jax.data.voc import PASCAL_CLASSES
from mnv2_jax.errors import UserError

HF_HUB_PREFIX = "hf-hub:"
SLIM_URL = "https://storage.googleapis.com/mobilenet_v2/checkpoints"
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2"
TORCHVISION_URL = "https://download.pytorch.org/models"
CORAL_URL = "https://github.com/google-coral/test_data/raw/104342d2d3480b3e66203073dac24f4e2dbb4c41"

PUBLISHER, HASHED_HERE, RECORDED, HUB = "publisher", "hashed here", "recorded at first download", "Hub (LFS)"
ARCHIVE_FORMAT = "tflite-in-tgz"  # a .tgz holding exactly one .tflite model, read by the TFLite importer

# slim README (mobilenet_v2.md §6): (width, resolution) -> (top-1, top-5), float checkpoints
SLIM_ACCURACY = {
    (1.4, 224): (75.0, 92.5),
    (1.3, 224): (74.4, 92.1),
    (1.0, 224): (71.8, 91.0),
    (1.0, 192): (70.7, 90.1),
    (1.0, 160): (68.8, 89.0),
    (1.0, 128): (65.3, 86.9),
    (1.0, 96): (60.3, 83.2),
    (0.75, 224): (69.8, 89.6),
    (0.75, 192): (68.7, 88.9),
    (0.75, 160): (66.4, 87.3),
    (0.75, 128): (63.2, 85.3),
    (0.75, 96): (58.8, 81.6),
    (0.5, 224): (65.4, 86.4),
    (0.5, 192): (63.9, 85.4),
    (0.5, 160): (61.0, 83.2),
    (0.5, 128): (57.7, 80.8),
    (0.5, 96): (51.2, 75.8),
    (0.35, 224): (60.3, 82.9),
    (0.35, 192): (58.2, 81.2),
    (0.35, 160): (55.7, 79.1),
    (0.35, 128): (50.8, 75.0),
    (0.35, 96): (45.5, 70.4),
}
KERAS_WIDTHS, KERAS_RESOLUTIONS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4), (96, 128, 160, 192, 224)
TIMM_ACCURACY = {
    "mobilenetv2_050.lamb_in1k": 65.928,
    "mobilenetv2_100.ra_in1k": 72.910,
    "mobilenetv2_140.ra_in1k": 76.528,
}


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weights file and what importing it needs."""

    name: str
    url: str  # or `hf-hub:<repo>` for the Hub's
    sha256: str | None  # full digest or a prefix (torchvision); None: recorded at the first download
    checksum: str  # where the checksum comes from: PUBLISHER, HASHED_HERE, RECORDED or HUB
    fmt: str  # an importer of `mnv2_jax.convert.importers.FORMATS`, ARCHIVE_FORMAT, or "hf-hub"
    task: str
    convention: str
    fields: Mapping[str, Any]  # dotted config fields on top of `base_config(convention, task)`
    metric: str = ""  # e.g. "ImageNet top-1 71.8 / top-5 91.0 (slim README)"; empty: none published

    def config(self) -> ml_collections.ConfigDict:
        """The config the weights' model needs (validated)."""
        config = config_lib.base_config(self.convention, self.task)
        for field, value in self.fields.items():
            *parents, leaf = field.split(".")
            section = config
            for parent in parents:
                section = section[parent]
            section[leaf] = value
        config_lib.validate(config)
        return config


def _classifier(width: float, resolution: int, num_classes: int) -> dict[str, Any]:
    return {"model.width": width, "resolution": resolution, "model.num_classes": num_classes}


def _slim(width: float, resolution: int) -> list[Weights]:
    top1, top5 = SLIM_ACCURACY[(width, resolution)]
    fields = _classifier(width, resolution, 1001)  # index 0 is the background class
    float_weights = Weights(
        f"mobilenet_v2_{width}_{resolution}",
        f"{SLIM_URL}/mobilenet_v2_{width}_{resolution}.tgz",
        None,
        RECORDED,
        ARCHIVE_FORMAT,
        "classification",
        "tf",
        fields,
        f"ImageNet top-1 {top1} / top-5 {top5} (slim README)",
    )
    quantized = dataclasses.replace(
        float_weights,
        name=f"mobilenet_v2_{width}_{resolution}_quant",
        url=f"{SLIM_URL}/quantized_v2_{resolution}_{round(width * 100)}.tgz",
        metric="uint8; no accuracy published",
    )
    return [float_weights, quantized]


def _keras(width: float, resolution: int) -> Weights:
    file = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{width}_{resolution}.h5"
    return Weights(
        f"keras_mobilenet_v2_{width}_{resolution}",
        f"{KERAS_URL}/{file}",
        None,
        RECORDED,
        "keras",
        "classification",
        "tf",
        _classifier(width, resolution, 1000),
        "keras.applications.MobileNetV2 ImageNet weights (1.0/224: top-1 71.3 on keras.io)"
        if (width, resolution) == (1.0, 224)
        else "keras.applications.MobileNetV2 ImageNet weights; no accuracy published per file",
    )


def _fixed_entries() -> list[Weights]:
    torchvision = [
        Weights(
            f"torchvision_mobilenet_v2.imagenet1k_{version}",
            f"{TORCHVISION_URL}/mobilenet_v2-{prefix}.pth",
            prefix,
            PUBLISHER,
            "torch",
            "classification",
            "torch",
            _classifier(1.0, 224, 1000),
            f"ImageNet top-1 {top1} / top-5 {top5} (torchvision)",
        )
        for version, prefix, top1, top5 in (("v1", "b0353104", 71.878, 90.286), ("v2", "7ebf99e0", 72.154, 90.822))
    ]
    timm = [
        Weights(
            f"timm/{variant}",
            f"{HF_HUB_PREFIX}timm/{variant}",
            None,
            HUB,
            "hf-hub",
            "classification",
            "torch",
            {},
            f"ImageNet top-1 {top1} (timm)",
        )
        for variant, top1 in TIMM_ACCURACY.items()
    ]
    coral = [
        Weights(
            "coral_mobilenet_v2_1.0_224_quant",
            f"{CORAL_URL}/mobilenet_v2_1.0_224_quant.tflite",
            "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
            HASHED_HERE,
            "tflite",
            "classification",
            "tf",
            _classifier(1.0, 224, 1001),
            "uint8 TFLite of the authors' 1.0/224 (google-coral/test_data); no accuracy published",
        ),
        _deeplab(
            "deeplabv3_mnv2_pascal_quant", 1.0, "350af47fd346ea6d74b58833a351f583ba860e9806ec5bd292ff8d8f1f249398"
        ),
        _deeplab(
            "deeplabv3_mnv2_dm05_pascal_quant", 0.5, "0470d2a782aa54eeeb99d32e7b6b3fb7722905c7c4f5d26bd957ec861366d48b"
        ),
    ]
    return torchvision + timm + coral


def _deeplab(name: str, width: float, sha256: str) -> Weights:
    fields = {
        "model.width": width,
        "resolution": 513,
        "model.num_classes": len(PASCAL_CLASSES),
        "model.output_stride": 16,
        "data.class_names": PASCAL_CLASSES,
    }
    if width != 1.0:  # DeepLab's feature_extractor.py turns channel rounding off below width 1.0
        fields.update({"model.divisible_by": 1, "model.min_depth": 1})
    return Weights(
        name,
        f"{CORAL_URL}/{name}.tflite",
        sha256,
        HASHED_HERE,
        "tflite",
        "segmentation",
        "tf",
        fields,
        "uint8 TFLite of DeepLabv3 on PASCAL VOC (google-coral/test_data); no accuracy published for it",
    )


def _all_entries() -> dict[str, Weights]:
    entries = [w for width, resolution in SLIM_ACCURACY for w in _slim(width, resolution)]
    entries += [_keras(width, resolution) for width in KERAS_WIDTHS for resolution in KERAS_RESOLUTIONS]
    entries += _fixed_entries()
    return {entry.name: entry for entry in entries}


REGISTRY: dict[str, Weights] = _all_entries()


def is_name(text: str) -> bool:
    """Whether `text` names weights: a registry name or an `hf-hub:` reference."""
    return text in REGISTRY or text.startswith(HF_HUB_PREFIX)


def get(name: str) -> Weights:
    """The registry's entry `name`; an unknown name is one line with the closest names."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown weights name {name!r}{hint} (`mnv2 import --list` prints the {len(REGISTRY)} names; "
        f"`hf-hub:<repo>` names a Hugging Face Hub repository, a path a workdir or file)"
    )
