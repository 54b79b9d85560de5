"""Input pipelines: dataset selection, deterministic resumable training stream, exact padded evaluation."""

import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
from datasets import synthetic_imagefolder

from mnv2_jax.config import base_config
from mnv2_jax.data import image_folder, local_datasets, pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synthetic_imagefolder(tmp_path_factory.mktemp("folder"), {"train": 20, "test": 23})


def folder_config(dataset):
    config = base_config()
    config.dataset = dataset
    config.train_split, config.eval_split = "train", "test"
    config.resolution = 8
    config.data.area_range = (0.3, 1.0)
    return config


def test_imagefolder_info_and_errors(folder, tmp_path):
    builder = pipeline.get_builder(folder)
    info = pipeline.dataset_info(builder)
    assert info.num_classes == 3 and info.split_sizes == {"train": 20, "test": 23}
    with pytest.raises(pipeline.DatasetError, match=r"eval_split='validation' is not a split of .*\['test', 'train'\]"):
        pipeline.check_split(builder, "validation", "eval_split")
    with pytest.raises(pipeline.DatasetError, match="is not a TFDS dataset"):
        pipeline.get_builder("imagenet2013")
    with pytest.raises(pipeline.DatasetError, match="is not a directory"):
        pipeline.get_builder(f"imagefolder:{tmp_path}/missing")


def batches(builder, config, start_batch, count, process_index=0, process_count=1, batch_size=4):
    it = pipeline.train_iterator(
        builder, config, batch_size, start_batch * batch_size, process_index=process_index, process_count=process_count
    )
    return list(itertools.islice(it, count))


def folder_with_corrupt_images(root):
    """A synthetic image folder plus a truncated JPEG and a text file named .png in its train split."""
    dataset = synthetic_imagefolder(root, {"train": 12, "test": 4})
    jpeg = tf.io.encode_jpeg(np.full((12, 12, 3), 90, np.uint8)).numpy()
    (root / "train" / "class_0" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "train" / "class_1" / "notes.png").write_bytes(b"not an image")
    return dataset


def test_corrupt_images_fail_naming_the_files_or_are_skipped_and_counted(tmp_path):
    dataset = folder_with_corrupt_images(tmp_path)
    with pytest.raises(image_folder.CorruptImageError) as error:
        pipeline.get_builder(dataset)
    message = str(error.value)
    assert "2 image(s) of split 'train'" in message and "corrupt_images=skip" in message and "\n" not in message
    assert "truncated.jpg: jpeg::Uncompress failed" in message and "notes.png: Unknown image file format" in message

    builder = pipeline.get_builder(dataset, corrupt_images="skip")
    assert pipeline.dataset_info(builder).split_sizes == {"train": 12, "test": 4}
    assert sorted(os.path.basename(p) for p in builder.skipped["train"]) == ["notes.png", "truncated.jpg"]
    batch = next(pipeline.train_iterator(builder, folder_config(dataset), 12))  # one whole epoch decodes
    assert batch["image"].shape == (12, 8, 8, 3)


def test_training_stream_is_deterministic_and_resumable(folder):
    builder = pipeline.get_builder(folder)
    config = folder_config(folder)
    full = batches(builder, config, 0, 12)  # 48 examples: more than two epochs of 20
    assert full[0]["image"].shape == (4, 8, 8, 3) and full[0]["image"].dtype == np.float32
    assert full[0]["image"].min() >= -1.0 and full[0]["image"].max() <= 1.0
    again = batches(builder, config, 0, 12)
    resumed = batches(builder, config, 7, 5)  # resume mid-way through the second epoch
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # The position is in examples: resuming with another batch size continues the same stream.
    halves = batches(builder, config, 14, 10, batch_size=2)
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in halves]), np.concatenate([b["image"] for b in full[7:]])
    )
    # Each epoch is a permutation of the 20 examples, and epochs are shuffled differently.
    labels = np.concatenate([b["label"] for b in full])
    assert sorted(np.bincount(labels[:20])) == [6, 7, 7]
    assert not np.array_equal(labels[:20], labels[20:40])
    config.seed = 1
    reseeded = batches(builder, config, 0, 12)
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(full, reseeded, strict=True))


def test_training_streams_of_processes_are_disjoint(folder):
    builder = pipeline.get_builder(folder)
    config = folder_config(folder)
    config.data.area_range = (1.0, 1.0)
    config.data.flip = False
    first = [batches(builder, config, 0, 2, p, 2) for p in range(2)]  # 2 x 8 = 16 of each process's 10 examples
    seen = [{tuple(np.round(img.ravel()[:6], 4)) for b in per for img in b["image"]} for per in first]
    assert seen[0].isdisjoint(seen[1])


@pytest.mark.parametrize("process_count", [1, 2, 3, 8])
def test_eval_covers_every_example_once(folder, process_count):
    builder = pipeline.get_builder(folder)
    config = folder_config(folder)
    steps_seen, labels, masks = set(), [], []
    for index in range(process_count):
        batches_, steps = pipeline.eval_batches(builder, config, 2, process_index=index, process_count=process_count)
        got = list(batches_.as_numpy_iterator())
        assert len(got) == steps  # every process runs the same number of batches
        steps_seen.add(steps)
        for b in got:
            labels.append(b["label"])
            masks.append(b["mask"])
    assert len(steps_seen) == 1
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    assert masks.sum() == 23
    assert np.bincount(labels[masks]).tolist() == [8, 8, 7]


def test_local_fashion_mnist_prepares_as_tfds_dataset(fashion_mnist_files, tmp_path):
    builder = pipeline.get_builder("fashion_mnist", data_dir=str(tmp_path))
    info = pipeline.dataset_info(builder)
    assert info.split_sizes == {"train": 60_000, "test": 10_000}
    assert info.class_names[0] == "T-shirt/top" and info.num_classes == 10
    labels = local_datasets.read_idx(str(fashion_mnist_files / "t10k-labels-idx1-ubyte.gz"))
    assert np.bincount(labels).tolist() == [1000] * 10
    config = folder_config("fashion_mnist")
    config.resolution = 28
    config.data.eval_crop = 1.0
    config.model.preprocessing = "inception"
    got, steps = pipeline.eval_batches(builder, config, 5000, process_index=0, process_count=1)
    assert steps == 2
    counted = np.concatenate([b["label"] for b in got.as_numpy_iterator()])
    assert np.bincount(counted).tolist() == [1000] * 10  # same labels as the IDX file
