"""`launch/tpu.py run --recover`: a training run on a spot or preemptible TPU pod, brought back until it finishes.

Each attempt looks at the pod first (`gcloud ... describe`): a pod that is gone is created and set up again, a
preempted or terminated one is deleted first, one in a transition (creating, repairing, ...) is waited for; then the
same `run` command runs on every worker and resumes from the workdir's latest checkpoint. The loop ends when the
run's `finished.json` exists (status 0), when the command fails on a READY pod with another status than ssh's
connection loss (255: a real failure, which a rerun would repeat), or after `max_attempts` attempts. Every attempt is
one line on stderr and one JSON line in `<local_dir>/<job>/recovery.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from mnv2_jax.errors import UserError
from mnv2_jax.launch import tpu
from mnv2_jax.launch.options import check

READY = "READY"
GONE = "GONE"  # `describe` found no such TPU (deleted after a preemption, or never created)
REPLACE = ("PREEMPTED", "TERMINATED")  # deleted, then created again
WAIT = ("CREATING", "STARTING", "RESTARTING", "REPAIRING", "DELETING", "STOPPING")  # asked again later
SSH_LOST = 255  # ssh's status when the connection drops (the workers went away) or cannot be made


class RecoveryError(UserError):
    """The run did not finish within the attempts, or failed in a way a rerun would repeat."""


@dataclasses.dataclass(frozen=True)
class Recovery:
    """How `run --recover` brings a pod back: attempts, waits, and where the set-up copies the checkout from."""

    max_attempts: int = 10
    poll_s: float = 30.0  # between looks at a pod in a transition
    wait_limit_s: float = 1800.0  # the longest wait for one transition
    source_dir: str = "."
    packages: Mapping[str, str] | None = None
    local_dir: str = "tpu_logs"

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        valid = isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 1
        check(valid, "max_attempts", "an int >= 1", attempts)


def training_workdir(command: Sequence[str]) -> str:
    """The workdir of the `mnv2 train` command to rerun; a one-line error for any other command."""
    workdir = tpu.training_workdir(command)
    if not workdir:
        raise UserError("--recover needs a `mnv2 train --workdir ...` command: it reruns until the run finishes")
    return workdir


def describe_command(pod: tpu.TpuPod) -> list[str]:
    """Prints the pod's state (READY, PREEMPTED, ...); fails with NOT_FOUND when there is no such TPU."""
    return [*tpu.GCLOUD_TPU, "describe", pod.name, *tpu.location(pod), "--format=value(state)"]


def pod_state(pod: tpu.TpuPod, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str:
    """The pod's state, GONE when it does not exist; an error naming gcloud's message for anything else."""
    done = run(describe_command(pod), check=False, capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout.strip() or "STATE_UNSPECIFIED"
    if "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower():
        return GONE
    message = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    raise RecoveryError(f"gcloud cannot describe TPU {pod.name}: {message}")


def repair_commands(pod: tpu.TpuPod, state: str, recovery: Recovery) -> list[list[str]]:
    """What brings a pod in `state` back to READY and set up (nothing for a READY pod)."""
    if state == READY:
        return []
    rebuild = tpu.create_commands(pod) + tpu.setup_commands(pod, recovery.source_dir, recovery.packages)
    if state == GONE:
        return rebuild
    if state in REPLACE:
        return tpu.delete_commands(pod) + rebuild
    raise RecoveryError(f"TPU {pod.name} is {state}: neither running nor preempted; start or delete it, then rerun")


def run_until_finished(
    pod: tpu.TpuPod,
    command: Sequence[str],
    job: str,
    recovery: Recovery,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    allow_local_workdir: bool = False,
) -> int:
    """Runs the `mnv2 train` `command` on `pod`, recovering the pod, until its workdir holds `finished.json`."""
    from mnv2_jax.training import run_files

    workdir = training_workdir(command)
    run_commands = tpu.run_commands(pod, command, job, allow_local_workdir=allow_local_workdir)
    log = os.path.join(recovery.local_dir, job, "recovery.jsonl")
    for attempt in range(1, recovery.max_attempts + 1):
        state = _settled_state(pod, recovery, run)
        status = tpu.execute(repair_commands(pod, state, recovery), dry_run=False, run=run)
        if status == 0:
            status = tpu.execute(run_commands, dry_run=False, run=run)
        finished = run_files.read_finished(workdir) is not None
        _log(log, attempt, recovery.max_attempts, state, status, finished)
        if finished:
            return 0
        if status not in (0, SSH_LOST) and pod_state(pod, run) == READY:
            raise RecoveryError(
                f"the command failed with exit status {status} on a READY pod (attempt {attempt}); a rerun would "
                f"fail the same way: see {tpu.home(pod.log_dir)}/{job}.log on the workers (launch/tpu.py logs)"
            )
    raise RecoveryError(
        f"the run did not finish in {recovery.max_attempts} attempts (each logged in {log}); rerun the same command "
        "to go on from the latest checkpoint"
    )


def _settled_state(pod: tpu.TpuPod, recovery: Recovery, run: Callable) -> str:
    """The pod's state once it is out of a transition (polled every `poll_s`, at most `wait_limit_s`)."""
    deadline = time.monotonic() + recovery.wait_limit_s
    state = pod_state(pod, run)
    while state in WAIT:
        if time.monotonic() > deadline:
            raise RecoveryError(f"TPU {pod.name} stayed {state} for {recovery.wait_limit_s:.0f} s")
        time.sleep(recovery.poll_s)
        state = pod_state(pod, run)
    return state


def _log(path: str, attempt: int, attempts: int, state: str, status: int, finished: bool) -> None:
    outcome = "finished" if finished else f"exit status {status}"
    print(f"recovery attempt {attempt}/{attempts}: pod was {state}; {outcome}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"time": time.time(), "attempt": attempt, "pod_state": state, "status": status, "finished": finished}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
