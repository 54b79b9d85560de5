"""Segmentation on the shared trainer: VOC-layout data (palette masks read as class ids), mIoU over every labelled
pixel on any device count, the best checkpoint by mIoU, exact resume, and the backbone taken from a classifier."""

import json

import jax
import numpy as np
import pytest
from PIL import Image
from train_helpers import assert_resume_is_exact, run_mnv2, small_task_run_args

from mnv2_jax import tasks
from mnv2_jax.data import voc
from mnv2_jax.tasks.segmentation import IGNORE_LABEL
from mnv2_jax.training import checkpoint, run_files, train, transfer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("segmentation_run")]

CLASSES = ("sky", "road", "car")
SIZES = [(30, 40), (36, 28), (24, 24)]  # height, width: each image is evaluated at its own size
COLOURS = np.array([[200, 60, 30], [40, 180, 70], [20, 50, 210]])


def write_voc_folder(root, splits=(("train", 16), ("val", 5))) -> str:
    """Photos whose colour follows the class (plus noise) and masks with an ignored top band; every other mask is
    a palette PNG whose colours are not its indices."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, 768).astype(np.uint8)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in splits:
        ids = [f"{split}_{i:03d}" for i in range(count)]
        for i, example_id in enumerate(ids):
            height, width = SIZES[i % len(SIZES)]
            mask = np.broadcast_to((np.arange(width) * 3 // width)[None], (height, width)).astype(np.uint8)
            mask = np.roll(mask, i, axis=1).copy()
            image = np.clip(COLOURS[mask] + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
            mask[: 2 + i % 3] = IGNORE_LABEL
            Image.fromarray(image).save(root / "JPEGImages" / f"{example_id}.jpg", quality=95)
            png = Image.fromarray(mask, mode="L")
            if i % 2:
                png = Image.fromarray(mask, mode="P")
                png.putpalette(palette.tolist())
            png.save(root / "SegmentationClass" / f"{example_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return f"voc:{root}"


def labelled_pixels(root, split) -> int:
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    masks = [np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids]
    return sum(int(np.sum(mask != IGNORE_LABEL)) for mask in masks)


def segmentation_args(dataset, **overrides) -> list[str]:
    """The small task run (`train_helpers.SMALL_TASK_RUN`) on crops of 33x33, evaluated at 49x49."""
    fields = {
        "resolution": 33,
        "eval_resolution": 49,
        "model.num_classes": len(CLASSES),
        "data.class_names": CLASSES,
        "segmentation.feature_endpoint": "layer_9",  # the shallow network's 320-channel map
        "segmentation.head_features": 16,
        **overrides,
    }
    return small_task_run_args("configs/deeplab_camvid.py:width=0.35", dataset, **fields)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc_folder(root)
    return root


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory, voc_root):
    """A classifier of the same backbone (5 classes), written as `mnv2 import` writes one."""
    from configs_loader import load

    from mnv2_jax.weights.pretrained import write_workdir

    config = load(*segmentation_args(f"voc:{voc_root}", **{"model.num_classes": 5})[1:])
    config.task = "classification"
    model = tasks.get(config).build_model()
    variables = jax.jit(model.init)(jax.random.key(7), np.zeros((1, 33, 33, 3), np.float32))
    workdir = tmp_path_factory.mktemp("classifier") / "workdir"
    write_workdir(str(workdir), variables, config)
    return workdir, variables


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory, voc_root, classifier_workdir):
    """`mnv2 train` of the segmenter on 8 devices, its backbone from `classifier_workdir`."""
    workdir = tmp_path_factory.mktemp("segmentation") / "workdir"
    args = segmentation_args(f"voc:{voc_root}", init_from=classifier_workdir[0])
    status, err = run_mnv2("train", "--workdir", workdir, *args)
    assert status == 0, err[-3000:]
    return workdir, err


def test_training_logs_pixel_metrics_and_evaluates_every_labelled_pixel_once(segmentation_run, voc_root):
    workdir, _ = segmentation_run
    records = run_files.read_metrics(str(workdir))
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert {"train/loss", "train/pixel_accuracy", "train/lr", "train/grad_norm"} <= train_records[0].keys()
    evals = [r for r in records if "eval/mIoU" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval/count"] == 5 for r in evals)
    assert all(r["eval/pixels"] == labelled_pixels(voc_root, "val") for r in evals)
    assert {f"eval/iou/{name}" for name in CLASSES} <= evals[-1].keys()
    assert 0 <= evals[-1]["eval/mIoU"] <= 1 and 0 <= evals[-1]["eval/pixel_accuracy"] <= 1


def test_the_best_checkpoint_is_kept_by_miou(segmentation_run, tmp_path):
    """The trainer's checkpoint manager for the run's task: the last `keep_checkpoints` and the best by mIoU (not
    by a key only classification has)."""
    _, config = checkpoint.restore_config(str(segmentation_run[0]))
    config.keep_checkpoints = 1
    mngr = train.checkpoint_manager(str(tmp_path), config, tasks.get(config).best_metric)
    for step, miou in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)]:
        metrics = {"eval/mIoU": miou, "eval/pixel_accuracy": 1 - miou}
        checkpoint.save(mngr, step, {"params": {"w": np.full(2, step)}}, config, metrics=metrics, force=True)
    mngr.wait_until_finished()
    assert set(mngr.all_steps()) == {2, 4}
    mngr.close()


def test_init_from_loads_the_backbone_and_says_what_it_loaded(segmentation_run, classifier_workdir):
    _, err = segmentation_run
    source, variables = classifier_workdir
    backbone = {f"{c}/{n}" for c in transfer.COLLECTIONS for n in checkpoint.leaves_by_name(variables[c])}
    backbone = {n for n in backbone if n.split("/")[1] not in ("Conv_1", "Logits")}  # layer_10 and the classifier
    line = next(line for line in err.splitlines() if "initialised params" in line)
    assert f"initialised params and batch statistics from {source} (step 0): loaded {len(backbone)} tensors" in line
    assert "image_pooling (" in line.split("; initialised")[1]  # the head is new
    assert line.endswith("left out 7 of the source's: Conv_1 (5), Logits (2)")


def test_eval_on_any_device_count_counts_the_same_pixels(segmentation_run, voc_root):
    workdir, _ = segmentation_run
    reference = [r for r in run_files.read_metrics(str(workdir)) if "eval/mIoU" in r][-1]
    for devices, batch in ((1, 8), (3, 6)):
        overrides = {"eval_batch_size": batch}
        _, results = train.evaluate_checkpoint(str(workdir), devices=jax.devices()[:devices], overrides=overrides)
        assert results["eval/pixels"] == reference["eval/pixels"] and results["eval/count"] == 5
        assert results["eval/mIoU"] == pytest.approx(reference["eval/mIoU"], abs=1e-9)


def test_resume_ends_bitwise_equal_to_the_uninterrupted_run(segmentation_run, voc_root, classifier_workdir, tmp_path):
    args = segmentation_args(f"voc:{voc_root}", init_from=classifier_workdir[0])
    assert_resume_is_exact(args, tmp_path / "resumed", segmentation_run[0])


def test_palette_masks_are_read_as_class_ids(tmp_path):
    mask = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    png = Image.fromarray(mask, mode="P")
    png.putpalette([(i * 37) % 256 for i in range(768)])
    png.save(tmp_path / "mask.png")
    decoded = voc.decode_mask((tmp_path / "mask.png").read_bytes()).numpy()
    np.testing.assert_array_equal(decoded, mask)


def test_transfer_matches_by_name_and_shape_and_names_a_mismatch():
    ours = {"params": {"Conv": {"kernel": np.zeros((3, 3))}, "head": {"bias": np.zeros(2)}}, "batch_stats": {}}
    theirs = {"params": {"Conv": {"kernel": np.ones((3, 3))}, "Logits": {"bias": np.ones(5)}}, "batch_stats": {}}
    variables, report = transfer.match(ours, theirs)
    np.testing.assert_array_equal(variables["params"]["Conv"]["kernel"], np.ones((3, 3)))
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], np.zeros(2))
    assert report.loaded == ("params/Conv/kernel",) and report.new == ("params/head/bias",)
    assert report.left_out == ("params/Logits/bias",)
    theirs["params"]["Conv"]["kernel"] = np.ones((3, 4))
    with pytest.raises(transfer.TransferError, match=r"params/Conv/kernel: source \(3, 4\) vs model \(3, 3\)"):
        transfer.match(ours, theirs)
    with pytest.raises(transfer.TransferError, match="no tensor of the source"):
        transfer.match(ours, {"params": {"Other": {"kernel": np.ones(1)}}, "batch_stats": {}})


def test_config_json_names_the_task(segmentation_run):
    saved = json.loads((segmentation_run[0] / "config.json").read_text())
    assert saved["task"] == "segmentation" and saved["model"]["num_classes"] == len(CLASSES)


def test_eval_command_on_another_split_writes_its_own_metrics(segmentation_run, voc_root):
    workdir, _ = segmentation_run
    status, err = run_mnv2("eval", "--workdir", workdir, "--config.eval_split=train")
    assert status == 0, err[-3000:]
    other = [r for r in run_files.read_metrics(str(workdir)) if "eval_train/mIoU" in r]
    assert len(other) == 1 and other[0]["step"] == 6 and other[0]["eval_train/count"] == 16
    assert other[0]["eval_train/pixels"] == labelled_pixels(voc_root, "train")
    status, err = run_mnv2("eval", "--workdir", workdir, "--config.eval_split=test")
    assert status == 2 and "eval_split='test' is not a split of" in err


def test_multi_scale_flipped_eval_counts_the_same_pixels_under_its_own_name(segmentation_run):
    workdir, _ = segmentation_run
    args = ["--config.segmentation.eval_scales=0.75,1.25", "--config.segmentation.eval_flip"]
    status, err = run_mnv2("eval", "--workdir", workdir, *args)
    assert status == 0, err[-3000:]
    records = run_files.read_metrics(str(workdir))
    single = [r for r in records if "eval/mIoU" in r][-1]
    multi = [r for r in records if "eval_multiscale_flip/mIoU" in r]
    assert len(multi) == 1 and multi[0]["eval_multiscale_flip/pixels"] == single["eval/pixels"]
    assert 0 <= multi[0]["eval_multiscale_flip/mIoU"] <= 1
    status, err = run_mnv2("eval", "--workdir", workdir, "--config.segmentation.eval_scales=0.5,big")
    assert status == 2 and "--config.segmentation.eval_scales must be comma-separated numbers" in err


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_reports_a_segmenters_throughput_and_flops(mnv2, voc_root, mode):
    args = segmentation_args(f"voc:{voc_root}")
    status, out, err = mnv2("bench", *args, f"--mode={mode}", "--steps=2", "--pipeline_steps=2", "--json")
    assert status == 0, err[-3000:]
    result = json.loads(out)
    assert result["mode"] == mode and result["batch"] == 8 and result["images_per_s"] > 0
    # XLA's count against our own count of the model's multiply-adds (forward: 2 FLOPs each)
    from configs_loader import load

    from mnv2_jax.models import complexity

    config = load(*args[1:])
    macs = complexity.summarize(tasks.get(config).build_model(), config.resolution)["macs"]
    if mode == "infer":
        assert result["flops_per_image"] == pytest.approx(2 * macs, rel=0.15)
    else:
        assert result["flops_per_image"] > 2 * 2 * macs  # forward and backward
