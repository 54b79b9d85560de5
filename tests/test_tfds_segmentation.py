"""Segmentation on a TFDS dataset by name: the same batches as the same photos and masks in a `voc:<root>` folder
(an `Image` or a `Tensor` mask, stored class ids shifted back by `data.mask_label_offset`), every labelled pixel
evaluated once, and one-line errors, before anything is compiled or downloaded, for what cannot be read."""

import itertools
import pathlib
import re
from typing import ClassVar

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from test_segmentation_training import labelled_pixels, write_voc_folder

from mnv2_jax.config import base_config
from mnv2_jax.data import pipeline, tfds_segmentation
from mnv2_jax.tasks.segmentation import IGNORE_LABEL
from mnv2_jax.training import train

NAME = "mnv2_test_voc_pairs"  # the builder below, registered when this module is imported
SPLITS = (("train", 6), ("val", 5))


class Mnv2TestVocPairs(tfds.core.GeneratorBasedBuilder):
    """The photos and masks of the VOC folder at `voc_root` (set before preparing): the photos' JPEG files as they
    are, each mask as a 1-channel `Image` and as an int64 `Tensor`; config `shifted` stores class ids + 1 (255
    kept), as oxford_iiit_pet stores 1..3. A 7-class `label` stands for such datasets' per-image labels."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="ids"),
        tfds.core.BuilderConfig(name="shifted"),
    ]
    pkg_dir_path = epath.Path(__file__).parent  # TFDS reads metadata files there (a test module is no package)
    voc_root: pathlib.Path | None = None

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
                "mask_tensor": tfds.features.Tensor(shape=(None, None), dtype=np.int64, encoding="zlib"),
                "label": tfds.features.ClassLabel(num_classes=7),
            }
        )
        return self.dataset_info_from_configs(features=features, disable_shuffling=True)  # the folder's order

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split, _ in SPLITS}

    def _generate_examples(self, split):
        root = self.voc_root
        shift = 1 if self.builder_config.name == "shifted" else 0
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        for i, example_id in enumerate(ids):
            mask = np.asarray(Image.open(root / "SegmentationClass" / f"{example_id}.png"))  # palette indices
            mask = np.where(mask == IGNORE_LABEL, mask, mask + shift).astype(np.uint8)
            yield (
                example_id,
                {
                    "image": str(root / "JPEGImages" / f"{example_id}.jpg"),
                    "segmentation_mask": mask[..., None],
                    "mask_tensor": mask.astype(np.int64),
                    "label": i % 7,
                },
            )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(voc root, TFDS data dir holding both configs of the builder above, prepared from that folder)."""
    root = tmp_path_factory.mktemp("voc")
    write_voc_folder(root, SPLITS)
    data_dir = tmp_path_factory.mktemp("tfds")
    Mnv2TestVocPairs.voc_root = root
    for name in ("ids", "shifted"):
        tfds.builder(f"{NAME}/{name}", data_dir=str(data_dir)).download_and_prepare()
    return root, str(data_dir)


MISMATCHED = ("train_001", "val_002")  # their masks halved: 14x18 for a 28x36 photo, 12x12 for 24x24


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """(voc root, TFDS data dir) as `data`'s, but masks `MISMATCHED` are half their photo's size (palette kept)."""
    root = tmp_path_factory.mktemp("mismatched")
    write_voc_folder(root, SPLITS)
    for example_id in MISMATCHED:
        path = root / "SegmentationClass" / f"{example_id}.png"
        mask = Image.open(path)
        mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST).save(path)
    data_dir = tmp_path_factory.mktemp("tfds_mismatched")
    Mnv2TestVocPairs.voc_root = root
    tfds.builder(f"{NAME}/ids", data_dir=str(data_dir)).download_and_prepare()
    return root, str(data_dir)


def segmentation_config(dataset, data_dir=None, **data_fields):
    config = base_config(task="segmentation")
    config.dataset, config.data_dir = dataset, data_dir
    config.train_split, config.eval_split = "train", "val"
    config.resolution, config.eval_resolution = 33, 49
    config.model.output_stride, config.model.num_classes = 16, 3
    config.data.update(data_fields)
    return config


def train_batches(config, count=4, batch_size=4):
    """The first `count` training batches (16 crops: more than two epochs of 6 images)."""
    builder = pipeline.builder_for(config)
    return list(itertools.islice(pipeline.train_iterator(builder, config, batch_size), count))


def eval_batches(config, process_index=0, process_count=1):
    batches, _ = pipeline.eval_batches(
        pipeline.builder_for(config), config, 2, process_index=process_index, process_count=process_count
    )
    return list(batches.as_numpy_iterator())


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(
    "builder_config, mask_feature, offset",
    [
        ("ids", "segmentation_mask", 0),
        ("ids", "mask_tensor", 0),
        ("shifted", "segmentation_mask", -1),
        ("shifted", "mask_tensor", -1),
    ],
)
def test_tfds_masks_give_the_batches_of_the_same_data_in_a_voc_folder(data, builder_config, mask_feature, offset):
    root, data_dir = data
    voc = segmentation_config(f"voc:{root}")
    tfds_config = segmentation_config(
        f"{NAME}/{builder_config}", data_dir, mask_feature=mask_feature, mask_label_offset=offset
    )
    expected = train_batches(voc)
    labels = np.concatenate([b["label"] for b in expected])
    assert set(np.unique(labels)) == {0, 1, 2, IGNORE_LABEL}  # every class, the ignored band and crop padding
    assert_same_batches(train_batches(tfds_config), expected)
    assert_same_batches(eval_batches(tfds_config), eval_batches(voc))
    # The number of classes is the config's, not the per-image `label`'s 7.
    info = pipeline.dataset_info(pipeline.builder_for(tfds_config))
    assert info.num_classes is None and info.split_sizes == {"train": 6, "val": 5}
    assert train.resolve_num_classes(tfds_config, info).model.num_classes == 3


def test_the_label_offset_shifts_every_stored_class_id_but_the_ignore_label(data):
    root, data_dir = data
    stored = train_batches(segmentation_config(f"{NAME}/shifted", data_dir))
    expected = train_batches(segmentation_config(f"voc:{root}"))
    for a, b in zip(stored, expected, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])  # the same crops...
        ignored = b["label"] == IGNORE_LABEL
        np.testing.assert_array_equal(a["label"] == IGNORE_LABEL, ignored)  # ...the same ignored pixels...
        np.testing.assert_array_equal(a["label"][~ignored], b["label"][~ignored] + 1)  # ...ids as stored
    shifted_up = train_batches(segmentation_config(f"voc:{root}", mask_label_offset=1))
    assert_same_batches(shifted_up, stored)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_on_a_tfds_dataset_counts_every_labelled_pixel_once(data, process_count):
    root, data_dir = data
    config = segmentation_config(f"{NAME}/shifted", data_dir, mask_label_offset=-1)
    pixels, examples = 0, 0
    for index in range(process_count):
        for batch in eval_batches(config, index, process_count):
            pixels += int(np.sum((batch["label"] != IGNORE_LABEL) & batch["mask"][:, None, None]))
            examples += int(batch["mask"].sum())
    assert examples == 5 and pixels == labelled_pixels(root, "val")


@pytest.mark.parametrize(
    "dataset, override, message",
    [
        (
            "no_such_dataset",
            None,
            "dataset 'no_such_dataset' is not a TFDS dataset; task=segmentation reads 'voc:<root>' or a name",
        ),
        ("imagefolder:{root}", None, "holds one label per image; task=segmentation reads 'voc:<root>'"),
        (
            f"{NAME}/ids",
            "--config.data.mask_feature=mask",
            f"data.mask_feature='mask' is not a feature of dataset '{NAME}/ids'; "
            "its features: image, label, mask_tensor, segmentation_mask",
        ),
        (  # TFDS's own VOC holds boxes only; its features are known without downloading anything
            "voc/2012",
            None,
            "data.mask_feature='segmentation_mask' is not a feature of dataset 'voc/2012'; "
            "its features: image, image/filename, labels, labels_no_difficult, objects",
        ),
        (
            f"{NAME}/ids",
            "--config.data.mask_feature=image",
            "data.mask_feature='image' of dataset 'mnv2_test_voc_pairs/ids' is Image(shape=(None, None, 3), "
            "dtype=uint8); a mask must be a 1-channel uint8 Image or an integer Tensor",
        ),
        (
            f"{NAME}/ids",
            "--config.data.mask_feature=label",
            "data.mask_feature='label' of dataset 'mnv2_test_voc_pairs/ids' is ClassLabel(",
        ),
        (f"{NAME}/ids", "--config.data.mask_label_offset=256", "data.mask_label_offset must be an int in [-255, 255]"),
        (f"{NAME}/ids", "--config.data.mask_feature=", "data.mask_feature must be the name of a dataset feature"),
        (
            "voc:{mismatched}",
            None,
            "masks must have their image's size: {mismatched}/SegmentationClass/train_001.png is 14x18 (its image "
            "28x36), {mismatched}/SegmentationClass/val_002.png is 12x12 (its image 24x24)",
        ),
    ],
)
def test_bad_segmentation_data_is_one_line_before_any_compile(
    mnv2, data, mismatched, tmp_path, monkeypatch, dataset, override, message
):
    def compile_nothing(*args, **kwargs):
        raise AssertionError("the trainer was built before the data was checked")

    monkeypatch.setattr(train, "build_trainer", compile_nothing)
    root, data_dir = data
    workdir = tmp_path / "run"
    dataset, message = (text.format(root=root, mismatched=mismatched[0]) for text in (dataset, message))
    args = [
        "--config",
        "configs/deeplab_voc.py:width=0.35",
        f"--config.dataset={dataset}",
        f"--config.data_dir={tmp_path / 'empty' if dataset == 'voc/2012' else data_dir}",
        "--config.train_split=train",
        "--config.eval_split=val",
        *([override] if override else []),
    ]
    status, _, err = mnv2("train", "--workdir", workdir, *args)
    assert status == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert not workdir.exists() and not (tmp_path / "empty" / "voc").exists()  # nothing written nor downloaded


@pytest.mark.parametrize("mask_feature", ["segmentation_mask", "mask_tensor"])
def test_a_tfds_mask_of_another_size_stops_the_pipeline_naming_the_feature(mismatched, mask_feature):
    """Not scaled to its photo: training and evaluation stop at the pair (a VOC folder's are refused when opened)."""
    config = segmentation_config(f"{NAME}/ids", mismatched[1], mask_feature=mask_feature)
    message = f"dataset {NAME}/ids: data.mask_feature={mask_feature} holds a mask of another size than its image"
    for batches in (train_batches, eval_batches):
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
            batches(config)


def test_a_mask_feature_must_hold_class_ids():
    is_mask, features = tfds_segmentation._is_class_id_map, tfds.features
    assert is_mask(features.Image(shape=(None, None, 1))) and is_mask(
        features.Tensor(shape=(None, None, 1), dtype=np.int32)
    )
    assert not is_mask(features.Image(shape=(None, None, 1), dtype=np.uint16))  # would not decode as VOC's 8-bit masks
    assert not is_mask(features.Tensor(shape=(None, None), dtype=np.float32))
    assert not is_mask(features.Tensor(shape=(None, None, 2), dtype=np.uint8))
