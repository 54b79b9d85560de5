"""`mnv2 sweep SWEEP [--runner local|slurm|tpu] [--dry-run] [--parallel N] [--report] [--root DIR] [--set F=V ...]`.

Expands a sweep file (`configs/sweeps/*.py`) into runs named after their swept values under `<root>/<sweep name>/`,
and trains the unfinished ones: rerun the same command after an interruption and it skips the finished runs and
resumes the others. `--report` writes the CSV, Markdown table and plots of what the runs have logged so far.
"""

from __future__ import annotations

from absl import flags

from mnv2_jax.cli import common


@common.command
def main(argv: list[str]) -> int | None:
    fv = flags.FlagValues()
    flags.DEFINE_enum("runner", "local", ["local", "slurm", "tpu"], "where the runs train", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "print what would run or be submitted; change nothing", flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "local runner: runs training at the same time", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool(
        "report", False, "write the report of the runs (CSV, Markdown, plots); train nothing", flag_values=fv
    )
    flags.DEFINE_string("root", "workdirs/sweeps", "the runs live in ROOT/<sweep name>/<run name>", flag_values=fv)
    flags.DEFINE_multi_string("set", [], "FIELD=VALUE: a config override for every run", flag_values=fv)
    flags.DEFINE_multi_string("slurm", [], "KEY=VALUE: a launch.slurm.SlurmJob option (e.g. nodes=2)", flag_values=fv)
    flags.DEFINE_multi_string("tpu", [], "KEY=VALUE: a launch.tpu.TpuPod option (e.g. name=my-pod)", flag_values=fv)
    flags.DEFINE_alias("dry-run", "dry_run", flag_values=fv)
    positional = common.parse(fv, argv)
    if len(positional) != 1:
        raise common.UsageError(
            f"usage: {argv[0]} configs/sweeps/SWEEP.py [--runner local|slurm|tpu] [--dry-run] [--parallel N] [--report]"
        )
    from mnv2_jax.sweeps import report, runner, spec

    sweep = spec.load(positional[0], fv.root, fv.set)
    if fv.report:
        written = report.write(sweep)
        print(report.markdown_table(written.rows), end="")
        for path in written.paths.values():
            print(path)
        return 0
    spec.validate(sweep)
    runner.check_commands(sweep)
    if fv.runner == "slurm":
        return runner.run_slurm(sweep, runner.parse_options(fv.slurm, "--slurm"), dry_run=fv.dry_run)
    if fv.runner == "tpu":
        return runner.run_tpu(sweep, runner.parse_options(fv.tpu, "--tpu"), dry_run=fv.dry_run)
    return runner.run_local(sweep, parallel=fv.parallel, dry_run=fv.dry_run)
