"""SIGTERM (the preemption notice of TPU VMs, SLURM and Kubernetes) -> a checkpoint at the next step, then exit.

SIGUSR1 means the same: SLURM's `srun` turns a SIGTERM it receives itself (`scancel --full`) into SIGKILL of its
tasks, but forwards SIGUSR1 to them (`scancel --full --signal=USR1`, `sbatch --signal=USR1@300`).

Each session stopped this way is recorded in `<workdir>/preemptions.json`; when two sessions in a row are stopped
within their first step, the run stops with `NoProgressError` instead of asking to be resumed: a job whose time
limit is shorter than start-up and compilation would otherwise be requeued forever, one step further each time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import types
from typing import Any

import jax
from absl import logging
from etils import epath

from mnv2_jax.errors import UserError
from mnv2_jax.training import checkpoint, run_files

# Exit status of a run that stopped for preemption (128 + SIGTERM, what schedulers expect of a terminated job).
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM
PREEMPTIONS_FILE = "preemptions.json"  # [{"start_step", "step", "time"}] of the sessions stopped by a notice


class Preempted(Exception):
    """Training stopped early at `step` after a preemption notice; its checkpoint is written."""

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(
            f"preempted: saved a checkpoint at step {step} in {checkpoint_dir}; run the same command to resume"
        )
        self.step = step


class NoProgressError(UserError):
    """Two sessions in a row were stopped by a preemption notice within their first step."""


class PreemptionNotice:
    """Context manager that records SIGTERM (or SIGUSR1) so the training loop can checkpoint before exiting.

    With one process, a handler sets a flag (the previous handlers are restored
    on exit). With several, every process must agree on the step, so the loop
    asks orbax's `reached_preemption`, which uses JAX's distributed preemption
    sync point; that listens to SIGTERM only, so SIGUSR1 is passed on to it as
    SIGTERM.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is threading.main_thread():
            if jax.process_count() == 1:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        logging.warning("%s received: checkpointing after the current step, then exiting", name)
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
        self.signalled = True

    def start(self, step: int, mngr) -> None:
        """Tells JAX's preemption sync point the step the session starts at: a notice before the session's first
        step would otherwise set the sync point at step 1, which a resumed session never reaches."""
        if jax.process_count() > 1:
            mngr.reached_preemption(step)

    def reached(self, step: int, mngr) -> bool:
        """Whether to checkpoint at `step` and stop."""
        if jax.process_count() > 1:
            return mngr.reached_preemption(step)
        return self.signalled


def previous_preemptions(workdir: str) -> list[dict[str, Any]]:
    """The sessions of the run in `workdir` that a preemption notice stopped, oldest first."""
    return run_files.read_json(epath.Path(workdir) / PREEMPTIONS_FILE) or []


def stop(workdir: str, previous: list[dict[str, Any]], start_step: int, step: int) -> None:
    """Records this session (process 0), which started at `start_step` and checkpointed `step` after a notice, and
    raises `Preempted`, or `NoProgressError` when it and the session before both stopped within their first step."""
    if jax.process_index() == 0:
        record = {"start_step": start_step, "step": step, "time": round(time.time(), 3)}
        run_files.write_json(epath.Path(workdir) / PREEMPTIONS_FILE, [*previous, record])
    last = previous[-1] if previous else None
    if step - start_step <= 1 and last and last["step"] == start_step and last["step"] - last["start_step"] <= 1:
        raise NoProgressError(
            f"stopped by a preemption notice within the first step in two sessions in a row (steps "
            f"{last['start_step']}->{last['step']}, {start_step}->{step}): the time before the job's signal, e.g. "
            "its time limit (sbatch --time) minus launch/slurm.py's --signal_before_end_s, is shorter than start-up "
            "and the first step; raise the time limit. Not asking to be resumed; the checkpoint at step "
            f"{step} is kept and the same command resumes from it"
        )
    raise Preempted(step, checkpoint.checkpoint_dir(workdir))
