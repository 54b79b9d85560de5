"""COCO mAP of gathered eval arrays (issue 17, must-show 2): a hand-made case whose AP is computed by hand equals
both our conversion's result and pycocotools' own evaluation of the same case written as COCO JSON files."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mnv2_jax.detection import coco_eval

# Two images (height, width); pixel boxes are COCO's [x, y, width, height].
SIZES = [(100, 200), (80, 120)]
GROUND_TRUTH = [  # image, class, box
    (0, 0, [20, 10, 60, 40]),
    (1, 1, [0, 0, 100, 50]),
    (1, 0, [60, 40, 50, 30]),  # a crowd region: detections inside it cost nothing
]
CROWD = [False, False, True]
DETECTIONS = [  # image, class, box, score
    (0, 0, [20, 10, 60, 40], 0.9),  # exact: a true positive at every IoU threshold
    (0, 0, [150, 60, 30, 30], 0.8),  # no overlap: a false positive, ranked below the true one
    (1, 1, [0, 0, 100, 29], 0.7),  # IoU 0.58: true at thresholds 0.5 and 0.55 only
    (1, 0, [62, 42, 40, 20], 0.6),  # inside the crowd region: ignored
]


def normalised(box, size):
    x, y, w, h = box
    height, width = size
    return [y / height, x / width, (y + h) / height, (x + w) / width]


def gathered_arrays(max_boxes=4, max_detections=5) -> dict[str, np.ndarray]:
    """The case as the eval steps return it: padded per image."""
    images = len(SIZES)
    arrays = {
        "size": np.array(SIZES, np.int32),
        "gt_boxes": np.zeros((images, max_boxes, 4), np.float32),
        "gt_classes": np.zeros((images, max_boxes), np.int32),
        "gt_mask": np.zeros((images, max_boxes), bool),
        "gt_crowd": np.zeros((images, max_boxes), bool),
        "boxes": np.zeros((images, max_detections, 4), np.float32),
        "scores": np.zeros((images, max_detections), np.float32),
        "classes": np.zeros((images, max_detections), np.int32),
        "num_detections": np.zeros(images, np.int32),
    }
    counts = [0] * images
    for (image, label, box), crowd in zip(GROUND_TRUTH, CROWD, strict=True):
        i = counts[image]
        arrays["gt_boxes"][image, i] = normalised(box, SIZES[image])
        arrays["gt_classes"][image, i], arrays["gt_mask"][image, i], arrays["gt_crowd"][image, i] = label, True, crowd
        counts[image] += 1
    for image, label, box, score in DETECTIONS:
        i = arrays["num_detections"][image]
        arrays["boxes"][image, i] = normalised(box, SIZES[image])
        arrays["classes"][image, i], arrays["scores"][image, i] = label, score
        arrays["num_detections"][image] += 1
    return arrays


def pycocotools_own(tmp_path) -> np.ndarray:
    """pycocotools on the case written by hand as COCO files (categories 1 and 2)."""
    dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(SIZES)],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": int(crowd)}
            for n, ((i, c, b), crowd) in enumerate(zip(GROUND_TRUTH, CROWD, strict=True))
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    results = [{"image_id": i, "category_id": c + 1, "bbox": b, "score": s} for i, c, b, s in DETECTIONS]
    (tmp_path / "gt.json").write_text(json.dumps(dataset))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    ground_truth = COCO(str(tmp_path / "gt.json"))
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(tmp_path / "dt.json")), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats


def test_map_of_a_hand_made_case_equals_the_hand_count_and_pycocotools_own(tmp_path):
    dataset, results = coco_eval.to_coco(gathered_arrays(), num_classes=2)
    stats, precision = coco_eval.evaluate(dataset, results)
    # By hand: class 0 has AP 1 at every threshold (its true positive outranks the false one; the crowd detection is
    # ignored); class 1 is found at IoU 0.58, so 2 of the 10 thresholds: AP 0.2. mAP (1 + 0.2) / 2; mAP50 1.
    assert stats["mAP"] == pytest.approx(0.6, abs=1e-12)
    assert stats["mAP50"] == pytest.approx(1.0, abs=1e-12) and stats["mAP75"] == pytest.approx(0.5, abs=1e-12)
    np.testing.assert_allclose([stats[name] for name in coco_eval.STAT_NAMES], pycocotools_own(tmp_path), atol=1e-12)
    ap, ap50 = coco_eval.per_class_ap(precision, 2)
    assert ap == pytest.approx([1.0, 0.2]) and ap50 == pytest.approx([1.0, 1.0])


def test_no_detections_scores_zero():
    arrays = gathered_arrays()
    arrays["num_detections"][:] = 0
    stats, precision = coco_eval.evaluate(*coco_eval.to_coco(arrays, num_classes=2))
    assert stats["mAP"] == 0.0 and precision is None
