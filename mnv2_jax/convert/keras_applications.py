"""Weights of `keras.applications.MobileNetV2` <-> our variables.

Keras's MobileNetV2 is the TF convention (TF 'SAME' padding, BN epsilon 1e-3).
Files are read by building the same Keras model and calling `load_weights`,
which reads arrays only (`.weights.h5`, `.keras`, legacy `.h5`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mnv2_jax.convert import ConversionError
from mnv2_jax.convert.layout import BIAS, BN_MEAN, BN_OFFSET, BN_SCALE, BN_VAR, KERNEL, Entry, Layer

KERAS_PADDING, KERAS_BN_EPSILON = "same", 1e-3
SUFFIXES = (".weights.h5", ".keras", ".h5")
_BN_ORDER = (BN_SCALE, BN_OFFSET, BN_MEAN, BN_VAR)  # gamma, beta, moving_mean, moving_variance


def _names(layer: Layer) -> tuple[str, str]:
    if layer.role == "stem":
        return "Conv1", "bn_Conv1"
    if layer.role == "head":
        return "Conv_1", "Conv_1_bn"
    prefix = "expanded_conv" if layer.block == 0 else f"block_{layer.block}"
    return f"{prefix}_{layer.role}", f"{prefix}_{layer.role}_BN"


def table(layers: list[Layer]) -> list[Entry]:
    """Entries keyed `<keras layer name>/<weight index>`."""
    entries = []
    for layer in layers:
        if layer.role == "logits":
            entries += [Entry("predictions/0", layer, KERNEL), Entry("predictions/1", layer, BIAS)]
            continue
        conv, bn = _names(layer)
        if layer.kind == "depthwise":  # Keras (H, W, C, 1) <-> ours (H, W, 1, C)
            swap = lambda k: k.transpose(0, 1, 3, 2)
            entries.append(Entry(f"{conv}/0", layer, KERNEL, swap, swap))
        else:
            entries.append(Entry(f"{conv}/0", layer, KERNEL))
        entries += [Entry(f"{bn}/{i}", layer, field) for i, field in enumerate(_BN_ORDER)]
    return entries


def check_conventions(model_config) -> None:
    if model_config.padding != KERAS_PADDING or model_config.bn_epsilon != KERAS_BN_EPSILON:
        raise ConversionError(
            "keras.applications.MobileNetV2 uses TF 'SAME' padding and BN epsilon 1e-3, the config has "
            f"model.padding={model_config.padding!r}, model.bn_epsilon={model_config.bn_epsilon}; use the tf "
            "convention (configs/imagenet.py:convention=tf)"
        )


def build(width: float, resolution: int, num_classes: int):
    """`keras.applications.MobileNetV2` with random weights and logits output (no softmax)."""
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(resolution, resolution, 3),
        alpha=width,
        include_top=True,
        weights=None,
        classes=num_classes,
        classifier_activation=None,
    )


def set_weights(keras_model, tensors: Mapping[str, np.ndarray]) -> None:
    by_layer: dict[str, dict[int, np.ndarray]] = {}
    for key, value in tensors.items():
        name, index = key.rsplit("/", 1)
        by_layer.setdefault(name, {})[int(index)] = value
    for name, weights in by_layer.items():
        layer = keras_model.get_layer(name)
        layer.set_weights([weights[i] for i in range(len(weights))])


def get_weights(keras_model) -> dict[str, np.ndarray]:
    return {
        f"{layer.name}/{i}": np.asarray(w) for layer in keras_model.layers for i, w in enumerate(layer.get_weights())
    }


def check_suffix(path: str) -> None:
    if not path.endswith(SUFFIXES):
        raise ConversionError(f"{path}: Keras weights files end in one of {SUFFIXES}")


def save(keras_model, path: str) -> None:
    """`.keras` saves the whole model, `.weights.h5` the weights only."""
    check_suffix(path)
    if path.endswith(".keras"):
        keras_model.save(path)
    else:
        keras_model.save_weights(path)


def load(path: str, width: float, resolution: int, num_classes: int) -> dict[str, np.ndarray]:
    """The weights of a Keras MobileNetV2 file, read into a freshly built model of the configured shape."""
    check_suffix(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head.startswith(b"\x89HDF") or head.startswith(b"PK")):
        raise ConversionError(f"{path} is not a Keras file (neither HDF5 nor a .keras zip)")
    keras_model = build(width, resolution, num_classes)
    try:
        keras_model.load_weights(path)
    except (ValueError, KeyError, OSError) as e:
        raise ConversionError(
            f"{path} does not fit keras.applications.MobileNetV2(alpha={width}, classes={num_classes}): {e}"
        ) from e
    return get_weights(keras_model)
