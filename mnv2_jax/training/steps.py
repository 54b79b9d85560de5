"""The train state and the train/eval steps, compiled with `jax.jit` over the mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mnv2_jax.models import MobileNetV2, predict
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
    model: MobileNetV2, tx: optax.GradientTransformation, rng: jax.Array, resolution: int, use_ema: bool
) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, resolution, resolution, 3), model.conventions.param_dtype))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else None
    if targets is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optax.softmax_cross_entropy(logits, targets)


def correct_top_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k largest logits (ties broken towards the label's favour)."""
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def make_train_step(
    model: MobileNetV2,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_classes: int,
    label_smoothing: float,
    ema_decay: float | None,
    rng: jax.Array,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            (logits, _), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats"],
            )
            loss = jnp.mean(cross_entropy(logits, batch["label"], num_classes, label_smoothing))
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
            "train/top1": jnp.mean(correct_top_k(logits, batch["label"], 1)),
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


def make_eval_step(
    model: MobileNetV2, num_classes: int, batch_shards: int = 1
) -> Callable[[dict, dict], dict[str, jax.Array]]:
    """Sums over the batch of loss, top-1/top-5 hits and the example count, masked (padding counts 0).

    `batch_shards`: the devices the batch is split over (see `models.predict`).
    """

    def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = predict(model, variables, batch["image"], batch_shards)
        mask = batch["mask"].astype(jnp.float32)
        return {
            "loss": jnp.sum(cross_entropy(logits, batch["label"], num_classes) * mask),
            "top1": jnp.sum(correct_top_k(logits, batch["label"], 1) * mask),
            "top5": jnp.sum(correct_top_k(logits, batch["label"], min(5, num_classes)) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step
