"""`mnv2 predict --workdir DIR [--labels FILE] IMAGE...`: what the checkpoint's task makes of each image: top-k
classes (classification), per-pixel classes written as PNGs under `--out DIR` with each class's share of the image
(segmentation), or boxes with their labels and scores (detection: drawn on PNGs under `--out DIR`, printed as JSON
with `--json`)."""

from __future__ import annotations

from absl import flags

from mnv2_jax import inference, tasks
from mnv2_jax.cli import common
from mnv2_jax.training import checkpoint


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
    options = tasks.PredictOptions(labels, fv.top_k, fv.out, fv.json, fv.min_score)
    _, config = checkpoint.restore_config(fv.workdir, fv.checkpoint)
    tasks.get(config).check_predict(options)
    config, model, variables = inference.load_model(fv.workdir, fv.checkpoint)
    tasks.get(config).predict(model, variables, images, options)
