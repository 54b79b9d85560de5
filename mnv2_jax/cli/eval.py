"""`mnv2 eval --workdir DIR [--checkpoint STEP] [--config.dataset=... --config.eval_split=...]`: evaluate a
checkpoint on its config's full eval split, or on another dataset or split (e.g. choose on val, report on test)."""

from __future__ import annotations

import os
import re

from absl import flags

from mnv2_jax.cli import common

# The fields of the saved config an evaluation may change: where the data comes from and how it is batched, and
# a segmenter's multi-scale inference.
DATA_FIELDS = {"dataset": str, "eval_split": str, "data_dir": str, "eval_batch_size": int, "eval_resolution": int}
SCALES, FLIP = "segmentation.eval_scales", "segmentation.eval_flip"


def metrics_prefix(overrides: dict) -> str:
    """`eval` for the run's own eval split; `eval_<dataset>_<split>` for another, with `_multiscale` and `_flip`
    for a segmenter's multi-scale inference, so that they never mix."""
    segmentation = overrides.get("segmentation", {})
    dataset = os.path.basename(str(overrides.get("dataset", "")).rstrip("/").split(":")[-1])
    parts = [dataset, str(overrides.get("eval_split", ""))]
    parts += ["multiscale" if tuple(segmentation.get("eval_scales", (1.0,))) != (1.0,) else ""]
    parts += ["flip" if segmentation.get("eval_flip") else ""]
    name = "_".join(filter(None, parts))
    return "eval_" + re.sub(r"[^A-Za-z0-9_]+", "_", name) if name else "eval"


def inference_overrides(fv: flags.FlagValues) -> dict:
    """`segmentation.eval_scales` and `eval_flip` from the command line, as a nested config update."""
    overrides = {}
    if fv[f"config.{SCALES}"].value is not None:
        try:
            overrides["eval_scales"] = tuple(float(scale) for scale in fv[f"config.{SCALES}"].value)
        except ValueError:
            raise common.UsageError(
                f"--config.{SCALES} must be comma-separated numbers, got {','.join(fv[f'config.{SCALES}'].value)!r}"
            ) from None
    if fv[f"config.{FLIP}"].value is not None:
        overrides["eval_flip"] = fv[f"config.{FLIP}"].value
    return {"segmentation": overrides} if overrides else {}


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoints", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    for field, kind in DATA_FIELDS.items():
        define = flags.DEFINE_integer if kind is int else flags.DEFINE_string
        define(f"config.{field}", None, f"evaluate with this {field} instead of the run's", flag_values=fv)
    flags.DEFINE_list(f"config.{SCALES}", None, "segmenters: average over these scales, e.g. 0.5,1,1.5", flag_values=fv)
    flags.DEFINE_boolean(f"config.{FLIP}", None, "segmenters: average in the mirrored inputs too", flag_values=fv)
    common.parse(fv, argv)
    if fv.workdir is None:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--checkpoint STEP] [--config.dataset=...]")
    overrides = {field: fv[f"config.{field}"].value for field in DATA_FIELDS if fv[f"config.{field}"].value is not None}
    overrides.update(inference_overrides(fv))
    common.setup_logging()
    from mnv2_jax.training import distributed, train

    distributed.maybe_initialize()
    step, results = train.evaluate_checkpoint(fv.workdir, fv.checkpoint, overrides=overrides)
    prefix = metrics_prefix(overrides)
    results = {prefix + key[len("eval") :]: value for key, value in results.items()}
    train.write_eval(fv.workdir, step, results)
    print(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
