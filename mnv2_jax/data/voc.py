"""`voc:<root>` segmentation datasets in PASCAL VOC's layout, checked when opened.

    root/JPEGImages/<id>.jpg                     the photos
    root/SegmentationClass/<id>.png              one class id per pixel (8-bit grey or palette PNG; 255 = ignore)
    root/ImageSets/Segmentation/<split>.txt      one id per line

Palette PNGs (VOC's own) hold class ids as palette indices, which TF's PNG decoder would turn into colours, so
masks are decoded with Pillow.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from mnv2_jax.errors import UserError

PREFIX = "voc:"
MASK_MODES = ("L", "P")  # 8-bit grey or palette: the value (index) is the class id


class VocError(UserError):
    """A VOC-layout dataset is missing files or holds masks that are not class-id maps."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int


@dataclasses.dataclass(frozen=True)
class Info:
    splits: dict[str, SplitInfo]


class VocSegmentationFolder:
    """A VOC-layout segmentation dataset: splits of undecoded `{'image', 'segmentation_mask'}` examples."""

    def __init__(self, root: str):
        self.root = root
        self.name = f"{PREFIX}{root}"
        sets = os.path.join(root, "ImageSets", "Segmentation")
        if not os.path.isdir(sets):
            raise VocError(f"dataset {self.name!r}: {sets} is not a directory (expected the PASCAL VOC layout)")
        self._ids = {}
        for name in sorted(os.listdir(sets)):
            if name.endswith(".txt"):
                with open(os.path.join(sets, name)) as f:
                    self._ids[name[:-4]] = [line.split()[0] for line in f if line.strip()]
        missing = [p for ids in self._ids.values() for i in ids for p in self._paths(i) if not os.path.exists(p)]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise VocError(f"dataset {self.name!r} lists files that do not exist: {', '.join(missing[:3])}{more}")
        first = next((ids[0] for ids in self._ids.values() if ids), None)
        if first is not None:
            mode = Image.open(self._paths(first)[1]).mode
            if mode not in MASK_MODES:
                raise VocError(
                    f"dataset {self.name!r}: masks must be 8-bit class-id PNGs (mode {' or '.join(MASK_MODES)}), "
                    f"{self._paths(first)[1]} has mode {mode}"
                )
        self.info = Info({split: SplitInfo(len(ids)) for split, ids in self._ids.items()})
        self.skipped: dict[str, list[str]] = {}

    def _paths(self, example_id: str) -> tuple[str, str]:
        return (
            os.path.join(self.root, "JPEGImages", f"{example_id}.jpg"),
            os.path.join(self.root, "SegmentationClass", f"{example_id}.png"),
        )

    def as_dataset(self, split: str, shuffle_files: bool = False, decoders=None) -> tf.data.Dataset:
        """The split's examples in file order: `{'image': JPEG bytes, 'segmentation_mask': PNG bytes}` (undecoded,
        as TFDS gives them with `SkipDecoding`; the arguments are TFDS's, for one call site)."""
        images, masks = zip(*(self._paths(i) for i in self._ids[split]), strict=True) if self._ids[split] else ((), ())
        ds = tf.data.Dataset.from_tensor_slices({"image": list(images), "segmentation_mask": list(masks)})
        return ds.map(lambda paths: {k: tf.io.read_file(v) for k, v in paths.items()})


def _mask_values(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)), np.uint8)


def decode_mask(encoded: tf.Tensor) -> tf.Tensor:
    """PNG bytes -> (height, width) uint8 class ids (palette indices for palette PNGs)."""
    mask = tf.numpy_function(_mask_values, [encoded], tf.uint8, stateful=False)
    mask.set_shape([None, None])
    return mask
