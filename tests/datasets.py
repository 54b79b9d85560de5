"""Small image-folder datasets written for tests."""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow as tf


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 2:
        image = image[..., None]
    tf.io.write_file(str(path), tf.io.encode_png(image))


def synthetic_imagefolder(root: pathlib.Path, sizes: dict[str, int], num_classes: int = 3, size: int = 12) -> str:
    """`root/<split>/class_<k>/<i>.png` with constant images whose grey level encodes the class."""
    rng = np.random.default_rng(0)
    for split, count in sizes.items():
        for i in range(count):
            label = i % num_classes
            level = 40 + 80 * label
            image = np.clip(level + rng.integers(-10, 10, (size, size, 3)), 0, 255).astype(np.uint8)
            write_png(root / split / f"class_{label}" / f"{i:05d}.png", image)
    return f"imagefolder:{root}"
