"""TFDS datasets prepared from files already on the machine, so they need no download.

`fashion_mnist` is built from the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist/*.gz`, IDX format) into the TFDS data dir
under TFDS's own name, version and features. Once prepared, `tfds.builder(
"fashion_mnist")` reads it exactly as if TFDS had downloaded it; without the
Debian files, TFDS's own builder downloads as usual.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

FASHION_MNIST_DIR = os.environ.get("MNV2_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: str) -> np.ndarray:
    """Reads a gzipped IDX file (images: magic 2051, labels: magic 2049)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic == 2051:
        count, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, np.uint8, offset=8)
    raise ValueError(f"{path}: not an IDX image or label file (magic {magic})")


class LocalFashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fashion-MNIST from the Debian package, written as TFDS's `fashion_mnist` 3.0.1."""

    name = "fashion_mnist"
    VERSION = tfds.core.Version("3.0.1")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Zalando, MIT), prepared from the Debian package dataset-fashion-mnist.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is on disk
        return {
            "train": self._generate_examples("train"),
            "test": self._generate_examples("t10k"),
        }

    def _generate_examples(self, prefix: str):
        images = read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": image[..., None], "label": int(label)}


LOCAL_BUILDERS = {"fashion_mnist": (LocalFashionMnist, FASHION_MNIST_DIR)}


def prepare_from_local_files(name: str, data_dir: str | None) -> bool:
    """Prepares dataset `name` into `data_dir` from local files if we know how and they exist.

    Returns True when the dataset is (now) prepared from local files, False when
    there is no local source (TFDS's own builder then downloads it).
    """
    if name not in LOCAL_BUILDERS:
        return False
    builder_cls, source_dir = LOCAL_BUILDERS[name]
    if not os.path.isdir(source_dir):
        return False
    builder = builder_cls(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    )
    return True
