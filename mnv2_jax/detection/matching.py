"""Anchor matching and SSD's training targets: the API's `argmax_matcher` and target assigner."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnv2_jax.detection import boxes as box_ops

UNMATCHED = -1
IGNORED = -2


def match(
    similarity: jnp.ndarray,
    valid: jnp.ndarray,
    matched_threshold: float = 0.5,
    unmatched_threshold: float = 0.5,
    force_match_for_each_row: bool = True,
) -> jnp.ndarray:
    """Each anchor's ground-truth row, or UNMATCHED / IGNORED: `[M]` from a `[N, M]` similarity (IoU) of N padded
    ground-truth boxes (`valid` `[N]`) and M anchors.

    An anchor takes its most similar valid box when that reaches `matched_threshold`; below `unmatched_threshold` it
    is unmatched, in between ignored. With `force_match_for_each_row`, every valid box also claims its own most
    similar anchor, whatever the thresholds (the lowest row wins when two boxes claim the same anchor)."""
    if similarity.shape[0] == 0:
        return jnp.full(similarity.shape[1], UNMATCHED)
    similarity = jnp.where(valid[:, None], similarity, -1.0)
    best_row = jnp.argmax(similarity, axis=0)
    best_value = jnp.max(similarity, axis=0)
    matches = jnp.where(best_value >= matched_threshold, best_row, IGNORED)
    matches = jnp.where(best_value < unmatched_threshold, UNMATCHED, matches)
    if force_match_for_each_row:
        best_column = jnp.argmax(similarity, axis=1)  # [N]
        claims = jax.nn.one_hot(best_column, similarity.shape[1], dtype=jnp.int32) * valid[:, None]  # [N, M]
        claimed = jnp.any(claims > 0, axis=0)
        claiming_row = jnp.argmax(claims, axis=0)  # the first row that claims the anchor
        matches = jnp.where(claimed, claiming_row, matches)
    return matches


def targets(
    gt_boxes: jnp.ndarray,
    gt_classes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    anchors: jnp.ndarray,
    num_classes: int,
    matched_threshold: float = 0.5,
) -> dict[str, jnp.ndarray]:
    """One image's targets for its anchors `[M, 4]` from padded ground truth (`gt_boxes` `[N, 4]`, `gt_classes`
    `[N]` in 0..num_classes-1, `gt_valid` `[N]`), matched at `matched_threshold` (and unmatched below it):

    - `matches` `[M]`: the matched box, UNMATCHED or IGNORED;
    - `box_codes` `[M, 4]`: the matched box encoded relative to its anchor (0 elsewhere);
    - `classes` `[M, num_classes + 1]`: one-hot with the background in column 0 (all zero where ignored);
    - `class_weights` `[M]`: 1 for matched and unmatched anchors, 0 for ignored; `box_weights` `[M]`: 1 if matched.
    """
    matches = match(box_ops.iou(gt_boxes, anchors), gt_valid, matched_threshold, matched_threshold)
    matched = matches >= 0
    index = jnp.maximum(matches, 0)
    codes = box_ops.encode(gt_boxes[index], anchors)
    labels = jnp.where(matched, gt_classes[index] + 1, 0)
    classes = jax.nn.one_hot(labels, num_classes + 1) * (matches != IGNORED)[:, None]
    return {
        "matches": matches,
        "box_codes": jnp.where(matched[:, None], codes, 0.0),
        "classes": classes,
        "class_weights": (matches != IGNORED).astype(jnp.float32),
        "box_weights": matched.astype(jnp.float32),
    }
