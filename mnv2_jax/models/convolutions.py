"""The convolution implementations that `ConvBN` chooses between (`mnv2_jax.models.layers`), with their gradients.

Each family computes one operation several ways, numerically the same (tests/test_layers.py): XLA's native op, and
forms that XLA:CPU runs faster. Depthwise: XLA's grouped convolution, a sum of shifted slices with its own VJP, or
this package's C++ XLA:CPU kernels. 1x1: convolution or matrix product. k x k (the stem): convolution or a matrix
product over patches. Inputs are NHWC, kernels HWIO.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mnv2_jax.kernels.depthwise import depthwise_conv as depthwise_conv_kernel

Padding = tuple[tuple[int, int], tuple[int, int]]
# (x, kernel, strides, padding, dilation) -> y: the depthwise and the k x k convolution implementations
ConvFn = Callable[[jax.Array, jax.Array, tuple[int, int], Padding, tuple[int, int]], jax.Array]


def convolution(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> jax.Array:
    """XLA's convolution of an NHWC input with an HWIO kernel (grouped when `groups` > 1)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def depthwise_grouped(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> jax.Array:
    """Depthwise convolution as XLA's grouped convolution (one group per channel)."""
    return convolution(x, kernel, strides, padding, dilation, groups=x.shape[-1])


def _shifted_taps(x: jax.Array, kernel_hw: tuple[int, int], strides, padding: Padding, dilation) -> list[jax.Array]:
    """The kh*kw shifted, strided views of the padded input, one per kernel tap (row-major)."""
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    kh, kw = kernel_hw
    (sh, sw), (dh, dw) = strides, dilation
    n, h, w, c = x.shape
    out_h = (h - dh * (kh - 1) - 1) // sh + 1
    out_w = (w - dw * (kw - 1) - 1) // sw + 1
    return [
        lax.slice(
            x,
            (0, i * dh, j * dw, 0),
            (n, i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _shifted_forward(x, kernel, strides, padding, dilation):
    taps = _shifted_taps(x, kernel.shape[:2], strides, padding, dilation)
    weights = kernel.reshape(-1, kernel.shape[-1])
    out = taps[0] * weights[0]
    for tap, weight in zip(taps[1:], weights[1:], strict=True):
        out = out + tap * weight
    return out


# Images per step of the kernel-gradient loop: x and the output gradient of one step should stay in cache.
_KERNEL_GRAD_CHUNK_BYTES = 6 * 2**20


def _kernel_gradient(x, grad_out, kernel_shape, strides, padding, dilation):
    """d loss / d kernel, computed a few images at a time.

    Autodiff gives kh*kw separate full passes over the input and the output
    gradient (one reduction per tap), which is memory-bound on CPU. Looping
    over small batch chunks keeps both in cache while all taps are reduced.
    """
    n = x.shape[0]
    per_image = (x[0].size + grad_out[0].size) * x.dtype.itemsize
    limit = max(1, _KERNEL_GRAD_CHUNK_BYTES // per_image)
    chunk = max(d for d in range(1, min(n, limit) + 1) if n % d == 0)

    accumulate = jnp.promote_types(jnp.result_type(x, grad_out), jnp.float32)

    def taps_times_grad(xs, gs):
        taps = _shifted_taps(xs, kernel_shape[:2], strides, padding, dilation)
        return jnp.stack([jnp.sum(tap * gs, axis=(0, 1, 2), dtype=accumulate) for tap in taps])

    xs = x.reshape(n // chunk, chunk, *x.shape[1:])
    gs = grad_out.reshape(n // chunk, chunk, *grad_out.shape[1:])
    initial = jnp.zeros((kernel_shape[0] * kernel_shape[1], kernel_shape[-1]), accumulate)
    total, _ = lax.scan(lambda acc, xg: (acc + taps_times_grad(*xg), None), initial, (xs, gs))
    return total.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_shifted(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> jax.Array:
    """Depthwise convolution as a sum of kh*kw shifted, strided slices times a per-channel weight.

    Numerically the same operation as `depthwise_grouped`; XLA fuses it into one
    loop, which is much faster than its grouped convolution on CPU. Both gradients
    have their own implementations: the input gradient is one shifted pass too
    (`_input_gradient`), the kernel gradient is cache-friendly (`_kernel_gradient`).
    """
    return _shifted_forward(x, kernel, strides, padding, dilation)


def _depthwise_shifted_fwd(x, kernel, strides, padding, dilation):
    return _shifted_forward(x, kernel, strides, padding, dilation), (x, kernel)


def _input_gradient(grad_out, kernel, input_hw, strides, padding, dilation):
    """d loss / d input, as one shifted depthwise pass (the transposed convolution).

    The output gradient is spread out by the stride (interior padding), padded so that every input pixel
    sees the taps that read it, and correlated with the flipped kernel at stride 1. Autodiff of the
    forward would instead write kh*kw full-size padded tensors, one per tap, and add them.
    """
    pad_config = [(0, 0, 0)]
    for size, taps, stride, rate, (before, _), out in zip(
        input_hw, kernel.shape[:2], strides, dilation, padding, grad_out.shape[1:3], strict=True
    ):
        low = (taps - 1) * rate - before
        pad_config.append((low, size + before - (out - 1) * stride - 1, stride - 1))
    pad_config.append((0, 0, 0))
    spread = lax.pad(grad_out, jnp.zeros((), grad_out.dtype), pad_config)
    return _shifted_forward(spread, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)), dilation)


def _depthwise_shifted_bwd(strides, padding, dilation, residuals, grad_out):
    x, kernel = residuals
    grad_x = _input_gradient(grad_out, kernel, x.shape[1:3], strides, padding, dilation)
    grad_kernel = _kernel_gradient(x, grad_out, kernel.shape, strides, padding, dilation)
    return grad_x, grad_kernel.astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_cpu_kernel(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> jax.Array:
    """Depthwise convolution and both gradients as this package's C++ XLA:CPU kernels (`mnv2_jax/kernels`).

    float32 only: other dtypes take the shifted form. Raises if the backend is not CPU or the kernels do not build.
    """
    if jax.default_backend() != "cpu":
        raise ValueError(f"model.depthwise='cpu_kernel' runs on CPU only, not {jax.default_backend()}")
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        return depthwise_shifted(x, kernel, strides, padding, dilation)
    return depthwise_conv_kernel(x, kernel, strides, padding, dilation)


DEPTHWISE_IMPLEMENTATIONS: dict[str, ConvFn] = {
    "grouped": depthwise_grouped,
    "shifted": depthwise_shifted,
    "cpu_kernel": depthwise_cpu_kernel,
}


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 stride-1 convolution as XLA's convolution (native Conv ops in exported graphs)."""
    return convolution(x, kernel)


def pointwise_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 stride-1 convolution as a matrix product over the channel axis.

    The same operation as `pointwise_conv`; on CPU XLA runs it and both of its
    gradients as plain matrix products instead of (much slower) convolutions.
    """
    rows = x.reshape(-1, x.shape[-1])  # 2-D, so the kernel gradient is one (pixels, in)^T x (pixels, out) product
    return (rows @ kernel.reshape(kernel.shape[-2:])).reshape(*x.shape[:-1], kernel.shape[-1])


POINTWISE_IMPLEMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "conv": pointwise_conv,
    "dot": pointwise_dot,
}


def regular_conv_patches(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> jax.Array:
    """A k x k convolution as one matrix product over the input's patches (im2col).

    The same operation as `convolution`. The stem has 3 input channels, where
    XLA:CPU's convolution reaches a fraction of its matrix-product speed; the
    patches are the depthwise path's shifted views, side by side.
    """
    kh, kw, in_features, out_features = kernel.shape
    patches = jnp.concatenate(_shifted_taps(x, (kh, kw), strides, padding, dilation), axis=-1)
    return pointwise_dot(patches, kernel.reshape(1, 1, kh * kw * in_features, out_features))


REGULAR_CONV_IMPLEMENTATIONS: dict[str, ConvFn] = {
    "conv": convolution,
    "patches": regular_conv_patches,
}
