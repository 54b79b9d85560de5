"""Optimizers and learning-rate schedules in optax, with TF1 RMSProp semantics by default.

TF1 `RMSPropOptimizer` (what the paper and slim used): the mean-square slot
starts at 1, epsilon sits inside the square root, and the learning rate is
folded into the momentum buffer:
    ms <- rho * ms + (1 - rho) * g^2;  mom <- mu * mom + lr * g / sqrt(ms + eps);  w <- w - mom
which is `optax.rmsprop(..., initial_scale=1.0, eps_in_sqrt=True, bias_correction=False)`.
Weight decay is slim's coupled L2 (4e-5 * w added to the gradient) on regular
conv kernels and the logits kernel only: not depthwise kernels, BN or biases.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import optax

from mnv2_jax.training import fine_tune
from mnv2_jax.training.plan import Plan


def learning_rate_schedule(config: ml_collections.ConfigDict, plan: Plan) -> optax.Schedule:
    """Linear warm-up to the scaled rate, then exponential (staircase optional), cosine or constant."""
    opt = config.optimizer
    peak = plan.learning_rate
    if opt.schedule == "exponential":
        main = optax.exponential_decay(
            peak, transition_steps=plan.decay_steps, decay_rate=opt.decay_rate, staircase=opt.staircase
        )
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(1, plan.total_steps - plan.warmup_steps))
    else:
        main = optax.constant_schedule(peak)
    if plan.warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, plan.warmup_steps)
    return optax.join_schedules([warmup, main], [plan.warmup_steps])


def weight_decay_mask(params: Any, excluded: tuple[str, ...] = ()) -> Any:
    """True for the kernels slim regularises (regular convs and the logits, not depthwise convs), less the parameters
    `excluded` patterns match (`fine_tune.no_weight_decay`)."""
    is_excluded = fine_tune.matcher("fine_tune.no_weight_decay", excluded)

    def decays(path, _):
        keys = [getattr(k, "key", None) for k in path]
        name = "/".join(str(k) for k in keys)
        return keys[-1] == "kernel" and "depthwise" not in keys and not is_excluded(name)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, plan: Plan) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer`, with `config.fine_tune`'s frozen parameters and multipliers."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config, plan)
    mask = functools.partial(weight_decay_mask, excluded=tuple(config.fine_tune.no_weight_decay))
    parts = []
    if opt.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == "adamw":  # decoupled decay, same mask
        parts.append(optax.adamw(schedule, weight_decay=opt.weight_decay, mask=mask))
        return fine_tune.apply(optax.chain(*parts), config.fine_tune)
    if opt.weight_decay:
        parts.append(optax.add_decayed_weights(opt.weight_decay, mask=mask))
    if opt.name == "rmsprop":
        parts.append(
            optax.rmsprop(
                schedule,
                decay=opt.rmsprop_decay,
                eps=opt.epsilon,
                initial_scale=1.0,
                eps_in_sqrt=True,
                centered=False,
                momentum=opt.momentum,
                nesterov=False,
                bias_correction=False,
            )
        )
    else:
        parts.append(optax.sgd(schedule, momentum=opt.momentum, nesterov=True))
    return fine_tune.apply(optax.chain(*parts), config.fine_tune)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """TF's `ExponentialMovingAverage(decay, num_updates=step)`: min(decay, (1 + step) / (10 + step))."""
    return jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
