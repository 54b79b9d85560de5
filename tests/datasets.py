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


def fashion_mnist_imagefolder(source_dir: pathlib.Path, root: pathlib.Path, sizes: dict[str, int]) -> str:
    """`root/<split>/<label>/<i>.png` from the first real Fashion-MNIST test images (IDX files in `source_dir`),
    consecutive splits taking consecutive images."""
    from mnv2_jax.data import local_datasets

    images = local_datasets.read_idx(str(source_dir / "t10k-images-idx3-ubyte.gz"))
    labels = local_datasets.read_idx(str(source_dir / "t10k-labels-idx1-ubyte.gz"))
    start = 0
    for split, count in sizes.items():
        for i in range(start, start + count):
            write_png(root / split / str(labels[i]) / f"{i:05d}.png", images[i])
        start += count
    return f"imagefolder:{root}"
