"""The config schema every `configs/*.py` starts from, its `key=value` argument parser and its checks.

Experiment configs live in the top-level `configs/` folder and follow ml_collections' `get_config(arg)`; they call
`base_config` with a task's name (the shared model, data source, optimizer and loop, plus that task's own section and
data fields) and override fields. `validate()` turns a bad value into one clear error before any compile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from mnv2_jax import tasks
from mnv2_jax.config_checks import (
    ConfigError,
    check_choice,
    check_positive,
    check_range,
)
from mnv2_jax.models.layers import (
    DEPTHWISE_IMPLEMENTATIONS,
    PADDING_MODES,
    POINTWISE_IMPLEMENTATIONS,
    REGULAR_CONV_IMPLEMENTATIONS,
)
from mnv2_jax.models.mobilenet_v2 import BLOCK_STAGES, OUTPUT_STRIDES, RESIDUAL_MODES, stage_repeats
from mnv2_jax.training import fine_tune

__all__ = ["ConfigError", "base_config", "from_dict", "parse_arg", "to_dict", "validate"]

# Framework conventions: padding, BN decay/epsilon and input normalisation of each reference.
CONVENTIONS: dict[str, dict[str, Any]] = {
    "tf": dict(padding="same", bn_momentum=0.997, bn_epsilon=1e-3, preprocessing="inception"),
    "torch": dict(padding="symmetric", bn_momentum=0.9, bn_epsilon=1e-5, preprocessing="imagenet"),
}
PREPROCESSING_MODES = ("inception", "imagenet")
DTYPES = ("float32", "bfloat16", "float64")  # float64 (with JAX_ENABLE_X64=1) is for exactness tests
OPTIMIZERS = ("rmsprop", "sgd", "adamw")
NONFINITE_POLICIES = ("stop", "skip")
CORRUPT_IMAGE_POLICIES = ("fail", "skip")  # image folders: see mnv2_jax.data.image_folder
LR_SCALING = ("linear", "sqrt", "none")
SCHEDULES = ("exponential", "cosine", "constant")


def base_config(convention: str = "tf", task: str = "classification") -> ml_collections.ConfigDict:
    """Defaults shared by every config (the authors' MobileNetV2 1.0 at 224x224 with `convention`'s conventions,
    the data source, the optimizer and the loop), then `task`'s own section and data fields (`mnv2_jax.tasks`)."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    config = ml_collections.ConfigDict()
    config.resolution = 224
    config.eval_resolution = config_dict.placeholder(int)  # evaluation's input size; None: resolution
    config.seed = 0
    config.model = model_config(convention)
    add_data_source(config)
    add_training(config)
    fine_tune.add_config(config)
    tasks.task_type(task).configure(config)
    return config


def model_config(convention: str) -> ml_collections.ConfigDict:
    """`config.model`: the backbone (and classifier), how it is computed, and the framework's conventions."""
    model = ml_collections.ConfigDict()
    model.name = "mobilenet_v2"
    model.width = 1.0
    model.expansion = 6.0  # stages 2-7; the first stage always uses t=1
    model.stage_expansion = config_dict.placeholder(tuple)  # 7 values, one per stage; overrides `expansion`
    model.stage_repeats = config_dict.placeholder(tuple)  # blocks per stage (7 values); None: (1, 2, 3, 4, 3, 3, 1)
    model.num_classes = config_dict.FieldReference(1000, field_type=int)  # None: from the dataset's labels
    model.output_stride = 32
    model.dropout_rate = 0.2
    model.residual = "bottleneck"
    model.nonlinear_bottleneck = False
    model.divisible_by = 8
    model.min_depth = 8
    model.depthwise = "auto"  # CPU: C++ kernels to train (one device), else shifted multiply-adds; elsewhere: grouped
    model.pointwise = "auto"  # 1x1 convs; CPU: matrix products; elsewhere: XLA convolution
    model.regular_conv = "auto"  # the 3x3 stem; CPU: one matrix product over patches; elsewhere: XLA convolution
    # Images per device run through the network together in inference (eval, predict, bench); 0: the whole
    # batch; None: 1 on CPU (activations stay in cache, chunks run in parallel), the whole batch elsewhere.
    model.inference_chunk = config_dict.placeholder(int)
    model.remat = False  # recompute each block's expanded tensors in the backward pass: less memory, more FLOPs
    # Inference (eval, predict, bench): each block in this many groups of its expansion channels, so its expanded
    # tensor is never whole (the paper's memory-efficient inference, docs/memory.md); 1: off. Training and exports
    # run whole blocks.
    model.expansion_splits = 1
    model.bn_group_size = config_dict.placeholder(int)
    model.init_stddev = 0.09
    model.dtype = "float32"
    model.update(CONVENTIONS[convention])
    return model


def add_data_source(config: ml_collections.ConfigDict) -> None:
    """Where the data comes from and how it is read; each task adds its own `data.*` fields (augmentation)."""
    # A dataset by name for the config's task (mnv2_jax.data.sources): a TFDS name, `imagefolder:<root>`
    # (classification) or `voc:<root>` (segmentation, detection).
    config.dataset = "imagenet2012"
    config.data_dir = config_dict.placeholder(str)  # TFDS data dir (default: TFDS's own)
    config.train_split = "train"
    config.eval_split = "validation"
    data = config.data = ml_collections.ConfigDict()
    data.flip = True  # training: random horizontal flips
    data.class_names = config_dict.placeholder(tuple)  # for datasets that do not name their classes (voc:<root>)
    data.shuffle_buffer = 16_384
    data.cache = False  # cache the encoded examples in memory (small datasets)
    data.prefetch = 0  # batches to prefetch per process (0 = autotune)
    # image folders: an image that does not decode stops the run (fail) or is left out (skip)
    data.corrupt_images = "fail"


def add_training(config: ml_collections.ConfigDict) -> None:
    """The training length and batch, the optimizer, and the loop's checkpoints and logging."""
    # Steps per epoch, total steps and the scaled learning rate are derived from these in one place
    # (`mnv2_jax.training.plan`), so overriding one keeps the rest consistent.
    config.batch_size = 96  # global, over all devices of all processes (paper: 96)
    config.eval_batch_size = 200
    config.num_epochs = 300.0
    config.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs when set
    # k > 1: each step runs batch_size // k examples at a time, k times, and applies one update of their mean
    # gradient (less activation memory; batch norm per micro-batch). docs/training.md, "Gradient accumulation".
    config.accumulate_steps = 1

    opt = config.optimizer = ml_collections.ConfigDict()
    opt.name = "rmsprop"
    opt.learning_rate = 0.045  # at base_batch_size
    opt.base_batch_size = 96
    opt.lr_scaling = "linear"  # how the learning rate follows batch_size: linear, sqrt or none
    opt.schedule = "exponential"  # exponential (paper), cosine or constant
    opt.decay_rate = 0.98
    opt.decay_epochs = 1.0  # paper: 0.98 every epoch; slim README recipe: every 2.5 epochs
    opt.staircase = True
    opt.warmup_epochs = 0.0
    opt.rmsprop_decay = 0.9
    opt.momentum = 0.9
    opt.epsilon = 1.0  # slim's --opt_epsilon default; timm's TF-style recipes use 1e-3
    opt.weight_decay = 4e-5  # L2 on regular conv kernels and the logits kernel only
    opt.label_smoothing = 0.0  # slim README recipe: 0.1
    opt.ema_decay = config_dict.placeholder(float)  # slim README recipe: 0.9999
    opt.grad_clip_norm = config_dict.placeholder(float)

    config.log_every_steps = 100
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the last K, plus the best by the task's eval metric
    config.profile_steps = 0  # > 0: write a profile of that many steps after the first log interval
    config.init_from = config_dict.placeholder(str)  # a workdir, or weights by name (`mnv2 import --list`)
    # A NaN/Inf loss or gradient never updates the state; "stop" ends the run naming the step (before any
    # checkpoint of a later step), "skip" drops that update and goes on (counted in train/nonfinite).
    config.on_nonfinite = "stop"


def _parse_value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(float(text) if isinstance(default, float) else int(text))
        except ValueError:
            raise ConfigError(f"expected a {type(default).__name__}, got {text!r}") from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a big_vision-style config argument `key=value,key=value` against typed defaults."""
    result = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"config argument {item!r}: expected key=value with key one of {tuple(defaults)}")
        try:
            result[key] = _parse_value(value, defaults[key])
        except ConfigError as e:
            raise ConfigError(f"config argument {key}: {e}") from None
    return result


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the fields the model and commands rely on; raises `ConfigError` naming the field."""
    validate_model(config)
    task = tasks.get(config)
    if task.section and task.section not in config:
        raise ConfigError(
            f"task={task.name!r} needs its config section {task.section!r}: start the config from "
            f"mnv2_jax.config.base_config(task_name) with task_name={task.name!r}"
        )
    task.validate_config(config)
    if "optimizer" in config:
        validate_training(config)
        fine_tune.validate(config.fine_tune)
        task.validate_data(config)


def validate_model(config: ml_collections.ConfigDict) -> None:
    """Checks `config.model` and the input resolutions."""
    model = config.model
    check_choice("model.name", model.name, ("mobilenet_v2",))
    check_positive("model.width", model.width, float)
    expansions = model.stage_expansion if model.stage_expansion is not None else (model.expansion,)
    if model.stage_expansion is not None and len(model.stage_expansion) != len(BLOCK_STAGES):
        raise ConfigError(
            f"model.stage_expansion needs {len(BLOCK_STAGES)} values (one per stage), got {len(model.stage_expansion)}"
        )
    for t in expansions:
        if not isinstance(t, (int, float)) or t < 1:
            raise ConfigError(f"model.expansion must be >= 1, got {t!r}")
    try:
        stage_repeats(model.stage_repeats)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if model.num_classes is not None and (not isinstance(model.num_classes, int) or model.num_classes < 0):
        raise ConfigError(
            f"model.num_classes must be an int >= 0 (0 = no head) or None (from the dataset), got {model.num_classes!r}"
        )
    check_choice("model.output_stride", model.output_stride, OUTPUT_STRIDES)
    if not 0 <= model.dropout_rate < 1:
        raise ConfigError(f"model.dropout_rate must be in [0, 1), got {model.dropout_rate!r}")
    check_choice("model.residual", model.residual, RESIDUAL_MODES)
    _validate_computation(model)
    if not 0 <= model.bn_momentum < 1:
        raise ConfigError(f"model.bn_momentum must be in [0, 1), got {model.bn_momentum!r}")
    check_positive("model.bn_epsilon", model.bn_epsilon, float)
    if model.bn_group_size is not None:
        check_positive("model.bn_group_size", model.bn_group_size)
    check_positive("resolution", config.resolution)
    if config.resolution < model.output_stride:
        raise ConfigError(
            f"resolution={config.resolution} is too small for model.output_stride={model.output_stride}: the feature "
            f"map would reach 1x1 before the last stride-2 layers, which then stride over padding (Keras also "
            f"requires >= 32 at output stride 32); use resolution >= {model.output_stride} or a smaller output stride"
        )
    if config.eval_resolution is not None:
        check_positive("eval_resolution", config.eval_resolution)


def _validate_computation(model: ml_collections.ConfigDict) -> None:
    """How the model is computed: padding, implementations, chunks, splits, preprocessing, dtype, rounding."""
    check_choice("model.padding", model.padding, PADDING_MODES)
    check_choice("model.depthwise", model.depthwise, ("auto", *DEPTHWISE_IMPLEMENTATIONS))
    check_choice("model.pointwise", model.pointwise, ("auto", *POINTWISE_IMPLEMENTATIONS))
    check_choice("model.regular_conv", model.regular_conv, ("auto", *REGULAR_CONV_IMPLEMENTATIONS))
    if model.inference_chunk is not None and (not isinstance(model.inference_chunk, int) or model.inference_chunk < 0):
        raise ConfigError(
            f"model.inference_chunk must be an int >= 0 (0 = the whole batch) or None (auto), "
            f"got {model.inference_chunk!r}"
        )
    check_choice("model.preprocessing", model.preprocessing, PREPROCESSING_MODES)
    check_choice("model.dtype", model.dtype, DTYPES)
    check_positive("model.divisible_by", model.divisible_by)
    check_positive("model.min_depth", model.min_depth)
    check_positive("model.expansion_splits", model.expansion_splits)
    if model.expansion_splits > 1 and model.residual == "expansion":
        raise ConfigError(
            "model.expansion_splits > 1 needs model.residual in ('bottleneck', 'none'): the 'expansion' shortcut "
            "carries a block's whole expanded tensor to the next block"
        )


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Checks the data source, optimizer and loop fields used by `mnv2 train` / `mnv2 eval`."""
    if not isinstance(config.dataset, str) or not config.dataset:
        raise ConfigError(f"dataset must be a TFDS name, 'imagefolder:<root>' or 'voc:<root>', got {config.dataset!r}")
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        check_positive(field, config[field])
    check_positive("accumulate_steps", config.accumulate_steps)
    if config.batch_size % config.accumulate_steps:
        divisors = [k for k in range(1, config.batch_size + 1) if config.batch_size % k == 0]
        raise ConfigError(
            f"accumulate_steps={config.accumulate_steps} must divide batch_size={config.batch_size} (the micro-batches "
            f"are equal); use one of {divisors}"
        )
    check_positive("num_epochs", config.num_epochs, float)
    if config.num_train_steps is not None:
        check_positive("num_train_steps", config.num_train_steps)
    check_positive("eval_every_epochs", config.eval_every_epochs, float)
    data = config.data
    if data.class_names is not None and not all(isinstance(name, str) for name in data.class_names):
        raise ConfigError(f"data.class_names must be a tuple of strings or None, got {data.class_names!r}")
    check_choice("data.flip", data.flip, (False, True))
    check_positive("data.shuffle_buffer", data.shuffle_buffer)
    check_choice("data.corrupt_images", data.corrupt_images, CORRUPT_IMAGE_POLICIES)
    check_choice("on_nonfinite", config.on_nonfinite, NONFINITE_POLICIES)
    validate_optimizer(config.optimizer)


def validate_optimizer(opt: ml_collections.ConfigDict) -> None:
    """Checks `config.optimizer`."""
    check_choice("optimizer.name", opt.name, OPTIMIZERS)
    check_choice("optimizer.lr_scaling", opt.lr_scaling, LR_SCALING)
    check_choice("optimizer.schedule", opt.schedule, SCHEDULES)
    check_positive("optimizer.learning_rate", opt.learning_rate, float)
    check_positive("optimizer.base_batch_size", opt.base_batch_size)
    check_range("optimizer.decay_rate", opt.decay_rate, 0.0, 1.0, closed_high=True)
    check_positive("optimizer.decay_epochs", opt.decay_epochs, float)
    check_range("optimizer.warmup_epochs", opt.warmup_epochs, 0.0, float("inf"))
    check_range("optimizer.rmsprop_decay", opt.rmsprop_decay, 0.0, 1.0)
    check_range("optimizer.momentum", opt.momentum, 0.0, 1.0)
    check_positive("optimizer.epsilon", opt.epsilon, float)
    check_range("optimizer.weight_decay", opt.weight_decay, 0.0, 1.0)
    check_range("optimizer.label_smoothing", opt.label_smoothing, 0.0, 1.0)
    if opt.ema_decay is not None:
        check_range("optimizer.ema_decay", opt.ema_decay, 0.0, 1.0)
    if opt.grad_clip_norm is not None:
        check_positive("optimizer.grad_clip_norm", opt.grad_clip_norm, float)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-safe plain dict of the config (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def flatten(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """Every field as `{"model.width": 0.35, ...}` with TensorBoard-hparams-safe values (tuples and None as text)."""
    flat: dict[str, bool | int | float | str] = {}

    def visit(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                visit(f"{name}.", value)
            elif isinstance(value, bool | int | float | str):
                flat[name] = value
            else:
                flat[name] = str(tuple(value) if isinstance(value, list) else value)

    visit("", to_dict(config))
    return flat


def from_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a config saved with `to_dict`, on top of its task's `base_config` so new fields get defaults; the
    sections and `data.*` fields of other tasks (which configs saved before tasks owned them carry) are left out."""
    data = _migrated(data)
    task = data.get("task", "classification")
    config = base_config("tf", task)
    foreign_sections, foreign_data = _other_tasks_fields(task)

    def merge(target: ml_collections.ConfigDict, values: Mapping[str, Any], foreign: set[str]) -> None:
        for key, value in values.items():
            if key in foreign and key not in target:
                continue
            if isinstance(value, Mapping) and key in target and isinstance(target[key], ml_collections.ConfigDict):
                merge(target[key], value, foreign_data if key == "data" else set())
            else:
                with target.ignore_type():
                    target[key] = tuple(value) if isinstance(value, list) else value

    merge(config, data, foreign_sections)
    return config


def _migrated(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config with the fields since renamed: the dense tasks' `fine_tune_batch_norm=False` is
    `fine_tune.frozen_batch_norm=("backbone",)`."""
    data = json.loads(json.dumps(data))
    for section in ("segmentation", "detection"):
        if data.get(section, {}).pop("fine_tune_batch_norm", True) is False:
            data.setdefault("fine_tune", {})["frozen_batch_norm"] = [fine_tune.BACKBONE]
    return data


def _other_tasks_fields(task: str) -> tuple[set[str], set[str]]:
    """The top-level sections and `data.*` fields that the registered tasks other than `task` add."""
    own = base_config("tf", task)
    sections: set[str] = set()
    data_fields: set[str] = set()
    for name in set(tasks.names()) - {task}:
        other = base_config("tf", name)
        sections.update(set(other) - set(own))
        data_fields.update(set(other.data) - set(own.data))
    return sections, data_fields
