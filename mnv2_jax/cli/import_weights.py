"""`mnv2 import --from FORMAT PATH --config CONFIG --workdir DIR`: weights from another framework -> checkpoint."""

from __future__ import annotations

import os

from absl import flags

from mnv2_jax import config as config_lib
from mnv2_jax.cli import common
from mnv2_jax.convert.importers import FORMATS, import_variables
from mnv2_jax.training import checkpoint, run_files


def write_workdir(workdir: str, variables: dict, config) -> str:
    """Saves `variables` as step 0 of an empty workdir, with `config.json` beside it."""
    if checkpoint.latest_step(workdir) is not None:
        raise common.UsageError(
            f"{checkpoint.checkpoint_dir(workdir)} already holds checkpoints; use an empty --workdir"
        )
    os.makedirs(workdir, exist_ok=True)
    with checkpoint.manager(workdir) as mngr:
        checkpoint.save(mngr, 0, variables, config)
        mngr.wait_until_finished()
    run_files.write_json(os.path.join(workdir, run_files.CONFIG_FILE), config_lib.to_dict(config), indent=2)
    return checkpoint.checkpoint_dir(workdir)


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_enum("from", None, FORMATS, "format of the file to import", flag_values=fv)
    flags.DEFINE_string("workdir", None, "directory to write the checkpoint into", flag_values=fv)
    paths = common.parse(fv, argv)
    if fv["from"].value is None or fv.workdir is None or len(paths) != 1:
        raise common.UsageError(f"usage: {argv[0]} --from {{{','.join(FORMATS)}}} PATH --config CONFIG --workdir DIR")
    config = common.load_config(config_flag)
    variables = import_variables(fv["from"].value, paths[0], config)
    where = write_workdir(fv.workdir, variables, config)
    print(f"imported {paths[0]} -> {where} (step 0)")
