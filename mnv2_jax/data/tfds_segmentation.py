"""Segmentation on a TFDS dataset: a builder with a per-pixel class-id feature, read as a `voc:<root>` folder is.

`--config.dataset=<name>` (e.g. `oxford_iiit_pet`, a `name/config`, or any registered builder) with
`--config.data.mask_feature` naming the class-id map: a 1-channel uint8 `tfds.features.Image` (PNG bytes, decoded
as a VOC folder's masks are) or an integer `tfds.features.Tensor` of shape (height, width) or (height, width, 1).
The examples are the VOC folder's `{'image': encoded bytes, 'segmentation_mask': ...}`, so the segmentation task
processes both the same way. The number of classes is the config's, as for VOC folders.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_jax.data import sources, tfds_source
from mnv2_jax.errors import UserError

IMAGE_FEATURE = "image"


class MaskFeatureError(UserError):
    """The dataset has no usable photo or class-id feature for segmentation."""


@dataclasses.dataclass(frozen=True)
class Info:
    splits: Any  # the builder's `tfds.core.SplitDict` (sub-splits such as 'train[0:10]' work)


def _describe(feature: tfds.features.FeatureConnector) -> str:
    text = " ".join(repr(feature).split())  # nested features print on several lines
    return text if len(text) <= 120 else text[:117] + "..."


def _is_class_id_map(feature: tfds.features.FeatureConnector) -> bool:
    shape, dtype = tuple(feature.shape), tf.as_dtype(feature.np_dtype)
    if isinstance(feature, tfds.features.Image):
        return len(shape) == 3 and shape[-1] == 1 and dtype == tf.uint8
    if type(feature) is tfds.features.Tensor:  # not its subclasses (ClassLabel: one id per example)
        return dtype.is_integer and (len(shape) == 2 or (len(shape) == 3 and shape[-1] == 1))
    return False


class TfdsSegmentation:
    """A TFDS builder as a segmentation dataset: splits of undecoded `{'image', 'segmentation_mask'}` examples, the
    mask being `mask_feature` (PNG bytes for an `Image`, the (height, width) class ids for a `Tensor`)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, mask_feature: str, dataset: str):
        self.builder = builder
        self.name = dataset
        self.mask_feature = mask_feature
        features = dict(builder.info.features.items())
        available = ", ".join(sorted(features))
        if mask_feature not in features:
            raise MaskFeatureError(
                f"data.mask_feature={mask_feature!r} is not a feature of dataset {dataset!r}; its features: {available}"
            )
        mask = features[mask_feature]
        if not _is_class_id_map(mask):
            raise MaskFeatureError(
                f"data.mask_feature={mask_feature!r} of dataset {dataset!r} is {_describe(mask)}; a mask must be a "
                "1-channel uint8 Image or an integer Tensor of shape (height, width[, 1]) holding class ids"
            )
        image = features.get(IMAGE_FEATURE)
        if not isinstance(image, tfds.features.Image):
            what = _describe(image) if image is not None else "missing"
            raise MaskFeatureError(
                f"dataset {dataset!r}: segmentation reads the photo from an Image feature {IMAGE_FEATURE!r} "
                f"({what}); its features: {available}"
            )
        self._mask_is_image = isinstance(mask, tfds.features.Image)
        self.info = Info(builder.info.splits)

    def dataset_info(self) -> sources.DatasetInfo:
        """The classes are the config's (a TFDS dataset's `label`, if any, is another thing)."""
        sizes = {name: split.num_examples for name, split in self.info.splits.items()}
        return sources.DatasetInfo(None, (), sizes)

    def as_dataset(self, split, shuffle_files: bool = False, decoders=None) -> tf.data.Dataset:
        """The split's examples, undecoded as a VOC folder's (`decoders` is ignored: the photo, and a mask `Image`,
        always stay encoded)."""
        skip = {IMAGE_FEATURE: tfds.decode.SkipDecoding()}
        if self._mask_is_image:
            skip[self.mask_feature] = tfds.decode.SkipDecoding()
        ds = self.builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=skip)
        mask_feature, mask_is_image = self.mask_feature, self._mask_is_image

        def example(ex):
            mask = ex[mask_feature]
            if not mask_is_image and mask.shape.rank == 3:
                mask = mask[..., 0]
            return {"image": ex[IMAGE_FEATURE], "segmentation_mask": mask}

        return ds.map(example)


def open_tfds_segmentation(dataset: str, config: ml_collections.ConfigDict, prepare: bool) -> TfdsSegmentation:
    """A TFDS dataset read through `data.mask_feature`, checked before anything is downloaded or prepared."""
    builder = tfds_source.builder(dataset, config, "segmentation")
    TfdsSegmentation(builder, config.data.mask_feature, dataset)  # checks the features
    if prepare:
        builder = tfds_source.prepare(builder, dataset, config.data_dir)
    return TfdsSegmentation(builder, config.data.mask_feature, dataset)


sources.register(
    sources.Reader(
        "",
        "segmentation",
        "a name from tfds.list_builders() with a per-pixel class-id feature (e.g. 'oxford_iiit_pet'; "
        "data.mask_feature names it)",
        tfds_source.HOLDS,
        open_tfds_segmentation,
    )
)
