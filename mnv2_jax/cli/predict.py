"""`mnv2 predict --workdir DIR [--labels FILE] IMAGE...`: top-k classes per image."""

from __future__ import annotations

import numpy as np
from absl import flags

from mnv2_jax import inference
from mnv2_jax.cli import common
from mnv2_jax.data import preprocessing


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoint", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_string("labels", None, "class names, one per line, in class-index order", flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "classes to print per image", flag_values=fv)
    images = common.parse(fv, argv)
    if fv.workdir is None or not images:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--labels FILE] IMAGE...")
    labels = inference.read_labels(fv.labels) if fv.labels else None
    config, model, variables = inference.load_classifier(fv.workdir, fv.checkpoint)
    pixels = np.stack([preprocessing.load_image(path, config.resolution) for path in images])
    probabilities = inference.classify(model, variables, pixels, config.model.preprocessing)
    for path, probs in zip(images, probabilities, strict=True):
        print(path)
        for index, name, p in inference.top_k(probs, fv.top_k, labels):
            print(f"  {p:.4f}  {index:>5}  {name}")
