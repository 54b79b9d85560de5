"""SSD's box machinery against hand-computed cases and plain NumPy references (issue 17, must-show 2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_jax.detection import anchors, boxes, loss, matching, nms


def test_anchor_counts_of_the_release_at_300_and_320():
    assert anchors.anchors_per_location(anchors.AnchorSpec()) == [3, 6, 6, 6, 6, 6]
    assert anchors.feature_map_sizes(300) == [19, 10, 5, 3, 2, 1]
    assert anchors.feature_map_sizes(320) == [20, 10, 5, 3, 2, 1]
    # 19^2*3 + (10^2+5^2+3^2+2^2+1)*6 = 1083 + 834; 20^2*3 + 834
    assert anchors.for_resolution(300).shape == (1917, 4)
    assert anchors.for_resolution(320).shape == (2034, 4)


def test_first_anchors_of_each_layer_by_hand():
    grid = anchors.for_resolution(300)
    c = 0.5 / 19  # the first position's centre on the 19x19 map
    r2 = math.sqrt(2)
    expected = [
        [c - 0.05, c - 0.05, c + 0.05, c + 0.05],  # scale 0.1, ratio 1
        [c - 0.1 / r2, c - 0.1 * r2, c + 0.1 / r2, c + 0.1 * r2],  # scale 0.2, ratio 2: wider than high
        [c - 0.1 * r2, c - 0.1 / r2, c + 0.1 * r2, c + 0.1 / r2],  # ratio 1/2
        [c - 0.05, 3 * c - 0.05, c + 0.05, 3 * c + 0.05],  # the next position to the right
    ]
    np.testing.assert_allclose(grid[:4], expected, atol=1e-6)
    second = grid[19 * 19 * 3 :]  # 10x10 map, centre 0.05, scale 0.35; interpolated sqrt(0.35 * 0.5)
    np.testing.assert_allclose(second[0], [0.05 - 0.175, 0.05 - 0.175, 0.05 + 0.175, 0.05 + 0.175], atol=1e-6)
    s = math.sqrt(0.35 * 0.5) / 2
    np.testing.assert_allclose(second[5], [0.05 - s, 0.05 - s, 0.05 + s, 0.05 + s], atol=1e-6)
    last = grid[-6:]  # the 1x1 map: centre 0.5, scale 0.95, interpolated sqrt(0.95 * 1.0)
    np.testing.assert_allclose(last[0], [0.025, 0.025, 0.975, 0.975], atol=1e-6)
    s = math.sqrt(0.95) / 2
    np.testing.assert_allclose(last[5], [0.5 - s, 0.5 - s, 0.5 + s, 0.5 + s], atol=1e-6)


def test_iou_by_hand():
    a = jnp.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    b = jnp.array([[0.25, 0.25, 0.75, 0.75], [0.6, 0.6, 0.7, 0.7], [0.0, 0.0, 0.5, 0.5]])
    expected = [[0.0625 / (0.25 + 0.25 - 0.0625), 0.0, 1.0], [0.25, 0.01, 0.25]]
    np.testing.assert_allclose(boxes.iou(a, b), expected, rtol=1e-6)


def test_box_coder_by_hand_and_round_trip():
    anchor = jnp.array([[0.2, 0.2, 0.4, 0.6]])  # centre (0.3, 0.4), size 0.2 x 0.4
    box = jnp.array([[0.25, 0.3, 0.45, 0.5]])  # centre (0.35, 0.4), size 0.2 x 0.2
    code = boxes.encode(box, anchor)
    np.testing.assert_allclose(code[0], [10 * 0.05 / 0.2, 0.0, 0.0, 5 * math.log(0.5)], atol=1e-5)
    rng = np.random.default_rng(0)
    centres, sizes = rng.uniform(0.1, 0.9, (50, 2)), rng.uniform(0.01, 0.5, (50, 2))
    random_boxes = jnp.asarray(np.concatenate([centres - sizes / 2, centres + sizes / 2], 1), jnp.float32)
    grid = jnp.asarray(anchors.for_resolution(300)[:50])
    np.testing.assert_allclose(boxes.decode(boxes.encode(random_boxes, grid), grid), random_boxes, atol=1e-5)


def test_matcher_thresholds_and_forced_matches():
    # 2 valid boxes, 1 padded; 5 anchors.
    similarity = jnp.array(
        [
            [0.7, 0.3, 0.2, 0.45, 0.0],  # box 0: anchor 0 above 0.5; its best anchor is 0
            [0.6, 0.55, 0.1, 0.4, 0.0],  # box 1: anchor 1 above 0.5; anchor 0 goes to box 0 (0.7 > 0.6)
            [0.9, 0.9, 0.9, 0.9, 0.9],  # padding: never matches
        ]
    )
    valid = jnp.array([True, True, False])
    np.testing.assert_array_equal(matching.match(similarity, valid), [0, 1, -1, -1, -1])
    # A box whose best IoU is below the threshold still claims its best anchor.
    weak = jnp.array([[0.1, 0.3, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6, 0.2]])
    np.testing.assert_array_equal(matching.match(weak, jnp.array([True, True])), [-1, 0, -1, 1, -1])
    np.testing.assert_array_equal(
        matching.match(weak, jnp.array([True, True]), force_match_for_each_row=False), [-1, -1, -1, 1, -1]
    )
    # Between the thresholds: ignored.
    np.testing.assert_array_equal(
        matching.match(weak, jnp.array([True, True]), 0.5, 0.25, force_match_for_each_row=False), [-1, -2, -1, 1, -1]
    )
    # Two boxes with the same best anchor: the first box keeps it.
    same = jnp.array([[0.9, 0.1], [0.8, 0.2]])
    np.testing.assert_array_equal(matching.match(same, jnp.array([True, True])), [0, -1])
    np.testing.assert_array_equal(matching.match(similarity, jnp.zeros(3, bool)), [-1] * 5)


def test_targets_encode_the_matched_box_and_the_background_column():
    grid = jnp.asarray(anchors.for_resolution(300))
    gt = jnp.array([[0.1, 0.1, 0.5, 0.4], [0.0, 0.0, 0.0, 0.0]])
    t = matching.targets(gt, jnp.array([4, 0]), jnp.array([True, False]), grid, num_classes=5)
    matched = np.flatnonzero(np.asarray(t["matches"]) >= 0)
    assert len(matched) >= 1 and np.all(np.asarray(t["matches"])[matched] == 0)
    np.testing.assert_allclose(t["box_codes"][matched], boxes.encode(gt[:1], grid[matched]), atol=1e-6)
    assert np.all(np.argmax(t["classes"][matched], -1) == 5) and t["classes"].shape == (1917, 6)
    unmatched = np.asarray(t["matches"]) == -1
    assert np.all(np.asarray(t["classes"])[unmatched, 0] == 1) and float(t["box_weights"].sum()) == len(matched)


def test_hard_example_mining_keeps_three_negatives_per_positive():
    matches = jnp.array([0, -1, -1, 1, -1, -1, -1, -1, -2, -1])
    losses = jnp.array([5.0, 0.1, 0.9, 4.0, 0.5, 0.7, 0.2, 0.3, 9.0, 0.8])
    # 2 positives: the 6 unmatched anchors with the highest losses (the ignored one never counts).
    np.testing.assert_array_equal(np.flatnonzero(loss.mined_negatives(losses, matches)), sorted([2, 9, 5, 4, 7, 6]))
    # No positive: at least 3 negatives.
    none = jnp.full(10, -1)
    np.testing.assert_array_equal(np.flatnonzero(loss.mined_negatives(losses, none)), [0, 3, 8])


def test_ssd_loss_by_hand():
    """One image, 3 anchors: a positive (class 1 of 2), a negative, an ignored one."""
    targets = {
        "matches": jnp.array([[0, -1, -2]]),
        "classes": jnp.array([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]),
        "class_weights": jnp.array([[1.0, 1.0, 0.0]]),
        "box_codes": jnp.array([[[0.5, -2.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4]]),
        "box_weights": jnp.array([[1.0, 0.0, 0.0]]),
    }
    logits = jnp.zeros((1, 3, 3))
    codes = jnp.zeros((1, 3, 4))
    total, parts = loss.ssd_loss(logits, codes, targets)
    # sigmoid CE at logit 0 is log 2 per class: 3 classes x 2 counted anchors; smooth L1: 0.5*0.25 + (2-0.5)
    assert float(parts["classification"]) == pytest.approx(6 * math.log(2), rel=1e-6)
    assert float(parts["localization"]) == pytest.approx(0.125 + 1.5, rel=1e-6)
    assert float(total) == pytest.approx(6 * math.log(2) + 1.625, rel=1e-6)


def numpy_greedy_nms(boxes_np, scores_np, iou_threshold, max_out, score_threshold):
    """The textbook greedy NMS: sort by score, keep a box unless it overlaps a kept one above the threshold."""
    order = [i for i in np.argsort(-scores_np, kind="stable") if scores_np[i] > score_threshold]
    kept = []
    for i in order:
        if len(kept) == max_out:
            break
        if all(np.asarray(boxes.iou(boxes_np[i : i + 1], boxes_np[j : j + 1]))[0, 0] <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def test_nms_equals_a_numpy_reference_per_class():
    rng = np.random.default_rng(1)
    num_boxes, num_classes = 60, 3
    centres, sizes = rng.uniform(0.2, 0.8, (num_boxes, 2)), rng.uniform(0.05, 0.4, (num_boxes, 2))
    box_array = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (num_classes, num_boxes)).astype(np.float32)
    scores[2, :50] = 0.0  # class 2: only 10 candidates above the score threshold
    spec = nms.NmsSpec(score_threshold=0.05, iou_threshold=0.5, max_detections_per_class=8)
    indices, valid = jax.jit(nms.per_class_nms, static_argnums=2)(jnp.asarray(box_array), jnp.asarray(scores), spec)
    for c in range(num_classes):
        expected = numpy_greedy_nms(box_array, scores[c], 0.5, 8, 0.05)
        assert list(np.asarray(indices[c])[np.asarray(valid[c])]) == expected


def test_postprocess_decodes_and_keeps_the_best_detections_over_classes():
    grid = jnp.asarray(anchors.for_resolution(300))
    num_anchors = grid.shape[0]
    logits = jnp.full((2, num_anchors, 4), -20.0)
    # Image 0: anchors 10 and 11 share a centre (position 3 of the 19x19 map) with sizes 0.141 x 0.283 and
    # 0.283 x 0.141: IoU 0.02 / 0.06 = 1/3. Anchor 10 is class 2 (column 3) at 0.9, anchor 11 the same class at 0.8
    # (suppressed at IoU 0.3), anchor 500 class 0 at 0.7. Image 1: nothing above the score threshold.
    logit = lambda p: math.log(p / (1 - p))
    logits = logits.at[0, 10, 3].set(logit(0.9)).at[0, 11, 3].set(logit(0.8)).at[0, 500, 1].set(logit(0.7))
    codes = jnp.zeros((2, num_anchors, 4))
    assert float(boxes.iou(grid[10:11], grid[11:12])[0, 0]) == pytest.approx(1 / 3, rel=1e-5)
    spec = nms.NmsSpec(score_threshold=0.5, iou_threshold=0.3, max_total_detections=5)
    out = jax.jit(nms.postprocess, static_argnums=3)(codes, logits, grid, spec)
    np.testing.assert_array_equal(out["num_detections"], [2, 0])
    np.testing.assert_allclose(out["scores"][0], [0.9, 0.7, 0, 0, 0], rtol=1e-5)
    np.testing.assert_array_equal(out["classes"][0, :2], [2, 0])
    np.testing.assert_allclose(out["boxes"][0, :2], grid[jnp.array([10, 500])], atol=1e-6)
    # Above the IoU threshold no more: both boxes of class 2 are kept.
    spec = nms.NmsSpec(score_threshold=0.5, iou_threshold=0.4, max_total_detections=5)
    out = jax.jit(nms.postprocess, static_argnums=3)(codes, logits, grid, spec)
    np.testing.assert_allclose(out["scores"][0, :3], [0.9, 0.8, 0.7], rtol=1e-5)
