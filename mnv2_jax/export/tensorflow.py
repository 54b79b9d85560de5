"""TF SavedModel (jax2tf) and TFLite (float32 and full-integer int8) exports of a logits function."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from mnv2_jax.export import INPUT_NAME, OUTPUT_NAME

ApplyFn = Callable[[Any, Any], Any]  # (variables, images NHWC float32) -> logits
SERVING_PLATFORMS = ("cpu", "cuda")


def save_savedmodel(
    apply_fn: ApplyFn,
    variables: Any,
    resolution: int,
    path: str,
    batch_size: int | None = None,
    platforms: Sequence[str] = SERVING_PLATFORMS,
) -> None:
    """A SavedModel whose `serving_default` maps `images` (B, H, W, 3) float32 to `logits`.

    `batch_size=None` exports a polymorphic batch dimension. The weights are
    `tf.Variable`s; the computation is one StableHLO `XlaCallModule` lowered for
    each of `platforms`.
    """
    polymorphic = [None, "(b, _, _, _)"] if batch_size is None else None
    tf_apply = jax2tf.convert(
        apply_fn,
        with_gradient=False,
        polymorphic_shapes=polymorphic,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    module.weights = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), variables)
    spec = tf.TensorSpec([batch_size, resolution, resolution, 3], tf.float32, name=INPUT_NAME)

    @tf.function(autograph=False, input_signature=[spec])
    def serve(images):
        return {OUTPUT_NAME: tf_apply(module.weights, images)}

    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serving_default": serve})


def save_tflite(
    apply_fn: ApplyFn,
    variables: Any,
    resolution: int,
    path: str,
    representative_images: Iterable[np.ndarray] | None = None,
) -> dict[str, Any]:
    """A batch-1 TFLite model; full-integer int8 (int8 input and output) when representative images are given.

    Returns the input/output quantization `(scale, zero_point)` for int8 models.
    """
    with tempfile.TemporaryDirectory() as saved_model:
        save_savedmodel(apply_fn, variables, resolution, saved_model, batch_size=1, platforms=("cpu",))
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        if representative_images is not None:
            images = list(representative_images)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in images)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        flatbuffer = converter.convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return tflite_io_quantization(path) if representative_images is not None else {}


def tflite_io_quantization(path: str) -> dict[str, Any]:
    """`{'input': {...}, 'output': {...}}` with each tensor's dtype, scale and zero point."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)

    def describe(detail):
        scale, zero_point = detail["quantization"]
        return {"dtype": np.dtype(detail["dtype"]).name, "scale": float(scale), "zero_point": int(zero_point)}

    return {
        "input": describe(interpreter.get_input_details()[0]),
        "output": describe(interpreter.get_output_details()[0]),
    }


def op_counts(path: str) -> dict[str, int]:
    """How many of each builtin op a TFLite model has."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.fspath(path))
    counts: dict[str, int] = {}
    for op in interpreter._get_ops_details():  # the interpreter's only op-level listing
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return counts
