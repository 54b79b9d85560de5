"""Parameter and multiply-add counts of a model, per layer and in total.

Counting follows the authors' table: multiply-adds of regular convolutions,
depthwise convolutions and the final dense layer (no BN, biases, residual adds,
pooling or resizing); parameters with and without batch norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnv2_jax.models import backbone_of, with_backbone
from mnv2_jax.models.layers import ConvBN


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str  # "conv", "depthwise" or "dense"
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _count(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def subtree(tree: dict, path) -> dict:
    """The nested dict at a module path such as `('expanded_conv_3', 'expand')`."""
    for key in path:
        tree = tree[key]
    return tree


def layer_rows(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[LayerRow], dict]:
    """Per-layer rows (in execution order) and the abstract variables of `model` on `input_shape` (NHWC)."""
    model = with_backbone(model, backbone_of(model).clone(expansion_splits=1))  # the same layers, each called whole
    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, (ConvBN, nn.Conv, nn.Dense)):
            calls.append((context.module, out.shape))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, images)

    rows = []
    for module, out_shape in calls:
        params = subtree(variables["params"], module.path)
        kernel = params["kernel"].shape
        if isinstance(module, nn.Dense):
            kind, macs = "dense", math.prod(kernel)
        else:
            kind = "depthwise" if getattr(module, "depthwise", False) else "conv"
            macs = math.prod(out_shape[1:-1]) * math.prod(kernel)
        rows.append(LayerRow("/".join(module.path), kind, tuple(out_shape[1:]), _count(params), macs))
    return rows, variables


def summarize(model: nn.Module, resolution: int, in_channels: int = 3) -> dict[str, Any]:
    """Totals and per-layer rows for one image of `resolution` x `resolution`."""
    rows, variables = layer_rows(model, (1, resolution, resolution, in_channels))
    params = variables["params"]
    bn_params = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if any(getattr(k, "key", None) == "BatchNorm" for k in path)
    )
    total = _count(params)
    macs_by_kind = {kind: sum(r.macs for r in rows if r.kind == kind) for kind in ("conv", "depthwise", "dense")}
    macs = sum(macs_by_kind.values())
    summary = {
        "resolution": resolution,
        "params": total,
        "params_excluding_bn": total - bn_params,
        "bn_params": bn_params,
        "batch_stats": _count(variables.get("batch_stats", {})),
        "macs": macs,
        "macs_millions": macs // 1_000_000,
        "macs_by_kind": macs_by_kind,
        "layers": [dataclasses.asdict(r) for r in rows],
    }
    if hasattr(model, "part_of"):  # e.g. a segmenter: its backbone and its head
        parts: dict[str, dict[str, int]] = {}
        for scope, tree in params.items():
            part = parts.setdefault(model.part_of(scope), {"params": 0, "macs": 0})
            part["params"] += _count(tree)
        for row in rows:
            parts[model.part_of(row.name.split("/")[0])]["macs"] += row.macs
        summary["parts"] = parts
    return summary
