"""`voc:<root>` datasets in PASCAL VOC's layout, checked when opened: segmentation or detection.

    root/JPEGImages/<id>.jpg                     the photos
    root/SegmentationClass/<id>.png              segmentation: one class id per pixel (8-bit grey or palette PNG
                                                 of the photo's size; 255 = ignore)
    root/ImageSets/Segmentation/<split>.txt      segmentation: one id per line
    root/Annotations/<id>.xml                    detection: the image's objects (`name`, `bndbox`, `difficult`)
    root/ImageSets/Main/<split>.txt              detection: one id per line

Palette PNGs (VOC's own) hold class ids as palette indices, which TF's PNG decoder would turn into colours, so
masks are decoded with Pillow. Detection boxes follow TFDS's `voc` conversion of VOC's 1-based pixel corners:
`[ymin - 1, xmin - 1, ymax, xmax] / [height, width, height, width]`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import xml.etree.ElementTree as ET

import numpy as np
from absl import logging
from etils import epy
from PIL import Image

from mnv2_jax.data import sources
from mnv2_jax.errors import UserError

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf

PREFIX = "voc:"
# PASCAL VOC 2012's 20 classes after the background, in its label order (class id = index).
PASCAL_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def colour_map(num_classes: int) -> np.ndarray:
    """PASCAL VOC's colours for class ids (bit-interleaved), (max(num_classes, 256), 3) uint8."""
    colours = np.zeros((max(num_classes, 256), 3), np.uint8)
    for index in range(len(colours)):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


MASK_MODES = ("L", "P")  # 8-bit grey or palette: the value (index) is the class id


class VocError(UserError):
    """A VOC-layout dataset is missing files or holds masks that are not class-id maps."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int


@dataclasses.dataclass(frozen=True)
class Info:
    splits: dict[str, SplitInfo]
    class_names: tuple[str, ...] = ()  # detection: the object classes, in label order


class VocSegmentationFolder:
    """A VOC-layout segmentation dataset: splits of undecoded `{'image', 'segmentation_mask'}` examples."""

    reads_files = True

    def __init__(self, root: str):
        self.root = root
        self.name = f"{PREFIX}{root}"
        sets = os.path.join(root, "ImageSets", "Segmentation")
        if not os.path.isdir(sets):
            raise VocError(f"dataset {self.name!r}: {sets} is not a directory (expected the PASCAL VOC layout)")
        self._ids = {}
        for name in sorted(os.listdir(sets)):
            if name.endswith(".txt"):
                with open(os.path.join(sets, name)) as f:
                    self._ids[name[:-4]] = [line.split()[0] for line in f if line.strip()]
        missing = [p for ids in self._ids.values() for i in ids for p in self._paths(i) if not os.path.exists(p)]
        if missing:
            raise VocError(f"dataset {self.name!r} lists files that do not exist: {_first_few(missing)}")
        self._check_masks()
        self.info = Info({split: SplitInfo(len(ids)) for split, ids in self._ids.items()})
        self.skipped: dict[str, list[str]] = {}

    def dataset_info(self) -> sources.DatasetInfo:
        """The classes are the config's (`model.num_classes`, `data.class_names`)."""
        return sources.DatasetInfo(None, (), {split: len(ids) for split, ids in self._ids.items()})

    def _paths(self, example_id: str) -> tuple[str, str]:
        return (
            os.path.join(self.root, "JPEGImages", f"{example_id}.jpg"),
            os.path.join(self.root, "SegmentationClass", f"{example_id}.png"),
        )

    def _check_masks(self) -> None:
        """Every mask is an 8-bit class-id PNG of its photo's size (both read from the files' headers only)."""
        mismatched = []
        for example_id in dict.fromkeys(i for ids in self._ids.values() for i in ids):
            image_path, mask_path = self._paths(example_id)
            with Image.open(image_path) as image, Image.open(mask_path) as mask:
                if mask.mode not in MASK_MODES:
                    raise VocError(
                        f"dataset {self.name!r}: masks must be 8-bit class-id PNGs (mode {' or '.join(MASK_MODES)}), "
                        f"{mask_path} has mode {mask.mode}"
                    )
                if mask.size != image.size:
                    mismatched.append(f"{mask_path} is {_size(mask)} (its image {_size(image)})")
        if mismatched:
            raise VocError(f"dataset {self.name!r}: masks must have their image's size: {_first_few(mismatched)}")

    def as_dataset(self, split: str, shuffle_files: bool = False, decoders=None) -> tf.data.Dataset:
        """The split's examples in file order: `{'image': JPEG bytes, 'segmentation_mask': PNG bytes}` (undecoded,
        as TFDS gives them with `SkipDecoding`; the arguments are TFDS's, for one call site)."""
        images, masks = zip(*(self._paths(i) for i in self._ids[split]), strict=True) if self._ids[split] else ((), ())
        ds = tf.data.Dataset.from_tensor_slices({"image": list(images), "segmentation_mask": list(masks)})
        return ds.map(lambda paths: {k: tf.io.read_file(v) for k, v in paths.items()})


def _first_few(items: list[str], shown: int = 3) -> str:
    """The first `shown` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _size(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


def _mask_values(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)), np.uint8)


def decode_mask(encoded: tf.Tensor) -> tf.Tensor:
    """PNG bytes -> (height, width) uint8 class ids (palette indices for palette PNGs)."""
    mask = tf.numpy_function(_mask_values, [encoded], tf.uint8, stateful=False)
    mask.set_shape([None, None])
    return mask


@dataclasses.dataclass(frozen=True)
class Objects:
    """One image's annotated objects: boxes `[n, 4]` (normalised ymin, xmin, ymax, xmax), class ids, difficult."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def _split_ids(folder: str) -> dict[str, list[str]]:
    """Split name -> image ids, from `<split>.txt` files of one id per line (VOC's per-class `<class>_<split>.txt`
    lists, with a second column, are not splits)."""
    splits = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".txt"):
            continue
        with open(os.path.join(folder, name)) as f:
            rows = [line.split() for line in f if line.strip()]
        if rows and len(rows[0]) > 1:
            continue
        splits[name[:-4]] = [row[0] for row in rows]
    return splits


def _parse_xml(path: str) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise VocError(f"{path}: not a well-formed XML annotation ({e})") from None


def read_annotation(path: str, image_size: tuple[int, int]) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """A VOC XML's object names, normalised boxes `[n, 4]` and difficult flags, for an image of `image_size`
    (height, width) pixels, and the number of degenerate boxes (no area inside the image) left out."""
    height, width = image_size
    names, boxes, difficult, dropped = [], [], [], 0
    for obj in _parse_xml(path).iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise VocError(f"{path}: an <object> without <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise VocError(f"{path}: a <bndbox> without numeric xmin, ymin, xmax and ymax") from None
        if ymax <= ymin or xmax <= xmin:  # as annotated (a 1-pixel box would have xmax = xmin + 1)
            dropped += 1
            continue
        ymin, xmin = max(ymin - 1, 0.0), max(xmin - 1, 0.0)
        ymax, xmax = min(ymax, height), min(xmax, width)
        if ymax <= ymin or xmax <= xmin:  # outside the image
            dropped += 1
            continue
        names.append((obj.findtext("name") or "").strip())
        boxes.append([ymin / height, xmin / width, ymax / height, xmax / width])
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return names, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(difficult, bool), dropped


class VocDetectionFolder:
    """A VOC-layout detection dataset: splits of `{'image': JPEG bytes, 'objects': {'bbox', 'label',
    'is_difficult'}}` examples, the features of TFDS's `voc` (boxes normalised; labels index `class_names`).

    `class_names`: the object classes in label order; None takes the sorted names found in the annotations.
    Annotations are read once here; degenerate boxes are left out and counted (`dropped_boxes`, logged).
    """

    reads_files = True

    def __init__(self, root: str, class_names: tuple[str, ...] | None = None):
        self.root = root
        self.name = f"{PREFIX}{root}"
        sets = os.path.join(root, "ImageSets", "Main")
        if not os.path.isdir(sets) or not os.path.isdir(os.path.join(root, "Annotations")):
            raise VocError(
                f"dataset {self.name!r}: expected the PASCAL VOC detection layout (Annotations/, ImageSets/Main/, "
                "JPEGImages/)"
            )
        self._ids = _split_ids(sets)
        paths = {i: self._paths(i) for ids in self._ids.values() for i in ids}
        missing = [p for pair in paths.values() for p in pair if not os.path.exists(p)]
        if missing:
            raise VocError(f"dataset {self.name!r} lists files that do not exist: {_first_few(missing)}")
        annotations, self.dropped_boxes = {}, 0
        for example_id, (image_path, xml_path) in paths.items():
            with Image.open(image_path) as image:  # reads the header only
                width, height = image.size
            names, boxes, difficult, dropped = read_annotation(xml_path, (height, width))
            annotations[example_id] = (names, boxes, difficult)
            self.dropped_boxes += dropped
        found = sorted({name for names, _, _ in annotations.values() for name in names})
        self.class_names = tuple(class_names) if class_names else tuple(found)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise VocError(
                f"dataset {self.name!r} has objects of classes {unknown} not in data.class_names {self.class_names}"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        self._objects = {
            i: Objects(boxes, np.asarray([index[n] for n in names], np.int64), difficult)
            for i, (names, boxes, difficult) in annotations.items()
        }
        if self.dropped_boxes:
            logging.warning("dataset %s: left out %d degenerate boxes (no area)", self.name, self.dropped_boxes)
        self.info = Info({split: SplitInfo(len(ids)) for split, ids in self._ids.items()}, self.class_names)

    def _paths(self, example_id: str) -> tuple[str, str]:
        return (
            os.path.join(self.root, "JPEGImages", f"{example_id}.jpg"),
            os.path.join(self.root, "Annotations", f"{example_id}.xml"),
        )

    def dataset_info(self) -> sources.DatasetInfo:
        sizes = {split: len(ids) for split, ids in self._ids.items()}
        return sources.DatasetInfo(len(self.class_names), self.class_names, sizes)

    def objects(self, split: str) -> list[Objects]:
        """The split's annotations, in file order."""
        return [self._objects[i] for i in self._ids[split]]

    def class_counts(self, split: str) -> dict[str, int]:
        counts = collections.Counter(int(label) for obj in self.objects(split) for label in obj.labels)
        return {name: counts[i] for i, name in enumerate(self.class_names)}

    def as_dataset(self, split: str, shuffle_files: bool = False, decoders=None) -> tf.data.Dataset:
        """The split's examples in file order (the image undecoded; the arguments are TFDS's)."""
        objects = self.objects(split)
        ragged = lambda values, dtype: tf.ragged.constant(values, dtype=dtype, ragged_rank=1)
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "image": [self._paths(i)[0] for i in self._ids[split]],
                "objects": {
                    "bbox": ragged([o.boxes.tolist() for o in objects], tf.float32)
                    if objects
                    else tf.zeros((0, 0, 4), tf.float32),
                    "label": ragged([o.labels.tolist() for o in objects], tf.int64),
                    "is_difficult": ragged([o.difficult.tolist() for o in objects], tf.bool),
                },
            }
        )
        return ds.map(lambda ex: {**ex, "image": tf.io.read_file(ex["image"])})


def _root(name: str) -> str:
    return os.path.expanduser(name)


sources.register(
    sources.Reader(
        PREFIX,
        "segmentation",
        f"'{PREFIX}<root>'",
        "segmentation masks",
        lambda name, config, prepare: VocSegmentationFolder(_root(name)),
    )
)
sources.register(
    sources.Reader(
        PREFIX,
        "detection",
        f"'{PREFIX}<root>' (Annotations/)",
        "boxes",
        lambda name, config, prepare: VocDetectionFolder(_root(name), config.data.class_names),
    )
)
