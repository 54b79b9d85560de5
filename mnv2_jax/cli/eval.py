"""`mnv2 eval --workdir DIR [--checkpoint STEP] [--config.dataset=... --config.eval_split=...]`: evaluate a
checkpoint on its config's full eval split, or on another dataset or split (e.g. choose on val, report on test)."""

from __future__ import annotations

import os
import re

from absl import flags

from mnv2_jax import tasks
from mnv2_jax.cli import common

# The fields of the saved config an evaluation may change: where the data comes from and how it is batched; each
# task adds its own inference fields (`Task.eval_overrides`, e.g. a segmenter's multi-scale inference).
DATA_FIELDS = {"dataset": str, "eval_split": str, "data_dir": str, "eval_batch_size": int, "eval_resolution": int}


def inference_fields() -> dict[str, tuple[str, str]]:
    """Every registered task's `eval_overrides`: dotted field -> (kind, help)."""
    return {field: (kind, text) for name in tasks.names() for field, kind, text in tasks.task_type(name).eval_overrides}


def metrics_prefix(overrides: dict, task: tasks.Task) -> str:
    """`eval` for the run's own eval split; `eval_<dataset>_<split>` for another, with the task's words for changed
    inference (a segmenter's `_multiscale`, `_flip`), so that they never mix."""
    dataset = os.path.basename(str(overrides.get("dataset", "")).rstrip("/").split(":")[-1])
    parts = [dataset, str(overrides.get("eval_split", ""))]
    parts += task.eval_tags(overrides)
    name = "_".join(filter(None, parts))
    return "eval_" + re.sub(r"[^A-Za-z0-9_]+", "_", name) if name else "eval"


def inference_overrides(fv: flags.FlagValues) -> dict:
    """The tasks' inference fields given on the command line, as a nested config update."""
    overrides: dict[str, dict] = {}
    for field, (kind, _) in inference_fields().items():
        value = fv[f"config.{field}"].value
        if value is None:
            continue
        if kind == "floats":
            try:
                value = tuple(float(item) for item in value)
            except ValueError:
                raise common.UsageError(
                    f"--config.{field} must be comma-separated numbers, got {','.join(value)!r}"
                ) from None
        section, name = field.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    return overrides


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoints", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    for field, kind in DATA_FIELDS.items():
        define = flags.DEFINE_integer if kind is int else flags.DEFINE_string
        define(f"config.{field}", None, f"evaluate with this {field} instead of the run's", flag_values=fv)
    for field, (kind, text) in inference_fields().items():
        define = flags.DEFINE_list if kind == "floats" else flags.DEFINE_boolean
        define(f"config.{field}", None, text, flag_values=fv)
    common.parse(fv, argv)
    if fv.workdir is None:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--checkpoint STEP] [--config.dataset=...]")
    overrides = {field: fv[f"config.{field}"].value for field in DATA_FIELDS if fv[f"config.{field}"].value is not None}
    overrides.update(inference_overrides(fv))
    common.setup_logging()
    from mnv2_jax.training import checkpoint, distributed, train

    distributed.maybe_initialize()
    step, results = train.evaluate_checkpoint(fv.workdir, fv.checkpoint, overrides=overrides)
    prefix = metrics_prefix(overrides, tasks.get(checkpoint.restore_config(fv.workdir, step)[1]))
    results = {prefix + key[len("eval") :]: value for key, value in results.items()}
    train.write_eval(fv.workdir, step, results)
    print(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
