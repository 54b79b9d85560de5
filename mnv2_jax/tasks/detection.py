"""Object detection (SSDLite): SSD's matching, mined loss and post-processing inside the compiled steps, COCO mAP
(pycocotools) over the whole eval split on the host.

Ground truth enters padded to `detection.max_boxes` boxes with a mask. The eval step returns each image's
detections and ground truth (gathered from every device and host by the replicated output), and the host turns
all of them into COCO's metrics once per evaluation; the best checkpoint is picked by `eval/mAP`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epy
from ml_collections import config_dict
from PIL import Image, ImageDraw

from mnv2_jax import config_checks as checks
from mnv2_jax import tasks
from mnv2_jax.data import detection as detection_data
from mnv2_jax.data import preprocessing, voc
from mnv2_jax.data.sources import DatasetError
from mnv2_jax.detection import anchors as anchor_lib
from mnv2_jax.detection import coco_eval, loss, matching, nms
from mnv2_jax.evaluators import GatheredEvaluator
from mnv2_jax.models import SSDLite, build_detector
from mnv2_jax.models.ssdlite import HEADS
from mnv2_jax.tasks.base import PredictError, PredictOptions, Task

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf


class CocoMap(GatheredEvaluator):
    """COCO's metrics (pycocotools) of every image's detections against its ground truth, per class AP and AP50,
    and the detections per image."""

    def __init__(self, num_classes: int, class_names: tuple[str, ...]):
        super().__init__()
        self.num_classes, self.class_names = num_classes, class_names

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        dataset, results = coco_eval.to_coco(arrays, self.num_classes)
        stats, precision = coco_eval.evaluate(dataset, results)
        metrics = {f"eval/{name}": value for name, value in stats.items()}
        ap, ap50 = coco_eval.per_class_ap(precision, self.num_classes)
        for name, value, value50 in zip(self.class_names, ap, ap50, strict=True):
            if value is not None:
                metrics[f"eval/AP/{name}"] = value
                metrics[f"eval/AP50/{name}"] = value50
        count = len(arrays["num_detections"])
        metrics["eval/detections_per_image"] = float(np.mean(arrays["num_detections"])) if count else 0.0
        metrics["eval/count"] = float(count)
        return metrics


def write_detections(out: str, path: str, pixels: np.ndarray, detections: list[dict], num_classes: int) -> str:
    """`<stem>_detections.png` under `out`: the image with each box, its label and score, in its class's colour."""
    picture = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    colours = voc.colour_map(num_classes + 1)[1:]  # VOC's colours, without the background's black
    for found in detections:
        colour = tuple(int(c) for c in colours[found["class_id"]])
        draw.rectangle(found["box"], outline=colour, width=2)
        draw.text((found["box"][0] + 3, found["box"][1] + 2), f"{found['label']} {found['score']:.2f}", fill=colour)
    name = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + "_detections.png")
    picture.save(name)
    return name


@tasks.register
class Detection(Task):
    """SSD(Lite): sigmoid classification and smooth-L1 localisation of matched anchors with hard negative mining,
    normalised by the matches; COCO mAP over the whole eval split."""

    name = "detection"
    features = ("image", "objects")
    best_metric = "eval/mAP"
    section = "detection"
    export_meaning = (
        "per anchor: columns 0-3 the decoded box (ymin, xmin, ymax, xmax, normalised to the input), then each "
        "class's sigmoid score; per-class NMS is the caller's step: mnv2_jax.detection.nms.select(output[0])"
    )

    @classmethod
    def add_config(cls, config):
        # SSD(Lite) (mnv2_jax.models.ssdlite, mnv2_jax.detection) on the backbone of `config.model`;
        # `model.num_classes` counts the object classes (the background is added). Defaults: the
        # `ssdlite_mobilenet_v2_coco` release.
        det = config.detection = ml_collections.ConfigDict()
        det.head = "ssdlite"  # ssdlite: depthwise-separable predictors and extra layers; ssd: regular 3x3 convs
        det.max_boxes = 100  # ground-truth boxes per image after augmentation, padded (more are dropped, in order)
        det.min_scale = 0.2  # the anchors' scales, linear over the six maps
        det.max_scale = 0.95
        det.matched_threshold = 0.5  # an anchor matches a ground-truth box at this IoU (and each box its best anchor)
        det.negatives_per_positive = 3.0  # hard example mining
        det.min_negatives_per_image = 3
        det.score_threshold = 1e-8  # post-processing: per-class NMS, then the best detections of an image
        det.nms_iou_threshold = 0.6
        det.max_detections = 100
        # The initial score of every class at every anchor (the class logits' bias: RetinaNet's prior, 0.01 there);
        # None: 1/2 (bias 0), as released.
        det.class_prior = config_dict.placeholder(float)
        # Training (the release's `ssd_random_crop` and flip): a random crop that keeps at least
        # `min_object_covered` (one value drawn per example from this tuple) of some box, or the whole image with
        # probability `keep_image_probability`; then optional photometric distortion (brightness, contrast,
        # saturation, hue).
        data = config.data
        data.crop_min_object_covered = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
        data.crop_area_range = (0.1, 1.0)
        data.crop_aspect_ratio_range = (0.5, 2.0)
        data.keep_image_probability = 0.15
        data.photometric = False

    @classmethod
    def validate_config(cls, config):
        det, what = config.detection, " (object classes, without the background)"
        checks.check_class_count("model.num_classes", config.model.num_classes, "detection", what)
        checks.check_choice("model.output_stride (detection)", config.model.output_stride, (32,))
        checks.check_choice("detection.head", det.head, HEADS)
        for field in ("max_boxes", "min_negatives_per_image", "max_detections"):
            checks.check_positive(f"detection.{field}", det[field])
        high = det.max_scale if checks.is_number(det.max_scale) else 1.0
        checks.check_range("detection.min_scale", det.min_scale, 1e-3, high)
        checks.check_range("detection.max_scale", det.max_scale, det.min_scale, 1.0, closed_high=True)
        checks.check_range("detection.matched_threshold", det.matched_threshold, 0.0, 1.0, closed_high=True)
        checks.check_positive("detection.negatives_per_positive", det.negatives_per_positive, float)
        checks.check_range("detection.score_threshold", det.score_threshold, 0.0, 1.0)
        checks.check_range("detection.nms_iou_threshold", det.nms_iou_threshold, 0.0, 1.0, closed_high=True)
        if det.class_prior is not None:
            checks.check_range("detection.class_prior", det.class_prior, 1e-6, 1.0)
        if config.eval_resolution not in (None, config.resolution):
            raise checks.ConfigError(
                f"eval_resolution={config.eval_resolution}: detection evaluates at `resolution` ({config.resolution}), "
                "where its anchors are; leave eval_resolution unset"
            )

    @classmethod
    def validate_data(cls, config):
        data = config.data
        checks.check_numbers("data.crop_min_object_covered", data.crop_min_object_covered, 0, 1)
        checks.check_interval("data.crop_area_range", data.crop_area_range, 1e-3, 1.0)
        checks.check_interval("data.crop_aspect_ratio_range", data.crop_aspect_ratio_range, 1e-2, 1e2)
        checks.check_range("data.keep_image_probability", data.keep_image_probability, 0.0, 1.0, closed_high=True)
        checks.check_choice("data.photometric", data.photometric, (False, True))

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

    def eval_outputs(self, logits, batch):
        """Per example: the detections and the ground truth, gathered whole on the host."""
        detections = self.detect(logits, batch["image"].shape[1])
        ground_truth = {f"gt_{name}": batch[name] for name in ("boxes", "classes", "crowd")}
        return {
            **detections,
            **ground_truth,
            "gt_mask": batch["box_mask"],
            "size": batch["size"],
            "mask": batch["mask"],
        }

    def evaluator(self) -> CocoMap:
        return CocoMap(self.num_classes, self.class_names())

    # Data sources.

    def check_dataset(self, builder) -> None:
        """A VOC folder: an eval image with more boxes than `detection.max_boxes` is an error (its extra ground truth
        would not count, inflating mAP); in the training split a warning (the extra boxes are no targets). TFDS
        datasets are not scanned."""
        if not isinstance(builder, voc.VocDetectionFolder):
            return
        config, limit = self.config, self.config.detection.max_boxes
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

    def with_dataset(self, config, info) -> None:
        if config.data.class_names is None and len(info.class_names) == info.num_classes:
            config.data.class_names = info.class_names  # names the per-class metrics and predictions

    # Serving.

    def export_function(self, model):
        """Each anchor's decoded box (normalised ymin, xmin, ymax, xmax) and sigmoid class scores in one
        `[B, anchors, 4 + classes]` tensor; NMS is the caller's step (`mnv2_jax.detection.nms.select`)."""
        anchors = self.anchors(self.config.resolution)

        def detect(variables, images):
            outputs = model.apply(variables, images, train=False)[0]
            boxes, scores = nms.decode(outputs["box_codes"], outputs["class_logits"], anchors)
            return jnp.concatenate([boxes, scores], axis=-1)

        return detect

    def export_output_shape(self, batch):
        return [batch, len(self.anchors(self.config.resolution)), 4 + self.num_classes]

    def check_predict(self, options: PredictOptions) -> None:
        if options.out is None and not options.json:
            raise PredictError("detection checkpoints need --out DIR for the drawn PNGs, or --json")

    def predict(self, model, variables, paths, options):
        """Prints each image's boxes (labels, scores, pixels), or all of them as JSON; draws them under `out`."""
        from mnv2_jax import inference  # loads workdirs through the tasks: imported when used

        if options.labels:
            self.config.data.class_names = tuple(options.labels)
        images = [preprocessing.load_image_as_is(path) for path in paths]
        all_detections = inference.detect(self, model, variables, images, options.min_score)
        if options.out:
            os.makedirs(options.out, exist_ok=True)
        report = {}
        for path, pixels, detections in zip(paths, images, all_detections, strict=True):
            report[path] = detections
            written = write_detections(options.out, path, pixels, detections, self.num_classes) if options.out else None
            if options.json:
                continue
            print(path)
            for found in detections:
                box = ", ".join(f"{v:.1f}" for v in found["box"])
                print(f"  {found['score']:.4f}  {found['class_id']:>5}  {found['label']}  [{box}]")
            print(f"  wrote {written}")
        if options.json:
            print(json.dumps(report, indent=2))
