"""Detection data (issue 17): VOC detection folders (BCCD's counts, the box convention, degenerate boxes left out
and counted), SSD's random crop and flip moving the boxes with the image, padding, and the examples' determinism."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mnv2_jax.config import base_config
from mnv2_jax.data import detection, voc
from mnv2_jax.tasks.detection import Detection

VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"""
CLASSES = ("red", "green", "blue")
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220]])
SIZES = [(48, 64), (40, 40), (56, 44)]  # height, width


def write_voc_detection_folder(root, splits=(("train", 16), ("val", 5)), seed=0) -> str:
    """Grey noisy photos with 1-3 large filled rectangles whose colour is their class (image i's k-th object of class
    (i + k) mod 3, so an image holds each class at most once), VOC XML with 1-based corners. The first image of each
    split also holds a difficult object of the next class, the first training image a degenerate box (left out when
    read)."""
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in splits:
        ids = [f"{split}_{i:03d}" for i in range(count)]
        for i, example_id in enumerate(ids):
            height, width = SIZES[i % len(SIZES)]
            image = np.clip(128 + rng.normal(0, 15, (height, width, 3)), 0, 255)
            regular = 1 + i % 3
            objects = []
            for k in range(regular + (i == 0)):
                label = (i + k) % len(CLASSES)
                h, w = int(rng.integers(height // 2, height * 4 // 5)), int(rng.integers(width // 2, width * 4 // 5))
                y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
                image[y : y + h, x : x + w] = COLOURS[label]
                box = dict(xmin=x + 1, ymin=y + 1, xmax=x + w, ymax=y + h)  # VOC: 1-based, inclusive
                objects.append(VOC_OBJECT.format(name=CLASSES[label], difficult=int(k == regular), **box))
            if split == "train" and i == 0:
                objects.append(VOC_OBJECT.format(name="red", difficult=0, xmin=5, ymin=5, xmax=5, ymax=9))
            Image.fromarray(image.astype(np.uint8)).save(root / "JPEGImages" / f"{example_id}.jpg", quality=95)
            xml = f"<annotation><filename>{example_id}.jpg</filename>{''.join(objects)}</annotation>"
            (root / "Annotations" / f"{example_id}.xml").write_text(xml)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Main" / "red_train.txt").write_text("train_000  1\ntrain_001 -1\n")  # VOC's class lists
    return f"voc:{root}"


def test_bccd_is_read_with_its_splits_classes_and_box_convention(shared_data):
    folder = voc.VocDetectionFolder(str(shared_data / "bccd" / "BCCD"), ("RBC", "WBC", "Platelets"))
    sizes = {split: info.num_examples for split, info in folder.info.splits.items()}
    assert sizes == {"train": 205, "val": 87, "trainval": 292, "test": 72}
    assert folder.dropped_boxes == 2  # BloodImage_00338 and _00343: zero-area RBC boxes
    counts = {
        name: sum(folder.class_counts(split)[name] for split in ("trainval", "test")) for name in folder.class_names
    }
    assert counts == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}  # the dataset's README, less the two
    example = next(iter(folder.as_dataset("trainval")))  # BloodImage_00000: first object WBC at 260,177-491,376
    assert tf.io.decode_jpeg(example["image"]).shape == (480, 640, 3)
    np.testing.assert_allclose(example["objects"]["bbox"][0], [176 / 480, 259 / 640, 376 / 480, 491 / 640], rtol=1e-6)
    assert int(example["objects"]["label"][0]) == 1  # WBC


def test_a_voc_detection_folder_checks_its_files_and_classes(tmp_path):
    write_voc_detection_folder(tmp_path / "ok")
    folder = voc.VocDetectionFolder(str(tmp_path / "ok"))
    assert folder.class_names == tuple(sorted(CLASSES)) and folder.dropped_boxes == 1
    assert set(folder.info.splits) == {"train", "val"}  # `red_train.txt` (two columns) is not a split
    with pytest.raises(voc.VocError, match=r"objects of classes \['red'\] not in data.class_names \('green', 'blue'\)"):
        voc.VocDetectionFolder(str(tmp_path / "ok"), ("green", "blue"))
    (tmp_path / "ok" / "Annotations" / "val_001.xml").unlink()
    with pytest.raises(voc.VocError, match=r"lists files that do not exist: .*val_001\.xml"):
        voc.VocDetectionFolder(str(tmp_path / "ok"))
    with pytest.raises(voc.VocError, match="expected the PASCAL VOC detection layout"):
        voc.VocDetectionFolder(str(tmp_path))


def test_a_truncated_annotation_is_a_one_line_error_naming_the_file(tmp_path):
    write_voc_detection_folder(tmp_path)
    path = tmp_path / "Annotations" / "val_001.xml"
    path.write_text(path.read_text()[:-40])
    with pytest.raises(voc.VocError) as error:
        voc.VocDetectionFolder(str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{path}: not a well-formed XML annotation (") and len(message.splitlines()) == 1


def box_image(height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    """An image that is 255 inside each box (normalised) and 0 elsewhere."""
    image = np.zeros((height, width, 3), np.float32)
    for ymin, xmin, ymax, xmax in boxes:
        image[round(ymin * height) : round(ymax * height), round(xmin * width) : round(xmax * width)] = 255
    return image


def bright_extent(image: np.ndarray) -> np.ndarray:
    """The normalised extent of the bright pixels."""
    rows, cols = np.nonzero(image[..., 0] > 127)
    height, width = image.shape[:2]
    return np.array([rows.min() / height, cols.min() / width, (rows.max() + 1) / height, (cols.max() + 1) / width])


@pytest.mark.parametrize("seed", range(6))
def test_the_random_crop_and_flip_move_the_boxes_with_the_image(seed):
    boxes = np.array([[0.25, 0.3, 0.65, 0.7]], np.float32)
    image = box_image(100, 120, boxes)
    spec = detection.CropSpec(min_object_covered=(1.0,), keep_probability=0.0)  # the whole box stays inside
    seeds = tf.random.experimental.stateless_split([seed, 7], 2)
    cropped, cropped_boxes, (labels,) = detection.ssd_random_crop(image, boxes, [tf.constant([2])], seeds[0], spec)
    flipped, flipped_boxes = detection.flip_horizontally(cropped, cropped_boxes)
    for picture, box in ((cropped, cropped_boxes), (flipped, flipped_boxes)):
        picture = np.asarray(picture)
        tolerance = 1.0 / min(picture.shape[:2])  # a pixel of the crop
        np.testing.assert_allclose(box.numpy()[0], bright_extent(picture), atol=tolerance)
    assert labels.numpy().tolist() == [2]


def test_the_crop_drops_boxes_mostly_outside_it():
    """With min_object_covered 0.9, a kept box has at least 90% of its area inside the crop; the crop is drawn to
    cover 90% of one of them, so at least one survives, clipped to the crop."""
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, (12, 2, 2)), axis=1)
    boxes = np.concatenate([corners[:, 0], corners[:, 1]], -1).astype(np.float32)
    spec = detection.CropSpec(min_object_covered=(0.9,), keep_probability=0.0)
    for seed in range(5):
        image = np.zeros((200, 200, 3), np.float32)
        _, kept, (index,) = detection.ssd_random_crop(image, boxes, [tf.range(12)], tf.constant([seed, 1]), spec)
        assert 1 <= len(index) <= 12 and np.all((kept.numpy() >= 0) & (kept.numpy() <= 1))


def test_objects_are_padded_to_a_fixed_count_with_a_mask():
    boxes = tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4) / 12)
    padded = detection.pad_objects(boxes, tf.constant([4, 5, 6]), tf.constant([False, True, False]), 2)
    assert padded["boxes"].shape == (2, 4) and padded["classes"].numpy().tolist() == [4, 5]
    assert padded["crowd"].numpy().tolist() == [False, True]
    padded = detection.pad_objects(boxes, tf.constant([4, 5, 6]), tf.constant([False, True, False]), 5)
    assert padded["box_mask"].numpy().tolist() == [True, True, True, False, False]
    assert padded["classes"].numpy().tolist() == [4, 5, 6, 0, 0]


def test_training_examples_are_a_function_of_the_seed(tmp_path):
    write_voc_detection_folder(tmp_path)
    config = base_config(task="detection")
    config.resolution, config.model.num_classes = 64, 3
    config.data.photometric = True
    task = Detection(config)
    example = next(iter(voc.VocDetectionFolder(str(tmp_path)).as_dataset("train")))
    first, again, other = (task.train_example(example, tf.constant(s, tf.int64)) for s in ([1, 2], [1, 2], [1, 3]))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    assert not np.array_equal(first["image"], other["image"])
    assert first["image"].shape == (64, 64, 3) and first["boxes"].shape == (100, 4)
    evaluated = task.eval_example(example)
    assert evaluated["size"].numpy().tolist() == [48, 64]
    count = len(example["objects"]["bbox"])
    np.testing.assert_array_equal(evaluated["boxes"][:count], example["objects"]["bbox"])
    assert evaluated["box_mask"].numpy().sum() == count


# The first image of a split: one object, then the difficult one (the folder above).
FIRST_IMAGE_FLAGS = np.array([False, True])


def assert_flagged_boxes_are_crowd_regions_only(example, flags: np.ndarray) -> None:
    """`example`'s objects flagged by `flags` (difficult or crowd) are not in its training targets (the whole image
    kept, unflipped) and are the crowd regions of its eval example, the others not."""
    config = base_config(task="detection")
    config.resolution, config.model.num_classes = 64, 3
    config.data.keep_image_probability, config.data.flip = 1.0, False
    task = Detection(config)
    boxes, labels = example["objects"]["bbox"].numpy(), example["objects"]["label"].numpy()
    trained = task.train_example(example, tf.constant([1, 2], tf.int64))
    targets = trained["box_mask"].numpy()
    np.testing.assert_array_equal(trained["boxes"].numpy()[targets], boxes[~flags])
    np.testing.assert_array_equal(trained["classes"].numpy()[targets], labels[~flags])
    evaluated = task.eval_example(example)
    np.testing.assert_array_equal(evaluated["boxes"].numpy()[evaluated["box_mask"].numpy()], boxes)
    np.testing.assert_array_equal(evaluated["crowd"].numpy()[evaluated["box_mask"].numpy()], flags)


def test_difficult_boxes_are_no_training_targets_and_crowd_regions_in_evaluation(tmp_path):
    write_voc_detection_folder(tmp_path)
    example = next(iter(voc.VocDetectionFolder(str(tmp_path)).as_dataset("train")))
    np.testing.assert_array_equal(example["objects"]["is_difficult"], FIRST_IMAGE_FLAGS)
    assert_flagged_boxes_are_crowd_regions_only(example, FIRST_IMAGE_FLAGS)


def test_more_eval_boxes_than_max_boxes_is_one_line_error_before_any_compile(tmp_path, mnv2):
    """The synthetic folder's images hold up to 3 boxes (4 with the degenerate one, left out)."""
    dataset = write_voc_detection_folder(tmp_path)
    args = ["--config", "configs/ssdlite_bccd.py", f"--config.dataset={dataset}", "--config.train_split=train"]
    args += ["--config.eval_split=val", f"--config.data.class_names={CLASSES}", "--config.detection.max_boxes=2"]
    status, _, err = mnv2("train", "--workdir", str(tmp_path / "run"), *args)
    message = "eval_split='val' has an image with 3 boxes, more than detection.max_boxes=2; set"
    assert status == 2 and message in err and "Traceback" not in err, err[-2000:]
