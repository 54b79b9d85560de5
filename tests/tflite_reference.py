"""An independent float evaluation of a TFLite MobileNet graph, for parity tests.

Walks the interpreter's op list and computes each op in float64 numpy from the
dequantized weights: CONV_2D / DEPTHWISE_CONV_2D with TF 'SAME' padding (stride
from the tensor shapes, ReLU6 where the output tensor is named `Relu6`), ADD,
AVERAGE_POOL_2D, RESHAPE. It shares no code with `mnv2_jax` and returns the
input of the final SOFTMAX: the float logits.
"""

from __future__ import annotations

import numpy as np


def interpreter(path: str):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def _constant(it, details, index):
    data = it.get_tensor(index).astype(np.float64)
    quant = details[index]["quantization_parameters"]
    if len(quant["scales"]) == 0:
        return data
    shape = [1] * data.ndim
    if len(quant["scales"]) > 1:
        shape[quant["quantized_dimension"]] = -1
    return (data - np.reshape(quant["zero_points"], shape)) * np.reshape(quant["scales"], shape)


def _same_pad(x, kernel, stride):
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), *pads, (0, 0)))


def _conv(x, weights, bias, stride, depthwise):
    kh, kw = weights.shape[1:3]
    xp = _same_pad(x, kh, stride)
    n, h, w = x.shape[0], -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    out = np.zeros((n, h, w, weights.shape[3] if depthwise else weights.shape[0]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + (h - 1) * stride + 1 : stride, j : j + (w - 1) * stride + 1 : stride, :]
            if depthwise:  # weights 1HWC
                out += patch * weights[0, i, j]
            else:  # weights OHWI
                out += np.einsum("nhwc,oc->nhwo", patch, weights[:, i, j, :], optimize=True)
    return out + bias


def float_logits(path: str, inputs: np.ndarray) -> np.ndarray:
    """Float logits of the TFLite classifier at `path` for a batch of already normalised NHWC inputs."""
    it = interpreter(path)
    details = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()
    values = {ops[0]["inputs"][0]: np.asarray(inputs, np.float64)}
    for op in ops:
        name, ins, out = op["op_name"], op["inputs"], op["outputs"][0]
        if name == "SOFTMAX":
            return values[ins[0]]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            x = values[ins[0]]
            stride = x.shape[1] // details[out]["shape"][1]
            y = _conv(x, _constant(it, details, ins[1]), _constant(it, details, ins[2]), stride, name != "CONV_2D")
            if "Relu6" in details[out]["name"]:
                y = np.clip(y, 0, 6)
        elif name == "ADD":
            y = values[ins[0]] + values[ins[1]]
        elif name == "AVERAGE_POOL_2D":
            y = values[ins[0]].mean(axis=(1, 2), keepdims=True)
        elif name == "RESHAPE":
            y = values[ins[0]].reshape(len(inputs), -1)
        else:
            raise NotImplementedError(f"reference evaluator has no {name}")
        values[out] = y
    raise ValueError("graph has no SOFTMAX")


def quantized_probabilities(path: str, images_uint8: np.ndarray) -> np.ndarray:
    """The real TFLite interpreter's output probabilities (dequantized) for uint8 RGB images, one at a time."""
    it = interpreter(path)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    results = []
    for image in images_uint8:
        it.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        it.invoke()
        scale, zero_point = out["quantization"]
        results.append((it.get_tensor(out["index"])[0].astype(np.float64) - zero_point) * scale)
    return np.stack(results)
