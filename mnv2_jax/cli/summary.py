"""`mnv2 summary --config CONFIG [--config.FIELD=VALUE ...] [--json] [--per-layer] [--memory [--splits T]
[--activation_dtype D]]`."""

from __future__ import annotations

import json

from absl import flags

from mnv2_jax import tasks
from mnv2_jax.cli import common
from mnv2_jax.models import backbone_of
from mnv2_jax.models import memory as memory_lib
from mnv2_jax.models.complexity import summarize


def format_table(summary: dict, per_layer: bool) -> str:
    lines = []
    if per_layer:
        lines.append(f"{'layer':<34} {'kind':<9} {'output':>16} {'params':>11} {'MACs':>13}")
        for row in summary["layers"]:
            shape = "x".join(map(str, row["output_shape"]))
            lines.append(f"{row['name']:<34} {row['kind']:<9} {shape:>16} {row['params']:>11,} {row['macs']:>13,}")
        lines.append("")
    by_kind = ", ".join(f"{k} {v:,}" for k, v in summary["macs_by_kind"].items())
    lines += [
        f"input                {summary['resolution']}x{summary['resolution']}x3",
        f"parameters           {summary['params']:,} (BN scale/offset {summary['bn_params']:,}; "
        f"BN moving statistics {summary['batch_stats']:,} more)",
        f"  excluding BN       {summary['params_excluding_bn']:,} ({summary['params_excluding_bn'] / 1e6:.2f} M)",
        f"multiply-adds        {summary['macs']:,} ({summary['macs_millions']} M)",
        f"  by kind            {by_kind}",
    ]
    for part, counts in summary.get("parts", {}).items():
        lines.append(f"  {part:<18} {counts['params']:,} parameters, {counts['macs']:,} multiply-adds")
    return "\n".join(lines)


def _kb(count: int) -> str:
    return f"{count / 1000:,.1f} KB"


def format_memory(memory: dict, per_layer: bool) -> str:
    lines = [
        f"activation memory per image ({memory['activation_dtype']}, {memory['bytes_per_element']} bytes; "
        f"{memory['scope']}; K = 1000)"
    ]
    if per_layer:
        lines.append(f"  {'layer':<10} {'split as':<11} {'naive':>11} {'split':>11}  live tensors (split)")
        for row in memory["layers"]:
            split = row["split"] or {"elements": 0, "tensors": {}}
            tensors = ", ".join(f"{k} {v:,}" for k, v in split["tensors"].items())
            lines.append(
                f"  {row['endpoint']:<10} {row['split_as']:<11} {row['naive']['elements']:>11,} "
                f"{split['elements']:>11,}  {tensors}"
            )
    for name, key in (("naive", "naive_peak"), (f"split, t={memory['splits']}", "split_peak")):
        peak = memory[key]
        lines.append(f"  {name:<19}peak {peak['elements']:,} elements = {_kb(peak['bytes'])} at {peak['layer']}")
    by_t = ", ".join(f"{t}: {_kb(peak['bytes'])}" for t, peak in memory["split_peak_by_splits"].items())
    lines.append(f"  peak by t          {by_t}")
    rows = "; ".join(f"{r['size']}x{r['size']}: {r['channels']} ch, {_kb(r['bytes'])}" for r in memory["table3"])
    lines.append(f"  Table 3 (split)    {rows}; max {_kb(max(r['bytes'] for r in memory['table3']))}")
    return "\n".join(lines)


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_bool("json", False, "print JSON instead of a table", flag_values=fv)
    flags.DEFINE_bool("per_layer", False, "include one row per layer", flag_values=fv)
    flags.DEFINE_bool("memory", False, "add the activation memory per image (docs/memory.md)", flag_values=fv)
    splits_help = "groups per block for --memory (default: model.expansion_splits, or 6 when it is 1)"
    flags.DEFINE_integer("splits", None, splits_help, flag_values=fv)
    dtypes = list(memory_lib.ACTIVATION_DTYPES)
    flags.DEFINE_enum("activation_dtype", "float16", dtypes, "--memory's bytes per element", flag_values=fv)
    for alias in ("per-layer",):
        flags.DEFINE_alias(alias, "per_layer", flag_values=fv)
    common.parse(fv, argv)
    config = common.load_config(config_flag)
    model = tasks.get(config).build_model()
    summary = summarize(model, config.resolution)
    if not fv.per_layer:
        summary.pop("layers")
    text = format_table(summary, fv.per_layer)
    if fv.memory:
        splits = fv.splits or (config.model.expansion_splits if config.model.expansion_splits > 1 else 6)
        if splits < 1:
            raise common.UsageError(f"--splits must be >= 1, got {splits}")
        backbone = backbone_of(model)
        summary["memory"] = memory_lib.summarize(backbone, config.resolution, splits, fv.activation_dtype)
        summary["memory"]["scope"] = "backbone" if backbone is not model else "network"
        if not fv.per_layer:
            summary["memory"].pop("layers")
        text += "\n" + format_memory(summary["memory"], fv.per_layer)
    print(json.dumps(summary, indent=2) if fv.json else text)
