"""Building blocks shared by the MobileNetV2 backbone and the task heads.

Parameter names follow TF-slim so that weight converters are a rename plus a
transpose: a conv unit holds `kernel` and a `BatchNorm` submodule with
`scale`/`bias` params and `mean`/`var` batch statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mnv2_jax.kernels import cpu as cpu_kernels
from mnv2_jax.kernels.depthwise import depthwise_conv as depthwise_conv_kernel

Padding = tuple[tuple[int, int], tuple[int, int]]
# (x, kernel, strides, padding, dilation) -> y: the depthwise and the k x k convolution implementations
ConvFn = Callable[[jax.Array, jax.Array, tuple[int, int], Padding, tuple[int, int]], jax.Array]

PADDING_MODES = ("same", "symmetric")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count as the authors' code does.

    Nearest multiple of `divisor`, at least `min_value` (default `divisor`), and
    never more than 10% below `value`.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def conv_padding(size: int, kernel: int, stride: int, dilation: int, mode: str) -> tuple[int, int]:
    """Padding (before, after) of one spatial dimension.

    `same` is TensorFlow's rule (extra pixel after, so even inputs get (0, 1) at
    stride 2); `symmetric` pads `dilation * (kernel - 1) // 2` on both sides as
    PyTorch/torchvision do. Both give `ceil(size / stride)` outputs for odd kernels.
    """
    effective = (kernel - 1) * dilation + 1
    if mode == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + effective - size, 0)
        return total // 2, total - total // 2
    if mode == "symmetric":
        pad = (effective - 1) // 2
        return pad, pad
    raise ValueError(f"padding must be one of {PADDING_MODES}, got {mode!r}")


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


def _resolve(field: str, name: str, implementations: dict, fastest: dict[str, str], backend: str | None):
    """`auto` takes `fastest[backend]` (measured), else the first implementation (the native XLA op)."""
    if name == "auto":
        name = fastest.get(backend or jax.default_backend(), next(iter(implementations)))
    try:
        return implementations[name]
    except KeyError:
        raise ValueError(f"{field} must be one of {('auto', *implementations)}, got {name!r}") from None


def resolve_depthwise(name: str, backend: str | None = None, train: bool = True) -> ConvFn:
    """Returns the depthwise implementation; `auto` picks the fastest measured one per backend.

    On CPU: for training the C++ kernels, where they build and the process has one device (a custom call has no
    sharding rule, so under a multi-device mesh XLA would gather its operands to every device); for inference,
    which runs one image at a time, and otherwise, the shifted form (measured faster there: XLA overlaps the
    unrolled images' layers on both cores).
    """
    if name == "auto" and (backend or jax.default_backend()) == "cpu":
        name = "cpu_kernel" if train and jax.device_count() == 1 and cpu_kernels.available() else "shifted"
    return _resolve("model.depthwise", name, DEPTHWISE_IMPLEMENTATIONS, {}, backend)


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


def resolve_pointwise(name: str, backend: str | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns the 1x1 convolution implementation; `auto` picks the fastest measured one per backend."""
    return _resolve("model.pointwise", name, POINTWISE_IMPLEMENTATIONS, {"cpu": "dot"}, backend)


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


def resolve_regular_conv(name: str, backend: str | None = None) -> ConvFn:
    """Returns the k x k (stem) convolution implementation; `auto` picks the fastest measured one per backend."""
    return _resolve("model.regular_conv", name, REGULAR_CONV_IMPLEMENTATIONS, {"cpu": "patches"}, backend)


@dataclasses.dataclass(frozen=True)
class Conventions:
    """Framework conventions that change numerics (padding, BN constants, dtype), and how convolutions run."""

    padding: str = "same"
    bn_momentum: float = 0.997
    bn_epsilon: float = 1e-3
    bn_group_size: int | None = None
    depthwise: str = "auto"
    pointwise: str = "auto"
    regular_conv: str = "auto"
    init_stddev: float = 0.09
    dtype: jnp.dtype = jnp.float32

    @property
    def param_dtype(self) -> jnp.dtype:
        """Parameters and BN statistics: float32, or float64 for float64 compute (numerical tests)."""
        return jnp.promote_types(self.dtype, jnp.float32)


@jax.custom_jvp
def relu6(x: jax.Array) -> jax.Array:
    """min(max(x, 0), 6), with TF's and PyTorch's gradient: 1 strictly inside (0, 6), else 0.

    (`jnp.clip`'s own gradient splits ties, 0.5 at exactly 0 or 6, and costs extra passes.)
    """
    return jnp.clip(x, 0, 6)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    inside = (x > 0) & (x < 6)
    return jnp.clip(x, 0, 6), jnp.where(inside, dx, jnp.zeros_like(dx))


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


class ConvBN(nn.Module):
    """Convolution (regular or depthwise, no bias) + BatchNorm + optional activation.

    The kernel is HWIO: `(k, k, in, out)` for a regular conv and `(k, k, 1, C)`
    for a depthwise one (the TF/Flax layout of a grouped convolution).
    """

    features: int
    conventions: Conventions
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    depthwise: bool = False
    activation: Callable[[jax.Array], jax.Array] | None = relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = self.conventions
        k, in_features = self.kernel_size, x.shape[-1]
        if self.depthwise and self.features != in_features:
            raise ValueError(f"depthwise conv needs features == input channels, got {self.features} vs {in_features}")
        kernel_shape = (k, k, 1 if self.depthwise else in_features, self.features)
        init = nn.initializers.truncated_normal(conv.init_stddev)
        kernel = self.param("kernel", init, kernel_shape, conv.param_dtype).astype(conv.dtype)
        x = x.astype(conv.dtype)
        padding = tuple(conv_padding(size, k, self.stride, self.dilation, conv.padding) for size in x.shape[1:3])
        strides, dilation = (self.stride, self.stride), (self.dilation, self.dilation)
        if self.depthwise:
            y = resolve_depthwise(conv.depthwise, train=train)(x, kernel, strides, padding, dilation)
        elif k == 1 and self.stride == 1:
            y = resolve_pointwise(conv.pointwise)(x, kernel)
        else:
            y = resolve_regular_conv(conv.regular_conv)(x, kernel, strides, padding, dilation)
        y = BatchNorm(conv.bn_momentum, conv.bn_epsilon, conv.bn_group_size, conv.dtype, name="BatchNorm")(y, train)
        return self.activation(y) if self.activation is not None else y
