"""Joint image/box processing for detection (the Object Detection API's SSD augmentation): the examples' objects
padded to a fixed count, `ssd_random_crop`, horizontal flip and photometric distortion.

Boxes are `[ymin, xmin, ymax, xmax]` normalised to the image; images stay in [0, 255] float32. Training randomness
is stateless in the given seed, like the other tasks'.
"""

from __future__ import annotations

import dataclasses

from etils import epy

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """`ssd_random_crop`: one of `min_object_covered` drawn per example (the box overlap a crop must reach, and the
    fraction of a box that must stay inside it for the box to be kept); the whole image with `keep_probability`."""

    min_object_covered: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    area_range: tuple[float, float] = (0.1, 1.0)
    aspect_ratio_range: tuple[float, float] = (0.5, 2.0)
    keep_probability: float = 0.15
    max_attempts: int = 100


def objects_of(example: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """An example's boxes `[n, 4]` (float32), labels `[n]` (int32) and the flag of boxes evaluation ignores
    (`is_crowd` in COCO, `is_difficult` in VOC; all False when the dataset has neither)."""
    objects = example["objects"]
    boxes = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
    labels = tf.cast(objects["label"], tf.int32)
    flag = objects.get("is_crowd", objects.get("is_difficult"))
    ignored = tf.zeros_like(labels, tf.bool) if flag is None else tf.cast(flag, tf.bool)
    return boxes, labels, ignored


def _coverage(boxes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """The fraction of each box's area inside `window` (`[4]`)."""
    ymin = tf.maximum(boxes[:, 0], window[0])
    xmin = tf.maximum(boxes[:, 1], window[1])
    ymax = tf.minimum(boxes[:, 2], window[2])
    xmax = tf.minimum(boxes[:, 3], window[3])
    inside = tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inside / tf.maximum(area, 1e-12)


def ssd_random_crop(
    image: tf.Tensor, boxes: tf.Tensor, keep: list[tf.Tensor], seed: tf.Tensor, spec: CropSpec = CropSpec()
) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
    """A random crop of `image` that covers at least a drawn `min_object_covered` of some box (TF's
    `sample_distorted_bounding_box`, stateless); boxes with less than that fraction inside it (and none inside)
    are dropped with their entries of `keep` (per-box tensors), the rest clipped to the crop and re-expressed in it."""
    option_seed, crop_seed, keep_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    option = tf.random.stateless_uniform([], option_seed, 0, len(spec.min_object_covered), dtype=tf.int32)
    covered = tf.gather(tf.constant(spec.min_object_covered, tf.float32), option)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.clip_by_value(boxes, 0.0, 1.0)[None],
        seed=crop_seed,
        min_object_covered=covered,
        aspect_ratio_range=spec.aspect_ratio_range,
        area_range=spec.area_range,
        max_attempts=spec.max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    top_left = tf.cast(begin[:2], tf.float32) / shape
    extent = tf.cast(size[:2], tf.float32) / shape
    window = tf.concat([top_left, top_left + extent], 0)
    coverage = _coverage(boxes, window)
    kept = (coverage > 0.0) & (coverage >= covered)
    cropped_boxes = (tf.boolean_mask(boxes, kept) - tf.tile(top_left, [2])) / tf.tile(extent, [2])
    cropped = (
        tf.slice(image, begin, size),
        tf.clip_by_value(cropped_boxes, 0.0, 1.0),
        [tf.boolean_mask(t, kept) for t in keep],
    )
    whole = tf.random.stateless_uniform([], keep_seed) < spec.keep_probability
    image, boxes, keep = tf.cond(whole, lambda: (image, boxes, keep), lambda: cropped)
    return image, boxes, keep


def flip_horizontally(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The mirror image and its boxes."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return image[:, ::-1], tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)


def random_flip(image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`flip_horizontally` with probability 1/2."""
    mirrored = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(mirrored, lambda: flip_horizontally(image, boxes), lambda: (image, boxes))


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """SSD's colour distortion of a [0, 255] image: brightness (+-32), contrast and saturation (x0.5-1.5), hue
    (+-0.05 of the circle), in this order."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    x = image / 255.0
    x = tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[0])
    x = tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[1])
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = tf.image.stateless_random_saturation(x, 0.5, 1.5, seeds[2])
    x = tf.image.stateless_random_hue(x, 0.05, seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def pad_objects(boxes: tf.Tensor, labels: tf.Tensor, ignored: tf.Tensor, max_boxes: int) -> dict[str, tf.Tensor]:
    """The first `max_boxes` objects padded to `max_boxes`: `boxes` `[max_boxes, 4]`, `classes` (int32),
    `box_mask` (True for real boxes) and `crowd` (boxes evaluation ignores)."""
    count = tf.minimum(tf.shape(labels)[0], max_boxes)
    pad = max_boxes - count

    def padded(t, value=0):
        t = t[:count]
        return tf.pad(t, [[0, pad]] + [[0, 0]] * (len(t.shape) - 1), constant_values=value)

    result = {
        "boxes": padded(boxes),
        "classes": padded(labels),
        "box_mask": padded(tf.ones_like(labels, tf.bool), False),
        "crowd": padded(ignored, False),
    }
    result["boxes"].set_shape([max_boxes, 4])
    for name in ("classes", "box_mask", "crowd"):
        result[name].set_shape([max_boxes])
    return result
