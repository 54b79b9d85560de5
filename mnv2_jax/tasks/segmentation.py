"""Semantic segmentation (Mobile DeepLabv3): the task, the confusion matrix an evaluation accumulates, its scores.

The matrix is summed inside the compiled eval step over the whole (sharded) batch, so every device's and every
host's pixels count; the host adds the batches' matrices in int64. Pixels whose label is `ignore_label` and
padded examples (`mask` 0) never count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

from mnv2_jax.data import preprocessing
from mnv2_jax.data import segmentation as segmentation_data
from mnv2_jax.models import MobileDeepLabV3, build_segmenter
from mnv2_jax.tasks.base import Task

IGNORE_LABEL = 255  # PASCAL VOC's "void": object borders and unlabelled pixels


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


class Segmentation(Task):
    """Mobile DeepLabv3: per-pixel softmax cross-entropy over labelled pixels (DeepLab's loss, on logits upsampled to
    the input), mean IoU over the whole eval split; the best checkpoint by `eval/mIoU`."""

    name = "segmentation"
    features = ("image", "segmentation_mask")
    best_metric = "eval/mIoU"
    padding_label = IGNORE_LABEL

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

    def eval_sums(self, logits, batch):
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

    def eval_results(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        result = scores(totals["confusion"])
        metrics = {
            "eval/mIoU": result["mIoU"],
            "eval/pixel_accuracy": result["pixel_accuracy"],
            "eval/loss": float(totals["loss"]) / max(int(totals["pixels"]), 1),
            "eval/pixels": float(totals["pixels"]),  # the labelled pixels counted (each once)
            "eval/count": float(totals["count"]),
        }
        for name, iou in zip(self.class_names(), result["per_class_iou"], strict=True):
            if iou is not None:
                metrics[f"eval/iou/{name}"] = iou
        return metrics
