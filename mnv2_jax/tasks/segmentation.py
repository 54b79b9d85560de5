"""Semantic segmentation (Mobile DeepLabv3): the task, the confusion matrix an evaluation accumulates, its scores.

The matrix is summed inside the compiled eval step over the whole (sharded) batch, so every device's and every
host's pixels count; the host adds the batches' matrices in int64. Pixels whose label is `ignore_label` and
padded examples (`mask` 0) never count.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epy
from ml_collections import config_dict
from PIL import Image

from mnv2_jax import config_checks as checks
from mnv2_jax import tasks
from mnv2_jax.data import preprocessing, voc
from mnv2_jax.data import segmentation as segmentation_data
from mnv2_jax.evaluators import SummedEvaluator
from mnv2_jax.models import MobileDeepLabV3, build_segmenter
from mnv2_jax.models.deeplab import SEGMENTATION_OUTPUT_STRIDES
from mnv2_jax.models.mobilenet_v2 import stage_repeats
from mnv2_jax.tasks.base import PredictError, PredictOptions, Task

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf

IGNORE_LABEL = 255  # PASCAL VOC's "void": object borders and unlabelled pixels
MAX_LABEL_OFFSET = 255  # data.mask_label_offset: class ids are 8-bit in PNG masks


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, mask: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """(num_classes, num_classes) int32 counts, rows the true class and columns the predicted one.

    `labels` and `predictions` are (batch, height, width) class ids; `mask` (batch,) is 0 for padded examples.
    Labels outside [0, num_classes) other than `ignore_label` are an error of the data, and are not counted.
    """
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    valid &= mask.astype(bool).reshape(-1, *([1] * (labels.ndim - 1)))
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = (
        jnp.zeros(num_classes * num_classes, jnp.int32).at[index.reshape(-1)].add(valid.reshape(-1).astype(jnp.int32))
    )
    return counts.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict[str, float | list[float | None]]:
    """Mean IoU, pixel accuracy and per-class IoU of a confusion matrix.

    A class with no pixel in the labels nor in the predictions has no IoU (None) and is left out of the mean, as
    DeepLab's `tf.metrics.mean_iou` does.
    """
    confusion = np.asarray(confusion, np.int64)
    true_positives = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positives
    iou = [float(tp / u) if u else None for tp, u in zip(true_positives, union, strict=True)]
    present = [value for value in iou if value is not None]
    total = confusion.sum()
    return {
        "mIoU": float(np.mean(present)) if present else 0.0,
        "pixel_accuracy": float(true_positives.sum() / total) if total else 0.0,
        "per_class_iou": iou,
    }


def pixel_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
    """Per-pixel softmax cross-entropy (0 where the label is `ignore_label` or outside the classes), and where the
    label counts."""
    valid = (labels != ignore_label) & (labels >= 0) & (labels < logits.shape[-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.where(valid, loss, 0.0), valid


class MeanIoU(SummedEvaluator):
    """Mean IoU, pixel accuracy and per-class IoU of the confusion matrix summed over the split, and the mean loss
    per labelled pixel."""

    def __init__(self, class_names: tuple[str, ...]):
        super().__init__()
        self.class_names = class_names

    def metrics(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        result = scores(totals["confusion"])
        metrics = {
            "eval/mIoU": result["mIoU"],
            "eval/pixel_accuracy": result["pixel_accuracy"],
            "eval/loss": float(totals["loss"]) / max(int(totals["pixels"]), 1),
            "eval/pixels": float(totals["pixels"]),  # the labelled pixels counted (each once)
            "eval/count": float(totals["count"]),
        }
        for name, iou in zip(self.class_names, result["per_class_iou"], strict=True):
            if iou is not None:
                metrics[f"eval/iou/{name}"] = iou
        return metrics


def write_segmentation(out: str, path: str, pixels: np.ndarray, classes: np.ndarray) -> list[str]:
    """`<stem>_classes.png` (class ids), `<stem>_mask.png` (colours) and `<stem>_overlay.png` under `out`."""
    stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])
    colours = voc.colour_map(int(classes.max()) + 1)[classes]
    overlay = (0.5 * pixels + 0.5 * colours).round().astype(np.uint8)
    files = {f"{stem}_classes.png": classes, f"{stem}_mask.png": colours, f"{stem}_overlay.png": overlay}
    for name, array in files.items():
        Image.fromarray(array).save(name)
    return list(files)


@tasks.register
class Segmentation(Task):
    """Mobile DeepLabv3: per-pixel softmax cross-entropy over labelled pixels (DeepLab's loss, on logits upsampled to
    the input), mean IoU over the whole eval split; the best checkpoint by `eval/mIoU`."""

    name = "segmentation"
    features = ("image", "segmentation_mask")
    best_metric = "eval/mIoU"
    padding_label = IGNORE_LABEL
    section = "segmentation"
    export_meaning = "per-pixel class logits (NHWC) at the input's size; the class of a pixel is their argmax"
    eval_overrides = (
        ("segmentation.eval_scales", "floats", "segmenters: average over these scales, e.g. 0.5,1,1.5"),
        ("segmentation.eval_flip", "bool", "segmenters: average in the mirrored inputs too"),
    )

    @classmethod
    def add_config(cls, config):
        # Mobile DeepLabv3 (mnv2_jax.models.deeplab) on the backbone of `config.model`, at DeepLab's output stride.
        config.model.output_stride = 16
        seg = config.segmentation = ml_collections.ConfigDict()
        seg.feature_endpoint = "layer_18"  # the paper's V2*: the 320-channel map before the last 1x1 conv (layer_19)
        seg.aspp = False  # False: the released head (image pooling + 1x1); True: the paper's ASPP variant
        seg.atrous_rates = config_dict.placeholder(tuple)  # ASPP's rates; None: 6/12/18 at output stride 16, x2 at 8
        seg.head_features = 256
        seg.head_dropout_rate = 0.1
        seg.head_bn_momentum = 0.9997  # DeepLab's head batch norm (the backbone keeps model.bn_*)
        seg.head_bn_epsilon = 1e-5
        # Evaluation and predict (DeepLab's multi-scale inference): the input at each scale, plus mirrored with
        # eval_flip, class probabilities averaged; the paper's multi-scale row is (0.5, 0.75, ..., 1.75) with flips.
        seg.eval_scales = (1.0,)
        seg.eval_flip = False
        data = config.data
        data.scale_range = (0.5, 2.0)  # DeepLab's random rescale before the crop (resolution x resolution)
        data.scale_step = 0.25  # scales in this step within scale_range; 0: any scale
        # a TFDS dataset's per-pixel class-id feature (a 1-channel uint8 Image or an integer Tensor)
        data.mask_feature = "segmentation_mask"
        data.mask_label_offset = 0  # added to every stored class id but the ignore label 255

    @classmethod
    def validate_config(cls, config):
        seg = config.segmentation
        checks.check_choice(
            "model.output_stride (segmentation)", config.model.output_stride, SEGMENTATION_OUTPUT_STRIDES
        )
        checks.check_class_count("model.num_classes", config.model.num_classes, "segmentation")
        layers = 2 + sum(stage_repeats(config.model.stage_repeats))  # the stem, the blocks, the last 1x1 conv
        if seg.feature_endpoint not in [f"layer_{i}" for i in range(2, layers + 1)]:
            raise checks.ConfigError(
                f"segmentation.feature_endpoint must be one of layer_2 ... layer_{layers}, got {seg.feature_endpoint!r}"
            )
        checks.check_choice("segmentation.aspp", seg.aspp, (False, True))
        rates = seg.atrous_rates
        if rates is not None and not (len(rates) == 3 and all(isinstance(r, int) and r >= 1 for r in rates)):
            raise checks.ConfigError(f"segmentation.atrous_rates must be three ints >= 1 or None (auto), got {rates!r}")
        checks.check_positive("segmentation.head_features", seg.head_features)
        checks.check_range("segmentation.head_dropout_rate", seg.head_dropout_rate, 0.0, 1.0)
        checks.check_range("segmentation.head_bn_momentum", seg.head_bn_momentum, 0.0, 1.0)
        checks.check_positive("segmentation.head_bn_epsilon", seg.head_bn_epsilon, float)
        checks.check_numbers("segmentation.eval_scales", seg.eval_scales, 0.1, 4)
        checks.check_choice("segmentation.eval_flip", seg.eval_flip, (False, True))

    @classmethod
    def validate_data(cls, config):
        data = config.data
        checks.check_interval("data.scale_range", data.scale_range, 1e-3, 1e3)
        checks.check_range("data.scale_step", data.scale_step, 0.0, float("inf"))
        if not isinstance(data.mask_feature, str) or not data.mask_feature:
            raise checks.ConfigError(
                f"data.mask_feature must be the name of a dataset feature, got {data.mask_feature!r}"
            )
        offset, most = data.mask_label_offset, MAX_LABEL_OFFSET
        if not isinstance(offset, int) or isinstance(offset, bool) or not -most <= offset <= most:
            raise checks.ConfigError(f"data.mask_label_offset must be an int in [{-most}, {most}], got {offset!r}")

    def label_shape(self, resolution: int) -> tuple[int, ...]:
        return (resolution, resolution)

    def build_model(self, **overrides: Any) -> MobileDeepLabV3:
        return build_segmenter(self.config.model, self.config.segmentation, **overrides)

    def _decode(self, example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return segmentation_data.decode_pair(example, self.config.dataset, self.config.data.mask_feature)

    def _model_input(self, image: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        label = tf.cast(mask, tf.int32)  # padding holds the ignore label, which the offset keeps
        return {
            "image": preprocessing.normalize(image, self.config.model.preprocessing),
            "label": segmentation_data.offset_labels(label, self.config.data.mask_label_offset, IGNORE_LABEL),
        }

    def train_example(self, example, seed):
        data = self.config.data
        image, mask = segmentation_data.random_scale_crop_flip(
            *self._decode(example),
            seed,
            self.config.resolution,
            tuple(data.scale_range),
            data.scale_step,
            data.flip,
            IGNORE_LABEL,
        )
        return self._model_input(image, mask)

    def eval_example(self, example):
        image, mask = segmentation_data.fit_and_pad(
            *self._decode(example),
            self.eval_resolution,
            IGNORE_LABEL,
        )
        return self._model_input(image, mask)

    def loss(self, logits, batch):
        loss, valid = pixel_cross_entropy(logits, batch["label"])
        pixels = jnp.maximum(jnp.sum(valid), 1)
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]) & valid
        return jnp.sum(loss) / pixels, {"train/pixel_accuracy": jnp.sum(correct) / pixels}

    def eval_outputs(self, logits, batch):
        mask = batch["mask"]
        loss, valid = pixel_cross_entropy(logits, batch["label"])
        valid &= mask.astype(bool)[:, None, None]
        predictions = jnp.argmax(logits, axis=-1)
        return {
            "confusion": confusion_matrix(batch["label"], predictions, mask, self.num_classes),
            "loss": jnp.sum(jnp.where(valid, loss, 0.0)),
            "pixels": jnp.sum(valid.astype(jnp.int32)),
            "count": jnp.sum(mask.astype(jnp.float32)),
        }

    def evaluator(self) -> MeanIoU:
        return MeanIoU(self.class_names())

    def eval_tags(self, overrides):
        inference = overrides.get("segmentation", {})
        multiscale = tuple(inference.get("eval_scales", (1.0,))) != (1.0,)
        return ["multiscale" if multiscale else "", "flip" if inference.get("eval_flip") else ""]

    # Serving.

    def export_model(self) -> MobileDeepLabV3:
        """At one scale: multi-scale inference (`segmentation.eval_scales`) is the caller's loop."""
        return super().export_model().clone(eval_scales=(1.0,), eval_flip=False)

    def export_output_shape(self, batch):
        return [batch, self.config.resolution, self.config.resolution, self.num_classes]

    def check_predict(self, options: PredictOptions) -> None:
        if options.out is None:
            raise PredictError("segmentation checkpoints need --out DIR for the predicted PNGs")

    def predict(self, model, variables, paths, options):
        """Writes each image's classes, colours and overlay as PNGs and prints the classes' shares of it."""
        from mnv2_jax import inference  # loads workdirs through the tasks: imported when used

        names = self.class_names(options.labels)
        os.makedirs(options.out, exist_ok=True)
        images = [preprocessing.load_image_as_is(path) for path in paths]
        size, mode = self.eval_resolution, self.config.model.preprocessing
        for path, pixels, classes in zip(
            paths, images, inference.segment(model, variables, images, size, mode), strict=True
        ):
            written = write_segmentation(options.out, path, pixels, classes)
            print(path)
            counts = np.bincount(classes.ravel(), minlength=self.num_classes)
            for index in np.argsort(-counts, kind="stable"):
                if counts[index]:
                    name = names[index] if index < len(names) else str(index)
                    print(f"  {counts[index] / classes.size:.4f}  {index:>5}  {name}")
            print("  wrote " + ", ".join(written))
