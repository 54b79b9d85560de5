"""Shared pieces of the export/import tests: random but realistic weights, and each runtime's forward pass."""

from __future__ import annotations

import jax
import numpy as np

from mnv2_jax import tasks
from mnv2_jax.convert.pytorch import import_torchvision


def random_variables(config, seed: int = 0) -> dict:
    """Initialized weights with random BN statistics and scales, so every BN field matters for parity."""
    model = tasks.get(config).export_model()
    r = config.resolution
    variables = jax.tree.map(np.asarray, model.init(jax.random.key(seed), np.zeros((1, r, r, 3), np.float32)))
    rng = np.random.default_rng(seed)

    def randomize(path, a):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
        if name == "mean":
            return rng.normal(0.0, 0.2, a.shape).astype(a.dtype)
        if name == "scale":
            return rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
        if name == "bias" and path[0].key != "Logits":
            return rng.normal(0.0, 0.1, a.shape).astype(a.dtype)
        return a

    return {k: jax.tree_util.tree_map_with_path(randomize, variables[k]) for k in ("params", "batch_stats")}


def random_inputs(config, n: int = 2, seed: int = 1) -> np.ndarray:
    r = config.resolution
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, r, r, 3)).astype(np.float32)


def jax_logits(config, variables, images: np.ndarray) -> np.ndarray:
    return np.asarray(tasks.get(config).export_model().apply(variables, images, train=False)[0])


def tflite_logits(path, images: np.ndarray) -> np.ndarray:
    """The TFLite interpreter one image at a time; int8 inputs/outputs are (de)quantized with the model's own scales."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for image in images:
        x = image[None]
        if inp["dtype"] == np.int8:
            scale, zero_point = inp["quantization"]
            x = np.clip(np.round(x / scale + zero_point), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            scale, zero_point = out["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        results.append(y)
    return np.concatenate(results)


def torch_logits(torch_model, images: np.ndarray) -> np.ndarray:
    import torch

    torch_model.eval()
    with torch.no_grad():
        return torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def torchvision_model(width: float, num_classes: int):
    return import_torchvision().models.mobilenet_v2(weights=None, width_mult=width, num_classes=num_classes)


def timm_model(name: str, **kwargs):
    import_torchvision()
    import timm

    return timm.create_model(name, **kwargs)


def randomize_torch_bn(torch_model, seed: int = 0) -> None:
    """Random BN statistics and affine parameters in a torch model (its init has mean 0, var 1, scale 1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
