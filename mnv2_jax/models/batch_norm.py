"""Batch normalisation: global or per-group ("ghost") statistics, with a hand-written VJP, and its inference form.

Parameter names follow TF-slim: `scale`/`bias` params and `mean`/`var` batch statistics.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def inference_affine(
    scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Inference batch norm as `y = x * multiplier + offset` (both in `dtype`) from the stored statistics."""
    multiplier = scale * lax.rsqrt(var + epsilon)
    return multiplier.astype(dtype), (bias - mean * multiplier).astype(dtype)


class BatchNorm(nn.Module):
    """Batch normalisation with global or per-group ("ghost") statistics.

    `group_size=None` normalises over the whole (possibly sharded) batch; an
    integer normalises each consecutive group of that many examples on its own,
    as TPU per-core BN does. Statistics are computed in `param_dtype` (float32
    unless the model computes in float64).
    """

    momentum: float
    epsilon: float
    group_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        stats_dtype = jnp.promote_types(self.dtype, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (features,), stats_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), stats_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), stats_dtype)
        if not train:
            multiplier, offset = inference_affine(scale, bias, ra_mean.value, ra_var.value, self.epsilon, self.dtype)
            return (x * multiplier + offset).astype(self.dtype)

        xf = x.astype(stats_dtype)
        batch = x.shape[0]
        groups = 1
        if self.group_size is not None and self.group_size < batch:
            if batch % self.group_size:
                raise ValueError(f"batch size {batch} is not divisible by model.bn_group_size={self.group_size}")
            groups = batch // self.group_size
        xg = xf.reshape((groups, batch // groups, *x.shape[1:]))
        y, mean, var = batch_normalize(xg, scale, bias, self.epsilon)
        if not self.is_initializing():
            decay = self.momentum
            ra_mean.value = decay * ra_mean.value + (1 - decay) * jnp.mean(mean, axis=tuple(range(xg.ndim - 1)))
            ra_var.value = decay * ra_var.value + (1 - decay) * jnp.mean(var, axis=tuple(range(xg.ndim - 1)))
        return y.reshape(x.shape).astype(self.dtype)


def _moments(xg: jax.Array) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axes, keepdims=True)
    # Two passes (as tf.nn.moments): E[x^2] - E[x]^2 loses digits when |mean| >> std.
    return mean, jnp.mean(jnp.square(xg - mean), axes, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(
    xg: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises each group `xg[g]` (groups, batch, ..., C) by its own moments; returns (y, mean, var).

    Its VJP is the textbook batch-norm gradient (two reductions, one elementwise pass), which XLA runs in fewer
    passes over the activations than autodiff of the moments; gradients equal autodiff's (a test).
    """
    return _batch_normalize_fwd(xg, scale, bias, epsilon)[0]


def _batch_normalize_fwd(xg, scale, bias, epsilon):
    mean, var = _moments(xg)
    inv_std = lax.rsqrt(var + epsilon)
    y = (xg - mean) * (scale * inv_std) + bias
    return (y, mean, var), (xg, mean, inv_std, scale)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    xg, mean, inv_std, scale = residuals
    grad_y, grad_mean, grad_var = cotangents  # the moments' cotangents are zero unless the moments feed the loss
    axes = tuple(range(1, xg.ndim - 1))
    count = math.prod(xg.shape[1:-1])
    centered = xg - mean
    normalized = centered * inv_std
    sum_grad = jnp.sum(grad_y, axes, keepdims=True)
    sum_grad_normalized = jnp.sum(grad_y * normalized, axes, keepdims=True)
    grad_x = (
        (scale * inv_std / count) * (count * grad_y - sum_grad - normalized * sum_grad_normalized)
        + grad_mean / count
        + grad_var * (2.0 / count) * centered
    )
    all_but_channels = tuple(range(xg.ndim - 1))
    return grad_x, jnp.sum(sum_grad_normalized, all_but_channels), jnp.sum(sum_grad, all_but_channels)


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)
