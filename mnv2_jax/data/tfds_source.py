"""Datasets by TFDS name (`name[/config][:version]`): classification (a `label`) and detection (`objects`).

A dataset that is not prepared yet is built from local files when we know how (Fashion-MNIST from Debian's package,
`mnv2_jax.data.local_datasets`), else downloaded and prepared by TFDS (ImageNet needs its manual dir).
"""

from __future__ import annotations

import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_jax.data import local_datasets, sources

HOLDS = "a registered TFDS dataset"


def registered_name(dataset: str) -> str | None:
    """The builder name of `name[/config][:version]`, None when `dataset` is not such a name."""
    try:
        name, _ = tfds.core.naming.parse_builder_name_kwargs(dataset)
    except ValueError:
        return None
    return str(name)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def prepare(builder, dataset: str, data_dir: str | None):
    """`builder` ready to read: file-by-file datasets and prepared ones as they are, else prepared here."""
    if getattr(builder, "reads_files", False) or is_prepared(builder):
        return builder
    if local_datasets.prepare_from_local_files(dataset, data_dir):
        return tfds.builder(dataset, data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def builder(dataset: str, config: ml_collections.ConfigDict, task: str) -> tfds.core.DatasetBuilder:
    """The (maybe unprepared) TFDS builder of `dataset`; a one-line error naming what `task` reads if unknown."""
    if registered_name(dataset) not in tfds.list_builders():
        raise sources.DatasetError(
            f"dataset {dataset!r} is not a TFDS dataset; task={task} reads {sources.forms(task)}"
        )
    return tfds.builder(dataset, data_dir=config.data_dir)


def _opener(task: str) -> sources.Opener:
    def open_tfds(dataset: str, config: ml_collections.ConfigDict, ready: bool):
        found = builder(dataset, config, task)
        return prepare(found, dataset, config.data_dir) if ready else found

    return open_tfds


sources.register(
    sources.Reader(
        "",
        "classification",
        "a name from tfds.list_builders() (e.g. 'imagenet2012', 'cifar10', 'fashion_mnist')",
        HOLDS,
        _opener("classification"),
    )
)
sources.register(
    sources.Reader(
        "", "detection", "a TFDS detection dataset (e.g. 'coco/2017', 'voc/2007')", HOLDS, _opener("detection")
    )
)
