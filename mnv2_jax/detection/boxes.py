"""Box arithmetic: IoU and the Faster R-CNN box coder SSD uses (scales 10, 10, 5, 5)."""

from __future__ import annotations

import jax.numpy as jnp

# ssdlite_mobilenet_v2_coco.config: faster_rcnn_box_coder { y_scale: 10 x_scale: 10 height_scale: 5 width_scale: 5 }
COORDINATE_SCALES = (10.0, 10.0, 5.0, 5.0)
_EPSILON = 1e-8  # the API's faster_rcnn_box_coder: keeps zero-sized boxes finite


def area(boxes: jnp.ndarray) -> jnp.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Pairwise IoU `[..., N, M]` of boxes `[..., N, 4]` and `[..., M, 4]`; 0 where they do not intersect."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    height = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    width = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    intersection = height * width
    union = area(a) + area(b) - intersection
    return jnp.where(intersection > 0, intersection / jnp.where(intersection > 0, union, 1.0), 0.0)


def _centers(boxes: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    height, width = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + height / 2, boxes[..., 1] + width / 2, height, width


def encode(boxes: jnp.ndarray, anchors: jnp.ndarray, scales=COORDINATE_SCALES) -> jnp.ndarray:
    """Regression targets `[ty, tx, th, tw]` of `boxes` relative to `anchors` (same leading shape)."""
    y, x, h, w = _centers(boxes)
    ya, xa, ha, wa = _centers(anchors)
    ha, wa, h, w = ha + _EPSILON, wa + _EPSILON, h + _EPSILON, w + _EPSILON
    sy, sx, sh, sw = scales
    return jnp.stack([sy * (y - ya) / ha, sx * (x - xa) / wa, sh * jnp.log(h / ha), sw * jnp.log(w / wa)], axis=-1)


def decode(codes: jnp.ndarray, anchors: jnp.ndarray, scales=COORDINATE_SCALES) -> jnp.ndarray:
    """Boxes from regression codes `[ty, tx, th, tw]` relative to `anchors`: the inverse of `encode`."""
    ya, xa, ha, wa = _centers(anchors)
    sy, sx, sh, sw = scales
    h, w = jnp.exp(codes[..., 2] / sh) * ha, jnp.exp(codes[..., 3] / sw) * wa
    y, x = codes[..., 0] / sy * ha + ya, codes[..., 1] / sx * wa + xa
    return jnp.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], axis=-1)
