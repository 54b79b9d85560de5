"""`mnv2 summary --config CONFIG [--config.FIELD=VALUE ...] [--json] [--per-layer]`."""

from __future__ import annotations

import json

from absl import flags

from mnv2_jax.cli import common
from mnv2_jax.models import build
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


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    config_flag = common.define_config(fv, argv)
    flags.DEFINE_bool("json", False, "print JSON instead of a table", flag_values=fv)
    flags.DEFINE_bool("per_layer", False, "include one row per layer", flag_values=fv)
    for alias in ("per-layer",):
        flags.DEFINE_alias(alias, "per_layer", flag_values=fv)
    common.parse(fv, argv)
    config = common.load_config(config_flag)
    summary = summarize(build(config), config.resolution)
    if not fv.per_layer:
        summary.pop("layers")
    print(json.dumps(summary, indent=2) if fv.json else format_table(summary, fv.per_layer))
