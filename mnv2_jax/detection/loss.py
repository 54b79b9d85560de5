"""SSD's training loss as released: sigmoid classification over every class and the background, smooth-L1
localisation, hard example mining (3 negatives per positive, at least 3 per image), both normalised by the number
of matched anchors in the batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mnv2_jax.detection.matching import UNMATCHED


@dataclasses.dataclass(frozen=True)
class MiningSpec:
    """`hard_example_miner` of `ssdlite_mobilenet_v2_coco.config` (loss_type CLASSIFICATION)."""

    max_negatives_per_positive: float = 3.0
    min_negatives_per_image: int = 3


def smooth_l1(x: jnp.ndarray, delta: float = 1.0) -> jnp.ndarray:
    """Huber loss with `delta` (the API's `weighted_smooth_l1`): 0.5 x^2 inside, delta (|x| - 0.5 delta) outside."""
    ax = jnp.abs(x)
    return jnp.where(ax < delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def mined_negatives(class_losses: jnp.ndarray, matches: jnp.ndarray, spec: MiningSpec = MiningSpec()) -> jnp.ndarray:
    """The unmatched anchors `[M]` (bool) that train as negatives: the highest classification losses, at most
    `max_negatives_per_positive` times the image's matched anchors and at least `min_negatives_per_image`.

    The API first runs NMS at IoU 0.99 over the predicted boxes ranked by loss (`iou_threshold: 0.99`), which only
    removes near-identical boxes; this selection skips that step."""
    negative = matches == UNMATCHED
    num_positives = jnp.sum(matches >= 0)
    limit = jnp.maximum(
        spec.min_negatives_per_image, jnp.floor(spec.max_negatives_per_positive * num_positives).astype(jnp.int32)
    )
    ranked = jnp.argsort(jnp.where(negative, -class_losses, jnp.inf), stable=True)  # hardest negatives first
    rank = jnp.zeros_like(ranked).at[ranked].set(jnp.arange(ranked.shape[0]))
    return negative & (rank < limit)


def ssd_loss(
    class_logits: jnp.ndarray,
    box_codes: jnp.ndarray,
    targets: dict[str, jnp.ndarray],
    spec: MiningSpec = MiningSpec(),
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The batch's loss from predictions `class_logits` `[B, M, C+1]`, `box_codes` `[B, M, 4]` and the batched
    `matching.targets`; returns (classification + localisation loss, its parts and the match count)."""
    class_losses = optax.sigmoid_binary_cross_entropy(class_logits, targets["classes"]).sum(-1)
    class_losses = class_losses * targets["class_weights"]
    box_losses = smooth_l1(box_codes - targets["box_codes"]).sum(-1) * targets["box_weights"]
    negatives = jax.vmap(lambda losses, matches: mined_negatives(losses, matches, spec))(
        jax.lax.stop_gradient(class_losses), targets["matches"]
    )
    selected = (targets["matches"] >= 0) | negatives
    num_matches = jnp.sum(targets["box_weights"])
    normalizer = jnp.maximum(num_matches, 1.0)
    classification = jnp.sum(jnp.where(selected, class_losses, 0.0)) / normalizer
    localization = jnp.sum(box_losses) / normalizer
    parts = {"classification": classification, "localization": localization, "matches": num_matches}
    return classification + localization, parts
