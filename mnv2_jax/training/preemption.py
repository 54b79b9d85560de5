"""SIGTERM (the preemption notice of TPU VMs, SLURM and Kubernetes) -> a checkpoint at the next step, then exit."""

from __future__ import annotations

import signal
import threading
import types

import jax
from absl import logging

# Exit status of a run that stopped for preemption (128 + SIGTERM, what schedulers expect of a terminated job).
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
    """Training stopped early at `step` after a preemption notice; its checkpoint is written."""

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(
            f"preempted: saved a checkpoint at step {step} in {checkpoint_dir}; run the same command to resume"
        )
        self.step = step


class PreemptionNotice:
    """Context manager that records SIGTERM so the training loop can checkpoint before exiting.

    With one process, a SIGTERM handler sets a flag (the previous handler is
    restored on exit). With several, every process must agree on the step, so
    the loop asks orbax's `reached_preemption`, which uses JAX's distributed
    preemption sync point.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None

    def __enter__(self) -> PreemptionNotice:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        logging.warning("SIGTERM received: checkpointing after the current step, then exiting")
        self.signalled = True

    def reached(self, step: int, mngr) -> bool:
        """Whether to checkpoint at `step` and stop."""
        if jax.process_count() > 1:
            return mngr.reached_preemption(step)
        return self.signalled
