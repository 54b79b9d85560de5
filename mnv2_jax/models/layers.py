"""Building blocks shared by the MobileNetV2 backbone and the task heads.

Channel rounding, padding conventions, which convolution implementation runs (`mnv2_jax.models.convolutions`),
ReLU6, and `ConvBN`. Parameter names follow TF-slim so that weight converters are a rename plus a transpose: a conv
unit holds `kernel` and a `BatchNorm` submodule (`mnv2_jax.models.batch_norm`) with `scale`/`bias` params and
`mean`/`var` batch statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnv2_jax.kernels import cpu as cpu_kernels
from mnv2_jax.models.batch_norm import BatchNorm
from mnv2_jax.models.convolutions import (
    DEPTHWISE_IMPLEMENTATIONS,
    POINTWISE_IMPLEMENTATIONS,
    REGULAR_CONV_IMPLEMENTATIONS,
    ConvFn,
)

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


def resolve_pointwise(name: str, backend: str | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns the 1x1 convolution implementation; `auto` picks the fastest measured one per backend."""
    return _resolve("model.pointwise", name, POINTWISE_IMPLEMENTATIONS, {"cpu": "dot"}, backend)


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
