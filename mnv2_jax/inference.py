"""Loading a classifier from a workdir and running it on images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnv2_jax import config as config_lib
from mnv2_jax.data import preprocessing
from mnv2_jax.models import MobileNetV2, build_model, predict
from mnv2_jax.training import checkpoint


def abstract_variables(model: MobileNetV2, resolution: int, in_channels: int = 3) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s variables, without allocating them."""
    images = jax.ShapeDtypeStruct((1, resolution, resolution, in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def load_classifier(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, MobileNetV2, dict[str, Any]]:
    """The config, model and `{'params', 'batch_stats'}` of a checkpoint (the latest by default)."""
    step, config = checkpoint.restore_config(workdir, step)
    config_lib.require_task(config, ("classification",), f"loading a classifier from {workdir}")
    model = build_model(config.model)
    abstract = abstract_variables(model, config.resolution)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, variables = checkpoint.restore_model_variables(workdir, abstract, device, step)
    return config, model, variables


def classify(model: MobileNetV2, variables: dict[str, Any], images: np.ndarray, preprocessing_mode: str) -> np.ndarray:
    """Class probabilities for a batch of float RGB images with pixel values in [0, 255]."""

    @jax.jit
    def forward(variables, images):
        logits = predict(model, variables, preprocessing.normalize(images, preprocessing_mode))
        return jax.nn.softmax(logits)

    return np.asarray(forward(variables, jnp.asarray(images, jnp.float32)))


def read_labels(path: str) -> list[str]:
    """One class name per line (blank trailing lines ignored)."""
    with open(path) as f:
        return [line.strip() for line in f.read().rstrip("\n").split("\n")]


def top_k(probabilities: np.ndarray, k: int, labels: Sequence[str] | None = None) -> list[tuple[int, str, float]]:
    """The k most probable classes of one image as (index, label, probability)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    name = (lambda i: labels[i] if i < len(labels) else str(i)) if labels else str
    return [(int(i), name(int(i)), float(probabilities[i])) for i in order]
