"""Detection on the shared trainer (issue 17): VOC detection data, COCO mAP over every eval image on any device
count, the best checkpoint by mAP, and exact resume, as for the other tasks."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_detection_data import CLASSES, write_voc_detection_folder
from train_helpers import assert_resume_is_exact, run_mnv2, small_task_run_args

from mnv2_jax import tasks
from mnv2_jax.cli.main import main
from mnv2_jax.data import voc
from mnv2_jax.tasks.detection import Detection
from mnv2_jax.training import checkpoint, run_files, train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("detection_run")]


def detection_args(dataset, **overrides) -> list[str]:
    """The small task run (`train_helpers.SMALL_TASK_RUN`) at 32x32, with the release's class prior (spread-out
    scores for the export checks) and batch norm statistics that follow the batches within its 6 steps (with
    momentum 0.9 the inference network's output hardly depends on its input)."""
    fields = {
        "train_split": "train",
        "eval_split": "val",
        "resolution": 32,
        "data.class_names": CLASSES,
        "detection.max_boxes": 8,
        "detection.class_prior": 0.5,
        "model.bn_momentum": 0.5,
        **overrides,
    }
    return small_task_run_args("configs/ssdlite_bccd.py:width=0.35", dataset, **fields)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc_detection")
    write_voc_detection_folder(root)
    return root


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory, voc_root):
    """`mnv2 train` of the detector on 8 devices."""
    workdir = tmp_path_factory.mktemp("detection") / "workdir"
    status, err = run_mnv2("train", "--workdir", workdir, *detection_args(f"voc:{voc_root}"))
    assert status == 0, err[-3000:]
    return workdir, err


def test_training_logs_ssd_losses_and_coco_metrics_of_every_eval_image(detection_run):
    workdir, err = detection_run
    assert "left out 1 degenerate boxes" in err
    records = run_files.read_metrics(str(workdir))
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    expected = {"train/classification_loss", "train/localization_loss", "train/matches_per_image", "train/grad_norm"}
    assert expected <= train_records[0].keys()
    assert all(r["train/matches_per_image"] >= 1 for r in train_records)  # every image's boxes claim an anchor
    evals = [r for r in records if "eval/mAP" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval/count"] == 5 for r in evals)
    assert {"eval/mAP50", "eval/mAP75", "eval/mAP_small", "eval/AR100"} <= evals[-1].keys()
    assert {f"eval/AP50/{name}" for name in CLASSES} & evals[-1].keys()
    assert all(0 < r["eval/mAP"] <= r["eval/mAP50"] <= 1 for r in evals)
    assert evals[-1]["eval/mAP50"] > 0.1


def test_the_best_checkpoint_is_kept_by_map(detection_run, tmp_path):
    workdir, _ = detection_run
    evals = [r for r in run_files.read_metrics(str(workdir)) if "eval/mAP" in r]
    best = max(evals, key=lambda r: r["eval/mAP"])
    assert best["eval/mAP"] > 0
    with checkpoint.manager(str(workdir), items=()) as mngr:
        assert set(mngr.all_steps()) == {best["step"], evals[-1]["step"]}
    _, config = checkpoint.restore_config(str(workdir))
    config.keep_checkpoints = 1
    mngr = train.checkpoint_manager(str(tmp_path), config, tasks.get(config).best_metric)
    for step, value in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)]:
        checkpoint.save(
            mngr, step, {"params": {"w": np.full(2, step)}}, config, metrics={"eval/mAP": value}, force=True
        )
    mngr.wait_until_finished()
    assert set(mngr.all_steps()) == {2, 4}
    mngr.close()


def test_eval_on_any_device_count_gathers_the_same_detections(detection_run):
    workdir, _ = detection_run
    reference = [r for r in run_files.read_metrics(str(workdir)) if "eval/mAP" in r][-1]
    assert reference["eval/mAP"] > 0 and reference["eval/AR100"] > 0
    for devices, batch in ((1, 8), (3, 6)):
        overrides = {"eval_batch_size": batch}
        _, results = train.evaluate_checkpoint(str(workdir), devices=jax.devices()[:devices], overrides=overrides)
        assert results["eval/count"] == 5
        for name in ("eval/mAP", "eval/mAP50", "eval/AR100", "eval/detections_per_image"):
            assert results[name] == pytest.approx(reference[name], abs=1e-6), name


SHIFT = 0.2  # of a box's width: intersection (1 - SHIFT) w h, union (1 + SHIFT) w h
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_POINTS = np.linspace(0, 1, 101)
EVAL_BATCH = {1: 2, 3: 3, 8: 8}  # devices -> eval_batch_size: 5 images in several batches, or padded


def ground_truth_as_detections(batch, moved, scores) -> dict[str, jax.Array]:
    """The batch's ground-truth boxes and classes as its detections, each box moved right by `moved` `[B, N]` of its
    width, with `scores` `[B, N]`."""
    boxes = batch["boxes"]
    shift = moved * (boxes[..., 3] - boxes[..., 1])
    still = jnp.zeros_like(shift)
    return {
        "boxes": boxes + jnp.stack([still, shift, still, shift], -1),
        "scores": jnp.where(batch["box_mask"], scores, 0.0),
        "classes": batch["classes"],
        "num_detections": jnp.sum(batch["box_mask"], -1),
    }


def metrics_of_ground_truth_detections(workdir, devices: int, moved_and_scores) -> dict[str, float]:
    """The eval metrics of `workdir`'s checkpoint on `devices` (the real eval step, gather and COCO evaluation)
    with the model's detections replaced by the ground truth, moved and scored by `moved_and_scores(batch)`."""
    eval_outputs = Detection.eval_outputs

    def with_ground_truth_detections(self, logits, batch):
        sums = eval_outputs(self, logits, batch)
        detections = ground_truth_as_detections(batch, *moved_and_scores(batch))
        assert detections.keys() <= sums.keys()
        return {**sums, **detections}

    overrides = {"eval_batch_size": EVAL_BATCH[devices]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Detection, "eval_outputs", with_ground_truth_detections)
        _, results = train.evaluate_checkpoint(str(workdir), devices=jax.devices()[:devices], overrides=overrides)
    assert results["eval/count"] == 5
    return results


def map_with_one_image_shifted(objects: list[voc.Objects], shifted: int) -> float:
    """COCO's mAP when every box is found exactly with score 1 but image `shifted`'s, found with IoU
    `(1 - SHIFT) / (1 + SHIFT)` and score 1/2. At an IoU threshold above that, class c finds its n - k boxes outside
    that image first (precision 1) and no more: its AP is the share of COCO's recall points up to (n - k) / n."""
    iou = (1 - SHIFT) / (1 + SHIFT)
    counted = [o.labels[~o.difficult] for o in objects]
    aps = []
    for label in range(len(CLASSES)):
        n = sum(int(np.sum(labels == label)) for labels in counted)
        k = int(np.sum(counted[shifted] == label))
        missed = np.mean((n - k) / n >= COCO_RECALL_POINTS)
        aps.append(np.where(iou >= COCO_IOU_THRESHOLDS, 1.0, missed))
    return float(np.mean(aps))


@pytest.mark.parametrize("devices", [1, 3, 8])
def test_ground_truth_detections_score_map_1_and_with_one_image_shifted_the_map_counted_by_hand(
    detection_run, voc_root, devices
):
    """Every ground-truth box as a detection (the difficult one's on its crowd region): mAP 1. The boxes of val_002,
    the only val image of its size, moved right by a fifth of their width with score 1/2: the hand-counted mAP."""
    workdir, _ = detection_run
    exact = metrics_of_ground_truth_detections(workdir, devices, lambda b: (0.0, jnp.ones(b["classes"].shape)))
    assert exact["eval/mAP"] == pytest.approx(1.0, abs=1e-12) and exact["eval/AR100"] == pytest.approx(1.0, abs=1e-12)
    objects = voc.VocDetectionFolder(str(voc_root), CLASSES).objects("val")
    sizes = [Image.open(voc_root / "JPEGImages" / f"val_{i:03d}.jpg").size[::-1] for i in range(len(objects))]
    shifted = 2
    assert sizes.count(sizes[shifted]) == 1

    def shift_one_image(batch):
        in_image = jnp.all(batch["size"] == jnp.array(sizes[shifted]), -1)[:, None] & batch["box_mask"]
        return SHIFT * in_image, jnp.where(in_image, 0.5, 1.0)

    results = metrics_of_ground_truth_detections(workdir, devices, shift_one_image)
    expected = map_with_one_image_shifted(objects, shifted)
    assert expected < 1 and results["eval/mAP"] == pytest.approx(expected, abs=1e-9)
    assert results["eval/mAP50"] == pytest.approx(1.0, abs=1e-12)


def test_a_detection_on_a_difficult_box_is_no_false_positive(detection_run, voc_root):
    """The difficult box's detection ranked first (score 1; the other boxes' 1/2): on the box, a crowd region, it
    costs nothing (mAP 1); moved off it by two box widths, it is a false positive ahead of its class's n true
    detections, whose precision is then n / (n + 1) at every recall."""
    workdir, _ = detection_run
    objects = voc.VocDetectionFolder(str(voc_root), CLASSES).objects("val")
    (crowd_class,) = np.concatenate([o.labels[o.difficult] for o in objects])
    n = sum(int(np.sum(o.labels[~o.difficult] == crowd_class)) for o in objects)

    def crowd_first(moved):
        return lambda batch: (moved * batch["crowd"], jnp.where(batch["crowd"], 1.0, 0.5))

    on_the_box = metrics_of_ground_truth_detections(workdir, 8, crowd_first(0.0))
    assert on_the_box["eval/mAP"] == pytest.approx(1.0, abs=1e-12)
    off_the_box = metrics_of_ground_truth_detections(workdir, 8, crowd_first(2.0))
    expected = np.mean([n / (n + 1) if label == crowd_class else 1.0 for label in range(len(CLASSES))])
    assert off_the_box["eval/mAP"] == pytest.approx(expected, abs=1e-9)


def test_resume_ends_bitwise_equal_to_the_uninterrupted_run(detection_run, voc_root, tmp_path):
    assert_resume_is_exact(detection_args(f"voc:{voc_root}"), tmp_path / "resumed", detection_run[0])


def test_predict_prints_boxes_in_pixels_of_each_image_and_draws_them(detection_run, voc_root, tmp_path, monkeypatch):
    from mnv2_jax import inference

    workdir, _ = detection_run
    images = [voc_root / "JPEGImages" / f"val_00{i}.jpg" for i in range(2)]

    def predict_json(*flags):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["mnv2", "predict", "--workdir", str(workdir), "--json", *flags, *map(str, images)])
        assert status == 0
        return json.loads(out.getvalue())

    report = predict_json("--min_score=0")
    for path in images:
        width, height = Image.open(path).size
        detections = report[str(path)]
        assert detections and [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
        for found in detections:
            xmin, ymin, xmax, ymax = found["box"]
            assert 0 <= xmin <= xmax <= width and 0 <= ymin <= ymax <= height
            assert found["label"] == CLASSES[found["class_id"]]
    # --min_score set to one of the printed scores: exactly the detections scoring at least that, that one included.
    scores = sorted({d["score"] for detections in report.values() for d in detections})
    assert len(scores) >= 3
    threshold = scores[len(scores) // 2]
    at_least = {path: [d for d in detections if d["score"] >= threshold] for path, detections in report.items()}
    assert 0 < sum(map(len, at_least.values())) < sum(map(len, report.values()))
    assert predict_json(f"--min_score={threshold!r}") == at_least
    # Without the flag: 0.5 reaches the detector, and the drawn image's printed scores are those of at least 0.5.
    min_scores = []

    def recording_detect(task, model, variables, pixels, min_score):
        min_scores.append(min_score)
        return detect(task, model, variables, pixels, min_score)

    detect = inference.detect
    monkeypatch.setattr(inference, "detect", recording_detect)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["mnv2", "predict", "--workdir", str(workdir), "--out", str(tmp_path), str(images[0])])
    assert status == 0 and Image.open(tmp_path / "val_000_detections.png").size == Image.open(images[0]).size
    assert min_scores == [0.5]
    printed = [float(line.split()[0]) for line in out.getvalue().splitlines()[1:-1]]  # path, detections, "wrote"
    assert printed == [round(d["score"], 4) for d in report[str(images[0])] if d["score"] >= 0.5]


def test_the_exported_tflite_detector_gives_the_jax_models_boxes_and_scores(detection_run, shared_data, tmp_path):
    """Float TFLite in the real interpreter on BCCD's test photos: every anchor's decoded box within 1e-3 of the
    image size and its scores within 1e-3 times the range of the JAX scores (more than 0.1 with the release's prior
    1/2); after NMS (`nms.select`, the caller's step) the same top detections. The int8 model: scores within one
    quantisation step on average, spread over at least half the JAX range, and the JAX model's 10 best (anchor,
    class) scores among its 20 best."""
    from ai_edge_litert.interpreter import Interpreter

    from mnv2_jax import inference
    from mnv2_jax.data import preprocessing
    from mnv2_jax.detection import nms
    from mnv2_jax.export import routes

    workdir, _ = detection_run
    config, model, variables = inference.load_model(str(workdir))
    task = tasks.get(config)
    expected_fn = jax.jit(tasks.get(config).export_function(model))
    ids = (shared_data / "bccd" / "BCCD" / "ImageSets" / "Main" / "test.txt").read_text().split()[:4]
    photos = [shared_data / "bccd" / "BCCD" / "JPEGImages" / f"{i}.jpg" for i in ids]
    images = [
        preprocessing.normalize(preprocessing.load_image(str(p), config.resolution), config.model.preprocessing)
        for p in photos
    ]
    outputs = {}
    for fmt in ("tflite", "tflite-int8"):
        out = tmp_path / f"detector-{fmt}.tflite"
        status, err = run_mnv2("export", "--workdir", workdir, "--format", fmt, "--out", out)
        assert status == 0, err[-3000:]
        with open(routes.metadata_path(str(out))) as f:
            metadata = json.load(f)
        interpreter = Interpreter(model_path=str(out))
        interpreter.allocate_tensors()
        (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
        results = []
        for image in images:
            x = image[None].astype(np.float32)
            if fmt == "tflite-int8":
                scale, zero = given["quantization"]
                x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
            interpreter.set_tensor(given["index"], x)
            interpreter.invoke()
            y = interpreter.get_tensor(taken["index"])[0].astype(np.float32)
            if fmt == "tflite-int8":
                scale, zero = taken["quantization"]
                y = (y - zero) * scale
            results.append(y)
        outputs[fmt] = (np.stack(results), metadata)
    expected = np.asarray(expected_fn(variables, np.stack(images).astype(np.float32)))
    scores = expected[..., 4:].reshape(len(images), -1)  # per image, every (anchor, class)
    assert np.ptp(scores) > 0.1
    score_tolerance = 1e-3 * np.ptp(scores)
    got, metadata = outputs["tflite"]
    assert metadata["output"]["shape"] == [1, len(task.anchors(config.resolution)), 4 + len(CLASSES)]
    np.testing.assert_allclose(got[..., :4], expected[..., :4], atol=1e-3)
    np.testing.assert_allclose(got[..., 4:], expected[..., 4:], atol=score_tolerance)
    for image_output, image in zip(got, images, strict=True):
        selected = nms.select(image_output, task.nms_spec)
        reference = jax.device_get(task.detect(model.apply(variables, image[None])[0], config.resolution))
        top = 10
        np.testing.assert_array_equal(selected["classes"][:top], reference["classes"][0][:top])
        np.testing.assert_allclose(selected["scores"][:top], reference["scores"][0][:top], atol=score_tolerance)
        np.testing.assert_allclose(selected["boxes"][:top], reference["boxes"][0][:top], atol=1e-3)
    quantised, metadata = outputs["tflite-int8"]
    quantised_scores = quantised[..., 4:].reshape(len(images), -1)
    assert np.abs(quantised_scores - scores).mean() < metadata["quantization"]["output"]["scale"]
    for image_scores, image_quantised in zip(scores, quantised_scores, strict=True):
        assert np.ptp(image_quantised) > np.ptp(image_scores) / 2
        best = np.argsort(-image_scores)[:10]
        assert image_quantised[best].min() >= np.sort(image_quantised)[-20]  # among the 20 best, ties included


def test_eval_command_on_another_split_writes_its_own_metrics(detection_run):
    workdir, _ = detection_run
    status, err = run_mnv2("eval", "--workdir", workdir, "--config.eval_split=train")
    assert status == 0, err[-3000:]
    other = [r for r in run_files.read_metrics(str(workdir)) if "eval_train/mAP" in r]
    assert len(other) == 1 and other[0]["step"] == 6 and other[0]["eval_train/count"] == 16
    assert 0 < other[0]["eval_train/mAP"] <= other[0]["eval_train/mAP50"] <= 1
