"""COCO's detection metrics (pycocotools) over a whole evaluation split, from the padded arrays the eval steps
gather: the ground truth and detections of every image, normalised boxes turned into pixels of the original image.

Ground-truth areas are box areas (COCO's own annotations hold mask areas), so the small/medium/large split can differ
slightly from the official server's for COCO; boxes flagged crowd (COCO's `is_crowd`, VOC's `difficult`) are
COCO's `iscrowd` regions: matching one costs nothing.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from etils import epy

with epy.lazy_imports():  # pycocotools loads when an evaluation first runs
    from pycocotools import coco as coco_api
    from pycocotools import cocoeval as cocoeval_api

# COCOeval.stats, in its order.
STAT_NAMES = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR100_small",
    "AR100_medium",
    "AR100_large",
)


def _pixels(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """Normalised `[n, 4]` ymin, xmin, ymax, xmax -> COCO's `[n, 4]` x, y, width, height in pixels."""
    scaled = np.asarray(boxes, np.float64) * [height, width, height, width]
    return np.stack([scaled[:, 1], scaled[:, 0], scaled[:, 3] - scaled[:, 1], scaled[:, 2] - scaled[:, 0]], -1)


def to_coco(arrays: dict[str, np.ndarray], num_classes: int) -> tuple[dict, list[dict]]:
    """The ground-truth dataset and the detection results, in COCO's JSON structure, of gathered eval arrays:
    `size` `[I, 2]` (height, width), `gt_boxes` `[I, N, 4]`, `gt_classes`, `gt_mask`, `gt_crowd` `[I, N]`, and
    `boxes` `[I, D, 4]`, `scores`, `classes` `[I, D]`, `num_detections` `[I]`. Class k is category k + 1."""
    images, annotations, results = [], [], []
    for i, (height, width) in enumerate(np.asarray(arrays["size"], np.float64)):
        images.append({"id": i, "height": height, "width": width})
        valid = np.asarray(arrays["gt_mask"][i], bool)
        boxes = _pixels(arrays["gt_boxes"][i][valid], height, width)
        for box, label, crowd in zip(boxes, arrays["gt_classes"][i][valid], arrays["gt_crowd"][i][valid], strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(crowd),
                }
            )
        count = int(arrays["num_detections"][i])
        boxes = _pixels(arrays["boxes"][i][:count], height, width)
        for box, label, score in zip(boxes, arrays["classes"][i][:count], arrays["scores"][i][:count], strict=True):
            results.append({"image_id": i, "category_id": int(label) + 1, "bbox": box.tolist(), "score": float(score)})
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def evaluate(dataset: dict, results: list[dict]) -> tuple[dict[str, float], np.ndarray | None]:
    """COCOeval's 12 summary numbers (`STAT_NAMES`; -1 where a range holds no ground truth) and its precision
    array `[T, R, K, A, M]` (None when there are no detections: every number is then 0)."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        ground_truth = coco_api.COCO()
        ground_truth.dataset = dataset
        ground_truth.createIndex()
        if not results:
            return dict.fromkeys(STAT_NAMES, 0.0), None
        detections = ground_truth.loadRes(results)
        coco_eval = cocoeval_api.COCOeval(ground_truth, detections, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(STAT_NAMES, map(float, coco_eval.stats), strict=True)), coco_eval.eval["precision"]


def per_class_ap(precision: np.ndarray | None, num_classes: int) -> tuple[list[float | None], list[float | None]]:
    """Each class's AP over IoU 0.5:0.95 and at IoU 0.5 (all areas, 100 detections), as COCOeval averages them;
    None for a class without ground truth."""
    if precision is None:
        return [0.0] * num_classes, [0.0] * num_classes

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else None

    return (
        [mean(precision[:, :, k, 0, -1]) for k in range(num_classes)],
        [mean(precision[0, :, k, 0, -1]) for k in range(num_classes)],
    )
