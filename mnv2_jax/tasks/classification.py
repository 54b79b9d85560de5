"""Image classification: MobileNetV2 with its classifier, Inception-style crops, cross-entropy, top-1/top-5."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epy

from mnv2_jax import config_checks as checks
from mnv2_jax import tasks
from mnv2_jax.data import preprocessing
from mnv2_jax.evaluators import SummedEvaluator
from mnv2_jax.models import MobileNetV2, build_model
from mnv2_jax.tasks.base import EXPORT_FORMATS, PredictOptions, Task

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing."""
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing))


def correct_top_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k largest logits (ties broken towards the label's favour)."""
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def train_image(encoded: tf.Tensor, seed: tf.Tensor, resolution: int, data) -> tf.Tensor:
    """Random-area crop with aspect-ratio jitter (Inception style), resize, optional flip; pixels in [0, 255]."""
    image = preprocessing.decode_image(encoded)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=data.min_object_covered,
        aspect_ratio_range=tuple(data.aspect_ratio_range),
        area_range=tuple(data.area_range),
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    image = preprocessing.resize(tf.slice(image, begin, size), resolution)
    if data.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def eval_image(encoded: tf.Tensor, resolution: int, crop_fraction: float) -> tf.Tensor:
    """Central crop of `crop_fraction` of each side, then resize; pixels in [0, 255]."""
    image = preprocessing.decode_image(encoded)
    if crop_fraction < 1.0:
        image = tf.image.central_crop(image, crop_fraction)
    return preprocessing.resize(image, resolution)


class TopKAccuracy(SummedEvaluator):
    """Mean cross-entropy, top-1 and top-5 accuracy over the split."""

    def metrics(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        count = float(totals["count"])
        return {
            "eval/loss": float(totals["loss"]) / count,
            "eval/top1": float(totals["top1"]) / count,
            "eval/top5": float(totals["top5"]) / count,
            "eval/count": count,
        }


@tasks.register
class Classification(Task):
    name = "classification"
    features = ("image", "label")
    best_metric = "eval/top1"
    import_formats = ("tflite", "torch", "timm", "keras")
    export_formats = (*EXPORT_FORMATS, "torch", "safetensors", "keras")
    export_meaning = "class logits; softmax gives the class probabilities"

    @classmethod
    def add_config(cls, config):
        data = config.data
        data.area_range = (0.05, 1.0)  # training crops (slim inception_preprocessing)
        data.aspect_ratio_range = (0.75, 1.33)
        data.min_object_covered = 0.1
        data.eval_crop = 0.875  # evaluation: the central crop's share of each side

    @classmethod
    def validate_data(cls, config):
        data = config.data
        checks.check_interval("data.area_range", data.area_range, 0.0, 1.0)
        checks.check_interval("data.aspect_ratio_range", data.aspect_ratio_range, 1e-3, 1e3)
        checks.check_range("data.min_object_covered", data.min_object_covered, 0.0, 1.0, closed_high=True)
        checks.check_range("data.eval_crop", data.eval_crop, 1e-6, 1.0, closed_high=True)

    def build_model(self, **overrides: Any) -> MobileNetV2:
        return build_model(self.config.model, **overrides)

    def _model_input(self, image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        return {
            "image": preprocessing.normalize(image, self.config.model.preprocessing),
            "label": tf.cast(label, tf.int32),
        }

    def train_example(self, example, seed):
        image = train_image(example["image"], seed, self.config.resolution, self.config.data)
        return self._model_input(image, example["label"])

    def eval_example(self, example):
        image = eval_image(example["image"], self.eval_resolution, self.config.data.eval_crop)
        return self._model_input(image, example["label"])

    def loss(self, logits, batch):
        smoothing = self.config.optimizer.label_smoothing
        loss = jnp.mean(cross_entropy(logits, batch["label"], self.num_classes, smoothing))
        return loss, {"train/top1": jnp.mean(correct_top_k(logits, batch["label"], 1))}

    def eval_outputs(self, logits, batch):
        mask = batch["mask"].astype(jnp.float32)
        labels = batch["label"]
        return {
            "loss": jnp.sum(cross_entropy(logits, labels, self.num_classes) * mask),
            "top1": jnp.sum(correct_top_k(logits, labels, 1) * mask),
            "top5": jnp.sum(correct_top_k(logits, labels, min(5, self.num_classes)) * mask),
            "count": jnp.sum(mask),
        }

    def evaluator(self) -> TopKAccuracy:
        return TopKAccuracy()

    def predict(self, model, variables, paths: list[str], options: PredictOptions) -> None:
        """Prints the `top_k` classes of each image with their probabilities."""
        from mnv2_jax import inference  # loads workdirs through the tasks: imported when used

        pixels = np.stack([preprocessing.load_image(path, self.config.resolution) for path in paths])
        probabilities = inference.classify(model, variables, pixels, self.config.model.preprocessing)
        for path, probs in zip(paths, probabilities, strict=True):
            print(path)
            for index, name, p in inference.top_k(probs, options.top_k, options.labels):
                print(f"  {p:.4f}  {index:>5}  {name}")
