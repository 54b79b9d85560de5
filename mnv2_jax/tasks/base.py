"""The interface every task implements: what differs between tasks, so that everything else is one code path."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epy

from mnv2_jax.errors import UserError
from mnv2_jax.evaluators import Evaluator

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf

# The formats that hold any model: graphs, and the Hugging Face Hub folder (our Flax variables for non-timm models).
EXPORT_FORMATS = ("tflite", "tflite-int8", "onnx", "savedmodel", "hf-hub")


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """`mnv2 predict`'s flags; each task uses those that concern it."""

    labels: Sequence[str] | None = None  # class names in id order (--labels); None: the config's
    top_k: int = 5
    out: str | None = None  # a directory for the files of each image
    json: bool = False
    min_score: float = 0.5


class Task(abc.ABC):
    """One task's pieces for a validated config.

    Config: `add_config` adds the task's section (`config.<section>`) and its `data.*` fields to a base config,
    `validate_config` and `validate_data` check them with one-line errors before anything compiles.
    Data: examples arrive undecoded as `features` (e.g. `image` bytes and a `label`) from a data source registered
    for the task (`mnv2_jax.data.sources`); `train_example` and `eval_example` turn one into model inputs and targets
    (tf ops, the train one stateless in `seed`); `padding_example` fills the last eval batches (its `mask` is False).
    Every batch has `image`; eval batches also have `mask`.
    Compiled parts (pure jax, run on the global batch): `loss` for training, `eval_outputs` per eval batch; the
    task's `evaluator()` accumulates those over the split and gives the `eval/...` metrics.
    Serving: `export_function` (the exported graph), `predict` (what `mnv2 predict` writes).
    """

    name: str
    features: tuple[str, ...]  # the undecoded example's fields the task reads
    best_metric: str  # the eval metric (higher is better) that picks the best checkpoint
    padding_label: int = 0  # the label of padded eval examples (masked out either way)
    section: str | None = None  # the config section the task adds, e.g. `segmentation`
    import_formats: tuple[str, ...] = ("tflite",)  # `mnv2 import --from` formats that hold this task's model
    export_formats: tuple[str, ...] = EXPORT_FORMATS  # `mnv2 export --format` values it supports
    export_meaning: str = "model outputs"  # the exported output, in words (export metadata)
    # `mnv2 eval` flags that change the saved config's inference: (dotted field, kind: "floats" | "bool", help)
    eval_overrides: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # Config.

    @classmethod
    def configure(cls, config: ml_collections.ConfigDict) -> None:
        """Makes a base config this task's: `config.task` and the task's own fields."""
        config.task = cls.name
        cls.add_config(config)

    @classmethod
    def add_config(cls, config: ml_collections.ConfigDict) -> None:
        """Adds the task's own section and `data.*` fields, with their defaults, to a base config."""

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        """Checks the task's section and what the task needs of `config.model` (raises `ConfigError`)."""

    @classmethod
    def validate_data(cls, config: ml_collections.ConfigDict) -> None:
        """Checks the task's `data.*` fields (training and evaluation configs)."""

    # Data.

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def named_classes(self, *candidates: Sequence[str] | None) -> tuple[str, ...] | None:
        """The first of `candidates`, then `data.class_names`, that names every class; None if none does."""
        for names in (*candidates, self.config.data.class_names):
            if names and len(names) == self.num_classes:
                return tuple(names)
        return None

    def class_names(self, labels: Sequence[str] | None = None) -> tuple[str, ...]:
        """Every class's name in id order (metric names, predict): `labels` when given, else `data.class_names` when
        it names every class; class ids as strings for the classes left unnamed."""
        names = tuple(labels) if labels else self.named_classes() or ()
        return names[: self.num_classes] + tuple(str(i) for i in range(len(names), self.num_classes))

    @property
    def eval_resolution(self) -> int:
        """The side of evaluation's square inputs."""
        return self.config.eval_resolution or self.config.resolution

    def check_dataset(self, builder: Any) -> None:
        """Checks of an opened dataset beyond its splits (before anything compiles)."""

    def with_dataset(self, config: ml_collections.ConfigDict, info: Any) -> None:
        """Fills fields of `config` (a copy) the dataset gives (`info`: `DatasetInfo`), e.g. class names."""

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

    # Compiled parts and evaluation.

    @abc.abstractmethod
    def loss(self, logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The batch's mean training loss and the task's train metrics (`train/...`)."""

    @abc.abstractmethod
    def eval_outputs(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """What one eval batch gives the evaluator (padded examples count for nothing)."""

    @abc.abstractmethod
    def evaluator(self) -> Evaluator:
        """A new evaluator of this task's `eval_outputs`."""

    def eval_tags(self, overrides: dict[str, Any]) -> list[str]:
        """Words for the metrics' prefix that say how `eval_overrides` changed inference (e.g. `multiscale`)."""
        return []

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

    # Serving: exports and predict.

    def export_model(self) -> nn.Module:
        """The inference model for exports: native convolution ops (grouped depthwise, 1x1 conv), float32, whole
        blocks (the runtime plans its own memory)."""
        return self.build_model(
            depthwise="grouped", pointwise="conv", regular_conv="conv", dtype="float32", expansion_splits=1
        )

    def export_function(self, model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
        """`(variables, images) -> output` of the exported graph; by default the model's logits."""
        return lambda variables, images: model.apply(variables, images, train=False)[0]

    def export_output_shape(self, batch: int | None) -> list[int | None]:
        """The exported output's shape for `batch` images (None: any)."""
        return [batch, self.num_classes]

    def check_predict(self, options: PredictOptions) -> None:
        """Raises `UserError` when `options` lack what this task's `predict` needs (before any weight is read)."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, variables: Any, paths: list[str], options: PredictOptions) -> None:
        """Runs the model on the image files `paths` and prints (and writes, per `options`) the results."""


class PredictError(UserError):
    """`mnv2 predict`'s flags do not give what the task's results need."""
