"""Depthwise convolution on this backend: the shifted form (with its own VJP) against XLA's grouped convolution.

    python benchmarks/depthwise.py [--shape 32,64,64,96] [--stride 1]

Prints milliseconds for the forward pass, the input gradient and the kernel gradient of each implementation, and
of one elementwise pass over the input for scale; `shifted-autodiff` is the shifted forward differentiated
by JAX (`docs/benchmarks.md`).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_jax.models import convolutions
from mnv2_jax.models.convolutions import DEPTHWISE_IMPLEMENTATIONS
from mnv2_jax.models.layers import conv_padding


def milliseconds(fn, *args, repeats: int = 10) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="32,64,64,96", help="N,H,W,C of the input")
    parser.add_argument("--stride", type=int, default=1)
    args = parser.parse_args()
    n, h, w, c = (int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, c), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 1, c), np.float32))
    strides = (args.stride, args.stride)
    padding = tuple(conv_padding(size, 3, args.stride, 1, "same") for size in (h, w))
    print(f"{jax.default_backend()}, input {args.shape}, stride {args.stride}")
    print(f"  one elementwise pass: {milliseconds(lambda x: x * 2, x):.1f} ms")
    # "shifted-autodiff": the same forward differentiated by JAX, as before `depthwise_shifted` had its own VJP.
    implementations = {**DEPTHWISE_IMPLEMENTATIONS, "shifted-autodiff": convolutions._shifted_forward}
    for name, depthwise in implementations.items():
        forward = lambda x, k, dw=depthwise: dw(x, k, strides, padding, (1, 1))
        grad_out = jnp.ones_like(forward(x, kernel))
        grad_x = lambda x, k, g, f=forward: jax.vjp(lambda x: f(x, k), x)[1](g)[0]
        grad_k = lambda x, k, g, f=forward: jax.vjp(lambda k: f(x, k), k)[1](g)[0]
        print(
            f"  {name:<16} forward {milliseconds(forward, x, kernel):.1f} ms, "
            f"input gradient {milliseconds(grad_x, x, kernel, grad_out):.1f} ms, "
            f"kernel gradient {milliseconds(grad_k, x, kernel, grad_out):.1f} ms"
        )


if __name__ == "__main__":
    main()
