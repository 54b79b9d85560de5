"""The train state and the train/eval steps, compiled with `jax.jit` over the mesh."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mnv2_jax.models import predict
from mnv2_jax.training.optim import ema_decay_at


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # None when no EMA is kept

    def eval_variables(self) -> dict[str, Any]:
        """Variables to evaluate and export: the EMA of the weights when kept."""
        params = self.params if self.ema_params is None else self.ema_params
        return {"params": params, "batch_stats": self.batch_stats}


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, input_shape: tuple[int, ...], use_ema: bool
) -> TrainState:
    """Initial parameters, batch statistics, optimizer state and EMA for inputs of `input_shape`."""
    variables = model.init(rng, jnp.zeros(input_shape, model.conventions.param_dtype))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
    )


LossFn = Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
ContextFactory = Callable[[], contextlib.AbstractContextManager]
# (params, batch statistics, batch, dropout key) -> (loss, task metrics, updated batch statistics, gradients)
GradFn = Callable[[Any, Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array], Any, Any]]


def make_grad_fn(
    model: nn.Module, task_loss: LossFn, forward_context: ContextFactory = contextlib.nullcontext
) -> GradFn:
    """The loss, task metrics, updated batch statistics and gradients of one (micro-)batch; the forward pass runs in
    `forward_context()` (e.g. `fine_tune.frozen_batch_norm`)."""

    def grad_fn(params, batch_stats, batch, dropout_rng):
        def loss_fn(params):
            with forward_context():
                (logits, _), updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    batch["image"],
                    train=True,
                    rngs={"dropout": dropout_rng},
                    mutable=["batch_stats"],
                )
            loss, task_metrics = task_loss(logits, batch)
            return loss, (task_metrics, updates["batch_stats"])

        (loss, (task_metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, task_metrics, new_stats, grads

    return grad_fn


def accumulate(grad_fn: GradFn, k: int, micro_batches_sharding: jax.sharding.Sharding | None = None) -> GradFn:
    """`grad_fn` over the batch as k micro-batches run one after another (`lax.scan`): the means of their losses,
    task metrics, updated batch statistics and gradients.

    Micro-batch i holds the examples j with j % k == i, so each device (the batch is sharded on axis 0) holds an
    equal share of every micro-batch, on any device count. Every micro-batch starts from the same batch statistics
    and normalises with its own; the mean of their k updates is what `BatchNorm` stores for one batch of groups of
    the micro-batch size. Micro-batch i's dropout key is `fold_in(dropout_rng, i)`.
    """

    def split(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)  # (k, B/k, ...)
        return x if micro_batches_sharding is None else jax.lax.with_sharding_constraint(x, micro_batches_sharding)

    def accumulated(params, batch_stats, batch, dropout_rng):
        def body(grad_sum, xs):
            index, micro_batch = xs
            loss, task_metrics, new_stats, grads = grad_fn(
                params, batch_stats, micro_batch, jax.random.fold_in(dropout_rng, index)
            )
            return jax.tree.map(jnp.add, grad_sum, grads), (loss, task_metrics, new_stats)

        zeros = jax.tree.map(jnp.zeros_like, params)
        micro_batches = jax.tree.map(split, batch)
        grad_sum, stacked = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches))
        loss, task_metrics, new_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
        return loss, task_metrics, new_stats, jax.tree.map(lambda g: g / k, grad_sum)

    return accumulated


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    task_loss: LossFn,
    ema_decay: float | None,
    rng: jax.Array,
    accumulate_steps: int = 1,
    micro_batches_sharding: jax.sharding.Sharding | None = None,
    forward_context: ContextFactory = contextlib.nullcontext,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step on the task's loss (`task_loss(logits, batch) -> (loss, train metrics)`).

    `accumulate_steps` > 1: the gradient is the mean over that many micro-batches of the batch (`accumulate`; its
    stacked micro-batches are constrained to `micro_batches_sharding`); 1 compiles the plain step. The forward pass
    runs in `forward_context()`.
    """
    grad_fn = make_grad_fn(model, task_loss, forward_context)
    if accumulate_steps > 1:
        grad_fn = accumulate(grad_fn, accumulate_steps, micro_batches_sharding)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(rng, state.step)
        loss, task_metrics, batch_stats, grads = grad_fn(state.params, state.batch_stats, batch, dropout_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_decay is not None:
            decay = ema_decay_at(state.step.astype(jnp.float32), ema_decay)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
        grad_norm = optax.tree.norm(grads)
        # A NaN/Inf loss or gradient leaves every part of the state as it was (the step still counts).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {
            "train/loss": loss,
            **task_metrics,
            "train/lr": schedule(state.step),
            "train/grad_norm": grad_norm,
            "train/nonfinite": 1 - finite.astype(jnp.int32),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            batch_stats=keep_if_finite(batch_stats, state.batch_stats),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            ema_params=keep_if_finite(ema_params, state.ema_params),
        )
        return new_state, metrics

    return train_step


EvalOutputsFn = Callable[[jax.Array, dict[str, jax.Array]], dict[str, jax.Array]]


def make_eval_step(
    model: nn.Module, eval_outputs: EvalOutputsFn, batch_shards: int = 1
) -> Callable[[dict, dict], dict[str, jax.Array]]:
    """The task's `eval_outputs` of the model's inference logits on a padded batch.

    `batch_shards`: the devices the batch is split over (see `models.predict`).
    """

    def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return eval_outputs(predict(model, variables, batch["image"], batch_shards), batch)

    return eval_step
