"""The small files a run keeps in its workdir besides checkpoints, read without importing JAX or TensorFlow.

`metrics.jsonl`: one JSON object per metrics write (`training.metrics.JsonlWriter`); `finished.json`: written by
process 0 once the run has trained its last step (`mnv2 sweep` skips such runs).
"""

from __future__ import annotations

import json
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
FINISHED_FILE = "finished.json"  # {"step": last step, "train_seconds": the sessions' seconds up to their checkpoints}


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of `<workdir>/metrics.jsonl` (empty when there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_finished(workdir: str, step: int, train_seconds: float) -> None:
    """Marks `workdir` as trained to its last step (atomic; process 0 only)."""
    path = os.path.join(workdir, FINISHED_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"step": int(step), "train_seconds": round(float(train_seconds), 3)}, f)
    os.replace(path + ".tmp", path)


def read_finished(workdir: str) -> dict[str, Any] | None:
    """`<workdir>/finished.json`, or None while the run has not reached its last step."""
    path = os.path.join(workdir, FINISHED_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
