"""tf.data input pipelines for image classification on any TFDS dataset or a local image folder.

Training data is a deterministic function of (seed, position): each epoch is a
seeded shuffle of this process's examples and every augmentation draws from a
stateless RNG keyed by the example's position in the stream. The position (the
examples this process has consumed) is saved with each checkpoint; resuming
skips exactly those examples (before decoding) and continues with the same
batches an uninterrupted run would have seen.

Evaluation covers every example exactly once on any number of processes: each
process reads its part of the split, pads it with masked examples, and all
processes run the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_jax.data import image_folder, local_datasets, preprocessing
from mnv2_jax.errors import UserError

IMAGEFOLDER_PREFIX = "imagefolder:"


class DatasetError(UserError):
    """The configured dataset or split does not exist or cannot be read."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]


def _hide_accelerators_from_tf() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised or no such device type
        pass


def get_builder(
    dataset: str, data_dir: str | None = None, prepare: bool = True, corrupt_images: str = "fail"
) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `dataset`: a registered TFDS name, or `imagefolder:<root>`.

    An image folder's files are all decoded once here; `corrupt_images` (`fail`
    or `skip`) says what to do with those that do not decode.

    With `prepare`, a dataset that is not prepared yet is built from local files
    when we know how (Fashion-MNIST from Debian's package), else downloaded and
    prepared by TFDS (ImageNet needs its manual dir).
    """
    _hide_accelerators_from_tf()
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        root = os.path.expanduser(dataset[len(IMAGEFOLDER_PREFIX) :])
        if not os.path.isdir(root):
            raise DatasetError(
                f"dataset {dataset!r}: {root} is not a directory (expected root/<split>/<class>/<image>)"
            )
        return image_folder.CheckedImageFolder(root, corrupt_images)
    if dataset not in tfds.list_builders():
        raise DatasetError(
            f"dataset {dataset!r} is not a TFDS dataset; use a name from tfds.list_builders() "
            f"(e.g. 'imagenet2012', 'cifar10', 'fashion_mnist') or '{IMAGEFOLDER_PREFIX}<root>'"
        )
    builder = tfds.builder(dataset, data_dir=data_dir)
    if prepare and not _is_prepared(builder):
        if local_datasets.prepare_from_local_files(dataset, data_dir):
            builder = tfds.builder(dataset, data_dir=data_dir)
        else:
            builder.download_and_prepare()
    return builder


def builder_for(config: ml_collections.ConfigDict, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """`get_builder` for a config's `dataset`, `data_dir` and `data.corrupt_images`."""
    return get_builder(config.dataset, config.data_dir, prepare, config.data.corrupt_images)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def dataset_info(builder: tfds.core.DatasetBuilder) -> DatasetInfo:
    label = builder.info.features["label"]
    return DatasetInfo(
        num_classes=label.num_classes,
        class_names=tuple(label.names),
        split_sizes={name: split.num_examples for name, split in builder.info.splits.items()},
    )


def check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> int:
    """Number of examples of `split`; raises naming the config field when it does not exist."""
    splits = builder.info.splits
    if split not in splits:
        raise DatasetError(f"{field}={split!r} is not a split of {builder.name}; available: {sorted(splits)}")
    return splits[split].num_examples


def process_examples(
    builder: tfds.core.DatasetBuilder, split: str, process_index: int, process_count: int
) -> tuple[tf.data.Dataset, int]:
    """This process's share of `split` as undecoded `{'image': bytes, 'label'}` examples, and its size.

    Shares are disjoint, cover the split, and differ in size by at most one.
    """
    total = builder.info.splits[split].num_examples
    decoders = {"image": tfds.decode.SkipDecoding()}
    if isinstance(builder, tfds.folder_dataset.ImageFolder):  # no sub-split API: take every n-th file
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        ds = ds.shard(process_count, process_index)
        count = len(range(process_index, total, process_count))
    else:
        sub_split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
        ds = builder.as_dataset(split=sub_split, shuffle_files=False, decoders=decoders)
        count = builder.info.splits[sub_split].num_examples
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]}), count


def _train_image(encoded: tf.Tensor, seed: tf.Tensor, resolution: int, data: ml_collections.ConfigDict) -> tf.Tensor:
    """Random-area crop with aspect-ratio jitter (Inception style), resize, optional flip; pixels in [0, 255]."""
    image = preprocessing.decode_image(encoded)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=data.min_object_covered,
        aspect_ratio_range=tuple(data.aspect_ratio_range),
        area_range=tuple(data.area_range),
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    image = preprocessing.resize(tf.slice(image, begin, size), resolution)
    if data.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def eval_image(encoded: tf.Tensor, resolution: int, crop_fraction: float) -> tf.Tensor:
    """Central crop of `crop_fraction` of each side, then resize; pixels in [0, 255]."""
    image = preprocessing.decode_image(encoded)
    if crop_fraction < 1.0:
        image = tf.image.central_crop(image, crop_fraction)
    return preprocessing.resize(image, resolution)


def _model_input(image: tf.Tensor, label: tf.Tensor, config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
    """Pixels in [0, 255] -> the model's input; labels as int32."""
    return {"image": preprocessing.normalize(image, config.model.preprocessing), "label": tf.cast(label, tf.int32)}


def train_iterator(
    builder: tfds.core.DatasetBuilder,
    config: ml_collections.ConfigDict,
    local_batch_size: int,
    start_example: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches `{'image': float32 NHWC (normalised), 'label': int32}`.

    The stream starts after the first `start_example` examples of this
    process's stream (its saved position).
    """
    examples, count = process_examples(builder, config.train_split, process_index, process_count)
    if count < local_batch_size:
        raise DatasetError(
            f"train_split={config.train_split!r} has {count} examples on this process, "
            f"fewer than one local batch ({local_batch_size})"
        )
    data = config.data
    if data.cache:
        examples = examples.cache()
    buffer = min(count, data.shuffle_buffer)
    seed = config.seed + 1000 * process_index

    def epoch(e):
        order = examples.enumerate().shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
        return order.map(lambda i, ex: (e * count + i, ex))

    stream = tf.data.Dataset.range(start_example // count, 2**62).flat_map(epoch).skip(start_example % count)

    def prepare(position, ex):
        image = _train_image(ex["image"], tf.stack([tf.cast(seed, tf.int64), position]), config.resolution, data)
        return _model_input(image, ex["label"], config)

    ds = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(data.prefetch or tf.data.AUTOTUNE)
    ds = ds.with_options(_options())
    return ds.as_numpy_iterator()


def eval_batches(
    builder: tfds.core.DatasetBuilder,
    config: ml_collections.ConfigDict,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[tf.data.Dataset, int]:
    """Padded eval batches `{'image', 'label', 'mask'}` and their number (equal on every process)."""
    total = builder.info.splits[config.eval_split].num_examples
    steps = math.ceil(math.ceil(total / process_count) / local_batch_size)
    examples, _ = process_examples(builder, config.eval_split, process_index, process_count)

    def prepare(ex):
        image = eval_image(ex["image"], config.resolution, config.data.eval_crop)
        return {**_model_input(image, ex["label"], config), "mask": tf.constant(True)}

    ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros((config.resolution, config.resolution, 3), tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
    ).repeat()
    ds = ds.concatenate(padding).take(steps * local_batch_size).batch(local_batch_size)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), steps


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return options
