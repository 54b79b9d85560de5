"""`mnv2 train --config CONFIG[:ARGS] --workdir DIR [--config.FIELD=VALUE ...]`.

Resumes automatically from the workdir's latest checkpoint. Several processes
(see `launch/`) run the same command.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from mnv2_jax.cli import common


@common.command
def main(argv: list[str]) -> int | None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and TensorBoard logs", flag_values=fv)
    common.parse(fv, argv)
    if fv.workdir is None:
        raise common.UsageError(f"usage: {argv[0]} --config CONFIG --workdir DIR")
    config = common.load_config(config_flag)
    common.setup_logging()
    from mnv2_jax.training import distributed, preemption, train

    distributed.maybe_initialize()
    try:
        results = train.train_and_evaluate(config, fv.workdir)
    except preemption.Preempted as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return preemption.PREEMPTED_EXIT_STATUS
    except distributed.LostProcessError as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr, flush=True)
        # Exit now: JAX's exit-time shutdown would wait at a barrier for the dead process until its heartbeat timeout.
        os._exit(distributed.LOST_PROCESS_EXIT_STATUS)
    logging.info("final evaluation: %s", results)
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()))
