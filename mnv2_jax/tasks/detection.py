"""Object detection (SSDLite): SSD's matching, mined loss and post-processing inside the compiled steps, COCO mAP
(pycocotools) over the whole eval split on the host.

Ground truth enters padded to `detection.max_boxes` boxes with a mask. The eval step returns each image's
detections and ground truth (gathered from every device and host by the replicated output), and the host turns
all of them into COCO's metrics once per evaluation; the best checkpoint is picked by `eval/mAP`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from mnv2_jax.data import detection as detection_data
from mnv2_jax.data import preprocessing
from mnv2_jax.detection import anchors as anchor_lib
from mnv2_jax.detection import coco_eval, loss, matching, nms
from mnv2_jax.models import SSDLite, build_detector
from mnv2_jax.tasks.base import Task


class Detection(Task):
    """SSD(Lite): sigmoid classification and smooth-L1 localisation of matched anchors with hard negative mining,
    normalised by the matches; COCO mAP over the whole eval split."""

    name = "detection"
    features = ("image", "objects")
    best_metric = "eval/mAP"
    per_example_eval = True

    def build_model(self, **overrides: Any) -> SSDLite:
        return build_detector(self.config.model, self.config.detection, **overrides)

    @functools.cached_property
    def anchor_spec(self) -> anchor_lib.AnchorSpec:
        return anchor_lib.spec_of(self.config.detection)

    def anchors(self, resolution: int) -> np.ndarray:
        """The anchors `[M, 4]` of square inputs of `resolution` (one definition for the loss and decoding)."""
        return anchor_lib.for_resolution(resolution, self.anchor_spec)

    @property
    def nms_spec(self) -> nms.NmsSpec:
        det = self.config.detection
        return nms.NmsSpec(det.score_threshold, det.nms_iou_threshold, det.max_detections, det.max_detections)

    @property
    def crop_spec(self) -> detection_data.CropSpec:
        data = self.config.data
        return detection_data.CropSpec(
            tuple(data.crop_min_object_covered),
            tuple(data.crop_area_range),
            tuple(data.crop_aspect_ratio_range),
            data.keep_image_probability,
        )

    # Data.

    def _model_input(self, image: tf.Tensor, boxes, labels, ignored) -> dict[str, tf.Tensor]:
        size = self.config.resolution
        image = preprocessing.resize(image, size)
        image.set_shape([size, size, 3])
        return {
            "image": preprocessing.normalize(image, self.config.model.preprocessing),
            **detection_data.pad_objects(boxes, labels, ignored, self.config.detection.max_boxes),
        }

    def train_example(self, example, seed):
        crop_seed, flip_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        image = tf.cast(preprocessing.decode_image(example["image"]), tf.float32)
        boxes, labels, ignored = detection_data.objects_of(example)
        trained = ~ignored  # crowd and difficult boxes are not training targets
        boxes, labels = tf.boolean_mask(boxes, trained), tf.boolean_mask(labels, trained)
        image, boxes, (labels,) = detection_data.ssd_random_crop(image, boxes, [labels], crop_seed, self.crop_spec)
        if self.config.data.flip:
            image, boxes = detection_data.random_flip(image, boxes, flip_seed)
        if self.config.data.photometric:
            image = detection_data.photometric_distortion(image, colour_seed)
        return self._model_input(image, boxes, labels, tf.zeros_like(labels, tf.bool))

    def eval_example(self, example):
        image = preprocessing.decode_image(example["image"])
        size = tf.shape(image)[:2]
        return {**self._model_input(image, *detection_data.objects_of(example)), "size": size}

    def padding_example(self) -> dict[str, tf.Tensor]:
        size, max_boxes = self.config.resolution, self.config.detection.max_boxes
        empty = tf.zeros([0], tf.int32)
        return {
            "image": tf.zeros((size, size, 3), tf.float32),
            **detection_data.pad_objects(tf.zeros([0, 4]), empty, tf.zeros([0], tf.bool), max_boxes),
            "size": tf.ones([2], tf.int32),
        }

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        max_boxes = self.config.detection.max_boxes
        return {
            "image": np.zeros(self.input_shape(batch_size), np.float32),
            "boxes": np.zeros((batch_size, max_boxes, 4), np.float32),
            "classes": np.zeros((batch_size, max_boxes), np.int32),
            "box_mask": np.zeros((batch_size, max_boxes), bool),
            "crowd": np.zeros((batch_size, max_boxes), bool),
        }

    def synthetic_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch = self.dummy_batch(batch_size)
        count = min(8, batch["boxes"].shape[1])
        corners = np.sort(rng.uniform(0, 1, (batch_size, count, 2, 2)), axis=2)  # [y, x] low and high
        batch["boxes"][:, :count] = np.concatenate([corners[:, :, 0], corners[:, :, 1]], -1)
        batch["classes"][:, :count] = rng.integers(0, self.num_classes, (batch_size, count))
        batch["box_mask"][:, :count] = True
        return batch

    # Compiled parts.

    def targets(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        anchors = jnp.asarray(self.anchors(batch["image"].shape[1]))
        threshold = self.config.detection.matched_threshold

        def one(boxes, classes, valid):
            return matching.targets(boxes, classes, valid, anchors, self.num_classes, threshold)

        return jax.vmap(one)(batch["boxes"], batch["classes"], batch["box_mask"])

    def loss(self, logits, batch):
        det = self.config.detection
        mining = loss.MiningSpec(det.negatives_per_positive, det.min_negatives_per_image)
        total, parts = loss.ssd_loss(logits["class_logits"], logits["box_codes"], self.targets(batch), mining)
        return total, {
            "train/classification_loss": parts["classification"],
            "train/localization_loss": parts["localization"],
            "train/matches_per_image": parts["matches"] / batch["image"].shape[0],
        }

    def postprocess(self, outputs: dict[str, jax.Array], resolution: int) -> dict[str, jax.Array]:
        return self.detect(outputs, resolution)

    def detect(self, outputs: dict[str, jax.Array], resolution: int) -> dict[str, jax.Array]:
        """Post-processed detections of the model's outputs for inputs of `resolution` (normalised boxes)."""
        anchors = jnp.asarray(self.anchors(resolution))
        return nms.postprocess(outputs["box_codes"], outputs["class_logits"], anchors, self.nms_spec)

    def eval_sums(self, logits, batch):
        """Per example (not summed): the detections and the ground truth, gathered whole on the host."""
        detections = self.detect(logits, batch["image"].shape[1])
        ground_truth = {f"gt_{name}": batch[name] for name in ("boxes", "classes", "crowd")}
        return {
            **detections,
            **ground_truth,
            "gt_mask": batch["box_mask"],
            "size": batch["size"],
            "mask": batch["mask"],
        }

    def eval_results(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        real = np.asarray(totals["mask"], bool)
        arrays = {name: np.asarray(values)[real] for name, values in totals.items()}
        dataset, results = coco_eval.to_coco(arrays, self.num_classes)
        stats, precision = coco_eval.evaluate(dataset, results)
        metrics = {f"eval/{name}": value for name, value in stats.items()}
        ap, ap50 = coco_eval.per_class_ap(precision, self.num_classes)
        for name, value, value50 in zip(self.class_names(), ap, ap50, strict=True):
            if value is not None:
                metrics[f"eval/AP/{name}"] = value
                metrics[f"eval/AP50/{name}"] = value50
        metrics["eval/detections_per_image"] = float(np.mean(arrays["num_detections"])) if real.any() else 0.0
        metrics["eval/count"] = float(real.sum())
        return metrics
