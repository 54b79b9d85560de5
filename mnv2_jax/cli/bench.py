"""`mnv2 bench --config CONFIG [--mode train|infer] [--batch B] [--steps N] [--warmup N] [--pipeline_steps N]
[--json]`."""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from mnv2_jax.cli import common


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_enum("mode", "train", ["train", "infer"], "the compiled step to time", flag_values=fv)
    flags.DEFINE_integer("batch", None, "global batch (default: the config's batch_size)", flag_values=fv)
    flags.DEFINE_integer("steps", 20, "timed steps after warm-up (0: compile and analyse only)", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed steps first", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "the hardware's peak TFLOP/s, to report MFU against", flag_values=fv)
    flags.DEFINE_bool("json", False, "print JSON", flag_values=fv)
    flags.DEFINE_integer(
        "pipeline_steps",
        0,
        "also time this many batches of the training input pipeline alone (the config's "
        "dataset) and report whether training is input-bound",
        flag_values=fv,
    )
    common.parse(fv, argv)
    config = common.load_config(config_flag)
    from mnv2_jax import bench
    from mnv2_jax.training import distributed

    distributed.maybe_initialize()
    result = bench.run(
        config, fv.mode, fv.batch, fv.steps, fv.warmup, peak_tflops=fv.peak_tflops, pipeline_steps=fv.pipeline_steps
    )
    print(json.dumps(dataclasses.asdict(result), indent=2) if fv.json else bench.format_result(result))
