"""The training loop and evaluation: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint(workdir)`.

One program for every topology: the batch is sharded over the `data` axis of a
mesh of all devices of all processes, the train state is replicated, and each
process feeds its own slice of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from mnv2_jax import config as config_lib
from mnv2_jax import models, tasks
from mnv2_jax.config import ConfigError
from mnv2_jax.data import pipeline
from mnv2_jax.errors import UserError
from mnv2_jax.training import checkpoint, distributed, metrics, optim, preemption, run_files, steps, transfer
from mnv2_jax.training import plan as plan_lib
from mnv2_jax.training.evaluation import evaluate, jit_eval_step
from mnv2_jax.training.fine_tune import frozen_batch_norm

STATE_ITEMS = ("params", "batch_stats", "opt_state", "ema_params")


def resolve_num_classes(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo) -> ml_collections.ConfigDict:
    """A copy of the config with `model.num_classes` taken from the dataset when unset; checks it otherwise."""
    config = ml_collections.ConfigDict(config.to_dict())
    if info.num_classes is None:  # the dataset does not say (voc:<root>): the config must
        if config.model.num_classes is None:
            raise ConfigError(f"dataset {config.dataset!r} does not name its classes; set model.num_classes")
    elif config.model.num_classes is None:
        config.model.num_classes = info.num_classes
    elif config.model.num_classes != info.num_classes:
        raise ConfigError(
            f"model.num_classes={config.model.num_classes} but dataset {config.dataset!r} has {info.num_classes} "
            f"classes; set --config.model.num_classes={info.num_classes} (or None in the config file: from the data)"
        )
    tasks.get(config).with_dataset(config, info)
    return config


def open_dataset(config: ml_collections.ConfigDict):
    """The dataset's builder; process 0 prepares it (download or local files) while the others wait."""
    if jax.process_count() == 1:
        return pipeline.builder_for(config)
    if jax.process_index() == 0:
        builder = pipeline.builder_for(config)
    multihost_utils.sync_global_devices("mnv2: dataset prepared")
    if jax.process_index() != 0:
        builder = pipeline.builder_for(config, prepare=False)
    return builder


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, best_metric: str) -> ocp.CheckpointManager:
    """Keeps the last `config.keep_checkpoints` checkpoints and the best one by `best_metric` (higher is better)."""
    policy = preservation_policy.AnyPreservationPolicy(
        [
            preservation_policy.LatestN(n=config.keep_checkpoints),
            preservation_policy.BestN(
                get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True)
    return checkpoint.manager(workdir, items=STATE_ITEMS, options=options)


class NonFiniteError(UserError):
    """A training step produced a NaN or Inf loss or gradient under `on_nonfinite=stop`."""


def _check_finite(flags: list[tuple[int, jax.Array]], policy: str, workdir: str, mngr) -> None:
    """Applies `config.on_nonfinite` to steps whose loss or gradients were not finite (their updates were dropped)."""
    if not flags:
        return
    values = distributed.to_host([flag for _, flag in flags])
    bad = [step for (step, _), value in zip(flags, values, strict=True) if value]
    if not bad:
        return
    more = f" (and {len(bad) - 1} later step(s))" if len(bad) > 1 else ""
    if policy == "skip":
        logging.warning("skipped the update of step %d%s: non-finite loss or gradients", bad[0], more)
        return
    latest = mngr.latest_step()
    kept = f"step {latest}" if latest is not None else "none yet"
    raise NonFiniteError(
        f"non-finite loss or gradients at step {bad[0]}{more}; the update was not applied and nothing after it was "
        f"checkpointed (latest checkpoint in {checkpoint.checkpoint_dir(workdir)}: {kept}). "
        "Lower optimizer.learning_rate, check the data, or set on_nonfinite=skip to drop such updates"
    )


def state_items(state: steps.TrainState) -> dict[str, Any]:
    items = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    if state.ema_params is not None:
        items["ema_params"] = state.ema_params
    return items


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        run_files.write_json(epath.Path(workdir) / run_files.CONFIG_FILE, config_lib.to_dict(config), indent=2)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The task, model, optimizer and compiled steps of one run on one mesh."""

    task: tasks.Task
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    create_state: Callable[[jax.Array], steps.TrainState]  # rng -> initial state
    train_step: Callable  # (state, global batch) -> (state, metrics); donates the state
    eval_step: Callable  # (variables, global batch) -> the task's eval outputs


def build_trainer(config: ml_collections.ConfigDict, plan: plan_lib.Plan, mesh: jax.sharding.Mesh) -> Trainer:
    """Task, model, optimizer and the jitted train/eval steps (state replicated, batch sharded on `data`)."""
    task = tasks.get(config)
    model = task.build_model()
    tx = optim.make_optimizer(config, plan)
    schedule = optim.learning_rate_schedule(config, plan)
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    replicated = distributed.replicated(mesh)
    options = (config.accumulate_steps, distributed.micro_batches_sharded(mesh))
    options += (functools.partial(frozen_batch_norm, config.fine_tune),)
    step = steps.make_train_step(model, tx, schedule, task.loss, config.optimizer.ema_decay, dropout_rng, *options)
    train_step = jax.jit(
        step,
        in_shardings=(replicated, distributed.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    create_state = functools.partial(
        steps.create_train_state,
        model,
        tx,
        input_shape=task.input_shape(1),
        use_ema=config.optimizer.ema_decay is not None,
    )
    return Trainer(task, model, tx, schedule, create_state, train_step, jit_eval_step(task, model, mesh))


def restore_train_state(workdir: str, trainer: Trainer, mesh: jax.sharding.Mesh, step: int) -> steps.TrainState:
    """Checkpoint `step` of `workdir` as a train state replicated on `mesh`, whatever mesh wrote it."""
    replicated = distributed.replicated(mesh)
    abstract = jax.eval_shape(trainer.create_state, jax.random.key(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    _, items = checkpoint.restore(workdir, state_items(abstract), step)
    step_array = jax.device_put(np.asarray(step, np.int32), replicated)  # a host scalar would compile a 2nd step
    return abstract.replace(step=step_array, **items)


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run is set up with before its first step: checked config, mesh, data, plan and trainer."""

    config: ml_collections.ConfigDict  # validated, with the dataset's number of classes
    mesh: jax.sharding.Mesh
    builder: Any
    plan: plan_lib.Plan
    trainer: Trainer


def prepare_run(config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None) -> Run:
    """Every check that needs no compile (config, init_from, dataset, splits, batch divisibility, workdir), then the
    trainer."""
    config_lib.validate(config)
    if config.init_from and checkpoint.latest_step(workdir) is None:  # a resumed run does not read init_from
        transfer.check_source(config.init_from)
    mesh = distributed.make_mesh(devices)
    builder = open_dataset(config)
    info = pipeline.dataset_info(builder)
    num_train = pipeline.check_split(builder, config.train_split, "train_split")
    num_eval = pipeline.check_split(builder, config.eval_split, "eval_split")
    tasks.get(config).check_dataset(builder)
    config = resolve_num_classes(config, info)
    plan = plan_lib.make_plan(config, num_train, num_eval, mesh.size, distributed.mesh_process_count(mesh))
    logging.info("plan: %s", plan)
    run_files.check_writable(workdir)
    return Run(config, mesh, builder, plan, build_trainer(config, plan, mesh))


def initial_state(run: Run, workdir: str, mngr: ocp.CheckpointManager) -> tuple[steps.TrainState, int]:
    """The state to start from (the latest checkpoint, else a new one, from `init_from` when set) and this process's
    position in its training stream."""
    latest = mngr.latest_step()
    replicated = distributed.replicated(run.mesh)
    if latest is not None:
        state = restore_train_state(workdir, run.trainer, run.mesh, latest)
        process_count = distributed.mesh_process_count(run.mesh)
        logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), latest)
        return state, checkpoint.saved_data_position(workdir, latest, run.plan.local_batch_size, process_count)
    state = jax.jit(run.trainer.create_state, out_shardings=replicated)(jax.random.key(run.config.seed))
    if run.config.init_from:
        state, _ = transfer.initialise_from(state, run.config.init_from, replicated)
    return state, 0


@dataclasses.dataclass
class Session:
    """One session of a run (a first start or a resume): where it starts and what it writes to."""

    run: Run
    workdir: str
    mngr: ocp.CheckpointManager
    writer: Any
    start_step: int
    start_example: int  # this process's position in its training stream at `start_step`
    seconds_before: float  # the training seconds of the run's earlier sessions
    started: float  # time.time() at the session's start

    def log(self, step: int, pending: list[dict[str, jax.Array]]) -> None:
        stacked = distributed.to_host(pending)
        self.writer.write_scalars(step, {k: np.mean([m[k] for m in stacked]) for k in stacked[0]})

    def evaluate(self, step: int, state: steps.TrainState) -> dict[str, float]:
        run, started = self.run, time.time()
        results = evaluate(
            run.trainer.eval_step,
            state.eval_variables(),
            run.builder,
            run.config,
            run.plan.local_eval_batch_size,
            run.mesh,
        )
        results["eval/seconds"] = time.time() - started
        self.writer.write_scalars(step, results)
        return results

    def save(self, step: int, state: steps.TrainState, eval_metrics: dict[str, float] | None) -> None:
        position = self.start_example + (step - self.start_step) * self.run.plan.local_batch_size
        data_position = {
            "examples_per_process": position,
            "process_count": distributed.mesh_process_count(self.run.mesh),
            "train_seconds": self.seconds_before + time.time() - self.started,
        }
        checkpoint.save(
            self.mngr, step, state_items(state), self.run.config, eval_metrics, force=True, data_position=data_position
        )


def start_session(run: Run, workdir: str, started: float) -> tuple[Session, steps.TrainState]:
    """Clears incomplete checkpoints, restores or creates the state, and opens the metric writers."""
    if jax.process_index() == 0:
        checkpoint.discard_incomplete(workdir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mnv2: incomplete checkpoints removed")
    mngr = checkpoint_manager(workdir, run.config, run.trainer.task.best_metric)
    state, start_example = initial_state(run, workdir, mngr)
    start_step = int(distributed.to_host(state.step))
    writer = metrics.create_writer(workdir)
    _write_config(workdir, run.config)
    if start_step == 0:
        writer.write_hparams(config_lib.flatten(run.config))
    skipped = getattr(run.builder, "skipped", {})  # undecodable images left out under data.corrupt_images=skip
    if skipped:
        writer.write_scalars(
            start_step, {f"data/skipped_images/{split}": len(files) for split, files in skipped.items()}
        )
    seconds_before = checkpoint.saved_train_seconds(workdir, start_step)
    return Session(run, workdir, mngr, writer, start_step, start_example, seconds_before, started), state


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, float]:
    """Trains (resuming from `workdir` when it holds checkpoints), evaluates and checkpoints; returns the last eval.

    Process 0 writes `finished.json` once the last step is trained, with the seconds the run's sessions spent
    up to their last checkpoints (compiles and evaluations included)."""
    started = time.time()
    run = prepare_run(config, workdir, devices)
    session, state = start_session(run, workdir, started)
    step, last_eval = _train_steps(session, state)
    total = run.plan.total_steps
    finished = step == total and (session.start_step < step or run_files.read_finished(workdir) is None)
    if finished and jax.process_index() == 0:
        run_files.write_finished(workdir, step, session.seconds_before + time.time() - started)
    if jax.process_index() == 0:
        logging.info("TensorBoard logs: %s", os.path.join(run_files.absolute(workdir), "tensorboard"))
    return last_eval


def _train_steps(session: Session, state: steps.TrainState) -> tuple[int, dict[str, float]]:
    """The session's steps with their logs, evaluations and checkpoints; the last step and the last evaluation."""
    run, workdir, mngr = session.run, session.workdir, session.mngr
    config, mesh, plan, trainer = run.config, run.mesh, run.plan, run.trainer
    train_batches = pipeline.train_iterator(
        run.builder,
        config,
        plan.local_batch_size,
        session.start_example,
        process_index=distributed.mesh_process_index(mesh),
        process_count=distributed.mesh_process_count(mesh),
    )
    profile_steps = (config.profile_steps, config.log_every_steps)
    hooks = metrics.progress_hooks(plan.total_steps, session.writer, workdir, *profile_steps)
    last_eval: dict[str, float] = {}
    pending: list[dict[str, jax.Array]] = []
    unchecked: list[tuple[int, jax.Array]] = []  # (step, non-finite flag) not yet looked at on the host
    step, lost_process = session.start_step, False
    preempted_before = preemption.previous_preemptions(workdir)  # read by every process before process 0 writes
    with preemption.PreemptionNotice() as notice:
        notice.start(session.start_step, mngr)
        logging.info("training steps %d..%d of %d", session.start_step + 1, plan.total_steps, plan.total_steps)
        try:
            for step in range(session.start_step + 1, plan.total_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, step_metrics = trainer.train_step(state, distributed.global_batch(next(train_batches), mesh))
                pending.append(step_metrics)
                unchecked.append((step, step_metrics["train/nonfinite"]))
                for hook in hooks:
                    hook(step)
                log_now = step % config.log_every_steps == 0 or step == plan.total_steps
                evaluate_now = step % plan.eval_every_steps == 0 or step == plan.total_steps
                preempted = notice.reached(step, mngr)
                checkpoint_now = evaluate_now or preempted or step % config.checkpoint_every_steps == 0
                if log_now or checkpoint_now:  # before any checkpoint: a stopped run never saves past a bad step
                    _check_finite(unchecked, config.on_nonfinite, workdir, mngr)
                    unchecked = []
                if log_now:
                    session.log(step, pending)
                    pending = []
                if evaluate_now:
                    last_eval = session.evaluate(step, state)
                if checkpoint_now:
                    session.save(step, state, last_eval if evaluate_now else None)
                if preempted:
                    preemption.stop(workdir, preempted_before, session.start_step, step)
        except jax.errors.JaxRuntimeError as e:
            if not distributed.is_lost_process(e):
                raise
            lost_process = True  # waiting for checkpoint writes would wait on the dead process
            raise distributed.LostProcessError(step, e, mngr.latest_step()) from e
        finally:
            if not lost_process:
                mngr.wait_until_finished()
                mngr.close()
            session.writer.flush()
    return step, last_eval


def evaluate_checkpoint(
    workdir: str,
    step: int | None = None,
    devices: list[jax.Device] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[int, dict[str, float]]:
    """Evaluates a checkpoint of `workdir` (the latest by default) on its config's full eval split, or with the
    data fields in `overrides` (e.g. `dataset`, `eval_split`) changed."""
    step, config = checkpoint.restore_config(workdir, step)
    task = tasks.get(config)
    for section, fields in (overrides or {}).items():
        if isinstance(fields, dict) and section != task.section:
            names = ", ".join(f"{section}.{name}" for name in fields)
            raise ConfigError(f"{names} apply to {section} checkpoints; {workdir} holds a {task.name} run")
    if overrides:
        with config.ignore_type():
            config.update(overrides)
        config_lib.validate(config)
    mesh = distributed.make_mesh(devices)
    builder = open_dataset(config)
    pipeline.check_split(builder, config.eval_split, "eval_split")
    resolve_num_classes(config, pipeline.dataset_info(builder))  # the model's classes must be the data's
    plan_lib.check_divisible("eval_batch_size", config.eval_batch_size, mesh.size, distributed.mesh_process_count(mesh))
    task = tasks.get(config)
    model = task.build_model()
    replicated = distributed.replicated(mesh)
    abstract = models.abstract_variables(model, config.resolution)
    step, variables = checkpoint.restore_model_variables(workdir, abstract, replicated, step)
    eval_step = jit_eval_step(task, model, mesh)
    local_batch = config.eval_batch_size // distributed.mesh_process_count(mesh)
    return step, evaluate(eval_step, variables, builder, config, local_batch, mesh)


def write_eval(workdir: str, step: int, results: dict[str, float]) -> None:
    writer: metric_writers.MetricWriter = metrics.create_writer(workdir)
    writer.write_scalars(step, results)
    writer.flush()
