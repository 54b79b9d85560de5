"""Channel rounding, padding conventions and the depthwise implementations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_jax.models import layers
from mnv2_jax.models.layers import (
    BatchNorm,
    conv_padding,
    depthwise_grouped,
    depthwise_shifted,
    make_divisible,
    resolve_depthwise,
)


@pytest.mark.parametrize(
    "value, divisor, min_value, expected",
    [
        (32 * 0.35, 8, None, 16),  # rounds 11.2 to 8, which is > 10% below, so adds 8
        (16 * 0.35, 8, None, 8),
        (24 * 0.75, 8, None, 24),  # 18 -> 16 is 11% below -> 24
        (96 * 0.75, 8, None, 72),
        (160 * 1.3, 8, None, 208),
        (320 * 1.4, 8, None, 448),
        (1280 * 1.4, 8, None, 1792),
        (32 * 0.01, 8, None, 8),  # never below the minimum
        (24 * 0.5, 1, 1, 12),  # DeepLab's unrounded widths at dm 0.5
        (32 * 0.1, 16, 32, 32),  # slim test: divisible_by=16, min_depth=32
    ],
)
def test_make_divisible_matches_slim(value, divisor, min_value, expected):
    assert make_divisible(value, divisor, min_value) == expected


@pytest.mark.parametrize(
    "size, stride, dilation, mode, expected",
    [
        (224, 2, 1, "same", (0, 1)),  # TF: the extra pixel goes after
        (225, 2, 1, "same", (1, 1)),
        (224, 1, 1, "same", (1, 1)),
        (14, 1, 2, "same", (2, 2)),
        (224, 2, 1, "symmetric", (1, 1)),
        (14, 1, 4, "symmetric", (4, 4)),
    ],
)
def test_conv_padding(size, stride, dilation, mode, expected):
    assert conv_padding(size, 3, stride, dilation, mode) == expected


@pytest.mark.parametrize(
    "size, stride, dilation, mode",
    list(itertools.product((7, 8), (1, 2), (1, 2, 4), ("same", "symmetric"))),
)
def test_shifted_depthwise_equals_grouped_convolution(size, stride, dilation, mode):
    kx, kk = jax.random.split(jax.random.key(size * 100 + stride * 10 + dilation))
    x = jax.random.normal(kx, (2, size, size + 1, 5))
    kernel = jax.random.normal(kk, (3, 3, 1, 5))
    padding = tuple(conv_padding(s, 3, stride, dilation, mode) for s in x.shape[1:3])
    args = (x, kernel, (stride, stride), padding, (dilation, dilation))
    expected = depthwise_grouped(*args)
    actual = depthwise_shifted(*args)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "stride, dilation, mode, chunk_bytes",
    [(2, 1, "same", None), (1, 1, "symmetric", None), (1, 2, "same", 1), (2, 1, "symmetric", 3000)],
)
def test_depthwise_gradients_agree(monkeypatch, stride, dilation, mode, chunk_bytes):
    """The shifted form's own VJP (kernel gradient looped over batch chunks) equals autodiff of the grouped conv."""
    if chunk_bytes is not None:  # force several chunks: 1 image per step, or a few
        monkeypatch.setattr(layers, "_KERNEL_GRAD_CHUNK_BYTES", chunk_bytes)
    x = jax.random.normal(jax.random.key(0), (6, 9, 8, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
    padding = tuple(conv_padding(s, 3, stride, dilation, mode) for s in x.shape[1:3])

    def loss(fn, x, k):
        return jnp.sum(jnp.sin(fn(x, k, (stride, stride), padding, (dilation, dilation))))

    grads_grouped = jax.grad(lambda x, k: loss(depthwise_grouped, x, k), argnums=(0, 1))(x, kernel)
    grads_shifted = jax.jit(jax.grad(lambda x, k: loss(depthwise_shifted, x, k), argnums=(0, 1)))(x, kernel)
    for a, b in zip(grads_grouped, grads_shifted, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_resolve_depthwise_auto_and_errors():
    assert resolve_depthwise("auto", "cpu") is depthwise_shifted
    assert resolve_depthwise("auto", "gpu") is depthwise_grouped
    with pytest.raises(ValueError, match=r"model\.depthwise must be one of"):
        resolve_depthwise("fft")


def test_batch_norm_global_and_grouped_statistics():
    x = jnp.concatenate([jnp.zeros((2, 1, 1, 3)), jnp.full((2, 1, 1, 3), 4.0)])  # two groups of 2
    global_bn = BatchNorm(momentum=0.0, epsilon=0.0)
    variables = global_bn.init(jax.random.key(0), x, train=True)
    y, state = global_bn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(state["batch_stats"]["mean"], [2.0] * 3)
    np.testing.assert_allclose(state["batch_stats"]["var"], [4.0] * 3)
    np.testing.assert_allclose(y[:, 0, 0, 0], [-1, -1, 1, 1], atol=1e-6)

    ghost_bn = BatchNorm(momentum=0.0, epsilon=1e-3, group_size=2)
    y, state = ghost_bn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, 0.0, atol=1e-6)  # each group is constant, so it normalises to 0
    np.testing.assert_allclose(state["batch_stats"]["mean"], [2.0] * 3)  # mean of the group means
    np.testing.assert_allclose(state["batch_stats"]["var"], [0.0] * 3)  # mean of the group variances


def test_batch_norm_inference_uses_running_statistics():
    bn = BatchNorm(momentum=0.9, epsilon=1e-3)
    x = jnp.arange(12.0).reshape(4, 1, 1, 3)
    variables = bn.init(jax.random.key(0), x, train=False)
    variables = {
        "params": {"scale": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.5, 0.0, -1.0])},
        "batch_stats": {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 1.0, 0.25])},
    }
    y = bn.apply(variables, x, train=False)
    expected = (x - np.array([1, 2, 3])) / np.sqrt(np.array([4, 1, 0.25]) + 1e-3) * np.array([1, 2, 3]) + np.array(
        [0.5, 0, -1]
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
