"""Import a MobileNetV2 TFLite classifier or Mobile DeepLabv3 segmenter (float or quantized) into Flax variables.

TFLite models carry batch norm folded into each convolution's weights and bias; TF's converter may also fold the
global average pool's 1/(H*W) into the dense logits weights, or drop an all-zero bias. We dequantize every weight
(`(q - zero_point) * scale`, per tensor or per channel), transpose the kernels to Flax's HWIO layout and load each
conv with an identity batch norm (scale 1, bias = folded bias, mean 0, var = 1 - that layer's eps). Convolutions are
matched to our layers by their TF weight names, or in execution order where the names are not TF's, and each
pairing is checked by kind and shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnv2_jax.convert import ConversionError
from mnv2_jax.convert.layout import zeros_like
from mnv2_jax.models.complexity import LayerRow, layer_rows, subtree
from mnv2_jax.models.layers import ConvBN

TFLITE_MAGIC = b"TFL3"
_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclasses.dataclass
class TFLiteConv:
    op: str
    name: str
    kernel: np.ndarray  # TFLite layout: OHWI (conv), 1HWC (depthwise) or (out, in) (fully connected)
    bias: np.ndarray


def check_is_tflite(path: str) -> None:
    with open(path, "rb") as f:
        header = f.read(8)
    if header[4:8] != TFLITE_MAGIC:
        raise ConversionError(f"{path} is not a TFLite model (no 'TFL3' flatbuffer identifier)")


def _dequantize(interpreter, details: dict[int, dict], index: int, producers: dict[int, dict]) -> np.ndarray:
    if index in producers and producers[index]["op_name"] == "DEQUANTIZE":  # e.g. float16 weights
        return _dequantize(interpreter, details, producers[index]["inputs"][0], producers)
    data = interpreter.get_tensor(index)
    quant = details[index].get("quantization_parameters") or {}
    scales = np.asarray(quant.get("scales", []), np.float64)
    if data.dtype in (np.float32, np.float16, np.float64) or scales.size == 0:
        return data.astype(np.float32)
    zero_points = np.asarray(quant.get("zero_points", np.zeros_like(scales)), np.float64)
    shape = [1] * data.ndim
    if scales.size > 1:
        shape[quant.get("quantized_dimension", 0)] = scales.size
    return ((data.astype(np.float64) - zero_points.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def read_convolutions(path: str) -> list[TFLiteConv]:
    """The float weights and biases of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op, in graph order."""
    check_is_tflite(path)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    producers = {out: op for op in ops for out in op["outputs"]}
    convs = []
    for op in ops:
        if op["op_name"] not in _CONV_OPS:
            continue
        weights, bias = op["inputs"][1], op["inputs"][2]
        kernel = _dequantize(interpreter, details, weights, producers)
        # the converter drops a bias that is all zeros
        bias = np.zeros(kernel.shape[0], np.float32) if bias < 0 else _dequantize(interpreter, details, bias, producers)
        if op["op_name"] == "FULLY_CONNECTED":
            kernel = kernel * _summed_positions(interpreter, details, op["inputs"][0], producers)
        convs.append(
            TFLiteConv(
                op["op_name"],
                details[weights]["name"],
                kernel,
                bias,
            )
        )
    return convs


def _summed_positions(interpreter, details: dict[int, dict], index: int, producers: dict[int, dict]) -> int:
    """How many positions a SUM feeding a dense layer adds up (1 if none): TF's converter turns the global average
    pool into a SUM and folds its 1/(H*W) into the dense weights, which our model's mean pool applies itself."""
    while index in producers and producers[index]["op_name"] == "RESHAPE":
        index = producers[index]["inputs"][0]
    if index not in producers or producers[index]["op_name"] != "SUM":
        return 1
    summed, axes = producers[index]["inputs"][:2]
    shape = details[summed]["shape"]
    return int(np.prod([shape[axis] for axis in np.atleast_1d(interpreter.get_tensor(axes))]))


def _to_flax_kernel(conv: TFLiteConv, kind: str) -> np.ndarray:
    if conv.op == "FULLY_CONNECTED":
        return conv.kernel.T
    if kind == "dense":  # 1x1 conv logits (OHWI with H = W = 1) -> (in, out)
        return conv.kernel.reshape(conv.kernel.shape[0], -1).T
    if kind == "depthwise":  # 1HWC -> HW1C
        return conv.kernel.transpose(1, 2, 0, 3)
    return conv.kernel.transpose(1, 2, 3, 0)  # OHWI -> HWIO


def _layer_name(tflite_name: str) -> str:
    """Our layer path in a TF-named TFLite weight: `MobilenetV2/expanded_conv_3/expand/Conv2D_Fold;...` ->
    `expanded_conv_3/expand/Conv2D_Fold`."""
    name = tflite_name.split(";")[0]
    return name.removeprefix("MobilenetV2/")


def _pair(convs: list[TFLiteConv], rows: list[LayerRow]) -> list[tuple[LayerRow, TFLiteConv]]:
    """Each of our layers with its TFLite op: by the weights' TF names where they name every layer once (TF's
    converter may order ops differently from our execution order, e.g. DeepLab's `aspp0` before `image_pooling`,
    both 320 -> 256), else in execution order (the names of our own exports are not TF's)."""
    by_name = {}
    for conv in convs:
        matches = [row for row in rows if _layer_name(conv.name).startswith(row.name + "/")]
        if len(matches) != 1 or matches[0].name in by_name:
            return list(zip(rows, convs, strict=True))
        by_name[matches[0].name] = conv
    return [(row, by_name[row.name]) for row in rows]


def _bn_epsilons(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """The batch-norm epsilon of each conv layer (a segmentation head's differs from its backbone's)."""
    epsilons = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, ConvBN):
            epsilons["/".join(context.module.path)] = context.module.conventions.bn_epsilon
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), images)
    return epsilons


def variables_from_tflite(path: str, model: nn.Module, resolution: int) -> dict[str, Any]:
    """Flax `{'params', 'batch_stats'}` for `model` holding the TFLite model's weights."""
    convs = read_convolutions(path)
    input_shape = (1, resolution, resolution, 3)
    rows, abstract = layer_rows(model, input_shape)
    if len(convs) != len(rows):
        raise ConversionError(
            f"{path} has {len(convs)} convolution/dense ops but the configured model has {len(rows)} layers; "
            "check model.width, model.expansion and model.num_classes"
        )
    epsilons = _bn_epsilons(model, input_shape)
    params = zeros_like(abstract["params"])
    batch_stats = zeros_like(abstract["batch_stats"])
    expected_op = {"conv": ("CONV_2D",), "depthwise": ("DEPTHWISE_CONV_2D",), "dense": ("CONV_2D", "FULLY_CONNECTED")}
    for row, conv in _pair(convs, rows):
        if conv.op not in expected_op[row.kind]:
            raise ConversionError(f"layer {row.name} ({row.kind}) meets TFLite op {conv.op} ({conv.name})")
        path_keys = row.name.split("/")
        layer = subtree(params, path_keys)
        kernel = _to_flax_kernel(conv, row.kind)
        if kernel.shape != layer["kernel"].shape:
            raise ConversionError(
                f"layer {row.name}: TFLite weights {conv.name} have shape {kernel.shape} "
                f"(as Flax layout), the model expects {layer['kernel'].shape}"
            )
        layer["kernel"] = kernel
        if "BatchNorm" not in layer:  # dense logits, or a segmentation head's 1x1 logits conv with its bias
            layer["bias"] = conv.bias
            continue
        bn, stats = layer["BatchNorm"], subtree(batch_stats, path_keys)["BatchNorm"]
        bn["scale"] = np.ones_like(conv.bias)
        bn["bias"] = conv.bias
        stats["mean"] = np.zeros_like(conv.bias)
        stats["var"] = np.full_like(conv.bias, 1.0 - epsilons[row.name])
    return {"params": params, "batch_stats": batch_stats}
