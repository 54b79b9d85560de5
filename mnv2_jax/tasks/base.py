"""The interface every task implements."""

from __future__ import annotations

import abc
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow as tf


class Task(abc.ABC):
    """One task's pieces for a validated config.

    Data: examples arrive undecoded as `features` (e.g. `image` bytes and a `label`); `train_example` and
    `eval_example` turn one into model inputs and targets (tf ops, the train one stateless in `seed`);
    `padding_example` fills the last eval batches (its `mask` is False). Every batch has `image`; eval batches
    also have `mask`.
    Compiled parts (pure jax, run on the global batch): `loss` for training, `eval_sums` per eval batch (sums over
    the batch, padding masked out; or per-example arrays, see `per_example_eval`), and on the host `eval_results`
    turns their totals into `eval/...` metrics.
    """

    name: str
    features: tuple[str, ...]  # the undecoded example's fields the task reads
    best_metric: str  # the eval metric (higher is better) that picks the best checkpoint
    padding_label: int = 0  # the label of padded eval examples (masked out either way)
    # False: `eval_sums` returns sums, added up over the batches; True: per-example arrays (leading batch axis),
    # concatenated over the batches on the host (padding included, `mask` among them), e.g. detections for COCO mAP.
    per_example_eval: bool = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def class_names(self) -> tuple[str, ...]:
        """`data.class_names` when it names every class, else the class ids as strings (metric names, predict)."""
        names = tuple(self.config.data.class_names or ())
        return names if len(names) == self.num_classes else tuple(str(i) for i in range(self.num_classes))

    @property
    def eval_resolution(self) -> int:
        """The side of evaluation's square inputs."""
        return self.config.eval_resolution or self.config.resolution

    @abc.abstractmethod
    def build_model(self, **overrides: Any) -> nn.Module:
        """The task's model for `config.model` (keyword overrides replace model fields)."""

    @abc.abstractmethod
    def train_example(self, example: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """One training example: augmented model input and target, a function of (example, seed) only."""

    @abc.abstractmethod
    def eval_example(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One evaluation example (deterministic), without `mask`."""

    def label_shape(self, resolution: int) -> tuple[int, ...]:
        """The shape of one example's `label` for inputs of `resolution` x `resolution`."""
        return ()

    def padding_example(self) -> dict[str, tf.Tensor]:
        """An eval example of the right shapes that counts for nothing (without `mask`)."""
        size = self.eval_resolution
        label = tf.fill(self.label_shape(size), tf.constant(self.padding_label, tf.int32))
        return {"image": tf.zeros((size, size, 3), tf.float32), "label": label}

    @abc.abstractmethod
    def loss(self, logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The batch's mean training loss and the task's train metrics (`train/...`)."""

    @abc.abstractmethod
    def eval_sums(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Sums over the batch of what `eval_results` needs (padded examples count 0)."""

    @abc.abstractmethod
    def eval_results(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        """`eval/...` metrics from the totals of `eval_sums` over the whole split; includes `eval/count`."""

    def postprocess(self, outputs: Any, resolution: int) -> Any:
        """What inference hands the user from the model's outputs (detection: boxes after NMS); else the outputs."""
        return outputs

    def input_shape(self, batch_size: int) -> tuple[int, ...]:
        """The model input's shape for `batch_size` images (init, bench)."""
        return (batch_size, self.config.resolution, self.config.resolution, 3)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A training batch of the right shapes and dtypes, all zeros (bench, compile checks)."""
        return {
            "image": np.zeros(self.input_shape(batch_size), np.float32),
            "label": np.zeros((batch_size, *self.label_shape(self.config.resolution)), np.int32),
        }

    def synthetic_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A training batch of random targets (bench); the images are the caller's."""
        batch = self.dummy_batch(batch_size)
        batch["label"] = rng.integers(0, self.num_classes, batch["label"].shape).astype(np.int32)
        return batch
