"""Inverted-residual blocks evaluated in groups of expansion channels (the paper's memory-efficient inference).

A block F(x) = [project . depthwise . expand](x) is a sum over its expansion channels: each group of channels can
be expanded, filtered and projected on its own, and the projections added. Only the block's input, its output
(the accumulator) and one group's expanded tensors are alive at a time, instead of the whole expanded tensor
(section 5.1 of the paper). The groups run in a `lax.scan`, so XLA reuses one group's buffers for the next
and cannot merge the groups' matrix products back into one.

Channel counts that do not divide by the number of groups use groups of `ceil(C / t)` channels; the last group
starts earlier (so every slice has the same static size) and masks the channels an earlier group already added.
The functions take folded inference batch norm (a per-channel multiplier and offset) and return what the plain
layers return, up to the order of the projection's additions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mnv2_jax.models import convolutions, layers
from mnv2_jax.models.batch_norm import inference_affine


@dataclasses.dataclass(frozen=True)
class FoldedConv:
    """A convolution's HWIO kernel and its inference batch norm as `y = conv(x) * multiplier + offset`."""

    kernel: jax.Array
    multiplier: jax.Array
    offset: jax.Array


def folded_conv(variables: dict, path: tuple[str, ...], conventions: layers.Conventions) -> FoldedConv:
    """The `ConvBN` at `path` of a model's `{'params', 'batch_stats'}`, its batch norm folded as in inference."""
    params, stats = variables["params"], variables["batch_stats"]
    for key in path:
        params, stats = params[key], stats[key]
    bn, moments = params["BatchNorm"], stats["BatchNorm"]
    multiplier, offset = inference_affine(
        bn["scale"], bn["bias"], moments["mean"], moments["var"], conventions.bn_epsilon, conventions.dtype
    )
    return FoldedConv(params["kernel"].astype(conventions.dtype), multiplier, offset)


def _groups(channels: int, splits: int) -> tuple[int, int]:
    """(group size, number of groups) for `channels` split `splits` ways."""
    size = -(-channels // splits)
    return size, -(-channels // size)


def _slice(a: jax.Array, start: jax.Array, size: int, axis: int = -1) -> jax.Array:
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis % a.ndim)


def _over_groups(channels: int, splits: int, step: Callable, init):
    """Runs `step(carry, start, size, fresh)` for each group of channels; `fresh` marks the group's channels that
    no earlier group covered (all but the last group's overlap)."""
    size, count = _groups(channels, splits)

    def body(carry, index):
        start = jnp.minimum(index * size, channels - size)
        fresh = start + jnp.arange(size) >= index * size
        return step(carry, start, size, fresh), None

    carry, _ = lax.scan(body, init, jnp.arange(count))
    return carry


def _zeros_after(x: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Zeros computed from `x`, so that XLA creates a block's accumulator when the block starts: plain zeros are a
    constant it creates (shared between blocks) at the program's start and keeps alive through the peak.
    (`bool * 0` is not folded by XLA, and is 0 even where `x` is NaN or infinite.)"""
    return jnp.broadcast_to((x.reshape(-1)[0] == 0).astype(dtype) * 0, shape)


def _padding(x: jax.Array, kernel: int, stride: int, dilation: int, mode: str) -> convolutions.Padding:
    return tuple(layers.conv_padding(size, kernel, stride, dilation, mode) for size in x.shape[1:3])


def _apply(y: jax.Array, conv: FoldedConv, start, size, activation) -> jax.Array:
    y = y * _slice(conv.multiplier, start, size) + _slice(conv.offset, start, size)
    return activation(y) if activation is not None else y


def inverted_residual(
    x: jax.Array,
    expand: FoldedConv | None,
    depthwise: FoldedConv,
    project: FoldedConv,
    spec,
    conventions: layers.Conventions,
    splits: int,
    residual: bool,
    nonlinear_bottleneck: bool,
    stem: tuple[FoldedConv, int, int] | None = None,
) -> jax.Array:
    """One block (`spec`, a `LayerSpec`) in `splits` groups of its expanded channels.

    `expand=None` for a block without expansion: then `stem` = (conv, stride, dilation), the network's first
    k x k convolution, takes its place (the paper's trick for the first layer), so that the stem's output is
    computed group by group from the image and never held whole.
    """
    pointwise = layers.resolve_pointwise(conventions.pointwise)
    filter_depthwise = layers.resolve_depthwise(conventions.depthwise, train=False)
    dtype = conventions.dtype
    if expand is None and stem is None:
        raise ValueError(f"{spec.endpoint}: a block without expansion is split only together with the stem")
    if stem is not None:
        stem_conv, stem_stride, stem_dilation = stem
        stem_kernel = stem_conv.kernel.shape[0]
        stem_padding = _padding(x, stem_kernel, stem_stride, stem_dilation, conventions.padding)
        # XLA's own convolution: the im2col form ("patches", faster whole) does not depend on the group, so XLA
        # hoists it out of the loop and keeps the image's 27-channel patches alive through the block.
        regular = convolutions.convolution
        expanded_hw = [-(-size // stem_stride) for size in x.shape[1:3]]
    else:
        expanded_hw = list(x.shape[1:3])
    dw_padding = tuple(
        layers.conv_padding(size, 3, spec.stride, spec.dilation, conventions.padding) for size in expanded_hw
    )
    out_hw = [-(-size // spec.stride) for size in expanded_hw]
    accumulate = jnp.promote_types(dtype, jnp.float32)
    x = x.astype(dtype)

    def step(total, start, size, fresh):
        if stem is not None:
            kernel = _slice(stem_conv.kernel, start, size)
            strides, dilation = (stem_stride,) * 2, (stem_dilation,) * 2
            expanded = _apply(regular(x, kernel, strides, stem_padding, dilation), stem_conv, start, size, layers.relu6)
        else:
            expanded = _apply(pointwise(x, _slice(expand.kernel, start, size)), expand, start, size, layers.relu6)
        strides, dilation = (spec.stride,) * 2, (spec.dilation,) * 2
        filtered = filter_depthwise(expanded, _slice(depthwise.kernel, start, size), strides, dw_padding, dilation)
        filtered = jnp.where(fresh, _apply(filtered, depthwise, start, size, layers.relu6), 0).astype(dtype)
        return total + pointwise(filtered, _slice(project.kernel, start, size, axis=-2)).astype(accumulate)

    total = _zeros_after(x, (x.shape[0], *out_hw, spec.out_features), accumulate)
    total = _over_groups(spec.expanded_features, splits, step, total).astype(dtype)
    y = _apply(total, project, 0, spec.out_features, layers.relu6 if nonlinear_bottleneck else None)
    return y + x if residual else y


def conv_and_pool(x: jax.Array, conv: FoldedConv, conventions: layers.Conventions, splits: int) -> jax.Array:
    """The last 1x1 conv (+ BN, ReLU6) and the global average pool in `splits` groups of output channels: the
    pooled features `[B, C]` (in `param_dtype`) without the `[B, H, W, C]` map."""
    pointwise = layers.resolve_pointwise(conventions.pointwise)
    channels = conv.kernel.shape[-1]
    x = x.astype(conventions.dtype)

    def step(pooled, start, size, fresh):
        features = _apply(pointwise(x, _slice(conv.kernel, start, size)), conv, start, size, layers.relu6)
        # an overlapping group writes the same values again, so no mask is needed
        return lax.dynamic_update_slice_in_dim(pooled, jnp.mean(features.astype(pooled.dtype), axis=(1, 2)), start, 1)

    pooled = _zeros_after(x, (x.shape[0], channels), conventions.param_dtype)
    return _over_groups(channels, splits, step, pooled)
