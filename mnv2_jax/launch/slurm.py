"""SLURM: an sbatch script that runs one command as a multi-process JAX job (one process per GPU or per node).

Every task of a multi-process job (started by srun) gets `MNV2_DISTRIBUTED=1`, so `jax.distributed.initialize()`
reads the rest from SLURM's variables: the coordinator is the first node of SLURM_STEP_NODELIST (port derived from
SLURM_JOB_ID), the process count is SLURM_NTASKS, the process id SLURM_PROCID, and the GPU JAX takes is
SLURM_LOCALID (one process per GPU), or those of `MNV2_LOCAL_DEVICE_IDS` (one process per node owning all its GPUs).

`--signal=TERM@S` makes SLURM send SIGTERM to every task S seconds before the time limit: the trainer checkpoints
the current step and exits with status 143; the script then requeues the job, whose rerun of the same command
resumes from that checkpoint. A single process runs in the batch step itself, without srun (see `sbatch_script` for
how each of SLURM's ways of signalling a job reaches the training).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mnv2_jax.errors import UserError
from mnv2_jax.launch.options import (
    ArgumentParser,
    add_options,
    check,
    check_command,
    check_keys,
    lines,
    positive_int,
    run_cli,
    split_command,
    word,
)

PROG = "launch/slurm.py"
# The same names as in `mnv2_jax.training.distributed` (not imported: it imports JAX; a test checks they agree).
DISTRIBUTED_ENV = "MNV2_DISTRIBUTED"
LOCAL_DEVICE_IDS_ENV = "MNV2_LOCAL_DEVICE_IDS"
# `mnv2 train`'s status after SIGTERM, once the current step is checkpointed (`mnv2_jax.training.preemption`).
PREEMPTED_EXIT_STATUS = 143
PROCESS_MODES = ("per_gpu", "per_node")
_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^(UNLIMITED|INFINITE)$")  # the formats of sbatch --time

FIELD_HELP = {
    "job_name": "the SLURM job name (also names the log file)",
    "nodes": "number of nodes",
    "gpus_per_node": "GPUs of each node (sbatch --gpus-per-node; default: none requested)",
    "processes": "per_gpu: one JAX process per GPU; per_node: one process per node owning all its GPUs (default: "
    "per_gpu with GPUs, else per_node)",
    "partition": "sbatch --partition",
    "account": "sbatch --account",
    "time": "sbatch --time, e.g. 24:00:00 or 2-00:00:00",
    "cpus_per_task": "sbatch --cpus-per-task (CPUs for each process's input pipeline)",
    "log_dir": "directory of the job's log, <log_dir>/<job name>-<job id>.out (relative to --chdir)",
    "setup": "a shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)",
    "extra_sbatch": "another sbatch option, e.g. --qos=high (repeatable)",
    "signal_before_end_s": "SIGTERM to every task this many seconds before the time limit (sbatch --signal)",
    "requeue": "requeue the job when training stopped for preemption or the time limit (exit status 143)",
}


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """The resources and behaviour of one SLURM job; invalid values raise UserError naming the field."""

    job_name: str
    nodes: int = 1
    gpus_per_node: int | None = None  # None: no GPUs requested
    processes: str | None = None  # None: per_gpu with GPUs, else per_node
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    log_dir: str = "slurm_logs"
    setup: tuple[str, ...] = ()
    extra_sbatch: tuple[str, ...] = ()
    signal_before_end_s: int = 300
    requeue: bool = True

    def __post_init__(self) -> None:
        check(isinstance(self.job_name, str) and bool(re.fullmatch(r"[^\s/]+", self.job_name)), "job_name",
              "a name without spaces or '/'", self.job_name)  # fmt: skip
        check(positive_int(self.nodes), "nodes", "a positive integer", self.nodes)
        check(self.gpus_per_node is None or positive_int(self.gpus_per_node), "gpus_per_node", "a positive integer",
              self.gpus_per_node)  # fmt: skip
        if self.processes is None:
            object.__setattr__(self, "processes", "per_gpu" if self.gpus_per_node else "per_node")
        check(self.processes in PROCESS_MODES, "processes", f"one of {', '.join(PROCESS_MODES)}", self.processes)
        check(self.processes == "per_node" or self.gpus_per_node is not None, "processes",
              "per_node when no GPUs are requested (per_gpu needs gpus_per_node)", self.processes)  # fmt: skip
        for name in ("partition", "account", "time"):  # a number (`--slurm account=1234` in a sweep) is its text
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, str(value))
        for name in ("partition", "account"):
            value = getattr(self, name)
            check(value is None or word(value), name, "a name without spaces", value)
        check(self.time is None or (isinstance(self.time, str) and bool(_TIME.match(self.time))), "time",
              "a SLURM time limit: MINUTES, HH:MM:SS, D-HH, D-HH:MM:SS or UNLIMITED", self.time)  # fmt: skip
        check(self.cpus_per_task is None or positive_int(self.cpus_per_task), "cpus_per_task",
              "a positive integer", self.cpus_per_task)  # fmt: skip
        check(word(self.log_dir), "log_dir", "a path without spaces", self.log_dir)
        object.__setattr__(self, "setup", lines(self.setup, "setup"))
        object.__setattr__(self, "extra_sbatch", lines(self.extra_sbatch, "extra_sbatch"))
        for option in self.extra_sbatch:
            check(option.startswith("-") and word(option), "extra_sbatch", "sbatch options such as --qos=high", option)
        check(positive_int(self.signal_before_end_s) and self.signal_before_end_s <= 65535, "signal_before_end_s",
              "a number of seconds from 1 to 65535", self.signal_before_end_s)  # fmt: skip
        check(isinstance(self.requeue, bool), "requeue", "True or False", self.requeue)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SlurmJob:
        """A job from option names and values (a sweep file's `slurm` dict); unknown names are errors."""
        check_keys(cls, values, "SLURM job")
        if "job_name" not in values:
            raise UserError("job_name is required")
        return cls(**values)


def tasks_per_node(job: SlurmJob) -> int:
    """JAX processes on each node: one per GPU, or one owning all the node's GPUs."""
    return job.gpus_per_node if job.processes == "per_gpu" and job.gpus_per_node else 1


def sbatch_options(job: SlurmJob, chdir: str) -> list[str]:
    """The `#SBATCH` options of `job`, in the script's order."""
    check(word(chdir), "chdir", "a path without spaces (SLURM's #SBATCH lines take no quoting)", chdir)
    options = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={tasks_per_node(job)}",
    ]
    if job.gpus_per_node:  # not --gpus-per-task: every task must see all the node's GPUs, JAX takes SLURM_LOCALID's
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task is not None:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    options += [f"--{name}={getattr(job, name)}" for name in ("time", "partition", "account") if getattr(job, name)]
    options += [
        f"--chdir={chdir}",
        f"--output={job.log_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal=TERM@{job.signal_before_end_s}",  # no B: prefix: srun's tasks get it, not only this shell
    ]
    # --no-requeue too: a cluster's JobRequeue=1 would requeue a failed or cancelled job otherwise
    options.append("--requeue" if job.requeue else "--no-requeue")
    return options + list(job.extra_sbatch)


def runs_one_process(job: SlurmJob) -> bool:
    """Whether the job is a single process, which the batch script runs itself (no distributed set-up)."""
    return job.nodes == 1 and tasks_per_node(job) == 1


# A one-task job step that passes the signals SLURM sends to job steps (`scancel --signal`, the time limit's
# `--signal`, preemption) on to a process of the batch step, $0, and ends with it.
SIGNAL_RELAY = (
    'trap "kill -s TERM $0" TERM; trap "kill -s USR1 $0" USR1; while kill -0 $0 2>/dev/null; do sleep 1 & wait $!; done'
)


def _launch_lines(job: SlurmJob, command: list[str]) -> list[str]:
    """The lines that start the training in the background as $pid, and the signal its process(es) get from a
    SIGTERM or SIGUSR1 to the batch shell."""
    if runs_one_process(job):
        return [
            "forward=TERM",
            f"{shlex.join(command)} &",
            "pid=$!",
            "# job steps' signals reach the training through this step (it runs in the batch step, not in a job step)",
            f'srun --overlap --ntasks=1 bash -c {shlex.quote(SIGNAL_RELAY)} "$pid" &',
        ]
    lines_ = [f"export {DISTRIBUTED_ENV}=1"]
    if job.processes == "per_node" and job.gpus_per_node:
        lines_.append(f"export {LOCAL_DEVICE_IDS_ENV}={','.join(str(i) for i in range(job.gpus_per_node))}")
    return [
        *lines_,
        "forward=USR1  # srun turns a SIGTERM into SIGKILL of its tasks; it passes SIGUSR1 on",
        f"srun --kill-on-bad-exit=1 {shlex.join(command)} &",
        "pid=$!",
    ]


def sbatch_script(job: SlurmJob, command: Sequence[str], chdir: str) -> str:
    """The batch script that runs `command` as `job`'s processes from directory `chdir`.

    A single process runs in the batch step itself, with a job step that relays the signals of job steps to it, so
    that every way SLURM signals a job (steps only, `scancel --full`, `scancel --batch`) reaches it as SIGTERM.
    Several are started by srun, which turns a SIGTERM it receives itself (`scancel --full --signal=TERM`) into
    SIGKILL of its tasks but passes SIGUSR1 on (the trainer treats it as SIGTERM): this shell forwards what it gets
    to srun as SIGUSR1.
    """
    command = check_command(command)
    lines_ = ["#!/bin/bash", *(f"#SBATCH {option}" for option in sbatch_options(job, chdir))]
    lines_ += [
        f"# Written by {PROG}. To resume, submit it again (or rerun the command): training resumes from the",
        "# workdir's latest checkpoint.",
        "set -uo pipefail",
        "# SLURM may signal this shell (preemption, scancel --full or --batch): it passes the signal on to the",
        "# training and waits for it to checkpoint.",
        'trap \'echo "SIGTERM or SIGUSR1: passed on to the training, which checkpoints and stops" >&2;'
        ' if [ -n "${pid:-}" ]; then kill -s "$forward" "$pid" 2>/dev/null; else signalled=1; fi\' TERM USR1',
        f"cd {shlex.quote(chdir)}",
        *job.setup,
        *_launch_lines(job, list(command)),
        "# a signal that came before $pid was set is passed on now",
        '[ -n "${signalled:-}" ] && kill -s "$forward" "$pid" 2>/dev/null',
        "# a trapped signal ends `wait` early: wait again until the training has exited, then take its status",
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done',
        'wait "$pid"',
        "status=$?",
        *(["wait  # for the signal relay, which ends with the training"] if runs_one_process(job) else []),
    ]
    if job.requeue:
        lines_ += [
            f'if [ "$status" -eq {PREEMPTED_EXIT_STATUS} ]; then',
            '  echo "training checkpointed and stopped (preemption or time limit): requeueing job $SLURM_JOB_ID;'
            ' its rerun resumes from the checkpoint" >&2',
            '  scontrol requeue "$SLURM_JOB_ID" || exit "$status"',
            "  exit 0",
            "fi",
        ]
    lines_.append('exit "$status"')
    return "\n".join(lines_) + "\n"


def sbatch_command(script_path: str) -> list[str]:
    """The submission of a written script; `--parsable` prints only the job id."""
    return ["sbatch", "--parsable", script_path]


def gpus_in(gres: str) -> int:
    """GPUs of one node from sinfo's `%G` (`gpu:8`, `gpu:a100:4(S:0-1)`, `gpu:2,mps:100`, `(null)`)."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def check_partition(job: SlurmJob, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """A GPU request that no node of the partition can hold is an error at submit time (SLURM would keep the job
    PENDING forever, or sbatch fail on a cluster without GPUs). Without `sinfo`, nothing is checked."""
    if not job.gpus_per_node:
        return
    command = ["sinfo", "--noheader", "--format=%G", *([f"--partition={job.partition}"] if job.partition else [])]
    try:
        result = run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return
    if result.returncode != 0:
        return
    most = max((gpus_in(gres) for gres in result.stdout.split()), default=0)
    if most < job.gpus_per_node:
        where = f"partition {job.partition}" if job.partition else "the cluster"
        has = f"have at most {most} GPUs" if most else "have no GPUs"
        fix = f"set --gpus_per_node {most}" if most else "leave out --gpus_per_node"
        found = " ".join(sorted(set(result.stdout.split()))) or "nothing"
        raise UserError(
            f"gpus_per_node={job.gpus_per_node}, but the nodes of {where} {has} (sinfo: {found}); {fix} or choose "
            "another --partition"
        )


def submit(
    job: SlurmJob,
    command: Sequence[str],
    chdir: str,
    script_path: str,
    dry_run: bool,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> str:
    """Writes the script to `script_path` and submits it: returns the job id.

    With `dry_run`, writes and runs nothing: returns the script and the sbatch command it would run.
    """
    script = sbatch_script(job, command, chdir)
    sbatch = sbatch_command(script_path)
    if dry_run:
        return f"{script}# dry run: would write the script above to {script_path} and run:\n{shlex.join(sbatch)}\n"
    check_partition(job, run)
    os.makedirs(os.path.dirname(script_path) or ".", exist_ok=True)
    with open(script_path, "w") as f:
        f.write(script)
    os.makedirs(os.path.join(chdir, job.log_dir), exist_ok=True)  # sbatch does not create the log's directory
    try:
        result = run(sbatch, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError("sbatch: command not found (submit from a SLURM login node)") from None
    if result.returncode != 0:
        reason = (result.stderr or result.stdout or "").strip().splitlines()
        raise UserError(f"sbatch failed with exit status {result.returncode}: {reason[-1] if reason else '?'}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
    if not job_id:
        raise UserError(f"sbatch printed no job id (script {script_path})")
    return job_id


def main(argv: list[str] | None = None) -> int:
    """`python launch/slurm.py --job_name J --nodes 2 [...] [--dry-run] -- mnv2 train ...`: submit, print the id."""
    return run_cli(PROG, lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    options, command = split_command(argv)
    parser = ArgumentParser(prog=PROG, description="Submit one command as a multi-process JAX job to SLURM.")
    add_options(parser, SlurmJob, FIELD_HELP)
    parser.add_argument("--chdir", default=os.getcwd(), help="the job's working directory (default: this one)")
    parser.add_argument("--script", help="where to write the batch script (default: <log_dir>/<job_name>.sbatch)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print, submit nothing")
    args = vars(parser.parse_args(options))
    chdir, script, dry_run = args.pop("chdir"), args.pop("script"), args.pop("dry_run")
    job = SlurmJob.from_mapping(args)
    script = script or os.path.join(chdir, job.log_dir, f"{job.job_name}.sbatch")
    result = submit(job, command, os.path.abspath(chdir), script, dry_run=dry_run)
    if dry_run:
        print(result, end="")
    else:
        print(f"submitted job {result} ({script}); log: {job.log_dir}/{job.job_name}-{result}.out")
    return 0


def this_environments_program(command: Sequence[str]) -> list[str]:
    """`command` with a bare `mnv2` replaced by the one of this Python environment (its absolute path, else
    `python -m mnv2_jax.cli.main`), so that a job runs the submitting environment without an activation line."""
    command = list(command)
    if not command or command[0] != "mnv2":
        return command
    script = os.path.join(os.path.dirname(sys.executable), "mnv2")
    program = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "mnv2_jax.cli.main"]
    return [*program, *command[1:]]
