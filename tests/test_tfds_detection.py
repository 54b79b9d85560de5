"""Detection on a TFDS dataset by name (`objects`: `bbox`, `label`, `is_crowd`, as `coco/2017` has them): the same
training and eval batches as the same photos and boxes in a `voc:<root>` folder, and the classes from the dataset."""

import itertools
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from test_detection_data import (
    CLASSES,
    FIRST_IMAGE_FLAGS,
    assert_flagged_boxes_are_crowd_regions_only,
    write_voc_detection_folder,
)

from mnv2_jax.config import base_config
from mnv2_jax.data import pipeline, voc
from mnv2_jax.training import train

NAME = "mnv2_test_voc_boxes"  # the builder below, registered when this module is imported
SPLITS = (("train", 6), ("val", 5))


class Mnv2TestVocBoxes(tfds.core.GeneratorBasedBuilder):
    """The photos and boxes of the VOC folder at `voc_root` (set before preparing), with COCO's object features
    (its difficult objects are `is_crowd`)."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(__file__).parent  # TFDS reads metadata files there (a test module is no package)
    voc_root: pathlib.Path | None = None

    def _info(self):
        objects = {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=CLASSES)}
        objects["is_crowd"] = np.bool_
        features = {"image": tfds.features.Image(shape=(None, None, 3)), "objects": tfds.features.Sequence(objects)}
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split, _ in SPLITS}

    def _generate_examples(self, split):
        folder = voc.VocDetectionFolder(str(self.voc_root), CLASSES)
        ids = (self.voc_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        for example_id, objects in zip(ids, folder.objects(split), strict=True):
            boxes = [tfds.features.BBox(*map(float, box)) for box in objects.boxes]
            yield (
                example_id,
                {
                    "image": str(self.voc_root / "JPEGImages" / f"{example_id}.jpg"),
                    "objects": {"bbox": boxes, "label": objects.labels, "is_crowd": objects.difficult},
                },
            )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc_detection_folder(root, SPLITS)
    data_dir = tmp_path_factory.mktemp("tfds")
    Mnv2TestVocBoxes.voc_root = root
    tfds.builder(NAME, data_dir=str(data_dir)).download_and_prepare()
    return root, str(data_dir)


def detection_config(dataset, data_dir=None):
    config = base_config(task="detection")
    config.dataset, config.data_dir = dataset, data_dir
    config.train_split, config.eval_split = "train", "val"
    config.resolution, config.model.num_classes = 64, None
    config.data.class_names = CLASSES
    config.data.photometric = True
    config.detection.max_boxes = 6
    return config


def test_a_tfds_detection_dataset_gives_the_batches_of_the_same_voc_folder(data):
    root, data_dir = data
    batches = {}
    for dataset, directory in ((f"voc:{root}", None), (NAME, data_dir)):
        config = detection_config(dataset, directory)
        builder = pipeline.builder_for(config)
        config = train.resolve_num_classes(config, pipeline.dataset_info(builder))
        assert config.model.num_classes == 3
        train_batches = list(itertools.islice(pipeline.train_iterator(builder, config, 4), 3))
        eval_batches, _ = pipeline.eval_batches(builder, config, 2)
        batches[dataset] = train_batches + list(eval_batches.as_numpy_iterator())
    voc_batches, tfds_batches = batches.values()
    assert len(voc_batches) == len(tfds_batches) == 6
    for a, b in zip(voc_batches, tfds_batches, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)  # boxes stored as float32 by both


def test_crowd_boxes_are_no_training_targets_and_crowd_regions_in_evaluation(data):
    _, data_dir = data
    builder = tfds.builder(NAME, data_dir=data_dir)
    example = next(iter(builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})))
    np.testing.assert_array_equal(example["objects"]["is_crowd"], FIRST_IMAGE_FLAGS)
    assert_flagged_boxes_are_crowd_regions_only(example, FIRST_IMAGE_FLAGS)
