"""Metric writers: TensorBoard and console through clu, plus `metrics.jsonl` in the workdir.

Only process 0 writes; the others get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath

from mnv2_jax.training.run_files import METRICS_FILE


class NullWriter(metric_writers.MetricWriter):
    """Drops everything (processes other than 0); the base of `JsonlWriter`."""

    def write_summaries(self, step, values, metadata=None) -> None: ...

    def write_scalars(self, step, scalars) -> None: ...

    def write_images(self, step, images) -> None: ...

    def write_videos(self, step, videos) -> None: ...

    def write_audios(self, step, audios, *, sample_rate) -> None: ...

    def write_texts(self, step, texts) -> None: ...

    def write_histograms(self, step, arrays, num_buckets=None) -> None: ...

    def write_hparams(self, hparams) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlWriter(NullWriter):
    """Appends one JSON object per `write_scalars` call: `{"step": N, "train/loss": ..., ...}`."""

    def __init__(self, path: str):
        # For gs:// epath opens through TensorFlow's file system, whose `open` is a context manager, not a file;
        # closed in close(). A gs:// file is rewritten at each flush (objects cannot be appended to).
        self._files = contextlib.ExitStack()
        self._file = self._files.enter_context(epath.Path(path).open("a"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"hparams": dict(hparams)}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._files.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard (`<workdir>/tensorboard`), console logging and `<workdir>/metrics.jsonl` on process 0."""
    if jax.process_index() != 0:
        return NullWriter()
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    default = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"), asynchronous=False)
    return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, METRICS_FILE))])


def progress_hooks(total_steps: int, writer, workdir: str, profile_steps: int = 0, first_profile: int = 0) -> list:
    """Process 0's progress report (steps/s, ETA) and, with `profile_steps`, a profile of that many steps from
    step `first_profile`."""
    if jax.process_index() != 0:
        return []
    hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=30)]
    if profile_steps:
        hooks.append(
            periodic_actions.Profile(logdir=workdir, num_profile_steps=profile_steps, first_profile=first_profile)
        )
    return hooks
