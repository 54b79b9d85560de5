"""`mnv2 sweep SWEEP --report`: each run's metrics, size and cost in a CSV, a Markdown table and two plots.

Values come from each run's own files: `metrics.jsonl` (final and best eval metrics, steps/s), `config.json` (the
model, counted by `models.complexity.summarize` like `mnv2 summary`) and `finished.json` (wall time).
Plots: the metric against multiply-adds on a log scale with one line per value of a swept field (the paper's
Figure 5), and the eval metric against the training step, one line per run (its Figure 6).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from mnv2_jax.sweeps import runner, spec
from mnv2_jax.training import run_files

REPORT_DIR = "report"
CSV_FILE, MARKDOWN_FILE = "report.csv", "report.md"
MACS_PLOT, STEPS_PLOT = "metric_vs_macs.png", "metric_vs_step.png"


def _saved_config(workdir: str):
    from mnv2_jax import config as config_lib

    saved = run_files.read_json(epath.Path(workdir) / run_files.CONFIG_FILE)
    return None if saved is None else config_lib.from_dict(saved)


def model_size(config) -> dict[str, int]:
    """Parameters and multiply-adds of a config's model, counted like `mnv2 summary`."""
    from mnv2_jax import tasks
    from mnv2_jax.models.complexity import summarize

    counted = summarize(tasks.get(config).build_model(), config.resolution)
    return {"params": counted["params"], "macs": counted["macs"]}


def eval_history(records: Sequence[Mapping[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(step, value) of every record of `metrics.jsonl` that holds `metric`, in order."""
    return [(int(r["step"]), float(r[metric])) for r in records if metric in r]


def run_row(run: spec.Run, metric: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One run's row from its `metrics.jsonl` `records`: swept values, state, final and best metric, size, wall time
    and training images/s."""
    row: dict[str, Any] = {"run": run.name, **run.params, "state": runner.run_state(run)}
    config = _saved_config(run.workdir)
    history = eval_history(records, metric)
    row["step"] = max((int(r["step"]) for r in records if "step" in r), default=0)
    row.update(model_size(config) if config is not None else {"params": None, "macs": None})
    row[f"final {metric}"] = history[-1][1] if history else None
    best_step, best = max(history, key=lambda point: point[1]) if history else (None, None)
    row[f"best {metric}"], row["best step"] = best, best_step
    for key, value in sorted(run_files.last_eval_metrics([r for r in records if metric in r]).items()):
        if key != metric:
            row[f"final {key}"] = value
    finished = run_files.read_finished(run.workdir)
    row["wall seconds"] = finished["train_seconds"] if finished else None
    rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
    row["train images/s"] = statistics.median(rates) * config.batch_size if rates and config is not None else None
    return row


def report_metric(sweep: spec.Sweep) -> str:
    """The sweep's `report.metric`, else the task's checkpoint metric (`eval/top1`, `eval/mIoU`, `eval/mAP`)."""
    if "metric" in sweep.report:
        return sweep.report["metric"]
    from mnv2_jax import tasks
    from mnv2_jax.cli import common

    config = common.config_from_spec(sweep.config, *spec.config_arguments(sweep.runs[0]))
    return tasks.get(config).best_metric


def collect(sweep: spec.Sweep) -> tuple[str, list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    """The report's metric, one row per run and each run's (step, metric) history, in the sweep's order."""
    metric = report_metric(sweep)
    records = {run.name: run_files.read_metrics(run.workdir) for run in sweep.runs}
    histories = {name: eval_history(run_records, metric) for name, run_records in records.items()}
    return metric, [run_row(run, metric, records[run.name]) for run in sweep.runs], histories


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column == "macs":
        return f"{value / 1e6:.1f}M"
    if column == "params":
        return f"{value / 1e6:.3f}M"
    if isinstance(value, float) and column in ("wall seconds", "train images/s"):
        return f"{value:.0f}"
    if isinstance(value, float) and column.startswith(("final ", "best ", "mean ", "std ", "min ", "max ")):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def over_seeds(sweep: spec.Sweep, rows: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per run without its seed: the number of seeds with a final value, their mean, standard deviation
    (n - 1), minimum and maximum of the final `metric` (empty when the sweep has no seeds)."""
    if "seed" not in sweep.axes:
        return []
    groups: dict[tuple, list] = {}
    for row in rows:
        key = tuple(row[axis] for axis in sweep.axes if axis != "seed")
        groups.setdefault(key, []).append(row.get(f"final {metric}"))
    table = []
    for key, values in groups.items():
        values = [v for v in values if v is not None]
        entry: dict[str, Any] = dict(zip([a for a in sweep.axes if a != "seed"], key, strict=True))
        entry["seeds"] = len(values)
        mean = sum(values) / len(values) if values else None
        spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        entry.update({f"mean final {metric}": mean, f"std final {metric}": spread})
        entry.update(
            {f"min final {metric}": min(values, default=None), f"max final {metric}": max(values, default=None)}
        )
        table.append(entry)
    return table


def lines_field(sweep: spec.Sweep) -> str | None:
    """The swept field that makes one line per value in the multiply-add plot (`report.lines`, else the first axis
    of a grid of two or more fields)."""
    if "lines" in sweep.report:
        if sweep.report["lines"] not in sweep.axes:
            raise spec.SweepError(f"report.lines must be one of the swept fields {sweep.axes}")
        return sweep.report["lines"]
    axes = [a for a in sweep.axes if a != "seed"]
    return axes[0] if len(axes) >= 2 else None


Series = dict[str, tuple[list[float], list[float]]]  # a plot's lines: label -> (xs, ys)


def plot_metric_vs_macs(sweep: spec.Sweep, rows: Sequence[Mapping[str, Any]], metric: str, path: str) -> Series:
    """Figure 5 style: final `metric` (the mean over seeds) against multiply-adds (log scale), one line per value of
    `lines_field`; returns the plotted lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by = lines_field(sweep)
    seeded = "seed" in sweep.axes
    points: dict[tuple, list] = {}  # the runs of one point: the same swept values but the seed
    for row in rows:
        if row.get("macs") and row.get(f"final {metric}") is not None:
            points.setdefault(tuple(row[a] for a in sweep.axes if a != "seed"), []).append(row)
    groups: dict[Any, list] = {}
    for members in points.values():
        first = members[0]
        mean = sum(r[f"final {metric}"] for r in members) / len(members)
        name = first["run"].partition(",seed=")[0] if seeded else first["run"]
        groups.setdefault(first[by] if by else "runs", []).append((first["macs"] / 1e6, mean, name))
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    series: Series = {}
    for value, members in groups.items():
        members.sort()
        xs, ys = [x for x, _, _ in members], [y for _, y, _ in members]
        label = f"{by.rsplit('.', 1)[-1]}={value}" if by else "runs"
        series[label] = (xs, ys)
        axis.plot(xs, ys, marker="o", label=label, linestyle="-" if by else "none")
        if not by:
            for x, y, name in members:
                axis.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
    axis.xaxis.set_major_formatter(plain)
    axis.xaxis.set_minor_formatter(plain)
    axis.tick_params(axis="x", which="minor", labelsize=7)
    axis.set_xlabel("multiply-adds (millions, log scale)")
    axis.set_ylabel(f"final {metric}" + (" (mean over seeds)" if seeded else ""))
    axis.set_title(f"{sweep.name}: {metric} against multiply-adds")
    axis.grid(True, which="both", alpha=0.3)
    if by:
        axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return series


def plot_metric_vs_step(
    sweep: spec.Sweep, histories: Mapping[str, Sequence[tuple[int, float]]], metric: str, path: str
) -> Series:
    """Figure 6 style: the eval `metric` against the training step, one line per run; returns the plotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    series: Series = {name: ([s for s, _ in history], [v for _, v in history]) for name, history in histories.items()}
    colours: dict[str, Any] = {}  # one colour per run without its seed; seeds differ by line style
    styles = ("-", "--", ":", "-.")
    for name, (xs, ys) in series.items():
        group, _, seed = name.partition(",seed=") if ",seed=" in name else (name, "", "")
        colour = colours.setdefault(group, f"C{len(colours) % 10}")
        style = styles[int(seed) % len(styles)] if seed.isdigit() else "-"
        axis.plot(xs, ys, marker=".", label=name, color=colour, linestyle=style)
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    axis.set_title(f"{sweep.name}: {metric} during training")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return series


def _save_figure(figure, path: str) -> None:
    """A PNG of `figure` at `path`, local or `gs://` (through `etils.epath`)."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    epath.Path(path).write_bytes(png.getvalue())


@dataclasses.dataclass(frozen=True)
class Report:
    metric: str
    rows: list[dict[str, Any]]
    paths: dict[str, str]  # file name -> path
    macs_series: Series
    step_series: Series


def write(sweep: spec.Sweep, out_dir: str | None = None) -> Report:
    """Writes the CSV, the Markdown table and the two plots into `<root>/<sweep>/report/`."""
    metric, rows, histories = collect(sweep)
    out_dir = out_dir or os.path.join(sweep.root, REPORT_DIR)
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)  # a gs:// root stays a URI (not a local folder gs:/...)
    paths = {name: os.path.join(out_dir, name) for name in (CSV_FILE, MARKDOWN_FILE, MACS_PLOT, STEPS_PLOT)}
    columns = _columns(rows)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows([{c: ("" if row.get(c) is None else row.get(c)) for c in columns} for row in rows])
    epath.Path(paths[CSV_FILE]).write_text(table.getvalue())
    markdown = f"# Sweep `{sweep.name}` ({sweep.path}): {len(rows)} runs, metric `{metric}`\n\n" + markdown_table(rows)
    seeds = over_seeds(sweep, rows, metric)
    if seeds:
        markdown += f"\n## Over seeds\n\n{markdown_table(seeds)}"
    epath.Path(paths[MARKDOWN_FILE]).write_text(markdown)
    macs_series = plot_metric_vs_macs(sweep, rows, metric, paths[MACS_PLOT])
    step_series = plot_metric_vs_step(sweep, histories, metric, paths[STEPS_PLOT])
    return Report(metric, rows, paths, macs_series, step_series)
