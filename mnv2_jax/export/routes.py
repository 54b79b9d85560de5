"""`export(config, variables, format, out)`: one entry point for every export route, with a metadata file beside it."""

from __future__ import annotations

import dataclasses
import datetime
import glob
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mnv2_jax import config as config_lib
from mnv2_jax import tasks
from mnv2_jax.convert import ConversionError, keras_applications, pytorch
from mnv2_jax.convert.layout import export_tensors, model_layers
from mnv2_jax.data import preprocessing
from mnv2_jax.export import INPUT_NAME, OUTPUT_NAME
from mnv2_jax.export.files import atomic_output, write_json

# Each task lists those it supports (`Task.export_formats`); hf-hub: `export.hf_hub`.
FORMATS = ("tflite", "tflite-int8", "onnx", "savedmodel", "torch", "safetensors", "keras", "hf-hub")
DEFAULT_CALIBRATION_IMAGES = 100
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    overwrite: bool = False
    torch_layout: str | None = None  # "torchvision" or "timm"; default by the padding convention
    calibration: str | None = None  # image folder/glob for int8; default: the config's eval split
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    class_names: Sequence[str] | None = None


def metadata_path(out: str) -> str:
    """The metadata file written beside an export."""
    return os.path.abspath(out).rstrip(os.sep) + ".metadata.json"


def as_float32(variables: Any) -> dict[str, Any]:
    return jax.tree.map(lambda a: np.asarray(a, np.float32), {k: variables[k] for k in ("params", "batch_stats")})


def torch_layout(config: ml_collections.ConfigDict, options: ExportOptions) -> str:
    return options.torch_layout or ("torchvision" if config.model.padding == "symmetric" else "timm")


def check_before_export(config: ml_collections.ConfigDict, fmt: str, out: str, options: ExportOptions) -> None:
    """Every check that needs no weights: format, classifier, target architecture and conventions, output path."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if not config.model.num_classes:
        raise ConversionError("export needs a classifier; the config has model.num_classes=0 (a backbone)")
    task = tasks.get(config)
    if fmt not in task.export_formats:
        raise ConversionError(
            f"--format {fmt} holds classifiers only; task={task.name!r} exports as {task.export_formats}"
        )
    if fmt in ("torch", "safetensors"):
        layout = torch_layout(config, options)
        check_standard_architecture(config.model, f"{layout}'s MobileNetV2")
        pytorch.check_conventions(config.model, layout)
    if fmt == "keras":
        check_standard_architecture(config.model, "keras.applications.MobileNetV2")
        keras_applications.check_conventions(config.model)
        keras_applications.check_suffix(out)
    if os.path.lexists(out) and not options.overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it")


def standard_architecture_departures(model_config: ml_collections.ConfigDict) -> list[str]:
    """Every field by which `model_config` departs from the paper's MobileNetV2, as `model.<field>=... (needs ...)`."""
    expected = {
        "expansion": 6,
        "stage_expansion": None,
        "stage_repeats": None,
        "output_stride": 32,
        "residual": "bottleneck",
        "nonlinear_bottleneck": False,
        "divisible_by": 8,
        "min_depth": 8,
    }
    return [f"model.{k}={model_config[k]!r} (needs {v!r})" for k, v in expected.items() if model_config[k] != v]


def check_standard_architecture(model_config: ml_collections.ConfigDict, target: str) -> None:
    """Other frameworks' MobileNetV2 has only the paper's architecture; name every field that departs from it."""
    departures = standard_architecture_departures(model_config)
    if departures:
        raise ConversionError(f"{target} has only the standard MobileNetV2: " + ", ".join(departures))


def calibration_images(config: ml_collections.ConfigDict, source: str | None, count: int) -> list[np.ndarray]:
    """Model-input images (normalized, HWC) for int8 calibration: from an image folder/glob or the eval split."""
    if source:
        pattern = os.path.join(source, "**", "*") if os.path.isdir(source) else source
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if p.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise ConversionError(f"--calibration={source!r} matches no image files ({', '.join(IMAGE_SUFFIXES)})")
        pixels = [preprocessing.load_image(p, config.resolution) for p in paths[:count]]
        return [preprocessing.normalize(p, config.model.preprocessing).astype(np.float32) for p in pixels]
    from mnv2_jax.data import pipeline

    builder = pipeline.builder_for(config)
    pipeline.check_split(builder, config.eval_split, "config.eval_split")
    batches, _ = pipeline.eval_batches(builder, config, local_batch_size=1)
    return [batch["image"][0] for batch in batches.take(count).as_numpy_iterator()]


def _preprocessing_metadata(mode: str) -> dict[str, Any]:
    if mode == "inception":
        return {"mode": mode, "formula": "pixels / 127.5 - 1", "range": [-1.0, 1.0]}
    return {
        "mode": mode,
        "formula": "(pixels / 255 - mean) / std",
        "mean": list(preprocessing.IMAGENET_MEAN),
        "std": list(preprocessing.IMAGENET_STD),
    }


def _class_names(config: ml_collections.ConfigDict, names: Sequence[str] | None) -> list[str] | None:
    """`names` (--class_names), else the config's or the dataset's when they name every class; else None."""
    if names is not None:
        return list(names)
    task = tasks.get(config)
    known = task.named_classes()
    if known is None:
        try:
            from mnv2_jax.data import pipeline

            known = task.named_classes(pipeline.dataset_info(pipeline.builder_for(config, prepare=False)).class_names)
        except Exception:  # class names are a convenience: the dataset may not be on this machine
            return None
    return list(known) if known else None


def export(
    config: ml_collections.ConfigDict,
    variables: dict[str, Any],
    fmt: str,
    out: str,
    options: ExportOptions = ExportOptions(),
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes `variables` of `config`'s model as `fmt` to `out` (atomically) and its metadata beside it."""
    check_before_export(config, fmt, out, options)
    variables = as_float32(variables)
    task = tasks.get(config)
    resolution, meaning = config.resolution, task.export_meaning
    metadata: dict[str, Any] = {
        "format": fmt,
        "path": os.path.basename(os.path.abspath(out)),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source or {},
        "input": {"name": INPUT_NAME, "shape": [None, resolution, resolution, 3], "layout": "NHWC", "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": task.export_output_shape(None),
            "meaning": meaning,
        },
        "preprocessing": _preprocessing_metadata(config.model.preprocessing),
        "num_classes": config.model.num_classes,
        "class_names": _class_names(config, options.class_names),
        "config": config_lib.to_dict(config),
    }
    metadata.update(_write(config, variables, fmt, out, options, metadata))
    write_json(metadata_path(out), metadata, overwrite=True)
    return metadata


def _write(config, variables, fmt: str, out: str, options: ExportOptions, metadata: dict[str, Any]) -> dict[str, Any]:
    resolution, task = config.resolution, tasks.get(config)
    if fmt == "hf-hub":
        from mnv2_jax.export import hf_hub

        return hf_hub.write(config, variables, out, options, metadata)
    model = task.export_model()
    apply_fn = task.export_function(model)

    if fmt in ("torch", "safetensors"):
        return _write_torch(config, variables, fmt, out, options, model)
    if fmt == "keras":
        return _write_keras(config, variables, out, options, model)
    if fmt == "onnx":
        from mnv2_jax.export.onnx import save_onnx

        with atomic_output(out, options.overwrite) as tmp:
            save_onnx(lambda images: apply_fn(variables, images), resolution, tmp)
        return {"runtime": "onnxruntime: InferenceSession(path).run(['logits'], {'images': x})"}
    from mnv2_jax.export import tensorflow as tf_export

    if fmt == "savedmodel":
        with atomic_output(out, options.overwrite) as tmp:
            tf_export.save_savedmodel(apply_fn, variables, resolution, tmp)
        return {
            "signature": "serving_default",
            "platforms": list(tf_export.SERVING_PLATFORMS),
            "runtime": "tf.saved_model.load(path).signatures['serving_default'](images=x)['logits']",
        }
    representative = None
    if fmt == "tflite-int8":
        representative = calibration_images(config, options.calibration, options.calibration_images)
    with atomic_output(out, options.overwrite) as tmp:
        quantization = tf_export.save_tflite(apply_fn, variables, resolution, tmp, representative)
    dtype = "float32" if representative is None else "int8"
    metadata: dict[str, Any] = {
        "runtime": "ai_edge_litert.interpreter.Interpreter(model_path=path)",
        "input": {"name": INPUT_NAME, "shape": [1, resolution, resolution, 3], "layout": "NHWC", "dtype": dtype},
        "output": {
            "name": OUTPUT_NAME,
            "shape": task.export_output_shape(1),
            "dtype": dtype,
            "meaning": tasks.get(config).export_meaning,
        },
    }
    if representative is not None:
        metadata["quantization"] = quantization
        metadata["calibration"] = {
            "source": options.calibration or f"{config.dataset}:{config.eval_split}",
            "images": len(representative),
        }
    return metadata


def _write_torch(config, variables, fmt, out, options, model) -> dict[str, Any]:
    layout = torch_layout(config, options)
    layers, _ = model_layers(model, config.resolution)
    tensors = pytorch.export_state_dict(variables, layers, layout)
    with atomic_output(out, options.overwrite) as tmp:
        pytorch.save(tmp, tensors)
    width, classes = config.model.width, config.model.num_classes
    if layout == "torchvision":
        load = f"torchvision.models.mobilenet_v2(weights=None, width_mult={width}, num_classes={classes})"
    else:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in pytorch.timm_create_kwargs(config.model).items())
        variant = pytorch.TIMM_VARIANTS.get(width, f"<no timm variant for width {width}>")
        load = f"timm.create_model({variant!r}, {kwargs})"
    return {
        "layout": layout,
        "target": load,
        "input": {"name": "x", "shape": [None, 3, config.resolution, config.resolution], "layout": "NCHW"},
        "runtime": f"model = {load}; model.load_state_dict(state_dict, strict=True); model.eval()",
    }


def _write_keras(config, variables, out, options, model) -> dict[str, Any]:
    layers, _ = model_layers(model, config.resolution)
    keras_model = keras_applications.build(config.model.width, config.resolution, config.model.num_classes)
    keras_applications.set_weights(keras_model, export_tensors(variables, keras_applications.table(layers)))
    suffix = next(s for s in keras_applications.SUFFIXES if out.endswith(s))
    with atomic_output(out, options.overwrite) as tmp:
        keras_applications.save(keras_model, tmp)  # tmp keeps the suffix Keras checks
    load = (
        f"keras.applications.MobileNetV2(input_shape=({config.resolution}, {config.resolution}, 3), "
        f"alpha={config.model.width}, weights=None, classes={config.model.num_classes}, classifier_activation=None)"
    )
    return {"target": load, "runtime": f"model = {load}; model.load_weights(path)", "file_kind": suffix}
