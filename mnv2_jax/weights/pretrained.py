"""Weights by name -> variables and config (`mnv2 import NAME`, `--config.init_from=NAME`).

    load("mobilenet_v2_1.0_224")                 registry names (`mnv2 import --list`)
    load("hf-hub:timm/mobilenetv2_100.ra_in1k")  Hugging Face Hub repositories, or a folder written by
                                                 `mnv2 export --format hf-hub`

Files are downloaded once into the cache and verified there (`mnv2_jax.weights.download`); the conversion runs in
each process that loads them (seconds, no compile).
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
import tempfile
from typing import Any

import ml_collections

from mnv2_jax import config as config_lib
from mnv2_jax.convert.importers import import_variables
from mnv2_jax.errors import UserError
from mnv2_jax.training import checkpoint, run_files
from mnv2_jax.weights import download, registry


def write_workdir(workdir: str, variables: dict, config: ml_collections.ConfigDict) -> str:
    """Saves `variables` as step 0 of an empty workdir, with `config.json` beside it."""
    if checkpoint.latest_step(workdir) is not None:
        raise UserError(f"{checkpoint.checkpoint_dir(workdir)} already holds checkpoints; use an empty --workdir")
    os.makedirs(workdir, exist_ok=True)
    with checkpoint.manager(workdir) as mngr:
        checkpoint.save(mngr, 0, variables, config)
        mngr.wait_until_finished()
    run_files.write_json(os.path.join(workdir, run_files.CONFIG_FILE), config_lib.to_dict(config), indent=2)
    return checkpoint.checkpoint_dir(workdir)


def tflite_in_archive(archive: str) -> str:
    """The one `.tflite` model of a release `.tgz`, extracted beside it (once per archive content)."""
    target = f"{archive}.{download.sha256_of(archive)[:16]}.tflite"
    if os.path.isfile(target):
        return target
    with tarfile.open(archive) as tar:
        models = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".tflite")]
        if len(models) != 1:
            found = ", ".join(m.name for m in models) or "none"
            raise UserError(f"{archive}: expected one .tflite model in the archive, found {found}")
        source = tar.extractfile(models[0])
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(archive), delete=False) as out:
            shutil.copyfileobj(source, out)
    os.replace(out.name, target)
    return target


@functools.lru_cache(maxsize=1)  # `mnv2 train` checks the name before compiling, then loads it
def load(name: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """The variables (`{'params', 'batch_stats'}`) and config of the weights `name`, downloaded when needed."""
    from mnv2_jax.weights import hf_hub

    if name.startswith(registry.HF_HUB_PREFIX):
        return hf_hub.load_variables(name)
    entry = registry.get(name)
    if entry.fmt == "hf-hub":
        return hf_hub.load_variables(entry.url)
    config = entry.config()
    path = download.fetch(entry.url, entry.sha256)
    fmt = entry.fmt
    if fmt == registry.ARCHIVE_FORMAT:
        path, fmt = tflite_in_archive(path), "tflite"
    return import_variables(fmt, path, config), config
