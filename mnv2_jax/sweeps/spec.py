"""Sweep files (`configs/sweeps/*.py`): a base config plus a grid or a list of overrides, expanded into named runs.

A sweep file defines `get_sweep()` returning a dict (big_vision declares sweeps in the config file; here they are
their own file so one config serves many sweeps):

    config     the base config, as `mnv2 train --config` takes it: "configs/quickstart.py:epochs=2"
    overrides  {field: value} applied to every run: {"log_every_steps": 100}
    variants   [{"name": "linear", field: value, ...}, ...]: named runs (the paper's ablations)
    grid       {field: [values]}: every combination (with `variants`, every variant times every combination)
    seeds      [0, 1, ...]: each run repeated with `seed` set (and `seed=K` in its name)
    report     {"metric": "eval/top1", "lines": "model.expansion"}: the report's metric (default: the task's
               checkpoint metric) and the field that makes one line per value in the multiply-add plot
    slurm, tpu options of the `--runner slurm|tpu` launchers (`mnv2_jax.launch`)

Runs are named from their swept values (`expansion=4,width=0.5`, `linear`, `linear,seed=1`) and live in
`<root>/<sweep name>/<run name>`: the same file always gives the same workdirs, so a rerun finds its runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from mnv2_jax.errors import UserError

SWEEP_KEYS = ("config", "overrides", "variants", "grid", "seeds", "report", "slurm", "tpu")
REPORT_KEYS = ("metric", "lines")
VARIANT_AXIS = "variant"


class SweepError(UserError):
    """A sweep file or a sweep option is malformed."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of a sweep: its name, its swept values, the overrides it trains with and its workdir."""

    name: str
    params: dict[str, Any]  # swept field (or "variant") -> value
    overrides: dict[str, Any]  # every config override of the run, in order
    workdir: str


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: str
    config: str
    axes: tuple[str, ...]  # the swept fields, "variant" first when there are variants
    runs: tuple[Run, ...]
    report: dict[str, Any]
    slurm: dict[str, Any]
    tpu: dict[str, Any]

    @property
    def root(self) -> str:
        """`<root>/<sweep name>`: the runs' workdirs and the report."""
        return os.path.dirname(self.runs[0].workdir)


def format_value(value: Any) -> str:
    """A value as `--config.FIELD=VALUE` takes it: tuples as `(1,4,4)` (their strings quoted: `('^Conv/',)`),
    everything else as Python prints it."""
    if isinstance(value, list | tuple):
        items = [repr(v) if isinstance(v, str) else format_value(v) for v in value]
        return "(" + ",".join(items) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _name_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "-".join(_name_value(v) for v in value)
    return str(value).replace(os.sep, "_")


def _short_names(fields: Sequence[str]) -> dict[str, str]:
    """Each field's last component (`model.width` -> `width`), or the whole name where two would collide."""
    last = [field.rsplit(".", 1)[-1] for field in fields]
    return {field: short if last.count(short) == 1 else field for field, short in zip(fields, last, strict=True)}


def run_name(params: Mapping[str, Any]) -> str:
    """`linear,expansion=4,width=0.5,seed=1`: the variant's name, then `field=value` of each swept field."""
    shorts = _short_names([k for k in params if k != VARIANT_AXIS])
    parts = [str(params[VARIANT_AXIS])] if VARIANT_AXIS in params else []
    parts += [f"{shorts[k]}={_name_value(v)}" for k, v in params.items() if k != VARIANT_AXIS]
    return ",".join(parts)


def _load_error(path: str, source: str, error: Exception) -> SweepError:
    """One line naming sweep file `path`, its line that failed (of a syntax error, or the innermost of its frames in
    the traceback; `source` is the file name importlib compiled it with) and the error."""
    if isinstance(error, SyntaxError) and error.filename == source:
        line, message = error.lineno, error.msg
    else:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == source]
        line, message = (lines[-1] if lines else None), " ".join(str(error).split())
    where = f", line {line}" if line else ""
    return SweepError(f"sweep file {path}{where}: {type(error).__name__}: {message}")


def _load_module(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} does not exist (sweeps live in configs/sweeps/)")
    spec = importlib.util.spec_from_file_location(f"mnv2_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise _load_error(path, spec.origin, e) from None
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"sweep file {path} must define get_sweep() returning a dict with keys {SWEEP_KEYS}")
    try:
        definition = module.get_sweep()
    except Exception as e:
        raise _load_error(path, spec.origin, e) from None
    if not isinstance(definition, Mapping):
        raise SweepError(f"{path}: get_sweep() must return a dict, got {type(definition).__name__}")
    return definition


def _check(path: str, definition: Mapping[str, Any]) -> None:
    unknown = sorted(set(definition) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key(s) {unknown}; allowed: {SWEEP_KEYS}")
    if not isinstance(definition.get("config"), str):
        raise SweepError(f"{path}: 'config' must name the base config, e.g. 'configs/quickstart.py:epochs=2'")
    for key in ("overrides", "grid", "report", "slurm", "tpu"):
        if not isinstance(definition.get(key, {}), Mapping):
            raise SweepError(f"{path}: {key!r} must be a dict")
    for field, values in definition.get("grid", {}).items():
        if not isinstance(values, list | tuple) or not values:
            raise SweepError(f"{path}: grid[{field!r}] must be a non-empty list of values")
    names = []
    for variant in definition.get("variants", []):
        if not isinstance(variant, Mapping) or not isinstance(variant.get("name"), str) or not variant["name"]:
            raise SweepError(f"{path}: each variant must be a dict with a 'name' and its overrides, got {variant!r}")
        names.append(variant["name"])
    if len(set(names)) != len(names):
        raise SweepError(f"{path}: variant names must be unique, got {names}")
    seeds = definition.get("seeds", [])
    if not isinstance(seeds, list | tuple) or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{path}: 'seeds' must be a list of integers, got {seeds!r}")
    unknown = sorted(set(definition.get("report", {})) - set(REPORT_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown report key(s) {unknown}; allowed: {REPORT_KEYS}")


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise SweepError(f"{option} takes FIELD=VALUE, got {text!r}")
    return field, value


def load(path: str, root: str, extra_overrides: Sequence[str] = ()) -> Sweep:
    """The sweep of file `path`, its runs under `<root>/<file name>`, each with `extra_overrides` (`FIELD=VALUE`,
    from `mnv2 sweep --set`) added last."""
    definition = _load_module(path)
    _check(path, definition)
    name = os.path.splitext(os.path.basename(path))[0]
    extra = dict(parse_assignment(text, "--set") for text in extra_overrides)
    grid = dict(definition.get("grid", {}))
    variants = list(definition.get("variants", [])) or [None]
    seeds = list(definition.get("seeds", []))
    axes = ([VARIANT_AXIS] if variants != [None] else []) + list(grid) + (["seed"] if seeds else [])
    if not axes:
        raise SweepError(f"{path}: a sweep needs 'variants', a 'grid' or 'seeds'")

    runs = []
    for variant, values, seed in itertools.product(variants, itertools.product(*grid.values()), seeds or [None]):
        params: dict[str, Any] = {}
        overrides = dict(definition.get("overrides", {}))
        if variant is not None:
            params[VARIANT_AXIS] = variant["name"]
            overrides.update({k: v for k, v in variant.items() if k != "name"})
        params.update(zip(grid, values, strict=True))
        overrides.update(zip(grid, values, strict=True))
        if seed is not None:
            params["seed"] = seed
            overrides["seed"] = seed
        overrides.update(extra)
        run = run_name(params)
        runs.append(Run(run, params, overrides, os.path.join(root, name, run)))
    if len({run.name for run in runs}) != len(runs):
        raise SweepError(f"{path}: two runs would share a name; give the variants distinct names")
    return Sweep(
        name=name,
        path=path,
        config=definition["config"],
        axes=tuple(axes),
        runs=tuple(runs),
        report=dict(definition.get("report", {})),
        slurm=dict(definition.get("slurm", {})),
        tpu=dict(definition.get("tpu", {})),
    )


def config_arguments(run: Run) -> list[str]:
    """The run's overrides as `--config.FIELD=VALUE` arguments."""
    return [f"--config.{field}={format_value(value)}" for field, value in run.overrides.items()]


def train_command(sweep: Sweep, run: Run) -> list[str]:
    """`mnv2 train` of one run: the same on every runner and on every rerun (which resumes from the workdir)."""
    return ["mnv2", "train", "--config", sweep.config, "--workdir", run.workdir, *config_arguments(run)]


def validate(sweep: Sweep) -> None:
    """Every run's config passes the trainer's checks before anything starts (one line naming the run and field)."""
    from mnv2_jax.cli import common

    for run in sweep.runs:
        try:
            common.config_from_spec(sweep.config, *config_arguments(run))
        except UserError as e:
            raise SweepError(f"sweep {sweep.name}, run {run.name}: {e}") from None
