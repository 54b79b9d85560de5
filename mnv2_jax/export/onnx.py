"""ONNX export (jax2onnx) with a dynamic batch dimension."""

from __future__ import annotations

from collections.abc import Callable

import jax

from mnv2_jax.export import INPUT_NAME, OUTPUT_NAME


def save_onnx(logits_fn: Callable[[jax.Array], jax.Array], resolution: int, path: str) -> None:
    """One self-contained `.onnx` file mapping `images` (B, H, W, 3) float32 to `logits` (B, classes)."""
    import onnx
    from jax2onnx import to_onnx

    proto = to_onnx(
        logits_fn,
        [("B", resolution, resolution, 3)],
        model_name="mobilenet_v2",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        return_mode="proto",
    )
    onnx.save_model(proto, path, save_as_external_data=False)
