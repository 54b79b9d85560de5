"""SSD's post-processing, batched and jittable: sigmoid scores, per-class greedy NMS, the top detections."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_jax.detection import boxes as box_ops


@dataclasses.dataclass(frozen=True)
class NmsSpec:
    """`batch_non_max_suppression` of `ssdlite_mobilenet_v2_coco.config`."""

    score_threshold: float = 1e-8
    iou_threshold: float = 0.6
    max_detections_per_class: int = 100
    max_total_detections: int = 100


def per_class_nms(boxes: jnp.ndarray, scores: jnp.ndarray, spec: NmsSpec) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS of one image's class-shared `boxes` `[M, 4]` for every class of `scores` `[C, M]` at once: per
    class, the indices `[C, K]` of the K = max_detections_per_class boxes it keeps, in the order picked (highest
    score first), and their validity. Exact greedy NMS (each pick suppresses the boxes above the IoU threshold),
    stopped after K picks."""
    remaining = jnp.where(scores > spec.score_threshold, scores, -jnp.inf)

    def pick(remaining, _):
        index = jnp.argmax(remaining, axis=1)  # [C]
        valid = jnp.take_along_axis(remaining, index[:, None], axis=1)[:, 0] > -jnp.inf
        overlap = box_ops.iou(boxes[index][:, None, :], boxes[None, :, :])[:, 0, :]  # [C, M]
        suppressed = (overlap > spec.iou_threshold) | (jnp.arange(boxes.shape[0]) == index[:, None])
        remaining = jnp.where(suppressed & valid[:, None], -jnp.inf, remaining)
        return remaining, (index, valid)

    _, (indices, valid) = jax.lax.scan(pick, remaining, None, length=spec.max_detections_per_class)
    return indices.T, valid.T


def postprocess(
    box_codes: jnp.ndarray, class_logits: jnp.ndarray, anchors: jnp.ndarray, spec: NmsSpec = NmsSpec()
) -> dict[str, jnp.ndarray]:
    """Detections of a batch from the predictors' `box_codes` `[B, M, 4]` and `class_logits` `[B, M, C+1]`
    (column 0 the background): `boxes` `[B, D, 4]` (normalised), `scores` `[B, D]`, `classes` `[B, D]` (0-based,
    without the background) and `num_detections` `[B]`, D = max_total_detections, best first, zero-padded."""

    boxes, scores = decode(box_codes, class_logits, anchors)
    return jax.vmap(lambda b, s: _select(b, s, spec))(boxes, scores)


def decode(box_codes: jnp.ndarray, class_logits: jnp.ndarray, anchors: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each anchor's decoded box `[..., M, 4]` (normalised) and class scores `[..., M, C]` (sigmoid, without the
    background) from the predictors' outputs: what NMS selects from, and what exports hand out."""
    return box_ops.decode(box_codes, anchors), jax.nn.sigmoid(class_logits[..., 1:])


def _select(boxes: jnp.ndarray, scores: jnp.ndarray, spec: NmsSpec) -> dict[str, jnp.ndarray]:
    """One image's detections from decoded `boxes` `[M, 4]` and class `scores` `[M, C]`."""
    scores = scores.T  # [C, M]
    indices, valid = per_class_nms(boxes, scores, spec)
    per_class = indices.shape[1]
    kept_scores = jnp.where(valid, jnp.take_along_axis(scores, indices, axis=1), -jnp.inf).reshape(-1)
    top_scores, top = jax.lax.top_k(kept_scores, spec.max_total_detections)
    found = top_scores > -jnp.inf
    box_index = indices.reshape(-1)[top]
    return {
        "boxes": jnp.where(found[:, None], boxes[box_index], 0.0),
        "scores": jnp.where(found, top_scores, 0.0),
        "classes": jnp.where(found, top // per_class, 0),
        "num_detections": jnp.sum(found),
    }


def select(output: np.ndarray, spec: NmsSpec = NmsSpec()) -> dict[str, np.ndarray]:
    """NMS for an exported detector's output of one image, `[anchors, 4 + classes]` (decoded boxes, then class
    scores): the same detections as `postprocess`, as numpy arrays (`boxes`, `scores`, `classes`, `num_detections`)."""
    output = jnp.asarray(output, jnp.float32)
    detections = _select_jit(output[:, :4], output[:, 4:], spec)
    return {name: np.asarray(value) for name, value in detections.items()}


_select_jit = jax.jit(_select, static_argnums=2)
