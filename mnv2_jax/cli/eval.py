"""`mnv2 eval --workdir DIR [--checkpoint STEP]`: evaluate a checkpoint on its config's full eval split."""

from __future__ import annotations

from absl import flags

from mnv2_jax.cli import common


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoints", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    common.parse(fv, argv)
    if fv.workdir is None:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--checkpoint STEP]")
    common.setup_logging()
    from mnv2_jax.training import distributed, train

    distributed.maybe_initialize()
    step, results = train.evaluate_checkpoint(fv.workdir, fv.checkpoint)
    train.write_eval(fv.workdir, step, results)
    print(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
