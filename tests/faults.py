"""Runs `mnv2 ARGS...` and SIGKILLs its own process at a chosen point, for the crash tests.

    python tests/faults.py POINT train --config ... --workdir ...

POINT is one of
  eval          during the first evaluation, after its first batch
  checkpoint:N  inside the asynchronous write of checkpoint N: every array written, not yet committed
  trace         no fault: prints `faults: step N dispatched` to stderr as each train step is dispatched, so that
                a test can kill the process from outside while it trains
  none          no fault
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def after_each_dispatch(action) -> None:
    """Calls `action(step)` right after each train step is dispatched (while it computes)."""
    import jax

    from mnv2_jax.training import train

    build_trainer = train.build_trainer

    def build(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)

        def train_step(state, batch):
            this_step = int(jax.device_get(state.step)) + 1
            result = trainer.train_step(state, batch)
            action(this_step)
            return result

        return dataclasses.replace(trainer, train_step=train_step)

    train.build_trainer = build


def trace_steps() -> None:
    after_each_dispatch(lambda this_step: print(f"faults: step {this_step} dispatched", file=sys.stderr, flush=True))


def kill_during_eval() -> None:
    from mnv2_jax.training import train

    evaluate = train.evaluate

    def evaluate_then_die(eval_step, *args, **kwargs):
        calls = []

        def step(*step_args):
            calls.append(1)
            if len(calls) == 2:
                die()
            return eval_step(*step_args)

        return evaluate(step, *args, **kwargs)

    train.evaluate = evaluate_then_die


def kill_during_checkpoint_write(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    # Orbax commits a local step by renaming its temporary directory, a gs:// one by writing commit_success.txt.
    for temporary_path in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        finalize = temporary_path.finalize

        async def finalize_or_die(self, finalize=finalize):
            if self._final_path.name == str(step):
                die()
            return await finalize(self)

        temporary_path.finalize = finalize_or_die


def main() -> int:
    point, args = sys.argv[1], sys.argv[2:]
    kind, _, value = point.partition(":")
    if kind == "eval":
        kill_during_eval()
    elif kind == "checkpoint":
        kill_during_checkpoint_write(int(value))
    elif kind == "trace":
        trace_steps()
    elif kind != "none":
        raise SystemExit(f"unknown fault point {point!r}")
    from mnv2_jax.cli.main import main as mnv2

    return mnv2(["mnv2", *args])


if __name__ == "__main__":
    sys.exit(main())
