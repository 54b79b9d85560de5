"""Running a sweep's runs: here (`local`, N at a time), as SLURM jobs or one after another on a TPU pod.

Every runner starts the same `mnv2 train` command per run (`spec.train_command`), so a rerun of the sweep skips the
runs that finished (`finished.json` in their workdir) and resumes the others from their last checkpoint. A run's
command is recorded in `<workdir>/sweep_run.json` when it first starts; a later sweep that would train the same
workdir with another command stops with an error instead of mixing two configs in one run.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from etils import epath

from mnv2_jax.sweeps import spec
from mnv2_jax.training import run_files

RUN_FILE = "sweep_run.json"  # {"sweep": name, "command": [...], "slurm_job": id}
LOCK_FILE = "sweep.lock"  # held by the runner and its `mnv2 train` child while the run trains
LOG_FILE = "train.log"
RUNNERS = ("local", "slurm", "tpu")

Printer = Callable[[str], None]


def say(line: str) -> None:
    """Progress on stdout, flushed (a sweep's output is often piped to a log)."""
    print(line, flush=True)


def run_state(run: spec.Run) -> str:
    """`finished` (trained to its last step), `started` (has a workdir: it resumes) or `new`."""
    if run_files.read_finished(run.workdir) is not None:
        return "finished"
    return "started" if epath.Path(run.workdir).is_dir() else "new"


def _read_record(run: spec.Run) -> dict[str, Any]:
    return run_files.read_json(epath.Path(run.workdir) / RUN_FILE) or {}


def _write_record(run: spec.Run, record: Mapping[str, Any]) -> None:
    epath.Path(run.workdir).mkdir(parents=True, exist_ok=True)
    run_files.write_json(epath.Path(run.workdir) / RUN_FILE, dict(record), indent=1)


def check_commands(sweep: spec.Sweep) -> None:
    """Stops when a run's workdir was started with another command (another base config or other overrides)."""
    for run in sweep.runs:
        recorded = _read_record(run).get("command")
        command = spec.train_command(sweep, run)
        if recorded is not None and recorded != command:
            raise spec.SweepError(
                f"run {run.name} in {run.workdir} was started with another command ({shlex.join(recorded)}); "
                f"this sweep would train it with {shlex.join(command)}: use another --root or remove that workdir"
            )


def summary_line(sweep: spec.Sweep) -> str:
    states = [run_state(run) for run in sweep.runs]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("finished", "started", "new") if states.count(s))
    return f"sweep {sweep.name}: {len(sweep.runs)} runs ({counts}) in {sweep.root}"


def _mnv2_executable() -> str:
    """The `mnv2` of this Python environment (the runs use the same installation as the sweep)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "mnv2")
    return candidate if os.path.exists(candidate) else "mnv2"


def _die_with_parent() -> None:
    """In the child: SIGTERM when the sweep process dies, so a killed sweep's runs checkpoint and stop."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _LocalRun:
    """One `mnv2 train` child holding the run's lock (inherited: a killed sweep's child keeps it until it exits)."""

    def __init__(self, sweep: spec.Sweep, run: spec.Run, out: Printer):
        self.run, self.started = run, time.time()
        os.makedirs(run.workdir, exist_ok=True)
        self.lock = os.open(os.path.join(run.workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out(f"  waiting for {run.name}: another process is still training it")
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        command = spec.train_command(sweep, run)
        _write_record(run, {**_read_record(run), "sweep": sweep.name, "command": command})
        with open(os.path.join(run.workdir, LOG_FILE), "a") as log:
            self.process = subprocess.Popen(
                [_mnv2_executable(), *command[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(self.lock,),
                preexec_fn=_die_with_parent,
            )

    def poll(self) -> int | None:
        """The child's exit status, or None while it runs; releases this process's copy of the lock once it ended."""
        status = self.process.poll()
        if status is not None and self.lock is not None:
            os.close(self.lock)
            self.lock = None
        return status


def _unfinished(sweep: spec.Sweep) -> Iterator[spec.Run]:
    """The sweep's runs without `finished.json`, in order."""
    return (run for run in sweep.runs if run_state(run) != "finished")


def _final_metric(run: spec.Run, metric: str) -> str:
    """`: <metric>=<value>` of the run's last evaluation, or nothing when it logged none."""
    value = run_files.last_eval_metrics(run_files.read_metrics(run.workdir)).get(metric)
    return "" if value is None else f": {metric}={value:.4f}"


def prepare_datasets(sweep: spec.Sweep, runs: Sequence[spec.Run]) -> None:
    """Prepares each dataset the runs read once, here: parallel runs would each prepare a new TFDS dataset and race."""
    from mnv2_jax.cli import common
    from mnv2_jax.training import train

    seen = set()
    for run in runs:
        config = common.config_from_spec(sweep.config, *spec.config_arguments(run))
        if (config.dataset, config.data_dir) not in seen:
            seen.add((config.dataset, config.data_dir))
            train.open_dataset(config)


def run_local(sweep: spec.Sweep, parallel: int = 1, dry_run: bool = False, out: Printer = say) -> int:
    """Trains the sweep's unfinished runs here, `parallel` at a time; 0 when every run finished."""
    pending = list(_unfinished(sweep))
    out(summary_line(sweep))
    if dry_run:
        for run in pending:
            out(shlex.join(spec.train_command(sweep, run)))
        return 0
    if parallel > 1 and len(pending) > 1:  # in a child: JAX's threads in this process would make the forks unsafe
        preparation = multiprocessing.get_context("spawn").Process(target=prepare_datasets, args=(sweep, pending))
        preparation.start()
        preparation.join()
        if preparation.exitcode:
            raise spec.SweepError(f"preparing the sweep's datasets failed (exit status {preparation.exitcode})")
    from mnv2_jax.sweeps import report  # imports this module

    metric = report.report_metric(sweep)
    running: list[_LocalRun] = []
    failed: list[tuple[spec.Run, int]] = []
    done = 0
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                resume = " (resumes)" if run_state(run) == "started" else ""
                out(f"[{done + len(running) + 1}/{done + len(running) + len(pending) + 1}] {run.name}{resume}")
                running.append(_LocalRun(sweep, run, out))
            for child in list(running):
                status = child.poll()
                if status is None:
                    continue
                running.remove(child)
                done += 1
                seconds = time.time() - child.started
                if status == 0:
                    out(f"  finished {child.run.name} in {seconds:.0f} s{_final_metric(child.run, metric)}")
                else:
                    log = os.path.join(child.run.workdir, LOG_FILE)
                    out(f"  FAILED {child.run.name} (exit status {status}) after {seconds:.0f} s; log: {log}")
                    failed.append((child.run, status))
            time.sleep(0.2)
    except KeyboardInterrupt:  # SIGINT or SIGTERM: the runs checkpoint their current step and stop
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        for child in running:
            child.process.wait()
            child.poll()
        out(f"sweep {sweep.name} interrupted; the same command resumes it")
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        out(f"{len(failed)} run(s) failed: {', '.join(run.name for run, _ in failed)}")
        return 1
    return 0


def _slurm_job_active(job_id: str, run: Callable = subprocess.run) -> bool:
    result = run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


LaunchRun = Callable[[spec.Run], int]  # launches one run: 0, or an exit status that stops the sweep


def _run_remote(
    launcher: Callable[[spec.Sweep, Mapping[str, Any], bool, Printer, Callable], LaunchRun],
    sweep: spec.Sweep,
    options: Mapping[str, Any],
    dry_run: bool = False,
    out: Printer = say,
    run: Callable = subprocess.run,
) -> int:
    """Launches the sweep's unfinished runs in order with `launcher(sweep, options, dry_run, out, run)`, after the
    sweep's summary line; stops at the first nonzero status. `options` override the sweep's runner options."""
    launch = launcher(sweep, options, dry_run, out, run)
    out(summary_line(sweep))
    for point in _unfinished(sweep):
        status = launch(point)
        if status:
            return status
    return 0


def _slurm_submitter(
    sweep: spec.Sweep, options: Mapping[str, Any], dry_run: bool, out: Printer, run: Callable
) -> LaunchRun:
    """Submits one SLURM job per run (not one already queued or running)."""
    from mnv2_jax.launch import slurm

    def submit(point: spec.Run) -> int:
        record = _read_record(point)
        if record.get("slurm_job") and not dry_run and _slurm_job_active(record["slurm_job"], run):
            out(f"{point.name}: job {record['slurm_job']} is queued or running")
            return 0
        job = slurm.SlurmJob.from_mapping({**sweep.slurm, **options, "job_name": f"{sweep.name}.{point.name}"})
        command = slurm.this_environments_program(spec.train_command(sweep, point))
        script = os.path.join(point.workdir, "slurm.sbatch")
        result = slurm.submit(job, command, os.getcwd(), script, dry_run=dry_run, run=run)
        if dry_run:
            out(result)
        else:
            _write_record(point, {**record, "sweep": sweep.name, "command": command, "slurm_job": result})
            out(f"{point.name}: submitted job {result}")
        return 0

    return submit


def _tpu_pod_trainer(
    sweep: spec.Sweep, options: Mapping[str, Any], dry_run: bool, out: Printer, run: Callable
) -> LaunchRun:
    """Trains each run on a TPU pod (every worker runs it); a failure stops the sweep. With `recover=True` (and
    `max_attempts`) a preempted or deleted pod is recreated and set up, and the run rerun until it finishes."""
    from mnv2_jax.launch import tpu, tpu_recovery

    settings = {**sweep.tpu, **options}
    recover, max_attempts = settings.pop("recover", False), settings.pop("max_attempts", 10)
    pod = tpu.TpuPod.from_mapping(settings)
    recovery = tpu_recovery.Recovery(max_attempts) if recover else None  # checked before anything runs

    def train(point: spec.Run) -> int:
        command, job = spec.train_command(sweep, point), f"{sweep.name}.{point.name}"
        if recovery is not None and not dry_run:
            try:
                return tpu_recovery.run_until_finished(pod, command, job, recovery, run)
            except tpu_recovery.RecoveryError as error:
                out(f"{point.name}: {error}")
                return 1
        status = tpu.execute(tpu.run_commands(pod, command, job=job), dry_run=dry_run, run=run)
        if status:
            out(f"{point.name} failed with exit status {status}; the same command resumes the sweep")
        return status

    return train


# `run_slurm(sweep, options, dry_run=False, out=say, run=subprocess.run)`: submits one SLURM job per unfinished run
# (not one already queued or running); `options` over the sweep's.
run_slurm = functools.partial(_run_remote, _slurm_submitter)
# `run_tpu(...)`, the same arguments: trains the unfinished runs one after another on a TPU pod (every worker runs
# each); stops at a failure.
run_tpu = functools.partial(_run_remote, _tpu_pod_trainer)


def parse_options(assignments: Sequence[str], option: str) -> dict[str, Any]:
    """`--slurm nodes=2 --slurm partition=gpu` -> {"nodes": 2, "partition": "gpu"} (numbers and booleans typed)."""
    values: dict[str, Any] = {}
    for text in assignments:
        key, value = spec.parse_assignment(text, option)
        if value in ("True", "False"):
            values[key] = value == "True"
        else:
            try:
                values[key] = int(value)
            except ValueError:
                values[key] = value
    return values
