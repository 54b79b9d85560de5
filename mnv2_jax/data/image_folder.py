"""`imagefolder:<root>` datasets (root/<split>/<class>/<image>), checked for unreadable images when opened.

Every image is decoded once when the dataset is opened (in parallel, by
tf.data), so a corrupt or truncated file is found before anything is compiled
rather than by a crash mid-run. `data.corrupt_images` chooses what happens:
`fail` names the files, `skip` leaves them out of their split and counts them.
"""

from __future__ import annotations

import os
import re

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mnv2_jax.data import preprocessing, sources
from mnv2_jax.errors import UserError

PREFIX = "imagefolder:"
_SHOWN = 3  # file names quoted in messages


class CorruptImageError(UserError):
    """An image of an image folder cannot be decoded (under `data.corrupt_images=fail`)."""


def decode_error(path: str) -> str | None:
    """Why the image file at `path` cannot be decoded as the pipeline decodes it; None if it can."""
    try:
        preprocessing.decode_image(tf.io.read_file(path))
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        message = re.sub(r"\{\{.*?\}\}\s*", "", e.message)
        return re.sub(r"\s*\[Op:.*$", "", message, flags=re.S).strip()
    return None


def unreadable_images(paths: list[str]) -> list[tuple[str, str]]:
    """`(path, reason)` of every file of `paths` that does not decode as an image."""
    if not paths:
        return []

    def decodes(index, path):
        return index, tf.shape(preprocessing.decode_image(tf.io.read_file(path)))

    checked = tf.data.Dataset.from_tensor_slices(paths).enumerate()
    checked = checked.map(decodes, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    readable = {int(index) for index, _ in checked.as_numpy_iterator()}
    return [(path, decode_error(path) or "unreadable") for i, path in enumerate(paths) if i not in readable]


def _describe(bad: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{path}: {reason}" for path, reason in bad[:_SHOWN])
    return shown + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")


class CheckedImageFolder(tfds.folder_dataset.ImageFolder):
    """TFDS's `ImageFolder` whose splits hold only images that decode.

    `skipped` maps each split to the files left out under `corrupt_images="skip"`.
    """

    reads_files = True

    def __init__(self, root_dir: str, corrupt_images: str = "fail"):
        super().__init__(root_dir)
        self.skipped: dict[str, list[str]] = {}
        for split, examples in self._split_examples.items():
            bad = unreadable_images([example.image_path for example in examples])
            if not bad:
                continue
            if corrupt_images != "skip":
                raise CorruptImageError(
                    f"{len(bad)} image(s) of split {split!r} in {root_dir} cannot be decoded: {_describe(bad)}. "
                    "Remove or replace them, or set --config.data.corrupt_images=skip to leave them out"
                )
            logging.warning("skipping %d undecodable image(s) of split %r: %s", len(bad), split, _describe(bad))
            bad_paths = {path for path, _ in bad}
            self._split_examples[split] = [e for e in examples if e.image_path not in bad_paths]
            self.skipped[split] = sorted(bad_paths)
        if self.skipped:
            self.info.set_splits(
                tfds.core.SplitDict(
                    [
                        tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0)
                        for split, examples in self._split_examples.items()
                    ]
                )
            )


def open_folder(root: str, config, prepare: bool) -> CheckedImageFolder:
    """`imagefolder:<root>`: every image decoded once here, per `data.corrupt_images`."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise sources.DatasetError(
            f"dataset {PREFIX + root!r}: {root} is not a directory (expected root/<split>/<class>/<image>)"
        )
    return CheckedImageFolder(root, config.data.corrupt_images)


sources.register(sources.Reader(PREFIX, "classification", f"'{PREFIX}<root>'", "one label per image", open_folder))
