"""PyTorch state dicts of torchvision's `mobilenet_v2` and timm's `mobilenetv2_*` <-> our variables.

Tensors are written and read as plain arrays: `.safetensors` through
`safetensors.numpy` (no torch needed) and `.pth` through `torch.save` /
`torch.load(weights_only=True)`, so importing never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mnv2_jax.convert import ConversionError
from mnv2_jax.convert.layout import (
    BIAS,
    BN_MEAN,
    BN_OFFSET,
    BN_SCALE,
    BN_VAR,
    KERNEL,
    Entry,
    Layer,
    export_tensors,
)
from mnv2_jax.models.mobilenet_v2 import BLOCK_STAGES

LAYOUTS = ("torchvision", "timm")
TORCHVISION_PADDING, TORCHVISION_BN_EPSILON = "symmetric", 1e-5
# timm's names for the published widths (other widths: `timm.models.mobilenetv3._gen_mobilenet_v2`).
TIMM_VARIANTS = {
    0.35: "mobilenetv2_035",
    0.5: "mobilenetv2_050",
    0.75: "mobilenetv2_075",
    1.0: "mobilenetv2_100",
    1.4: "mobilenetv2_140",
}
_BN_SUFFIXES = ((BN_SCALE, "weight"), (BN_OFFSET, "bias"), (BN_MEAN, "running_mean"), (BN_VAR, "running_var"))
_NUM_BATCHES_TRACKED = "num_batches_tracked"


def _conv_entries(layer: Layer, conv: str, bn: str) -> list[Entry]:
    entries = [
        Entry(f"{conv}.weight", layer, KERNEL, lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0))
    ]
    entries += [Entry(f"{bn}.{suffix}", layer, field) for field, suffix in _BN_SUFFIXES]
    return entries


def _dense_entries(layer: Layer, name: str) -> list[Entry]:
    return [Entry(f"{name}.weight", layer, KERNEL, np.transpose, np.transpose), Entry(f"{name}.bias", layer, BIAS)]


def _torchvision_names(layer: Layer, num_blocks: int) -> tuple[str, str]:
    if layer.role == "stem":
        return "features.0.0", "features.0.1"
    if layer.role == "head":
        return f"features.{num_blocks + 1}.0", f"features.{num_blocks + 1}.1"
    prefix = f"features.{layer.block + 1}.conv"
    order = ("expand", "depthwise", "project") if layer.block_expands else ("depthwise", "project")
    i = order.index(layer.role)
    if layer.role == "project":  # the projection is a bare conv + BN, not a Conv2dNormActivation
        return f"{prefix}.{i}", f"{prefix}.{i + 1}"
    return f"{prefix}.{i}.0", f"{prefix}.{i}.1"


def _timm_block_position(block: int) -> tuple[int, int]:
    for stage, (_, _, repeats, _) in enumerate(BLOCK_STAGES):
        if block < repeats:
            return stage, block
        block -= repeats
    raise ConversionError(f"block {block} is beyond MobileNetV2's {sum(s[2] for s in BLOCK_STAGES)} blocks")


def _timm_names(layer: Layer) -> tuple[str, str]:
    if layer.role == "stem":
        return "conv_stem", "bn1"
    if layer.role == "head":
        return "conv_head", "bn2"
    stage, index = _timm_block_position(layer.block)
    prefix = f"blocks.{stage}.{index}"
    if layer.block_expands:
        conv, bn = {"expand": ("conv_pw", "bn1"), "depthwise": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")}[
            layer.role
        ]
    else:  # timm's DepthwiseSeparableConv
        conv, bn = {"depthwise": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2")}[layer.role]
    return f"{prefix}.{conv}", f"{prefix}.{bn}"


def table(layers: list[Layer], layout: str) -> list[Entry]:
    """The state-dict entries (except `num_batches_tracked`) of torchvision's or timm's MobileNetV2."""
    if layout not in LAYOUTS:
        raise ConversionError(f"torch layout must be one of {LAYOUTS}, got {layout!r}")
    num_blocks = sum(layer.role == "project" for layer in layers)
    entries = []
    for layer in layers:
        if layer.role == "logits":
            entries += _dense_entries(layer, "classifier.1" if layout == "torchvision" else "classifier")
        elif layout == "torchvision":
            entries += _conv_entries(layer, *_torchvision_names(layer, num_blocks))
        else:
            entries += _conv_entries(layer, *_timm_names(layer))
    return entries


def export_state_dict(variables: Mapping[str, Any], layers: list[Layer], layout: str) -> dict[str, np.ndarray]:
    """Our variables as torchvision's or timm's state dict, with the BN counters a strict `load_state_dict` needs."""
    return with_num_batches_tracked(export_tensors(variables, table(layers, layout)))


def with_num_batches_tracked(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the BN counters torch expects in a strict `load_state_dict` (value 0)."""
    out = dict(tensors)
    for key in tensors:
        if key.endswith(".running_mean"):
            out[key.removesuffix("running_mean") + _NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
    return out


def check_conventions(model_config, layout: str) -> None:
    """torchvision has symmetric padding and BN epsilon 1e-5 only; timm takes either (see `timm_create_kwargs`)."""
    if layout == "torchvision" and (
        model_config.padding != TORCHVISION_PADDING or model_config.bn_epsilon != TORCHVISION_BN_EPSILON
    ):
        raise ConversionError(
            "torchvision's mobilenet_v2 uses symmetric padding and BN epsilon 1e-5, the config has "
            f"model.padding={model_config.padding!r}, model.bn_epsilon={model_config.bn_epsilon}; use the torch "
            "convention (configs/imagenet.py:convention=torch) or the timm layout"
        )


def timm_create_kwargs(model_config) -> dict[str, Any]:
    """Arguments of `timm.create_model` that give timm our padding and BN epsilon."""
    kwargs: dict[str, Any] = {"num_classes": model_config.num_classes, "bn_eps": model_config.bn_epsilon}
    if model_config.padding == "same":
        kwargs["pad_type"] = "same"
    return kwargs


def save(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes a state dict: safetensors for `*.safetensors`, otherwise `torch.save` of a dict of tensors."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(dict(tensors), path)
        return
    import torch

    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)


def _unwrap(state: Any, path: str) -> dict[str, Any]:
    while isinstance(state, dict):
        if any(hasattr(v, "shape") for v in state.values()):
            break
        nested = [k for k in ("state_dict", "model", "state_dict_ema", "model_ema") if isinstance(state.get(k), dict)]
        if not nested:
            break
        state = state[nested[0]]
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path} holds no state dict (expected a dict of tensor names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load(path: str) -> dict[str, np.ndarray]:
    """A state dict from `.safetensors` or a torch file, as numpy arrays, without unpickling arbitrary objects."""
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or (len(head) > 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except SafetensorError as e:
            raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
    if not head.startswith(b"PK"):
        raise ConversionError(f"{path} is neither a PyTorch file (zip written by torch.save) nor safetensors")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and RuntimeError subclasses here
        raise ConversionError(f"{path} is not a plain PyTorch state dict ({type(e).__name__}: {e})") from e
    return {k: v.detach().cpu().numpy() for k, v in _unwrap(state, path).items() if isinstance(v, torch.Tensor)}


def without_counters(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict without BN `num_batches_tracked` counters (they carry no weights)."""
    return {k: v for k, v in tensors.items() if not k.endswith(_NUM_BATCHES_TRACKED)}


def import_torchvision():
    """`import torchvision` that also works beside CPU-only torch.

    PyPI's torchvision wheel is a CUDA build: beside the CPU torch wheel its
    `_C` extension fails to load, no custom ops get registered, and the import
    then fails registering fake kernels for `torchvision::nms`. Declaring the
    two op schemas it touches first lets the models import (`torchvision.ops`
    kernels stay unavailable).
    """
    import glob
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("torchvision is not installed (pip install 'mnv2_jax[torch]')")
    extensions = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        torch.ops.load_library(extensions[0])
    except (OSError, IndexError):
        if not hasattr(import_torchvision, "_schemas"):
            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            import_torchvision._schemas = library  # the schemas live as long as the library object
    import torchvision

    return torchvision
