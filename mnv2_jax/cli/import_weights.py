"""`mnv2 import`: weights from another framework, or published weights by name, -> a workdir checkpoint.

mnv2 import NAME --workdir DIR                   a registry name or `hf-hub:<repo>`; the config is derived
mnv2 import --from FORMAT FILE --config CONFIG --workdir DIR
mnv2 import --list                               the names, their sizes and published accuracy
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import flags

from mnv2_jax import tasks
from mnv2_jax.cli import common
from mnv2_jax.convert.importers import FORMATS, import_variables
from mnv2_jax.weights import download, pretrained, registry


def _size(entry: registry.Weights, counted: dict) -> str:
    """Parameters of the entry's model; models that differ only in resolution are counted once."""
    if entry.fmt == "hf-hub":
        return ""
    config = entry.config()
    key = (entry.task, config.model.width, config.model.num_classes, config.model.divisible_by)
    if key not in counted:
        model = tasks.get(config).build_model()
        shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
        counted[key] = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
    return f"{counted[key] / 1e6:.2f}M"


def listing() -> str:
    """One line per registry name: its model's parameters, where its checksum comes from, published accuracy."""
    rows = [f"{'name':<44} {'task':<14} {'params':>7}  {'checksum':<26} published", "-" * 120]
    counted: dict = {}
    for entry in registry.REGISTRY.values():
        params = _size(entry, counted)
        cached = "" if entry.fmt == "hf-hub" or not download.cached_path(entry.url).exists() else " (cached)"
        rows.append(f"{entry.name:<44} {entry.task:<14} {params:>7}  {entry.checksum:<26} {entry.metric}{cached}")
    rows.append(f"cache: {download.cache_dir()} (MNV2_CACHE); also any hf-hub:<repo> of a timm MobileNetV2")
    return "\n".join(rows)


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_enum("from", None, FORMATS, "format of the file to import (not with a weights name)", flag_values=fv)
    flags.DEFINE_string("workdir", None, "directory to write the checkpoint into", flag_values=fv)
    flags.DEFINE_bool("list", False, "print the weights names and exit", flag_values=fv)
    paths = common.parse(fv, argv)
    if fv.list:
        print(listing())
        return
    usage = (
        f"usage: {argv[0]} NAME --workdir DIR | {argv[0]} --from {{{','.join(FORMATS)}}} FILE --config CONFIG "
        f"--workdir DIR | {argv[0]} --list"
    )
    if fv.workdir is None or len(paths) != 1:
        raise common.UsageError(usage)
    if fv["from"].value is None:
        if config_flag.value is not None:
            raise common.UsageError(f"{paths[0]} derives its config; --config goes with --from FORMAT FILE")
        variables, config = pretrained.load(paths[0])
    else:
        config = common.load_config(config_flag)
        variables = import_variables(fv["from"].value, paths[0], config)
    where = pretrained.write_workdir(fv.workdir, variables, config)
    print(f"imported {paths[0]} -> {where} (step 0)")
