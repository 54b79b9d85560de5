"""`mnv2 predict --workdir DIR [--labels FILE] IMAGE...`: top-k classes per image (classification), per-pixel
classes written as PNGs under `--out DIR` with each class's share of the image (segmentation), or boxes with their
labels and scores (detection: drawn on PNGs under `--out DIR`, printed as JSON with `--json`)."""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from mnv2_jax import inference, tasks
from mnv2_jax.cli import common
from mnv2_jax.data import preprocessing
from mnv2_jax.training import checkpoint


def colour_map(num_classes: int) -> np.ndarray:
    """PASCAL VOC's colours for class ids (bit-interleaved), (num_classes, 3) uint8."""
    colours = np.zeros((max(num_classes, 256), 3), np.uint8)
    for index in range(len(colours)):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def write_segmentation(out: str, path: str, pixels: np.ndarray, classes: np.ndarray) -> list[str]:
    """`<stem>_classes.png` (class ids), `<stem>_mask.png` (colours) and `<stem>_overlay.png` under `out`."""
    stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])
    colours = colour_map(int(classes.max()) + 1)[classes]
    overlay = (0.5 * pixels + 0.5 * colours).round().astype(np.uint8)
    files = {f"{stem}_classes.png": classes, f"{stem}_mask.png": colours, f"{stem}_overlay.png": overlay}
    for name, array in files.items():
        Image.fromarray(array).save(name)
    return list(files)


def write_detections(out: str, path: str, pixels: np.ndarray, detections: list[dict], num_classes: int) -> str:
    """`<stem>_detections.png` under `out`: the image with each box, its label and score, in its class's colour."""
    picture = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    colours = colour_map(num_classes + 1)[1:]  # VOC's colours, without the background's black
    for found in detections:
        colour = tuple(int(c) for c in colours[found["class_id"]])
        draw.rectangle(found["box"], outline=colour, width=2)
        draw.text((found["box"][0] + 3, found["box"][1] + 2), f"{found['label']} {found['score']:.2f}", fill=colour)
    name = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + "_detections.png")
    picture.save(name)
    return name


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoint", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_string("labels", None, "class names, one per line, in class-index order", flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "classification: classes to print per image", flag_values=fv)
    flags.DEFINE_string("out", None, "segmentation, detection: directory for the PNGs of each image", flag_values=fv)
    flags.DEFINE_bool("json", False, "detection: print each image's detections as JSON", flag_values=fv)
    flags.DEFINE_float("min_score", 0.5, "detection: the lowest score shown", flag_values=fv)
    images = common.parse(fv, argv)
    if fv.workdir is None or not images:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--labels FILE] [--out DIR] IMAGE...")
    labels = inference.read_labels(fv.labels) if fv.labels else None
    _, config = checkpoint.restore_config(fv.workdir, fv.checkpoint)
    if config.task == "segmentation":
        if fv.out is None:
            raise common.UsageError("segmentation checkpoints need --out DIR for the predicted PNGs")
        return _segment(fv, images, labels)
    if config.task == "detection":
        if fv.out is None and not fv.json:
            raise common.UsageError("detection checkpoints need --out DIR for the drawn PNGs, or --json")
        return _detect(fv, images, labels)
    config, model, variables = inference.load_classifier(fv.workdir, fv.checkpoint)
    pixels = np.stack([preprocessing.load_image(path, config.resolution) for path in images])
    probabilities = inference.classify(model, variables, pixels, config.model.preprocessing)
    for path, probs in zip(images, probabilities, strict=True):
        print(path)
        for index, name, p in inference.top_k(probs, fv.top_k, labels):
            print(f"  {p:.4f}  {index:>5}  {name}")


def _segment(fv, paths: list[str], labels: list[str] | None) -> None:
    config, model, variables = inference.load_model(fv.workdir, fv.checkpoint, ("segmentation",))
    names = labels or list(config.data.class_names or ()) or [str(i) for i in range(config.model.num_classes)]
    os.makedirs(fv.out, exist_ok=True)
    images = [preprocessing.load_image_as_is(path) for path in paths]
    size = config.eval_resolution or config.resolution
    all_classes = inference.segment(model, variables, images, size, config.model.preprocessing)
    for path, pixels, classes in zip(paths, images, all_classes, strict=True):
        written = write_segmentation(fv.out, path, pixels, classes)
        print(path)
        counts = np.bincount(classes.ravel(), minlength=config.model.num_classes)
        for index in np.argsort(-counts, kind="stable"):
            if counts[index]:
                name = names[index] if index < len(names) else str(index)
                print(f"  {counts[index] / classes.size:.4f}  {index:>5}  {name}")
        print("  wrote " + ", ".join(written))


def _detect(fv, paths: list[str], labels: list[str] | None) -> None:
    config, model, variables = inference.load_model(fv.workdir, fv.checkpoint, ("detection",))
    if labels:
        config.data.class_names = tuple(labels)
    task = tasks.get(config)
    images = [preprocessing.load_image_as_is(path) for path in paths]
    all_detections = inference.detect(task, model, variables, images, fv.min_score)
    if fv.out:
        os.makedirs(fv.out, exist_ok=True)
    report = {}
    for path, pixels, detections in zip(paths, images, all_detections, strict=True):
        report[path] = detections
        written = write_detections(fv.out, path, pixels, detections, config.model.num_classes) if fv.out else None
        if fv.json:
            continue
        print(path)
        for found in detections:
            box = ", ".join(f"{v:.1f}" for v in found["box"])
            print(f"  {found['score']:.4f}  {found['class_id']:>5}  {found['label']}  [{box}]")
        print(f"  wrote {written}")
    if fv.json:
        print(json.dumps(report, indent=2))
