"""`mnv2 train --config CONFIG[:ARGS] --workdir DIR [--config.FIELD=VALUE ...]`.

Resumes automatically from the workdir's latest checkpoint. Several processes
(see `launch/`) run the same command.
"""

from __future__ import annotations

from absl import flags, logging

from mnv2_jax.cli import common


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and TensorBoard logs", flag_values=fv)
    common.parse(fv, argv)
    if fv.workdir is None:
        raise common.UsageError(f"usage: {argv[0]} --config CONFIG --workdir DIR")
    config = common.load_config(config_flag)
    common.setup_logging()
    from mnv2_jax.training import distributed, train

    distributed.maybe_initialize()
    results = train.train_and_evaluate(config, fv.workdir)
    logging.info("final evaluation: %s", results)
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()))
