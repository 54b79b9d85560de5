"""Depthwise convolution and its gradients as the C++ XLA:CPU kernels of `depthwise_cpu.cc` (float32, NHWC)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from mnv2_jax.kernels import cpu

Padding = tuple[tuple[int, int], tuple[int, int]]


def _geometry(strides, padding: Padding, dilation) -> dict[str, np.int64]:
    values = (*strides, padding[0][0], padding[1][0], *dilation)
    names = ("stride_h", "stride_w", "pad_top", "pad_left", "dilation_h", "dilation_w")
    return {name: np.int64(value) for name, value in zip(names, values, strict=True)}


def _call(target: str, shape, first, second, strides, padding, dilation) -> jax.Array:
    cpu.load()
    result = jax.ShapeDtypeStruct(shape, first.dtype)
    # vmap: one call per example (the kernels take rank-4 operands)
    call = jax.ffi.ffi_call(target, result, vmap_method="sequential")
    return call(first, second, **_geometry(strides, padding, dilation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> jax.Array:
    """Depthwise convolution of a float32 NHWC input with a (kh, kw, 1, C) kernel; explicit padding."""
    n, h, w, c = x.shape
    geometry = zip((h, w), padding, dilation, kernel.shape[:2], strides, strict=True)
    out_hw = [
        (size + before + after - rate * (taps - 1) - 1) // stride + 1
        for size, (before, after), rate, taps, stride in geometry
    ]
    return _call("Mnv2DepthwiseForward", (n, *out_hw, c), x, kernel, strides, padding, dilation)


def _forward(x, kernel, strides, padding, dilation):
    return depthwise_conv(x, kernel, strides, padding, dilation), (x, kernel)


def _backward(strides, padding, dilation, residuals, grad_out):
    x, kernel = residuals
    grad_x = _call("Mnv2DepthwiseInputGradient", x.shape, grad_out, kernel, strides, padding, dilation)
    grad_kernel = _call("Mnv2DepthwiseKernelGradient", kernel.shape, x, grad_out, strides, padding, dilation)
    return grad_x, grad_kernel


depthwise_conv.defvjp(_forward, _backward)
