"""Loading a task's model from a workdir and running it on images: classes per image, per pixel, or boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnv2_jax import tasks
from mnv2_jax.data import preprocessing
from mnv2_jax.models import MobileNetV2, abstract_variables, predict
from mnv2_jax.training import checkpoint


def load_model(
    workdir: str, step: int | None = None, tasks_served: tuple[str, ...] | None = None
) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any]]:
    """The config, the task's model and `{'params', 'batch_stats'}` of a checkpoint (the latest by default);
    `tasks_served`: the tasks the caller serves (checked before any weight is read)."""
    step, config = checkpoint.restore_config(workdir, step)
    served = tasks_served or tasks.names()
    task = tasks.require(config, served, f"loading a {'/'.join(served)} model from {workdir}")
    model = task.build_model()
    abstract = abstract_variables(model, config.resolution)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, variables = checkpoint.restore_model_variables(workdir, abstract, device, step)
    return config, model, variables


def load_classifier(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, MobileNetV2, dict[str, Any]]:
    """`load_model` for a classification workdir."""
    return load_model(workdir, step, ("classification",))


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


def segment(
    model, variables: dict[str, Any], images: Sequence[np.ndarray], size: int, preprocessing_mode: str
) -> list[np.ndarray]:
    """Class ids (uint8, height x width) of float RGB images with pixel values in [0, 255], each at its own size.

    As in evaluation, an image larger than `size` is scaled down to fit, and it is padded to `size` x `size`
    (one compiled program for every image); the logits of the image's region are resized back to the image's
    size before the argmax.
    """
    from mnv2_jax.data import segmentation

    @jax.jit
    def logits(variables, padded):
        return predict(model, variables, preprocessing.normalize(padded, preprocessing_mode))[0]

    results = []
    for image in images:
        height, width = image.shape[:2]
        scale = min(1.0, size / max(height, width))
        fitted = (round(height * scale), round(width * scale))
        padded, _ = segmentation.fit_and_pad(image, np.zeros((height, width), np.uint8), size, 0)
        region = logits(variables, jnp.asarray(padded.numpy()[None], jnp.float32))[: fitted[0], : fitted[1]]
        region = jax.image.resize(region, (height, width, region.shape[-1]), "bilinear")
        results.append(np.asarray(jnp.argmax(region, axis=-1), np.uint8))
    return results


def detect(task, model, variables: dict[str, Any], images: Sequence[np.ndarray], min_score: float) -> list[list[dict]]:
    """Each image's detections with a score of at least `min_score`, best first: `{"box": [xmin, ymin, xmax, ymax]`
    in pixels of the image, `"score"`, `"class_id"`, `"label"}`. Images (float RGB in [0, 255], any size) are
    resized to the model's square input as in evaluation."""
    size, mode = task.config.resolution, task.config.model.preprocessing
    names = task.class_names()

    @jax.jit
    def run(variables, image):
        outputs = predict(model, variables, preprocessing.normalize(image[None], mode))
        return jax.tree.map(lambda x: x[0], task.detect(outputs, size))

    results = []
    for image in images:
        height, width = image.shape[:2]
        found = jax.device_get(run(variables, jnp.asarray(preprocessing.resize(image, size).numpy())))
        boxes = np.clip(found["boxes"], 0.0, 1.0) * [height, width, height, width]
        detections = []
        count = int(found["num_detections"])  # best first: the rest are padding
        for box, score, label in zip(boxes[:count], found["scores"][:count], found["classes"][:count], strict=True):
            if score < min_score:
                break
            ymin, xmin, ymax, xmax = (round(float(v), 2) for v in box)
            label = int(label)
            detections.append(
                {"box": [xmin, ymin, xmax, ymax], "score": float(score), "class_id": label, "label": names[label]}
            )
        results.append(detections)
    return results
