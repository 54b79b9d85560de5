"""Activation memory of one image's inference through the backbone, under two schedules (paper section 5.1).

- **naive**: every layer's output is materialised whole; batch norm, ReLU6 and the residual add run inside the
  convolution that feeds them (as XLA's fusions and TFLite's fused ops do), and a tensor is freed after its last
  use. A layer's peak is the largest set of tensors alive during one of its convolutions.
- **split**: the layers `MobileNetV2.split_plan` names run in `t` groups of channels (`model.expansion_splits`,
  `mnv2_jax.models.splits`): a block holds its input, its output and one group's expanded and filtered tensors;
  the stem is computed inside the first block; the last conv inside the pooling.

Counts are elements per image, from the layer table alone (no compilation); bytes follow for an activation dtype.
`table3` applies the paper's Table 3 rule to the split schedule: at each spatial size, the most channels of a
tensor that must be materialised whole, and its memory.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mnv2_jax.models.mobilenet_v2 import LayerSpec, MobileNetV2

ACTIVATION_DTYPES = ("float16", "bfloat16", "float32", "int8")


def _size(size: int, stride: int) -> int:
    return -(-size // stride)  # both padding modes give ceil(size / stride) for 3x3 kernels


def _shapes(specs: list[LayerSpec], resolution: int) -> list[dict[str, tuple[int, int, int]]]:
    """Each layer's input, expanded (before the depthwise), depthwise output and output tensors (h, w, c)."""
    rows, size = [], resolution
    for spec in specs:
        out_size = _size(size, spec.stride)
        shapes = {"input": (size, size, spec.in_features), "output": (out_size, out_size, spec.out_features)}
        if spec.expanded_features is not None:
            shapes["expanded"] = (size, size, spec.expanded_features)
            shapes["depthwise"] = (out_size, out_size, spec.expanded_features)
        rows.append(shapes)
        size = out_size
    return rows


def _elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _naive(spec: LayerSpec, shapes: dict, residual: bool) -> dict[str, int]:
    """The tensors alive at the layer's largest step when every tensor is whole."""
    size = {name: _elements(shape) for name, shape in shapes.items()}
    if spec.expanded_features is None:
        return {"input": size["input"], "output": size["output"]}
    kept = {"input": size["input"]} if residual else {}
    steps = [
        {"input": size["input"], "expanded": size["expanded"]} if spec.has_expansion else {},
        {**kept, "expanded" if spec.has_expansion else "input": size["expanded"], "depthwise": size["depthwise"]},
        {**kept, "depthwise": size["depthwise"], "output": size["output"]},
    ]
    return max(steps, key=lambda live: sum(live.values()))


def _split(how: str, shapes: dict, stem_shapes: dict | None, splits: int) -> dict[str, int]:
    """The tensors alive while one group of channels is computed."""
    if how == "conv+pool":
        (h, w, c), group = shapes["output"], -(-shapes["output"][2] // splits)
        return {"input": _elements(shapes["input"]), "output group": h * w * group, "pooled": c}
    h, w, c = shapes["expanded"]
    oh, ow, _ = shapes["depthwise"]
    group = -(-c // splits)
    live = {"input": _elements(shapes["input"]), "output": _elements(shapes["output"])}
    if how == "stem+block":
        live["input"] = _elements(stem_shapes["input"])  # the image: the stem's output is never whole
    return {**live, "expanded group": h * w * group, "depthwise group": oh * ow * group}


def _peak(rows: list[dict], schedule: str) -> dict[str, Any]:
    row = max((r for r in rows if r[schedule]), key=lambda r: r[schedule]["elements"])
    return {"elements": row[schedule]["elements"], "layer": row["endpoint"]}


def activation_memory(model: MobileNetV2, resolution: int, splits: int, in_features: int = 3) -> dict[str, Any]:
    """Per-layer live tensors and the peak (elements per image) of the naive and the split schedule with `splits`
    groups (1: the naive schedule), plus the Table 3 view of the split schedule."""
    specs = model.specs(in_features)
    all_shapes = _shapes(specs, resolution)
    plan = model.split_plan(specs) if splits > 1 else {}
    rows = []
    for spec, shapes in zip(specs, all_shapes, strict=True):
        residual = model.residual == "bottleneck" and spec.residual
        naive = _naive(spec, shapes, residual)
        how = plan.get(spec.endpoint)
        if how == "stem":
            split = {}  # computed inside the next block
        elif how is None:
            split = naive
        else:
            split = _split(how, shapes, all_shapes[0] if how == "stem+block" else None, splits)
        rows.append(
            {
                "endpoint": spec.endpoint,
                "scope": spec.scope,
                "split_as": how or "whole",
                "shapes": {name: list(shape) for name, shape in shapes.items()},
                "naive": {"tensors": naive, "elements": sum(naive.values())},
                "split": {"tensors": split, "elements": sum(split.values())} if split else None,
            }
        )
    return {
        "resolution": resolution,
        "splits": splits,
        "layers": rows,
        "naive_peak": _peak(rows, "naive"),
        "split_peak": _peak(rows, "split"),
        "table3": table3(specs, all_shapes, plan, model.num_classes),
    }


def table3(specs: list[LayerSpec], all_shapes: list[dict], plan: dict[str, str], num_classes: int) -> list[dict]:
    """At each spatial size below the input, the most channels of a tensor the schedule materialises whole.

    Whole tensors are the outputs of the layers that run (the stem's and the last conv's not, when they run
    inside the first block and the pooling) and the inner tensors of blocks that run unsplit; the pooled
    features and the logits are 1 x 1.
    """
    widest: dict[int, int] = {}

    def add(shape) -> None:
        widest[shape[0]] = max(widest.get(shape[0], 0), shape[2])

    for spec, shapes in zip(specs, all_shapes, strict=True):
        how = plan.get(spec.endpoint)
        if how in ("stem", "conv+pool"):
            continue
        add(shapes["output"])
        if how is None and spec.expanded_features is not None:
            add(shapes["expanded"])
            add(shapes["depthwise"])
    if num_classes and specs[-1].expanded_features is None:
        add((1, 1, specs[-1].out_features))
        add((1, 1, num_classes))
    return [
        {"size": size, "channels": channels, "elements": size * size * channels}
        for size, channels in sorted(widest.items(), reverse=True)
    ]


def with_bytes(memory: dict[str, Any], activation_dtype: str) -> dict[str, Any]:
    """`memory` with `bytes` next to every `elements` for activations of `activation_dtype` (16-bit in the paper)."""
    if activation_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype must be one of {ACTIVATION_DTYPES}, got {activation_dtype!r}")
    itemsize = np.dtype(activation_dtype if activation_dtype != "bfloat16" else "float16").itemsize

    def convert(tree):
        if isinstance(tree, dict):
            out = {key: convert(value) for key, value in tree.items()}
            if "elements" in tree:
                out["bytes"] = tree["elements"] * itemsize
            return out
        if isinstance(tree, list):
            return [convert(value) for value in tree]
        return tree

    return {**convert(memory), "activation_dtype": activation_dtype, "bytes_per_element": itemsize}


def summarize(
    model: MobileNetV2, resolution: int, splits: int, activation_dtype: str, shown: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
) -> dict[str, Any]:
    """`activation_memory` at `splits` in elements and bytes, with the split peak for each of `shown` and for one
    channel per group (`per_channel`, the paper's limit)."""
    memory = activation_memory(model, resolution, splits)
    widest = max(shape[2] for row in memory["layers"] for shape in row["shapes"].values())
    by_splits = {str(t): activation_memory(model, resolution, t)["split_peak"] for t in shown}
    by_splits["per_channel"] = activation_memory(model, resolution, widest)["split_peak"]
    return with_bytes({**memory, "split_peak_by_splits": by_splits}, activation_dtype)
