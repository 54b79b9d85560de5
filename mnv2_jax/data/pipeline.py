"""tf.data input pipelines for every task, on any data source registered for it (`mnv2_jax.data.sources`).

What an example becomes (decoding, augmentation, targets) is the task's (`mnv2_jax.tasks`); this module reads,
orders, shards, batches and pads.

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

import math
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_jax import tasks
from mnv2_jax.data import image_folder, sources, tfds_segmentation, tfds_source, voc  # noqa: F401 (their sources)
from mnv2_jax.data.sources import DatasetError, DatasetInfo

__all__ = ["DatasetError", "DatasetInfo"]


def _hide_accelerators_from_tf() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised or no such device type
        pass


def builder_for(config: ml_collections.ConfigDict, prepare: bool = True):
    """The dataset of `config.dataset` for the config's task, from the data source registered for both
    (`mnv2_jax.data.sources`): a TFDS name (`name[/config][:version]`), `imagefolder:<root>`, `voc:<root>`, ...

    With `prepare`, a dataset that is not prepared yet is built from local files when we know how (Fashion-MNIST
    from Debian's package), else downloaded and prepared by TFDS (ImageNet needs its manual dir).
    """
    _hide_accelerators_from_tf()
    return sources.open_dataset(config, tasks.get(config).name, prepare)


def get_builder(
    dataset: str, data_dir: str | None = None, prepare: bool = True, corrupt_images: str = "fail"
) -> tfds.core.DatasetBuilder:
    """`builder_for` a classification config of `dataset`, `data_dir` and `data.corrupt_images` (an image folder's
    images that do not decode: `fail` or `skip`)."""
    from mnv2_jax.config import base_config

    config = base_config()
    config.dataset, config.data_dir, config.data.corrupt_images = dataset, data_dir, corrupt_images
    return builder_for(config, prepare)


def dataset_info(builder) -> DatasetInfo:
    """What a dataset says of its classes and splits: its own `dataset_info()`, else its TFDS features' `label`
    (detection: the objects' label)."""
    if hasattr(builder, "dataset_info"):
        return builder.dataset_info()
    split_sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    features = dict(builder.info.features.items())
    label = features.get("label")
    if "objects" in features and "label" in features["objects"]:  # detection (coco, voc): the objects' classes
        label = features["objects"]["label"]
    if not hasattr(label, "num_classes"):
        return DatasetInfo(num_classes=None, class_names=(), split_sizes=split_sizes)
    return DatasetInfo(num_classes=label.num_classes, class_names=tuple(label.names), split_sizes=split_sizes)


def check_split(builder, split: str, field: str) -> int:
    """Number of examples of `split`; raises naming the config field when it does not exist."""
    splits = builder.info.splits
    if split not in splits:
        raise DatasetError(f"{field}={split!r} is not a split of {builder.name}; available: {sorted(splits)}")
    return splits[split].num_examples


def process_examples(
    builder: tfds.core.DatasetBuilder,
    split: str,
    process_index: int,
    process_count: int,
    features: tuple[str, ...] = ("image", "label"),
) -> tuple[tf.data.Dataset, int]:
    """This process's share of `split` as undecoded examples (their `features`; images as bytes), and its size.

    Shares are disjoint, cover the split, and differ in size by at most one.
    """
    total = builder.info.splits[split].num_examples
    if getattr(builder, "reads_files", False):  # no sub-split API: take every n-th file
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.shard(process_count, process_index)
        count = len(range(process_index, total, process_count))
    else:
        sub_split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
        decoders = {name: tfds.decode.SkipDecoding() for name in features if name in ("image", "segmentation_mask")}
        ds = builder.as_dataset(split=sub_split, shuffle_files=False, decoders=decoders)
        count = builder.info.splits[sub_split].num_examples
    return ds.map(lambda ex: {name: ex[name] for name in features}), count


def train_iterator(
    builder: tfds.core.DatasetBuilder,
    config: ml_collections.ConfigDict,
    local_batch_size: int,
    start_example: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of the task's examples (`image`: float32 NHWC, normalised; the targets).

    The stream starts after the first `start_example` examples of this
    process's stream (its saved position).
    """
    task = tasks.get(config)
    examples, count = process_examples(builder, config.train_split, process_index, process_count, task.features)
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
        return task.train_example(ex, tf.stack([tf.cast(seed, tf.int64), position]))

    ds = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(data.prefetch or tf.data.AUTOTUNE)
    ds = ds.with_options(_options())
    return ds.as_numpy_iterator()


def eval_batches(
    builder: tfds.core.DatasetBuilder,
    config: ml_collections.ConfigDict,
    local_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[tf.data.Dataset, int]:
    """Padded eval batches (the task's examples plus `mask`, False for padding) and their number (equal on every
    process)."""
    task = tasks.get(config)
    total = builder.info.splits[config.eval_split].num_examples
    steps = math.ceil(math.ceil(total / process_count) / local_batch_size)
    examples, _ = process_examples(builder, config.eval_split, process_index, process_count, task.features)

    def prepare(ex):
        return {**task.eval_example(ex), "mask": tf.constant(True)}

    ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors({**task.padding_example(), "mask": tf.constant(False)}).repeat()
    ds = ds.concatenate(padding).take(steps * local_batch_size).batch(local_batch_size)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), steps


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return options
