"""Rematerialised blocks: the forward pass keeps only a block's inputs, the backward pass recomputes the rest.

Trades compute for memory in training (`model.remat`): an inverted-residual block's expanded tensors, the largest
activations, are not stored for the gradient.
"""

from __future__ import annotations

import flax.linen as nn
import jax


def _after(x: jax.Array, cotangent: jax.Array) -> jax.Array:
    """`x` plus a zero computed from `cotangent`: XLA cannot prove it zero (NaN * 0 is NaN), so whatever uses
    the result waits for the cotangent. JAX's own remat orders the recomputation with an optimization barrier,
    which XLA:CPU removes before scheduling; the recomputation was then hoisted next to the forward pass.
    """
    zero = cotangent.reshape(-1)[0].astype(x.dtype) * 0
    return x + zero


def rematerialized(block: nn.Module, x: jax.Array, train: bool, shortcut: jax.Array | None):
    """Calls `block(x, train, shortcut)` keeping only its inputs; the backward pass recomputes the rest."""
    definition = block.clone(parent=None, name=None)

    def call(module, x, shortcut):
        return module(x, train, shortcut)

    def forward(module, x, shortcut):
        outputs = module(x, train, shortcut)
        return outputs, (module.variables, x, shortcut)

    def backward(residuals, cotangents):
        variables, x, shortcut = residuals
        x = _after(x, cotangents[0])

        def pure(params, x, shortcut):
            outputs, _ = definition.apply({**variables, "params": params}, x, train, shortcut, mutable=["batch_stats"])
            return outputs

        _, vjp = jax.vjp(pure, variables["params"], x, shortcut)
        params_t, x_t, shortcut_t = vjp(cotangents)
        return {"params": params_t}, x_t, shortcut_t

    return nn.custom_vjp(call, forward, backward)(block, x, shortcut)
