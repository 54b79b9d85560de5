"""tf.data input pipelines for every task, on a TFDS dataset, a local image folder or a VOC-layout folder.

Segmentation reads a VOC folder or a TFDS dataset's class-id feature (`tfds_segmentation`) as the same examples.

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

import dataclasses
import math
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mnv2_jax import tasks
from mnv2_jax.data import image_folder, local_datasets, tfds_segmentation, voc
from mnv2_jax.errors import UserError

IMAGEFOLDER_PREFIX = "imagefolder:"
FILE_DATASETS = (
    tfds.folder_dataset.ImageFolder,
    voc.VocSegmentationFolder,
    voc.VocDetectionFolder,
)  # read file by file, no sub-splits
# Per-pixel class ids: the number of classes is the config's (a TFDS dataset's `label`, if any, is another thing).
SEGMENTATION_DATASETS = (voc.VocSegmentationFolder, tfds_segmentation.TfdsSegmentation)


class DatasetError(UserError):
    """The configured dataset or split does not exist or cannot be read."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None  # None: the dataset does not say (segmentation datasets: the config does)
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]


def _hide_accelerators_from_tf() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised or no such device type
        pass


def _registered_name(dataset: str) -> str | None:
    """The builder name of `name[/config][:version]`, None when `dataset` is not such a name."""
    try:
        name, _ = tfds.core.naming.parse_builder_name_kwargs(dataset)
    except ValueError:
        return None
    return str(name)


def get_builder(
    dataset: str,
    data_dir: str | None = None,
    prepare: bool = True,
    corrupt_images: str = "fail",
    task: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `dataset`: a registered TFDS name (`name[/config][:version]`), `imagefolder:<root>` or
    `voc:<root>`.

    An image folder's files are all decoded once here; `corrupt_images` (`fail`
    or `skip`) says what to do with those that do not decode. With `task`, a
    folder that holds the other task's data is an error. A `voc:<root>` folder is read for detection
    (`Annotations/`, objects of `class_names`, None: the names found) when `task` is detection, else for segmentation.

    With `prepare`, a dataset that is not prepared yet is built from local files
    when we know how (Fashion-MNIST from Debian's package), else downloaded and
    prepared by TFDS (ImageNet needs its manual dir).
    """
    _hide_accelerators_from_tf()
    if task == "segmentation" and dataset.startswith(IMAGEFOLDER_PREFIX):
        raise DatasetError(
            f"dataset {dataset!r} holds one label per image; task=segmentation reads '{voc.PREFIX}<root>' or a TFDS "
            "dataset with a per-pixel class-id feature (data.mask_feature)"
        )
    if task == "detection" and dataset.startswith(IMAGEFOLDER_PREFIX):
        raise DatasetError(
            f"dataset {dataset!r} holds one label per image; task=detection reads '{voc.PREFIX}<root>' (Annotations/) "
            "or a TFDS detection dataset (e.g. 'coco/2017', 'voc/2007')"
        )
    if task == "classification" and dataset.startswith(voc.PREFIX):
        raise DatasetError(f"dataset {dataset!r} holds segmentation masks; set task=segmentation to train on it")
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        root = os.path.expanduser(dataset[len(IMAGEFOLDER_PREFIX) :])
        if not os.path.isdir(root):
            raise DatasetError(
                f"dataset {dataset!r}: {root} is not a directory (expected root/<split>/<class>/<image>)"
            )
        return image_folder.CheckedImageFolder(root, corrupt_images)
    if dataset.startswith(voc.PREFIX):
        root = os.path.expanduser(dataset[len(voc.PREFIX) :])
        if task == "detection":
            return voc.VocDetectionFolder(root, class_names)
        return voc.VocSegmentationFolder(root)
    if _registered_name(dataset) not in tfds.list_builders():
        if task == "segmentation":
            raise DatasetError(
                f"dataset {dataset!r} is not a TFDS dataset; task=segmentation reads '{voc.PREFIX}<root>' or a name "
                "from tfds.list_builders() with a per-pixel class-id feature (e.g. 'oxford_iiit_pet'; "
                "data.mask_feature names it)"
            )
        raise DatasetError(
            f"dataset {dataset!r} is not a TFDS dataset; use a name from tfds.list_builders() "
            f"(e.g. 'imagenet2012', 'cifar10', 'fashion_mnist'), '{IMAGEFOLDER_PREFIX}<root>' or '{voc.PREFIX}<root>'"
        )
    builder = tfds.builder(dataset, data_dir=data_dir)
    return _prepare(builder, dataset, data_dir) if prepare else builder


def _prepare(builder: tfds.core.DatasetBuilder, dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    if isinstance(builder, FILE_DATASETS) or _is_prepared(builder):
        return builder
    if local_datasets.prepare_from_local_files(dataset, data_dir):
        return tfds.builder(dataset, data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def builder_for(config: ml_collections.ConfigDict, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """`get_builder` for a config's `dataset`, `data_dir`, `data.corrupt_images` and task. Segmentation reads a
    TFDS dataset through its `data.mask_feature`, checked before anything is downloaded or prepared."""
    builder = get_builder(
        config.dataset, config.data_dir, False, config.data.corrupt_images, config.task, config.data.class_names
    )
    if config.task != "segmentation" or isinstance(builder, voc.VocSegmentationFolder):
        return _prepare(builder, config.dataset, config.data_dir) if prepare else builder
    mask_feature = config.data.mask_feature
    tfds_segmentation.TfdsSegmentation(builder, mask_feature, config.dataset)  # checks the features
    if prepare:
        builder = _prepare(builder, config.dataset, config.data_dir)
    return tfds_segmentation.TfdsSegmentation(builder, mask_feature, config.dataset)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def dataset_info(builder: tfds.core.DatasetBuilder) -> DatasetInfo:
    split_sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    if isinstance(builder, voc.VocDetectionFolder):
        names = builder.class_names
        return DatasetInfo(num_classes=len(names), class_names=names, split_sizes=split_sizes)
    features = {} if isinstance(builder, SEGMENTATION_DATASETS) else dict(builder.info.features.items())
    label = features.get("label")
    if "objects" in features and "label" in features["objects"]:  # detection (coco, voc): the objects' classes
        label = features["objects"]["label"]
    if not hasattr(label, "num_classes"):
        return DatasetInfo(num_classes=None, class_names=(), split_sizes=split_sizes)
    return DatasetInfo(num_classes=label.num_classes, class_names=tuple(label.names), split_sizes=split_sizes)


def check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> int:
    """Number of examples of `split`; raises naming the config field when it does not exist."""
    splits = builder.info.splits
    if split not in splits:
        raise DatasetError(f"{field}={split!r} is not a split of {builder.name}; available: {sorted(splits)}")
    return splits[split].num_examples


def check_box_counts(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> None:
    """Detection on a VOC folder: an eval image with more boxes than `detection.max_boxes` is an error (its extra
    ground truth would not count, inflating mAP); in the training split a warning (the extra boxes are no
    targets). TFDS datasets are not scanned."""
    if config.task != "detection" or not isinstance(builder, voc.VocDetectionFolder):
        return
    limit = config.detection.max_boxes
    most = {
        split: max((len(objects.labels) for objects in builder.objects(split)), default=0)
        for split in (config.train_split, config.eval_split)
    }
    if most[config.eval_split] > limit:
        raise DatasetError(
            f"eval_split={config.eval_split!r} has an image with {most[config.eval_split]} boxes, more than "
            f"detection.max_boxes={limit}; set --config.detection.max_boxes={most[config.eval_split]}"
        )
    if most[config.train_split] > limit:
        logging.warning(
            "train_split=%r has images with up to %d boxes; those beyond detection.max_boxes=%d are no targets",
            config.train_split,
            most[config.train_split],
            limit,
        )


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
    if isinstance(builder, FILE_DATASETS):  # no sub-split API: take every n-th file
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
