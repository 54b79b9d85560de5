"""Channel rounding, padding conventions, the depthwise and 1x1 implementations, ReLU6 and batch norm."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_jax.kernels import cpu as cpu_kernels
from mnv2_jax.models import convolutions
from mnv2_jax.models.batch_norm import BatchNorm, batch_normalize
from mnv2_jax.models.convolutions import (
    convolution,
    depthwise_cpu_kernel,
    depthwise_grouped,
    depthwise_shifted,
    pointwise_conv,
    pointwise_dot,
    regular_conv_patches,
)
from mnv2_jax.models.layers import (
    conv_padding,
    make_divisible,
    relu6,
    resolve_depthwise,
    resolve_pointwise,
    resolve_regular_conv,
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
    "implementation, size, stride, dilation, mode",
    list(
        itertools.product((depthwise_shifted, depthwise_cpu_kernel), (7, 8), (1, 2), (1, 2, 4), ("same", "symmetric"))
    ),
)
def test_depthwise_equals_grouped_convolution(implementation, size, stride, dilation, mode):
    """The shifted form and the C++ kernel (37 channels: full 32-wide blocks and a remainder) equal XLA's op."""
    kx, kk = jax.random.split(jax.random.key(size * 100 + stride * 10 + dilation))
    x = jax.random.normal(kx, (2, size, size + 1, 37))
    kernel = jax.random.normal(kk, (3, 3, 1, 37))
    padding = tuple(conv_padding(s, 3, stride, dilation, mode) for s in x.shape[1:3])
    args = (x, kernel, (stride, stride), padding, (dilation, dilation))
    expected = depthwise_grouped(*args)
    actual = jax.jit(implementation, static_argnums=(2, 3, 4))(*args)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", [depthwise_shifted, depthwise_cpu_kernel])
@pytest.mark.parametrize(
    "stride, dilation, mode, chunk_bytes, size",
    [
        (2, 1, "same", None, 9),
        (2, 1, "same", None, 8),
        (1, 1, "symmetric", None, 9),
        (1, 2, "same", 1, 9),
        (1, 4, "symmetric", None, 7),
        (2, 2, "same", None, 10),
        (2, 1, "symmetric", 3000, 9),
        (2, 1, "symmetric", None, 4),
    ],
)
def test_depthwise_gradients_agree(monkeypatch, implementation, stride, dilation, mode, chunk_bytes, size):
    """The shifted form's own VJP (transposed input gradient, kernel gradient looped over batch chunks) and the
    C++ kernels' gradients equal autodiff of the grouped conv, for odd and even sizes (TF's 'same' drops or pads
    the last row)."""
    if chunk_bytes is not None:  # the shifted form's kernel gradient in several chunks: 1 image per step, or a few
        monkeypatch.setattr(convolutions, "_KERNEL_GRAD_CHUNK_BYTES", chunk_bytes)
    x = jax.random.normal(jax.random.key(0), (6, size, size - 1, 41))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 41))
    padding = tuple(conv_padding(s, 3, stride, dilation, mode) for s in x.shape[1:3])

    def loss(fn, x, k):
        return jnp.sum(jnp.sin(fn(x, k, (stride, stride), padding, (dilation, dilation))))

    grads_grouped = jax.grad(lambda x, k: loss(depthwise_grouped, x, k), argnums=(0, 1))(x, kernel)
    grads = jax.jit(jax.grad(lambda x, k: loss(implementation, x, k), argnums=(0, 1)))(x, kernel)
    for a, b in zip(grads_grouped, grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "resolve, on_cpu, other_backend, elsewhere, bad_name, message",
    [
        (resolve_depthwise, depthwise_shifted, "gpu", depthwise_grouped, "fft", r"model\.depthwise must be one of"),
        (
            resolve_pointwise,
            pointwise_dot,
            "tpu",
            pointwise_conv,
            "winograd",
            r"model\.pointwise must be one of \('auto', 'conv', 'dot'\)",
        ),
        (
            resolve_regular_conv,
            regular_conv_patches,
            "gpu",
            convolution,
            "fft",
            r"model\.regular_conv must be one of \('auto', 'conv', 'patches'\)",
        ),
    ],
)
def test_resolve_auto_per_backend_and_errors(resolve, on_cpu, other_backend, elsewhere, bad_name, message):
    assert resolve("auto", "cpu") is on_cpu
    assert resolve("auto", other_backend) is elsewhere
    with pytest.raises(ValueError, match=message):
        resolve(bad_name)


def test_depthwise_auto_on_cpu_takes_the_kernels_for_training_with_one_device(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert resolve_depthwise("auto", "cpu") is depthwise_cpu_kernel
    assert resolve_depthwise("auto", "cpu", train=False) is depthwise_shifted
    assert resolve_depthwise("auto", "gpu") is depthwise_grouped
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # a custom call would gather a sharded batch
    assert resolve_depthwise("auto", "cpu") is depthwise_shifted


def test_kernel_build_is_cached_and_its_failures_are_reported(monkeypatch, tmp_path):
    library = cpu_kernels.build(tmp_path, "g++")
    built_at = library.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path, "g++") == library and library.stat().st_mtime_ns == built_at
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C\\+\\+ compiler 'no-such-g\\+\\+'"):
        cpu_kernels.build(tmp_path / "other", "no-such-g++")
    with pytest.raises(cpu_kernels.KernelBuildError, match=r"false .* failed"):
        cpu_kernels.build(tmp_path / "other", "false")
    assert not list((tmp_path / "other").glob("**/*.so"))  # no partial library left behind

    monkeypatch.setattr(cpu_kernels, "_load", lambda: "compiler said no")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    with pytest.warns(UserWarning, match="compiler said no"):
        assert resolve_depthwise("auto", "cpu") is depthwise_shifted
    with pytest.raises(cpu_kernels.KernelBuildError, match="compiler said no"):
        cpu_kernels.load()


def test_cpu_kernel_takes_the_shifted_form_for_other_dtypes():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 8), jnp.bfloat16)
    args = (x, kernel, (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert "ffi_call" not in str(jax.make_jaxpr(depthwise_cpu_kernel, static_argnums=(2, 3, 4))(*args))
    np.testing.assert_array_equal(depthwise_cpu_kernel(*args), depthwise_shifted(*args))


def test_cpu_kernel_under_vmap_and_a_sharded_batch():
    """Correct, not fast, under a mesh: XLA gathers a custom call's operands (why `auto` needs one device)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 9, 9, 24)), sharding)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 24))
    args = ((2, 2), ((0, 1), (0, 1)), (1, 1))
    assert_trees_close(
        value_and_grads(depthwise_shifted, x, kernel, *args),
        value_and_grads(depthwise_cpu_kernel, x, kernel, *args),
        atol=1e-5,
        rtol=1e-5,
    )
    per_group = jax.vmap(lambda xs: depthwise_cpu_kernel(xs, kernel, *args))(x.reshape(2, 8, 9, 9, 24))
    np.testing.assert_allclose(per_group.reshape(16, 4, 4, 24), depthwise_shifted(x, kernel, *args), atol=1e-5)


def value_and_grads(fn, x, kernel, *args):
    """The value and both gradients of a scalar loss of `fn(x, kernel, *args)`, compiled."""
    loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k, *args)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)


def assert_trees_close(expected, actual, atol, rtol):
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


def test_pointwise_dot_equals_convolution_with_gradients():
    x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6))
    kernel = jax.random.normal(jax.random.key(1), (1, 1, 6, 7))
    assert pointwise_dot(x, kernel).shape == (3, 5, 4, 7)
    expected, actual = value_and_grads(pointwise_conv, x, kernel), value_and_grads(pointwise_dot, x, kernel)
    assert_trees_close(expected, actual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "size, kernel_size, stride, dilation, mode",
    [
        (9, 3, 2, 1, "same"),  # the stem: odd input, TF's padding
        (8, 3, 2, 1, "same"),  # even input: (0, 1) padding
        (8, 3, 2, 1, "symmetric"),
        (7, 3, 1, 2, "same"),
        (6, 5, 1, 1, "symmetric"),
        (7, 1, 2, 1, "same"),
    ],
)
def test_regular_conv_patches_equals_convolution_with_gradients(size, kernel_size, stride, dilation, mode):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 3, 5))
    padding = tuple(conv_padding(s, kernel_size, stride, dilation, mode) for s in x.shape[1:3])
    args = ((stride, stride), padding, (dilation, dilation))
    assert regular_conv_patches(x, kernel, *args).shape == convolution(x, kernel, *args).shape
    expected = value_and_grads(convolution, x, kernel, *args)
    actual = value_and_grads(regular_conv_patches, x, kernel, *args)
    assert_trees_close(expected, actual, atol=1e-4, rtol=1e-5)


def test_relu6_value_and_gradient_match_tensorflow_and_torch():
    """Including exactly 0 and 6, where `jnp.clip`'s own gradient would give 0.5."""
    import tensorflow as tf
    import torch

    x = np.array([-1.0, 0.0, 1e-7, 3.0, 6.0 - 1e-6, 6.0, 7.5], np.float32)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(relu6(x) * jnp.arange(1.0, 8.0)))(jnp.asarray(x))
    grad_of_sum = jax.grad(lambda x: jnp.sum(relu6(x)))(jnp.asarray(x))

    tf_x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(tf_x)
        tf_y = tf.nn.relu6(tf_x)
    np.testing.assert_array_equal(grad_of_sum, tape.gradient(tf_y, tf_x).numpy())
    torch_x = torch.tensor(x, requires_grad=True)
    torch.nn.functional.relu6(torch_x).sum().backward()
    np.testing.assert_array_equal(grad_of_sum, torch_x.grad.numpy())
    assert float(value) == pytest.approx(float(np.sum(np.clip(x, 0, 6) * np.arange(1.0, 8.0))))
    np.testing.assert_array_equal(grad, np.where((x > 0) & (x < 6), np.arange(1.0, 8.0), 0.0))


@pytest.mark.parametrize("groups", [1, 2])
def test_batch_norm_gradient_equals_autodiff_of_the_two_pass_moments(groups):
    """`batch_normalize`'s own VJP against JAX differentiating tf.nn.moments' formula, in float64, with the
    moments feeding the loss too (as they would if a loss used them)."""
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(0), (groups, 3, 4, 5, 6), jnp.float64) * 3 + 1
        scale = jax.random.normal(jax.random.key(1), (6,), jnp.float64)
        bias = jax.random.normal(jax.random.key(2), (6,), jnp.float64)

        def reference(x, scale, bias):
            mean = jnp.mean(x, (1, 2, 3), keepdims=True)
            var = jnp.mean(jnp.square(x - mean), (1, 2, 3), keepdims=True)
            return (x - mean) * scale * jax.lax.rsqrt(var + 1e-3) + bias, mean, var

        def loss(fn):
            def value(x, scale, bias):
                y, mean, var = fn(x, scale, bias)
                return jnp.sum(jnp.sin(y)) + jnp.sum(mean**2) + jnp.sum(jnp.cos(var))

            return jax.grad(value, argnums=(0, 1, 2))

        expected = loss(reference)(x, scale, bias)
        actual = jax.jit(loss(lambda x, s, b: batch_normalize(x, s, b, 1e-3)))(x, scale, bias)
        for a, b in zip(expected, actual, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
        for a, b in zip(reference(x, scale, bias), batch_normalize(x, scale, bias, 1e-3), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


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
