"""`hf-hub:` names: MobileNetV2 weights in a Hugging Face Hub repository, or in a local folder laid out like one.

    hf-hub:timm/mobilenetv2_100.ra_in1k     timm's repos (config.json with `architecture`, model.safetensors)
    hf-hub:USER/REPO@REVISION               a folder `mnv2 export --format hf-hub` wrote, uploaded (`mnv2_jax` key)
    hf-hub:/path/to/folder                  the same files in a local folder (an existing directory wins)

Files come through `huggingface_hub.hf_hub_download`, so its cache and settings apply (`HF_HUB_CACHE`/`HF_HOME`,
`HF_HUB_OFFLINE=1`, `HF_TOKEN`); a failure is one line naming the repository and what to do offline.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from mnv2_jax import config as config_lib
from mnv2_jax import tasks
from mnv2_jax.convert import ConversionError, pytorch
from mnv2_jax.convert.importers import import_variables
from mnv2_jax.convert.layout import listing
from mnv2_jax.export.hf_hub import CONFIG_FILE, LAYOUTS, MEAN_STD, SECTION, WEIGHTS_FILE
from mnv2_jax.models import abstract_variables
from mnv2_jax.weights import download, registry

PREFIX = registry.HF_HUB_PREFIX
FLAX_FORMAT = "mnv2-flax"  # our Flax variables flattened by name (`params/Conv/kernel`), not an importer's format
# timm `model_args` mnv2_jax builds: each with its possible values (None: any; the class count comes from config.json,
# dropout does not change the weights).
_MODEL_ARGS = {
    "num_classes": None,
    "drop_rate": None,
    "drop_path_rate": None,
    "bn_eps": None,
    "pad_type": ("", "same"),
    "in_chans": (3,),
    "global_pool": ("avg",),
}


def resolve(spec: str) -> tuple[str, str, ml_collections.ConfigDict]:
    """`hf-hub:<repo_id>[@revision]` or `hf-hub:<folder>` -> (format for `import_variables`, or `FLAX_FORMAT`; the
    local path of its model.safetensors; the config of its model)."""
    config_path = _fetch(spec, CONFIG_FILE)
    try:
        with open(config_path) as f:
            hub_config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{spec}: {CONFIG_FILE} is not readable JSON ({e})") from None
    fmt, config = _config_of(hub_config, spec)
    return fmt, _fetch(spec, WEIGHTS_FILE), config


def load_variables(spec: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """Our `{'params', 'batch_stats'}` and config for `spec` (see `resolve`), names and shapes checked."""
    fmt, path, config = resolve(spec)
    if fmt == FLAX_FORMAT:
        return read_flax(path, config), config
    return import_variables(fmt, path, config), config


def read_flax(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The variables of a safetensors file of our variables flattened by name, checked against `config`'s model."""
    abstract = abstract_variables(tasks.get(config).build_model(), config.resolution)
    expected = traverse_util.flatten_dict({k: abstract[k] for k in ("params", "batch_stats")}, sep="/")
    tensors = pytorch.load(path)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        problems = [f"missing ({len(missing)}): {listing(missing)}"] * bool(missing)
        problems += [f"unexpected ({len(unexpected)}): {listing(unexpected)}"] * bool(unexpected)
        problems += [f"shapes (file vs model) ({len(shapes)}): {listing(shapes)}"] * bool(shapes)
        raise ConversionError(f"{path} does not match the model of its config.json: " + "; ".join(problems))
    flat = {k: np.asarray(tensors[k], expected[k].dtype) for k in expected}
    return traverse_util.unflatten_dict(flat, sep="/")


def _config_of(hub_config: Mapping[str, Any], spec: str) -> tuple[str, ml_collections.ConfigDict]:
    section = hub_config.get(SECTION)
    if section is not None:
        chosen = section.get("layout")
        if chosen not in LAYOUTS:
            raise ConversionError(f"{spec}: {CONFIG_FILE} has {SECTION}.layout={chosen!r}, not one of {LAYOUTS}")
        return ("timm" if chosen == "timm" else FLAX_FORMAT), config_lib.from_dict(section["config"])
    if "architecture" in hub_config:
        return "timm", timm_config(hub_config, spec)
    raise ConversionError(f"{spec}: {CONFIG_FILE} has neither an {SECTION!r} section nor a timm 'architecture'")


def timm_config(hub_config: Mapping[str, Any], spec: str) -> ml_collections.ConfigDict:
    """The classification config of a timm repo's config.json: width from the architecture; classes, resolution,
    preprocessing, eval crop and class names from `pretrained_cfg`; torch conventions unless `model_args` differ."""
    widths = {name: width for width, name in pytorch.TIMM_VARIANTS.items()}
    architecture = hub_config["architecture"]
    if architecture not in widths:
        raise ConversionError(
            f"{spec}: timm architecture {architecture!r} is not a MobileNetV2 mnv2_jax reads; "
            f"supported: {', '.join(widths)}"
        )
    pretrained = hub_config.get("pretrained_cfg", hub_config)  # timm's older configs are one flat dict
    config = config_lib.base_config("torch")
    config.model.width = widths[architecture]
    config.model.num_classes = int(hub_config.get("num_classes", pretrained.get("num_classes", 1000)))
    config.resolution = int(pretrained.get("input_size", (3, 224, 224))[-1])
    config.model.preprocessing = _preprocessing(pretrained, spec)
    if 0 < pretrained.get("crop_pct", 0) <= 1:
        config.data.eval_crop = float(pretrained["crop_pct"])
    labels = hub_config.get("label_names") or pretrained.get("label_names")
    if isinstance(labels, list) and len(labels) == config.model.num_classes:
        config.data.class_names = tuple(str(label) for label in labels)
    _apply_model_args(config.model, hub_config.get("model_args") or {}, spec)
    return config


def _preprocessing(pretrained: Mapping[str, Any], spec: str) -> str:
    mean, std = pretrained.get("mean", MEAN_STD["imagenet"][0]), pretrained.get("std", MEAN_STD["imagenet"][1])
    for mode, (known_mean, known_std) in MEAN_STD.items():
        if np.allclose(mean, known_mean) and np.allclose(std, known_std):
            return mode
    raise ConversionError(f"{spec}: input mean {list(mean)} / std {list(std)} is neither of {list(MEAN_STD)}")


def _apply_model_args(model: ml_collections.ConfigDict, args: Mapping[str, Any], spec: str) -> None:
    """timm's `pad_type` and `bn_eps` (TF-style models); refuses arguments that change the architecture."""
    changed = [f"{k}={v!r}" for k, v in args.items() if k not in _MODEL_ARGS or v not in (_MODEL_ARGS[k] or (v,))]
    if changed:
        raise ConversionError(
            f"{spec}: timm model_args {', '.join(changed)} change the model; mnv2_jax cannot build it"
        )
    if args.get("pad_type") == "same":
        model.padding = "same"
    if "bn_eps" in args:
        model.bn_epsilon = float(args["bn_eps"])


def _verified(path: str, spec: str) -> str:
    """`path`, a file in the Hub cache, checked against the SHA-256 its blob is named by (the Hub's LFS files: the
    safetensors); other blobs are named by git's SHA-1 and are left as they are."""
    blob = os.path.realpath(path)
    digest = os.path.basename(blob)
    if re.fullmatch(r"[0-9a-f]{64}", digest) and download.sha256_of(blob) != digest:
        raise ConversionError(
            f"{spec}: {blob} does not match its LFS SHA-256 (a damaged or changed download); delete it and fetch again"
        )
    return path


def _fetch(spec: str, filename: str) -> str:
    """The local path of `filename` of `spec`: in its folder, or downloaded into (or found in) the Hub cache."""
    if not spec.startswith(PREFIX):
        raise ConversionError(f"{spec!r} is not an {PREFIX}<repo_id>[@revision] or {PREFIX}<folder> name")
    name = spec.removeprefix(PREFIX)
    if os.path.isdir(name):
        path = os.path.join(name, filename)
        if not os.path.isfile(path):
            raise ConversionError(f"{spec}: the folder {name} has no {filename}")
        return path
    repo_id, _, revision = name.partition("@")
    try:
        from huggingface_hub import constants, errors, hf_hub_download
    except ImportError:
        raise ConversionError(f"{spec}: Hub repositories need huggingface_hub (pip install huggingface_hub)") from None
    http_error = getattr(errors, "HTTPError", OSError)  # httpx's from huggingface_hub 1.0; before, requests' (OSError)
    try:
        return _verified(hf_hub_download(repo_id, filename, revision=revision or None), spec)
    except (OSError, ValueError, http_error, errors.EntryNotFoundError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        at = f" --revision {revision}" if revision else ""
        raise ConversionError(
            f"cannot get {filename} of Hugging Face Hub repo {name}: {reason}; offline (HF_HUB_OFFLINE=1) it must "
            f"already be in the Hub cache {constants.HF_HUB_CACHE}: run `hf download {repo_id}{at}` where there is "
            f"network and copy that cache (or set HF_HUB_CACHE), or name a folder holding its files: {PREFIX}<folder>"
        ) from None
