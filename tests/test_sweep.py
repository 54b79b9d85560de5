"""`mnv2 sweep`: sweep files expanded into named runs, local runs that resume after a kill, the report, hparams."""

import csv
import fcntl
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest
from conftest import REPO, mnv2_command

from mnv2_jax.sweeps import report, runner, spec

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def read(path) -> str:
    return pathlib.Path(path).read_text()


def write_sweep(path, body: str):
    path.write_text(f"def get_sweep():\n    return {body}\n")
    return str(path)


def test_a_sweep_file_expands_into_stably_named_runs_with_their_overrides(tmp_path):
    path = write_sweep(
        tmp_path / "ablation.py",
        """{
        "config": "configs/quickstart.py:epochs=2",
        "overrides": {"log_every_steps": 10},
        "variants": [{"name": "linear"}, {"name": "relu6", "model.nonlinear_bottleneck": True}],
        "grid": {"model.stage_expansion": [(1, 4, 4, 6, 6, 6, 6), (1, 6, 6, 6, 6, 6, 6)], "model.width": [0.5]},
        "seeds": [0, 1],
    }""",
    )
    sweep = spec.load(path, str(tmp_path / "root"), ["num_train_steps=5"])
    assert sweep.name == "ablation"
    assert sweep.axes == ("variant", "model.stage_expansion", "model.width", "seed")
    names = [run.name for run in sweep.runs]
    assert names[:2] == [
        "linear,stage_expansion=1-4-4-6-6-6-6,width=0.5,seed=0",
        "linear,stage_expansion=1-4-4-6-6-6-6,width=0.5,seed=1",
    ]
    assert len(names) == len(set(names)) == 8
    assert names == [run.name for run in spec.load(path, str(tmp_path / "root")).runs]  # the same on every load
    relu6 = sweep.runs[-1]
    assert relu6.workdir == str(tmp_path / "root" / "ablation" / "relu6,stage_expansion=1-6-6-6-6-6-6,width=0.5,seed=1")
    command = spec.train_command(sweep, relu6)
    assert command[:6] == ["mnv2", "train", "--config", "configs/quickstart.py:epochs=2", "--workdir", relu6.workdir]
    assert command[6:] == [
        "--config.log_every_steps=10",
        "--config.model.nonlinear_bottleneck=True",
        "--config.model.stage_expansion=(1,6,6,6,6,6,6)",
        "--config.model.width=0.5",
        "--config.seed=1",
        "--config.num_train_steps=5",
    ]
    # The command line's overrides reach the trainer's config: a per-stage expansion tuple, typed fields.
    from mnv2_jax.cli import common

    config = common.config_from_spec(sweep.config, *command[6:])
    assert config.model.stage_expansion == (1, 6, 6, 6, 6, 6, 6)
    assert (config.model.nonlinear_bottleneck, config.model.width, config.seed) == (True, 0.5, 1)
    assert config.num_train_steps == 5


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"config": "configs/quickstart.py", "grid": {"model.width": []}}', "grid['model.width'] must be a non-empty"),
        ('{"config": "configs/quickstart.py", "grids": {}}', "unknown sweep key(s) ['grids']"),
        ('{"config": "configs/quickstart.py", "variants": [{"name": "a"}, {"name": "a"}]}', "variant names must be"),
        ('{"config": "configs/quickstart.py"}', "needs 'variants', a 'grid' or 'seeds'"),
        ('{"config": "configs/quickstart.py", "grid": {"model.widht": [0.5]}}', "run widht=0.5: unknown config field"),
        ('{"config": "configs/quickstart.py", "grid": {"model.residual": ["skip"]}}', "model.residual must be one of"),
        ('{"config": "configs/quickstart.py", "grid": {}', "bad.py, line 2: SyntaxError: '{' was never closed"),
        ('{"config": QUICKSTART}', "bad.py, line 2: NameError: name 'QUICKSTART' is not defined"),
    ],
)
def test_bad_sweep_files_are_one_line_errors_before_anything_runs(tmp_path, mnv2, body, message):
    path = os.path.relpath(write_sweep(tmp_path / "bad.py", body))  # as typed, relative to the working directory
    status, _, err = mnv2("sweep", path, "--root", tmp_path / "root")
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "sweeps").glob("*.py")))
def test_every_shipped_sweep_file_builds_and_validates_its_runs(tmp_path, mnv2, path):
    status, out, err = mnv2("sweep", path, "--root", tmp_path / "root", "--dry-run")
    assert status == 0, err
    sweep = spec.load(path, str(tmp_path / "root"))
    assert out.count("mnv2 train --config ") == len(sweep.runs) > 0
    assert not (tmp_path / "root").exists()


def test_dry_run_prints_each_runs_command_and_changes_nothing(tmp_path, mnv2):
    path = write_sweep(tmp_path / "grid.py", '{"config": "configs/quickstart.py", "grid": {"model.expansion": [2, 4]}}')
    status, out, err = mnv2("sweep", path, "--root", tmp_path / "root", "--dry-run", "--set", "num_train_steps=3")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"sweep grid: 2 runs (2 new) in {tmp_path / 'root' / 'grid'}"
    assert lines[1] == (
        f"mnv2 train --config configs/quickstart.py --workdir {tmp_path / 'root' / 'grid' / 'expansion=2'} "
        "--config.model.expansion=2 --config.num_train_steps=3"
    )
    assert len(lines) == 3
    assert not (tmp_path / "root").exists()


def test_slurm_and_tpu_runners_submit_the_same_train_command(tmp_path, mnv2, fake_gcs):
    path = write_sweep(tmp_path / "grid.py", '{"config": "configs/quickstart.py", "grid": {"model.expansion": [2, 4]}}')
    status, out, err = mnv2(
        "sweep",
        path,
        "--root",
        tmp_path / "root",
        "--runner",
        "slurm",
        "--dry-run",
        "--slurm",
        "nodes=2",
        "--slurm",
        "partition=gpu",
    )
    assert status == 0, err
    sweep = spec.load(path, str(tmp_path / "root"))
    import shlex

    from mnv2_jax.launch import slurm

    for run in sweep.runs:
        assert f"#SBATCH --job-name=grid.{run.name}" in out
        # The job runs this environment's mnv2 (an unactivated venv's jobs found no `mnv2` on PATH)
        program, *arguments = slurm.this_environments_program(spec.train_command(sweep, run))
        assert os.path.dirname(program) == os.path.dirname(sys.executable) or program == sys.executable
        assert arguments[-len(spec.train_command(sweep, run)) + 1 :] == spec.train_command(sweep, run)[1:]
        assert "srun --kill-on-bad-exit=1 " + shlex.join([program, *arguments]) in out
    assert out.count("#SBATCH --nodes=2") == 2 and out.count("#SBATCH --partition=gpu") == 2
    assert not (tmp_path / "root").exists()

    status, out, err = mnv2(
        "sweep",
        path,
        "--root",
        "gs://bucket/sweeps",
        "--runner",
        "tpu",
        "--dry-run",
        "--tpu",
        "name=pod",
        "--tpu",
        "zone=us-central2-b",
    )
    assert status == 0, err
    remote = [line for line in out.splitlines() if line.startswith("gcloud compute tpus tpu-vm ssh pod")]
    assert len(remote) == 2 and all("--worker=all" in line for line in remote)
    assert "--workdir gs://bucket/sweeps/grid/expansion=4" in remote[1]


def read_records(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line) for line in read(path).splitlines()] if os.path.exists(path) else []


def eval_records(workdir, metric):
    return [(r["step"], r[metric]) for r in read_records(workdir) if metric in r]


def expected_row(run: spec.Run, batch_size: int, size: dict) -> dict:
    """A run's report row computed from its own files: swept values, state, last step, `size` (params, macs), the
    final and best eval/top1 and the best one's step, the last evaluation's other metrics (not its image count or
    seconds), `finished.json`'s seconds and the median steps/s of the progress reports x the batch size."""
    records = read_records(run.workdir)
    evals = [r for r in records if "eval/top1" in r]
    last, best = (evals[-1], max(evals, key=lambda r: r["eval/top1"])) if evals else ({}, {})
    finished = os.path.join(run.workdir, "finished.json")
    rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
    return {
        "run": run.name,
        **run.params,
        "state": "finished" if os.path.exists(finished) else "started" if os.path.isdir(run.workdir) else "new",
        "step": max((r["step"] for r in records if "step" in r), default=0),
        **size,
        "final eval/top1": last.get("eval/top1"),
        "best eval/top1": best.get("eval/top1"),
        "best step": best.get("step"),
        "final eval/loss": last.get("eval/loss"),
        "final eval/top5": last.get("eval/top5"),
        "wall seconds": json.loads(read(finished))["train_seconds"] if os.path.exists(finished) else None,
        "train images/s": statistics.median(rates) * batch_size if rates else None,
    }


def summary_size(mnv2, sweep: spec.Sweep, run: spec.Run) -> dict:
    """Parameters and multiply-adds of a run's model by `mnv2 summary --json` (with the class count the run read from
    its dataset, from its `config.json`)."""
    num_classes = json.loads(read(os.path.join(run.workdir, "config.json")))["model"]["num_classes"]
    arguments = [*spec.config_arguments(run), f"--config.model.num_classes={num_classes}"]
    status, out, err = mnv2("summary", "--config", sweep.config, *arguments, "--json")
    assert status == 0, err
    counted = json.loads(out)
    return {"params": counted["params"], "macs": counted["macs"]}


def markdown_cell(column: str, value) -> str:
    """The report's Markdown: multiply-adds and parameters in millions, seconds and images/s whole, metrics to 4
    decimals, empty for no value."""
    if value is None:
        return ""
    if column in ("macs", "params"):
        return f"{value / 1e6:.1f}M" if column == "macs" else f"{value / 1e6:.3f}M"
    if column in ("wall seconds", "train images/s"):
        return f"{value:.0f}"
    return f"{value:.4f}" if column.startswith(("final ", "best ")) and isinstance(value, float) else str(value)


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """The first table of a Markdown file: run name -> {column: cell}."""
    lines = [line for line in text.split("\n\n## ")[0].splitlines() if line.startswith("|")]
    header, *rows = [[cell.strip() for cell in line[1:-1].split("|")] for line in lines]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in rows[1:]}


def csv_value(cell: str):
    """A CSV cell's value: None when empty, a number where it is one, else the text."""
    if cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def assert_report_is(written: report.Report, expected: list[dict]) -> None:
    """The CSV's columns and rows are `expected`'s, and each run's own Markdown row holds, cell by cell, its values."""
    with open(written.paths[report.CSV_FILE]) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(expected[0])
        assert [{column: csv_value(cell) for column, cell in row.items()} for row in reader] == expected
    table = markdown_rows(read(written.paths[report.MARKDOWN_FILE]))
    assert list(table) == [values["run"] for values in expected]
    for values in expected:
        assert table[values["run"]] == {column: markdown_cell(column, value) for column, value in values.items()}


def wait_for(predicate, timeout_s=300.0):
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def lock_is_free(workdir) -> bool:
    fd = os.open(os.path.join(workdir, runner.LOCK_FILE), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def hparams_of(tensorboard_dir) -> dict:
    """The hparams a run wrote to TensorBoard (the hparams plugin's session start info)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2

    values = {}
    for name in os.listdir(tensorboard_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(tensorboard_dir, name)):
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    for key, v in data.session_start_info.hparams.items():
                        values[key] = getattr(v, v.WhichOneof("kind"))
    return values


@pytest.mark.slow
def test_a_killed_sweep_reruns_only_what_was_missing_and_its_report_equals_the_runs_metrics(tmp_path, folder, mnv2):
    """Must-show of issue 18: a 2 expansions x 2 widths sweep of the quickstart config, shortened by overrides, killed
    while its second run trains; the same command then skips the finished run, resumes the interrupted one and trains
    the rest; `--report` writes the CSV, the table and the plots with the values of the runs' `metrics.jsonl`."""
    path = write_sweep(
        tmp_path / "quick.py",
        '{"config": "configs/quickstart.py", "grid": {"model.expansion": [2, 4], "model.width": [0.25, 0.35]}}',
    )
    short = {
        "dataset": folder,
        "resolution": 16,
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_train_steps": 6,
        "log_every_steps": 2,
        "eval_every_epochs": 0.5,
        "checkpoint_every_steps": 2,
        "model.stage_repeats": "(1,1,1,1,1,1,1)",
        "data.cache": False,
    }
    sweep_args = ["sweep", path, "--root", tmp_path / "root", *[f"--set={k}={v}" for k, v in short.items()]]
    sweep = spec.load(path, str(tmp_path / "root"), [f"{k}={v}" for k, v in short.items()])
    first, second = sweep.runs[0].workdir, sweep.runs[1].workdir

    killed = subprocess.Popen(mnv2_command(*sweep_args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def reached(path, text=None) -> bool:
            assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
            return os.path.exists(path) and (text is None or text in read(path))

        wait_for(lambda: reached(os.path.join(first, "finished.json")))
        log = os.path.join(second, runner.LOG_FILE)
        wait_for(lambda: reached(log, "training steps 1..6"))
        time.sleep(1.0)  # the run's SIGTERM handler is installed right after that line; it is still compiling
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    wait_for(lambda: lock_is_free(second))  # the run saw its parent die (SIGTERM), checkpointed and stopped
    first_metrics = read(os.path.join(first, "metrics.jsonl"))
    assert not os.path.exists(os.path.join(second, "finished.json"))

    rerun = subprocess.run(mnv2_command(*sweep_args), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "4 runs (1 finished, 1 started, 2 new)" in rerun.stdout
    assert sweep.runs[0].name not in rerun.stdout.split("\n", 1)[1]  # never started again
    assert read(os.path.join(first, "metrics.jsonl")) == first_metrics
    assert read(os.path.join(first, runner.LOG_FILE)).count("training steps") == 1
    second_log = read(log)
    assert "resumed from" in second_log and second_log.count("training steps") == 2
    assert all(os.path.exists(os.path.join(run.workdir, "finished.json")) for run in sweep.runs)
    for run in sweep.runs[1:]:  # the line of each run it trained shows the report's metric of its last evaluation
        top1 = eval_records(run.workdir, "eval/top1")[-1][1]
        assert re.search(rf"finished {re.escape(run.name)} in \d+ s: eval/top1={top1:.4f}\n", rerun.stdout)

    written = report.write(sweep)
    assert written.metric == "eval/top1"
    expected = [expected_row(run, short["batch_size"], summary_size(mnv2, sweep, run)) for run in sweep.runs]
    assert_report_is(written, expected)
    for values, run in zip(expected, sweep.runs, strict=True):
        history = eval_records(run.workdir, "eval/top1")
        assert len(history) == 3 and (values["step"], values["state"]) == (6, "finished")
        assert values["wall seconds"] > 0 and values["train images/s"] > 0
        saved = json.loads(read(os.path.join(run.workdir, "config.json")))
        assert saved["model"]["expansion"] == run.params["model.expansion"]
        assert written.step_series[run.name] == ([s for s, _ in history], [v for _, v in history])
        # TensorBoard gets every field as an hparam, nested ones included.
        hparams = hparams_of(os.path.join(run.workdir, "tensorboard"))
        assert hparams["model.expansion"] == run.params["model.expansion"]
        assert hparams["model.width"] == pytest.approx(run.params["model.width"])
        assert hparams["model.stage_repeats"] == "(1, 1, 1, 1, 1, 1, 1)"
    # One line per expansion (the first grid field), points ordered by multiply-adds.
    assert set(written.macs_series) == {"expansion=2", "expansion=4"}
    for expansion, (xs, ys) in written.macs_series.items():
        members = sorted(
            (r for r in expected if f"expansion={r['model.expansion']}" == expansion), key=lambda r: r["macs"]
        )
        assert xs == [r["macs"] / 1e6 for r in members] and xs == sorted(xs)
        assert ys == [r["final eval/top1"] for r in members]
    from matplotlib import image

    for plot in (report.MACS_PLOT, report.STEPS_PLOT):
        assert image.imread(written.paths[plot]).shape[2] in (3, 4)


def write_records(workdir, records) -> None:
    os.makedirs(workdir, exist_ok=True)
    pathlib.Path(workdir, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def evaluation(step: int, top1: float, top5: float, loss: float) -> dict:
    """An evaluation's record, with the image count and seconds that the report leaves out."""
    left_out = {"eval/count": 13.0, "eval/seconds": 2.5}
    return {"step": step, "eval/top1": top1, "eval/top5": top5, "eval/loss": loss, **left_out}


def test_every_report_column_is_each_runs_own_value(tmp_path):
    """Three runs at resolutions 96, 128 and 160 of the released MobileNetV2 1.0, their files written here: finished,
    started and new. Multiply-adds come from the paper's per-block formula; images/s is the median, not the mean, of
    the progress reports' steps/s (odd and even counts) times the batch size; the best step is not the last one."""
    path = write_sweep(
        tmp_path / "res.py",
        '{"config": "configs/imagenet.py", "overrides": {"batch_size": 8}, "grid": {"resolution": [96, 128, 160]}}',
    )
    sweep = spec.load(path, str(tmp_path / "root"))
    finished, started, _ = sweep.runs
    from test_architecture import table1_macs

    from mnv2_jax import config as config_lib
    from mnv2_jax.cli import common

    for run in (finished, started):
        config = common.config_from_spec(sweep.config, *spec.config_arguments(run))
        os.makedirs(run.workdir)
        pathlib.Path(run.workdir, "config.json").write_text(json.dumps(config_lib.to_dict(config)))
    write_records(finished.workdir, [
        {"hparams": {"batch_size": 8}},
        {"step": 10, "train/loss": 2.0}, {"step": 10, "steps_per_sec": 2.0}, evaluation(10, 0.5, 0.75, 1.5),
        {"step": 20, "steps_per_sec": 10.0}, evaluation(20, 0.625, 0.8125, 1.375),
        {"step": 30, "steps_per_sec": 3.0}, {"step": 30, "uptime": 9.0}, evaluation(30, 0.5625, 0.875, 1.25),
    ])  # fmt: skip
    pathlib.Path(finished.workdir, "finished.json").write_text('{"step": 30, "train_seconds": 12.5}')
    write_records(started.workdir, [
        {"step": 5, "steps_per_sec": 4.0}, {"step": 10, "steps_per_sec": 1.0}, evaluation(10, 0.25, 0.5, 2.0),
        {"step": 15, "steps_per_sec": 2.0}, {"step": 20, "steps_per_sec": 8.0},
    ])  # fmt: skip

    written = report.write(sweep)
    params = 3_504_872  # torchvision's count of MobileNetV2 1.0 with 1000 classes (tests/test_architecture.py)
    sizes = [{"params": params, "macs": sum(table1_macs(1.0, r, num_classes=1000).values())} for r in (96, 128)]
    sizes.append({"params": None, "macs": None})
    assert_report_is(written, [expected_row(run, 8, size) for run, size in zip(sweep.runs, sizes, strict=True)])
    best_steps_and_rates = [(row["best step"], row["train images/s"]) for row in written.rows]
    assert best_steps_and_rates == [(20, 3 * 8), (10, 3 * 8), (None, None)]  # medians of 2, 10, 3 and of 4, 1, 2, 8
    assert markdown_rows(read(written.paths[report.MARKDOWN_FILE]))[finished.name] == dict(
        zip(
            ["run", "resolution", "state", "step", "params", "macs", "final eval/top1", "best eval/top1", "best step",
             "final eval/loss", "final eval/top5", "wall seconds", "train images/s"],
            ["resolution=96", "96", "finished", "30", "3.505M", "56.3M", "0.5625", "0.6250", "20", "1.2500", "0.8750",
             "12", "24"],
            strict=True,
        )
    )  # fmt: skip


STUB_TRAINER = """#!/usr/bin/env python3
import json, os, signal, sys, time
workdir = sys.argv[sys.argv.index("--workdir") + 1]
def stop(signum, frame):
    open(os.path.join(workdir, "sigterm"), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(workdir, "started"), "w").close()
time.sleep(float(os.environ.get("STUB_SECONDS", "60")))
json.dump({"step": 1, "train_seconds": 1.0}, open(os.path.join(workdir, "finished.json"), "w"))
"""

SWEEP_WITH_STUB = """
import sys
from mnv2_jax.sweeps import runner, spec
runner._mnv2_executable = lambda: {stub!r}
sweep = spec.load({path!r}, {root!r})
runner.check_commands(sweep)
sys.exit(runner.run_local(sweep))
"""


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_stopped_sweep_stops_its_runs_and_a_rerun_waits_for_them(tmp_path, how):
    """SIGTERM to the sweep: its run gets SIGTERM and the sweep exits with 143. SIGKILL: the kernel sends the run
    SIGTERM (PR_SET_PDEATHSIG); the run keeps the workdir's lock until it exits."""
    stub = tmp_path / "mnv2"
    stub.write_text(STUB_TRAINER)
    stub.chmod(0o755)
    path = write_sweep(tmp_path / "grid.py", '{"config": "configs/quickstart.py", "grid": {"model.expansion": [2]}}')
    sweep = spec.load(path, str(tmp_path / "root"))
    workdir = sweep.runs[0].workdir
    script = SWEEP_WITH_STUB.format(stub=str(stub), path=path, root=str(tmp_path / "root"))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    wait_for(lambda: os.path.exists(os.path.join(workdir, "started")), timeout_s=60)
    assert not lock_is_free(workdir)
    process.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    status = process.wait(timeout=30)
    wait_for(lambda: os.path.exists(os.path.join(workdir, "sigterm")), timeout_s=30)
    assert status == (143 if how == "sigterm" else -signal.SIGKILL)
    wait_for(lambda: lock_is_free(workdir), timeout_s=30)
    assert runner.run_state(sweep.runs[0]) == "started"
    # The rerun trains it to the end (the stub's quick run) and a third run finds it finished.
    rerun = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "STUB_SECONDS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "1 runs (1 started)" in rerun.stdout and "(resumes)" in rerun.stdout
    assert runner.run_state(sweep.runs[0]) == "finished"


def test_a_workdir_started_with_another_command_is_refused(tmp_path, mnv2):
    path = write_sweep(tmp_path / "grid.py", '{"config": "configs/quickstart.py", "grid": {"model.expansion": [2]}}')
    sweep = spec.load(path, str(tmp_path / "root"), ["num_train_steps=5"])
    os.makedirs(sweep.runs[0].workdir)
    with open(os.path.join(sweep.runs[0].workdir, runner.RUN_FILE), "w") as f:
        json.dump({"sweep": "grid", "command": spec.train_command(sweep, sweep.runs[0])}, f)
    status, _, err = mnv2("sweep", path, "--root", tmp_path / "root", "--dry-run", "--set", "num_train_steps=5")
    assert status == 0, err
    status, _, err = mnv2("sweep", path, "--root", tmp_path / "root", "--set", "num_train_steps=6")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "run expansion=2 in" in err and "was started with another command" in err
    assert "--config.num_train_steps=5" in err and "--config.num_train_steps=6" in err


def test_the_report_summarises_each_variant_over_its_seeds(tmp_path):
    path = write_sweep(
        tmp_path / "seeds.py",
        '{"config": "configs/quickstart.py", "variants": [{"name": "a"}, {"name": "b"}], "seeds": [0, 1, 2]}',
    )
    sweep = spec.load(path, str(tmp_path / "root"))
    finals = {"a,seed=0": 0.8, "a,seed=1": 0.7, "a,seed=2": 0.9, "b,seed=0": 0.5, "b,seed=1": None, "b,seed=2": 0.6}
    rows = [{"run": run.name, **run.params, "final eval/top1": finals[run.name]} for run in sweep.runs]
    summary = report.over_seeds(sweep, rows, "eval/top1")
    assert [(r["variant"], r["seeds"]) for r in summary] == [("a", 3), ("b", 2)]
    assert summary[0]["mean final eval/top1"] == pytest.approx(0.8)
    assert summary[0]["std final eval/top1"] == pytest.approx(0.1)  # sample standard deviation (n - 1)
    assert (summary[0]["min final eval/top1"], summary[0]["max final eval/top1"]) == (0.7, 0.9)
    assert summary[1]["mean final eval/top1"] == pytest.approx(0.55)
    assert "| a | 3 | 0.8000 | 0.1000 | 0.7000 | 0.9000 |" in report.markdown_table(summary)
    no_seeds = spec.load(write_sweep(tmp_path / "v.py", '{"config": "c.py", "variants": [{"name": "a"}]}'), "r")
    assert report.over_seeds(no_seeds, rows, "eval/top1") == []


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """`gs://...` paths through `etils.epath` land under `tmp_path/gcs` (no network)."""
    from etils.epath import testing

    root = tmp_path / "gcs"

    def local(path):
        text = os.fspath(path)
        return str(root / text[len("gs://") :]) if text.startswith("gs://") else path

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *[local(a) for a in args], **kwargs)

    names = ("open", "copy", "rename", "exists", "glob", "walk", "isdir", "listdir", "makedirs", "mkdir", "remove")
    names += ("replace", "rmtree", "stat")
    from etils.epath import gpath

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath takes TF's real GCS, not the mock
    with testing.mock_epath(**dict.fromkeys(names, redirect)):
        yield root
    assert not os.path.exists("gs:")  # nothing wrote a local folder in place of the bucket


def test_a_gs_workdirs_own_files_go_through_the_cloud_file_system(fake_gcs):
    """The trainer's workdir files (write probe, config.json, metrics.jsonl, finished.json, interrupted checkpoints)
    and the sweep's run states use `etils.epath`, which writes `gs://` through TensorFlow's Cloud Storage file system;
    before, `os.path.abspath("gs://b/w")` made them a local folder `gs:/b/w`."""
    from mnv2_jax.config import base_config
    from mnv2_jax.training import checkpoint, metrics, run_files, train

    workdir = "gs://bucket/sweeps/grid/expansion=2"
    run_files.check_writable(workdir)
    assert (fake_gcs / "bucket/sweeps/grid/expansion=2").is_dir()
    assert checkpoint.checkpoint_dir(workdir) == workdir + "/checkpoints"

    config = base_config()
    train._write_config(workdir, config)
    assert json.loads((fake_gcs / "bucket/sweeps/grid/expansion=2/config.json").read_text())["model"]["width"] == 1.0
    writer = metrics.JsonlWriter(workdir + "/metrics.jsonl")
    writer.write_scalars(1, {"train/loss": 2.5})
    writer.write_scalars(2, {"eval/top1": 0.5})
    writer.close()
    assert run_files.read_metrics(workdir) == [{"step": 1, "train/loss": 2.5}, {"step": 2, "eval/top1": 0.5}]

    sweep_run = spec.Run("expansion=2", {"model.expansion": 2}, {"model.expansion": 2}, workdir)
    assert runner.run_state(sweep_run) == "started"
    run_files.write_finished(workdir, 2, 12.5)
    assert run_files.read_finished(workdir) == {"step": 2, "train_seconds": 12.5}
    assert runner.run_state(sweep_run) == "finished"

    # On Cloud Storage orbax marks a finished step with commit_success.txt (no rename): step 4 was interrupted.
    checkpoints = fake_gcs / "bucket/sweeps/grid/expansion=2/checkpoints"
    (checkpoints / "2").mkdir(parents=True)
    (checkpoints / "2" / "commit_success.txt").write_text("ok")
    (checkpoints / "4").mkdir()
    assert checkpoint.discard_incomplete(workdir) == ["4"]
    assert sorted(os.listdir(checkpoints)) == ["2"]


def test_parallel_runs_find_each_dataset_prepared_once(tmp_path, monkeypatch):
    """`--parallel N` first prepares each dataset the runs read, once (first-time TFDS preparations would race)."""
    from mnv2_jax.training import train

    path = write_sweep(
        tmp_path / "data.py",
        '{"config": "configs/quickstart.py", "grid": {"dataset": ["cifar10", "fashion_mnist"], "seed": [0, 1]}}',
    )
    sweep = spec.load(path, str(tmp_path / "root"))
    opened = []
    monkeypatch.setattr(train, "open_dataset", lambda config: opened.append((config.dataset, config.data_dir)))
    runner.prepare_datasets(sweep, sweep.runs)
    assert opened == [("cifar10", None), ("fashion_mnist", None)]


def test_the_tpu_runner_with_recover_brings_a_preempted_pod_back_for_each_run(tmp_path, fake_gcs, monkeypatch):
    """`--tpu recover=True`: the first run's pod is preempted once (ssh lost, then PREEMPTED), so it is deleted,
    created, set up and the run rerun; the sweep goes on once each run's `finished.json` exists."""
    import re

    from mnv2_jax.launch import tpu
    from mnv2_jax.training import run_files

    monkeypatch.chdir(tmp_path)  # the recovery log's default folder, tpu_logs/
    monkeypatch.setattr(tpu, "pinned_requirements", lambda *args: ["jax[tpu]==0.10.2"])
    path = write_sweep(tmp_path / "grid.py", '{"config": "configs/quickstart.py", "grid": {"model.expansion": [2, 4]}}')
    sweep = spec.load(path, "gs://bucket/sweeps")
    pod = {"state": "READY", "preempt": True}
    calls = []

    def run(command, check=False, **kwargs):
        action = command[4] if command[0] == "gcloud" else command[0]
        calls.append(action)
        status, stdout = 0, ""
        if action == "describe":
            stdout = pod["state"]
        elif action == "create":
            pod["state"] = "READY"
        elif action == "ssh" and "pip install" not in command[-1]:
            if pod.pop("preempt", False):
                pod["state"], status = "PREEMPTED", 255
            else:
                workdir = tmp_path / "gcs" / re.search(r"--workdir gs://(\S+)", command[-1]).group(1)  # fake_gcs's
                workdir.mkdir(parents=True)
                run_files.write_finished(str(workdir), 3, 1.0)
        return subprocess.CompletedProcess(command, status, stdout, "")

    said = []
    options = {"name": "pod", "zone": "us-central2-b", "recover": True, "max_attempts": 3}
    assert runner.run_tpu(sweep, options, out=said.append, run=run) == 0
    assert calls == ["describe", "ssh", "describe", "delete", "create", "tar", "scp", "ssh", "ssh", "describe", "ssh"]
    assert all(run_files.read_finished(point.workdir) for point in sweep.runs)
    assert said == ["sweep grid: 2 runs (2 new) in gs://bucket/sweeps/grid"]
