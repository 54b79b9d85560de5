"""Evaluation on a mesh: the task's compiled eval step over padded global batches, its evaluator on the host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from mnv2_jax import tasks
from mnv2_jax.data import pipeline
from mnv2_jax.training import distributed, steps


def jit_eval_step(task: tasks.Task, model, mesh: jax.sharding.Mesh) -> Callable:
    """The task's eval step of `model` on `mesh`: (replicated variables, sharded batch) -> replicated outputs."""
    return jax.jit(
        steps.make_eval_step(model, task.eval_outputs, mesh.size),
        in_shardings=(distributed.replicated(mesh), distributed.batch_sharded(mesh)),
        out_shardings=distributed.replicated(mesh),
    )


def evaluate(
    eval_step,
    variables: dict[str, Any],
    builder,
    config: ml_collections.ConfigDict,
    local_batch_size: int,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """The task's eval metrics over every example of the eval split (padding masked out)."""
    batches, _ = pipeline.eval_batches(
        builder,
        config,
        local_batch_size,
        process_index=distributed.mesh_process_index(mesh),
        process_count=distributed.mesh_process_count(mesh),
    )
    evaluator = tasks.get(config).evaluator()
    for local in batches.as_numpy_iterator():
        evaluator.update(eval_step(variables, distributed.global_batch(local, mesh)))
    return evaluator.result()
