"""Our model's layers in execution order, and name tables that map them onto other frameworks' tensors.

Every framework we exchange weights with (torchvision, timm, Keras) stores the
same layers in the same order; only names and tensor layouts differ. A
framework is described by a *table*: one `Entry` per target tensor, naming
which of our tensors it holds and how to transpose it. Export and import are
then the same generic walk in both directions, with every name and shape
checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from mnv2_jax.convert import ConversionError
from mnv2_jax.models.complexity import layer_rows, subtree

# Our tensor names within one layer.
KERNEL, BIAS, BN_SCALE, BN_OFFSET, BN_MEAN, BN_VAR = "kernel", "bias", "scale", "offset", "mean", "var"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv+BN or dense layer of our model."""

    name: str  # module path, e.g. "expanded_conv_3/expand"
    kind: str  # "conv", "depthwise" or "dense"
    role: str  # "stem", "expand", "depthwise", "project", "head" or "logits"
    block: int | None  # inverted-residual block index (0-16), None outside blocks
    block_expands: bool  # whether the block has a 1x1 expansion conv


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the other framework: which of our tensors it holds, and the layout change to get there."""

    key: str
    layer: Layer
    field: str
    to_target: Callable[[np.ndarray], np.ndarray] = lambda a: a
    from_target: Callable[[np.ndarray], np.ndarray] = lambda a: a


def _block_index(scope: str) -> int:
    return 0 if scope == "expanded_conv" else int(scope.rsplit("_", 1)[1])


def model_layers(model: nn.Module, resolution: int) -> tuple[list[Layer], dict[str, Any]]:
    """The layers of `model` in execution order and its abstract variables."""
    rows, abstract = layer_rows(model, (1, resolution, resolution, 3))
    expanding = {row.name.split("/")[0] for row in rows if row.name.endswith("/expand")}
    layers = []
    for row in rows:
        scope, _, sub = row.name.partition("/")
        if sub:
            layers.append(Layer(row.name, row.kind, sub, _block_index(scope), scope in expanding))
        else:
            role = {"Conv": "stem", "Conv_1": "head", "Logits": "logits"}[scope]
            layers.append(Layer(row.name, row.kind, role, None, False))
    return layers, abstract


def read_layer(variables: Mapping[str, Any], layer: Layer) -> dict[str, np.ndarray]:
    """Our tensors of one layer as numpy arrays: kernel (+ bias for dense, + BN fields for convs)."""
    path = layer.name.split("/")
    params = subtree(variables["params"], path)
    tensors = {KERNEL: np.asarray(params[KERNEL])}
    if layer.kind == "dense":
        tensors[BIAS] = np.asarray(params["bias"])
        return tensors
    bn, stats = params["BatchNorm"], subtree(variables["batch_stats"], path)["BatchNorm"]
    tensors.update(
        {
            BN_SCALE: np.asarray(bn["scale"]),
            BN_OFFSET: np.asarray(bn["bias"]),
            BN_MEAN: np.asarray(stats["mean"]),
            BN_VAR: np.asarray(stats["var"]),
        }
    )
    return tensors


def _slot(variables: dict, layer: Layer, field: str) -> tuple[dict, str]:
    path = layer.name.split("/")
    if field in (KERNEL, BIAS):
        return subtree(variables["params"], path), field
    if field in (BN_SCALE, BN_OFFSET):
        return subtree(variables["params"], path)["BatchNorm"], "bias" if field == BN_OFFSET else "scale"
    return subtree(variables["batch_stats"], path)["BatchNorm"], field


def export_tensors(variables: Mapping[str, Any], table: Iterable[Entry]) -> dict[str, np.ndarray]:
    """`{target key: array}` for every entry of a framework's table."""
    cache: dict[str, dict[str, np.ndarray]] = {}
    out = {}
    for entry in table:
        tensors = cache.setdefault(entry.layer.name, read_layer(variables, entry.layer))
        out[entry.key] = np.ascontiguousarray(entry.to_target(tensors[entry.field]))
    return out


def import_tensors(
    tensors: Mapping[str, np.ndarray], table: list[Entry], abstract: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """Our `{'params', 'batch_stats'}` from another framework's `{key: array}`; names and shapes are checked."""
    expected = {entry.key for entry in table}
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    if missing or unexpected:
        lines = [f"{source} does not match the configured model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {listing(unexpected)}")
        if not expected & tensors.keys():
            lines.append("  no name matches: the file is another framework's layout (check --from)")
        lines.append("check model.width and model.num_classes, and that the file is a MobileNetV2 of this layout")
        raise ConversionError("\n".join(lines))
    variables = zeros_like({k: abstract[k] for k in ("params", "batch_stats")})
    mismatches = []
    for entry in table:
        slot, name = _slot(variables, entry.layer, entry.field)
        value = np.asarray(entry.from_target(np.asarray(tensors[entry.key])))
        if value.shape != slot[name].shape:
            target_shape = tuple(np.shape(tensors[entry.key]))
            mismatches.append(
                f"  {entry.key} {target_shape} -> {entry.layer.name}/{entry.field}: "
                f"{value.shape} in our layout, the model expects {slot[name].shape}"
            )
            continue
        slot[name] = value.astype(slot[name].dtype)
    if mismatches:
        shown = mismatches[:_MAX_LISTED] + (
            [f"  ... ({len(mismatches) - _MAX_LISTED} more)"] * (len(mismatches) > _MAX_LISTED)
        )
        raise ConversionError(
            f"{source}: {len(mismatches)} shapes disagree with the configured model (check model.width and "
            "model.num_classes):\n" + "\n".join(shown)
        )
    return variables


_MAX_LISTED = 12


def listing(names: list[str], limit: int = _MAX_LISTED) -> str:
    """The first `limit` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


def zeros_like(tree: Mapping) -> dict:
    """Numpy zeros with the structure, shapes and dtypes of an (abstract) variable tree."""
    return {k: zeros_like(v) if isinstance(v, Mapping) else np.zeros(v.shape, v.dtype) for k, v in tree.items()}
