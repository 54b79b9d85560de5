"""`mnv2 eval --workdir DIR [--checkpoint STEP] [--config.dataset=... --config.eval_split=...]`: evaluate a
checkpoint on its config's full eval split, or on another dataset or split (e.g. choose on val, report on test)."""

from __future__ import annotations

import os
import re

from absl import flags

from mnv2_jax.cli import common

# The fields of the saved config an evaluation may change: where the data comes from and how it is batched.
DATA_FIELDS = {"dataset": str, "eval_split": str, "data_dir": str, "eval_batch_size": int, "eval_resolution": int}


def metrics_prefix(overrides: dict) -> str:
    """`eval` for the run's own eval split; `eval_<dataset>_<split>` for another, so the two never mix."""
    if not {"dataset", "eval_split"} & overrides.keys():
        return "eval"
    dataset = os.path.basename(str(overrides.get("dataset", "")).rstrip("/").split(":")[-1])
    name = "_".join(filter(None, (dataset, str(overrides.get("eval_split", "")))))
    return "eval_" + re.sub(r"[^A-Za-z0-9_]+", "_", name)


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoints", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    for field, kind in DATA_FIELDS.items():
        define = flags.DEFINE_integer if kind is int else flags.DEFINE_string
        define(f"config.{field}", None, f"evaluate with this {field} instead of the run's", flag_values=fv)
    common.parse(fv, argv)
    if fv.workdir is None:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--checkpoint STEP] [--config.dataset=...]")
    overrides = {field: fv[f"config.{field}"].value for field in DATA_FIELDS if fv[f"config.{field}"].value is not None}
    common.setup_logging()
    from mnv2_jax.training import distributed, train

    distributed.maybe_initialize()
    step, results = train.evaluate_checkpoint(fv.workdir, fv.checkpoint, overrides=overrides)
    prefix = metrics_prefix(overrides)
    results = {prefix + key[len("eval") :]: value for key, value in results.items()}
    train.write_eval(fv.workdir, step, results)
    print(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
