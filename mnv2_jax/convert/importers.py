"""`import_variables(format, path, config)`: another framework's weights file -> our `{'params', 'batch_stats'}`."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from mnv2_jax import tasks
from mnv2_jax.convert import ConversionError, keras_applications, pytorch, tflite
from mnv2_jax.convert.layout import import_tensors, model_layers

FORMATS = ("tflite", "torch", "timm", "keras")


def import_variables(fmt: str, path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Reads `path` (a `fmt` file) into variables of the model `config` describes; names and shapes are checked."""
    if fmt not in FORMATS:
        raise ConversionError(f"--from must be one of {FORMATS}, got {fmt!r}")
    if not os.path.isfile(path):
        raise ConversionError(f"no such file: {path}")
    task = tasks.get(config)
    if fmt not in task.import_formats:
        raise ConversionError(
            f"--from {fmt} reads classifiers, not task={task.name!r}: import it with a classification config "
            f"(task={task.name!r} imports --from {'/'.join(task.import_formats)})"
        )
    model = task.build_model()
    if fmt == "tflite":
        if config.model.padding != "same":
            raise ConversionError("TFLite models use TF 'SAME' padding; set --config.model.padding=same")
        return tflite.variables_from_tflite(path, model, config.resolution)
    layers, abstract = model_layers(model, config.resolution)
    if fmt == "keras":
        keras_applications.check_conventions(config.model)
        tensors = keras_applications.load(path, config.model.width, config.resolution, config.model.num_classes)
        return import_tensors(tensors, keras_applications.table(layers), abstract, path)
    layout = "torchvision" if fmt == "torch" else "timm"
    pytorch.check_conventions(config.model, layout)
    tensors = pytorch.without_counters(pytorch.load(path))
    return import_tensors(tensors, pytorch.table(layers, layout), abstract, path)
