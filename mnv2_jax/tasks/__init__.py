"""What differs between the tasks: model, data processing, loss, evaluation metrics and the best-checkpoint metric.

`get(config)` returns the task object of `config.task`; the trainer, evaluation, `bench` and `predict` only talk
to that object, so a new task plugs into the same loop and keeps its guarantees (exact resume, any mesh, the
non-finite guard, masked padded evaluation).
"""

from __future__ import annotations

import ml_collections

from mnv2_jax.tasks.base import Task
from mnv2_jax.tasks.classification import Classification
from mnv2_jax.tasks.detection import Detection
from mnv2_jax.tasks.segmentation import Segmentation

TASK_TYPES: dict[str, type[Task]] = {
    "classification": Classification,
    "segmentation": Segmentation,
    "detection": Detection,
}

__all__ = ["TASK_TYPES", "Classification", "Detection", "Segmentation", "Task", "get"]


def get(config: ml_collections.ConfigDict) -> Task:
    """The task object of `config.task` (a validated config)."""
    return TASK_TYPES[config.task](config)
