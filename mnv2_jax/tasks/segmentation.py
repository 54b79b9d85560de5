"""Semantic segmentation: the confusion matrix an evaluation accumulates, and the scores it gives.

The matrix is summed inside the compiled eval step over the whole (sharded) batch, so every device's and every
host's pixels count; the host adds the batches' matrices in int64. Pixels whose label is `ignore_label` and
padded examples (`mask` 0) never count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
