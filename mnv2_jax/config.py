"""The config schema every `configs/*.py` starts from, its `key=value` argument parser and its checks.

Experiment configs live in the top-level `configs/` folder and follow
ml_collections' `get_config(arg)`; they call `base_config()` and override
fields. `validate()` turns a bad value into one clear error before any compile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from mnv2_jax.errors import UserError
from mnv2_jax.models.deeplab import SEGMENTATION_OUTPUT_STRIDES
from mnv2_jax.models.layers import (
    DEPTHWISE_IMPLEMENTATIONS,
    PADDING_MODES,
    POINTWISE_IMPLEMENTATIONS,
    REGULAR_CONV_IMPLEMENTATIONS,
)
from mnv2_jax.models.mobilenet_v2 import BLOCK_STAGES, OUTPUT_STRIDES, RESIDUAL_MODES, stage_repeats
from mnv2_jax.models.ssdlite import HEADS as DETECTION_HEADS

# Framework conventions: padding, BN decay/epsilon and input normalisation of each reference.
CONVENTIONS: dict[str, dict[str, Any]] = {
    "tf": dict(padding="same", bn_momentum=0.997, bn_epsilon=1e-3, preprocessing="inception"),
    "torch": dict(padding="symmetric", bn_momentum=0.9, bn_epsilon=1e-5, preprocessing="imagenet"),
}
PREPROCESSING_MODES = ("inception", "imagenet")
TASKS = ("classification", "segmentation", "detection")
DTYPES = ("float32", "bfloat16", "float64")  # float64 (with JAX_ENABLE_X64=1) is for exactness tests


class ConfigError(UserError):
    """A config field holds a value outside what is allowed."""


def base_config(convention: str = "tf") -> ml_collections.ConfigDict:
    """Defaults shared by every config: the authors' MobileNetV2 1.0 at 224x224 with TF conventions."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    config = ml_collections.ConfigDict()
    config.task = "classification"  # what the model learns: one of TASKS; each has its own section below
    config.resolution = 224
    config.eval_resolution = config_dict.placeholder(int)  # evaluation's input size; None: resolution
    config.seed = 0

    model = config.model = ml_collections.ConfigDict()
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

    # task=segmentation: Mobile DeepLabv3 (mnv2_jax.models.deeplab) on the backbone above.
    seg = config.segmentation = ml_collections.ConfigDict()
    seg.feature_endpoint = "layer_18"  # the paper's V2*: the 320-channel map before the last 1x1 conv (layer_19)
    seg.aspp = False  # False: the released head (image pooling + 1x1); True: the paper's ASPP variant
    seg.atrous_rates = config_dict.placeholder(tuple)  # ASPP's three rates; None: 6/12/18 at output stride 16, x2 at 8
    seg.head_features = 256
    seg.head_dropout_rate = 0.1
    seg.head_bn_momentum = 0.9997  # DeepLab's head batch norm (the backbone keeps model.bn_*)
    seg.head_bn_epsilon = 1e-5
    seg.fine_tune_batch_norm = True  # False: the backbone's BN keeps its stored statistics (small batches, imports)
    # Evaluation and predict (DeepLab's multi-scale inference): the input at each scale, plus mirrored with eval_flip,
    # class probabilities averaged; the paper's multi-scale row is (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) with flipping.
    seg.eval_scales = (1.0,)
    seg.eval_flip = False

    # task=detection: SSD(Lite) (mnv2_jax.models.ssdlite, mnv2_jax.detection) on the backbone above; `model.num_classes`
    # counts the object classes (the background is added). Defaults: the `ssdlite_mobilenet_v2_coco` release.
    det = config.detection = ml_collections.ConfigDict()
    det.head = "ssdlite"  # ssdlite: depthwise-separable predictors and extra layers; ssd: regular 3x3 convolutions
    det.max_boxes = 100  # ground-truth boxes per image after augmentation, padded (more are dropped, in file order)
    det.min_scale = 0.2  # the anchors' scales, linear over the six maps
    det.max_scale = 0.95
    det.matched_threshold = 0.5  # an anchor matches a ground-truth box at this IoU (and each box its best anchor)
    det.negatives_per_positive = 3.0  # hard example mining
    det.min_negatives_per_image = 3
    det.score_threshold = 1e-8  # post-processing: per-class NMS, then the best detections of an image
    det.nms_iou_threshold = 0.6
    det.max_detections = 100
    det.fine_tune_batch_norm = True  # False: the backbone's BN keeps its stored statistics (small batches, imports)
    # The initial score of every class at every anchor (the class logits' bias: RetinaNet's prior, 0.01 there);
    # None: 1/2 (bias 0), as released.
    det.class_prior = config_dict.placeholder(float)

    # Data: a TFDS dataset by name (segmentation: one with a per-pixel class-id feature), `imagefolder:<root>`
    # (classification) or `voc:<root>` (segmentation).
    config.dataset = "imagenet2012"
    config.data_dir = config_dict.placeholder(str)  # TFDS data dir (default: TFDS's own)
    config.train_split = "train"
    config.eval_split = "validation"
    data = config.data = ml_collections.ConfigDict()
    data.area_range = (0.05, 1.0)  # slim inception_preprocessing
    data.aspect_ratio_range = (0.75, 1.33)
    data.min_object_covered = 0.1
    data.flip = True
    data.eval_crop = 0.875
    data.scale_range = (0.5, 2.0)  # segmentation: DeepLab's random rescale before the crop (resolution x resolution)
    data.scale_step = 0.25  # segmentation: scales in this step within scale_range; 0: any scale
    data.class_names = config_dict.placeholder(tuple)  # for datasets that do not name their classes (voc:<root>)
    # segmentation on a TFDS dataset: the per-pixel class-id feature (a 1-channel uint8 Image or an integer Tensor)
    data.mask_feature = "segmentation_mask"
    data.mask_label_offset = 0  # segmentation: added to every stored class id but the ignore label 255
    # detection training (the release's `ssd_random_crop` and flip): a random crop that keeps at least
    # `min_object_covered` (one value drawn per example from this tuple) of some box, or the whole image with
    # probability `keep_image_probability`; then optional photometric distortion (brightness, contrast, saturation, hue)
    data.crop_min_object_covered = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    data.crop_area_range = (0.1, 1.0)
    data.crop_aspect_ratio_range = (0.5, 2.0)
    data.keep_image_probability = 0.15
    data.photometric = False
    data.shuffle_buffer = 16_384
    data.cache = False  # cache the encoded examples in memory (small datasets)
    data.prefetch = 0  # batches to prefetch per process (0 = autotune)
    data.corrupt_images = (
        "fail"  # image folders: an image that does not decode stops the run (fail) or is left out (skip)
    )

    # Training length and batch. Steps per epoch, total steps and the scaled learning rate are derived
    # from these in one place (`mnv2_jax.training.plan`), so overriding one keeps the rest consistent.
    config.batch_size = 96  # global, over all devices of all processes (paper: 96)
    config.eval_batch_size = 200
    config.num_epochs = 300.0
    config.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs when set

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

    # Loop, checkpoints and logging.
    config.log_every_steps = 100
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the last K, plus the best by eval top-1
    config.profile_steps = 0  # > 0: write a profile of that many steps after the first log interval
    config.init_from = config_dict.placeholder(str)  # workdir whose latest params initialise this run
    # A NaN/Inf loss or gradient never updates the state; "stop" ends the run naming the step (before any
    # checkpoint of a later step), "skip" drops that update and goes on (counted in train/nonfinite).
    config.on_nonfinite = "stop"
    return config


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


def _check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} must be one of {allowed}, got {value!r}")


def _check_positive(field: str, value: Any, kind: type = int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{field} must be a positive {kind.__name__}, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"{field} must be a positive int, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the fields the model and commands rely on; raises `ConfigError` naming the field."""
    model = config.model
    _check_choice("model.name", model.name, ("mobilenet_v2",))
    _check_positive("model.width", model.width, float)
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
    _check_choice("model.output_stride", model.output_stride, OUTPUT_STRIDES)
    if not 0 <= model.dropout_rate < 1:
        raise ConfigError(f"model.dropout_rate must be in [0, 1), got {model.dropout_rate!r}")
    _check_choice("model.residual", model.residual, RESIDUAL_MODES)
    _check_choice("model.padding", model.padding, PADDING_MODES)
    _check_choice("model.depthwise", model.depthwise, ("auto", *DEPTHWISE_IMPLEMENTATIONS))
    _check_choice("model.pointwise", model.pointwise, ("auto", *POINTWISE_IMPLEMENTATIONS))
    _check_choice("model.regular_conv", model.regular_conv, ("auto", *REGULAR_CONV_IMPLEMENTATIONS))
    if model.inference_chunk is not None and (not isinstance(model.inference_chunk, int) or model.inference_chunk < 0):
        raise ConfigError(
            f"model.inference_chunk must be an int >= 0 (0 = the whole batch) or None (auto), "
            f"got {model.inference_chunk!r}"
        )
    _check_choice("model.preprocessing", model.preprocessing, PREPROCESSING_MODES)
    _check_choice("model.dtype", model.dtype, DTYPES)
    _check_positive("model.divisible_by", model.divisible_by)
    _check_positive("model.min_depth", model.min_depth)
    _check_positive("model.expansion_splits", model.expansion_splits)
    if model.expansion_splits > 1 and model.residual == "expansion":
        raise ConfigError(
            "model.expansion_splits > 1 needs model.residual in ('bottleneck', 'none'): the 'expansion' shortcut "
            "carries a block's whole expanded tensor to the next block"
        )
    if not 0 <= model.bn_momentum < 1:
        raise ConfigError(f"model.bn_momentum must be in [0, 1), got {model.bn_momentum!r}")
    _check_positive("model.bn_epsilon", model.bn_epsilon, float)
    if model.bn_group_size is not None:
        _check_positive("model.bn_group_size", model.bn_group_size)
    _check_positive("resolution", config.resolution)
    if config.resolution < model.output_stride:
        raise ConfigError(
            f"resolution={config.resolution} is too small for model.output_stride={model.output_stride}: the feature "
            f"map would reach 1x1 before the last stride-2 layers, which then stride over padding (Keras also "
            f"requires >= 32 at output stride 32); use resolution >= {model.output_stride} or a smaller output stride"
        )
    if config.eval_resolution is not None:
        _check_positive("eval_resolution", config.eval_resolution)
    _check_choice("task", config.task, TASKS)
    if config.task == "segmentation":
        validate_segmentation(config)
    if config.task == "detection":
        validate_detection(config)
    if "optimizer" in config:
        validate_training(config)


def require_task(config: ml_collections.ConfigDict, tasks: tuple[str, ...], what: str) -> None:
    """Raises a one-line error when `what` (a command, a workdir's use) does not serve `config.task` yet."""
    if config.task not in tasks:
        raise ConfigError(f"{what} does not serve task={config.task!r} yet; it serves task in {tasks}")


def validate_segmentation(config: ml_collections.ConfigDict) -> None:
    """Checks `config.segmentation` and what segmentation needs of `config.model`."""
    seg = config.segmentation
    _check_choice("model.output_stride (segmentation)", config.model.output_stride, SEGMENTATION_OUTPUT_STRIDES)
    if not isinstance(config.model.num_classes, int) or config.model.num_classes < 1:
        raise ConfigError(f"model.num_classes must be an int >= 1 for segmentation, got {config.model.num_classes!r}")
    layers = 2 + sum(stage_repeats(config.model.stage_repeats))  # the stem, the blocks, the last 1x1 conv
    if seg.feature_endpoint not in [f"layer_{i}" for i in range(2, layers + 1)]:
        raise ConfigError(
            f"segmentation.feature_endpoint must be one of layer_2 ... layer_{layers}, got {seg.feature_endpoint!r}"
        )
    _check_choice("segmentation.aspp", seg.aspp, (False, True))
    if seg.atrous_rates is not None and not (
        len(seg.atrous_rates) == 3 and all(isinstance(r, int) and r >= 1 for r in seg.atrous_rates)
    ):
        raise ConfigError(f"segmentation.atrous_rates must be three ints >= 1 or None (auto), got {seg.atrous_rates!r}")
    _check_positive("segmentation.head_features", seg.head_features)
    _check_range("segmentation.head_dropout_rate", seg.head_dropout_rate, 0.0, 1.0)
    _check_range("segmentation.head_bn_momentum", seg.head_bn_momentum, 0.0, 1.0)
    _check_positive("segmentation.head_bn_epsilon", seg.head_bn_epsilon, float)
    _check_choice("segmentation.fine_tune_batch_norm", seg.fine_tune_batch_norm, (False, True))
    scales = seg.eval_scales
    if not isinstance(scales, tuple) or not scales or not all(_is_number(x) and 0.1 <= x <= 4 for x in scales):
        raise ConfigError(f"segmentation.eval_scales must be a non-empty tuple of numbers in [0.1, 4], got {scales!r}")
    _check_choice("segmentation.eval_flip", seg.eval_flip, (False, True))


def validate_detection(config: ml_collections.ConfigDict) -> None:
    """Checks `config.detection` and what detection needs of `config.model`."""
    det = config.detection
    if not isinstance(config.model.num_classes, int) or config.model.num_classes < 1:
        raise ConfigError(
            f"model.num_classes must be an int >= 1 for detection (object classes, without the background), "
            f"got {config.model.num_classes!r}"
        )
    _check_choice("model.output_stride (detection)", config.model.output_stride, (32,))
    _check_choice("detection.head", det.head, DETECTION_HEADS)
    for field in ("max_boxes", "min_negatives_per_image", "max_detections"):
        _check_positive(f"detection.{field}", det[field])
    _check_range("detection.min_scale", det.min_scale, 1e-3, det.max_scale if _is_number(det.max_scale) else 1.0)
    _check_range("detection.max_scale", det.max_scale, det.min_scale, 1.0, closed_high=True)
    _check_range("detection.matched_threshold", det.matched_threshold, 0.0, 1.0, closed_high=True)
    _check_positive("detection.negatives_per_positive", det.negatives_per_positive, float)
    _check_range("detection.score_threshold", det.score_threshold, 0.0, 1.0)
    _check_range("detection.nms_iou_threshold", det.nms_iou_threshold, 0.0, 1.0, closed_high=True)
    _check_choice("detection.fine_tune_batch_norm", det.fine_tune_batch_norm, (False, True))
    if det.class_prior is not None:
        _check_range("detection.class_prior", det.class_prior, 1e-6, 1.0)
    if config.eval_resolution not in (None, config.resolution):
        raise ConfigError(
            f"eval_resolution={config.eval_resolution}: detection evaluates at `resolution` ({config.resolution}), "
            "where its anchors are; leave eval_resolution unset"
        )


OPTIMIZERS = ("rmsprop", "sgd", "adamw")
NONFINITE_POLICIES = ("stop", "skip")
CORRUPT_IMAGE_POLICIES = ("fail", "skip")  # image folders: see mnv2_jax.data.image_folder
MAX_LABEL_OFFSET = 255  # data.mask_label_offset: class ids are 8-bit in PNG masks
LR_SCALING = ("linear", "sqrt", "none")
SCHEDULES = ("exponential", "cosine", "constant")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(field: str, value: Any, low: float, high: float, *, closed_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{field} must be in [{low}, {high}{bracket}, got {value!r}")


def _check_interval(field: str, value: Any, low: float, high: float) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and low <= value[0] <= value[1] <= high):
        raise ConfigError(f"{field} must be a pair (lo, hi) with {low} <= lo <= hi <= {high}, got {value!r}")


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Checks the data, optimizer and loop fields used by `mnv2 train` / `mnv2 eval`."""
    if not isinstance(config.dataset, str) or not config.dataset:
        raise ConfigError(f"dataset must be a TFDS name, 'imagefolder:<root>' or 'voc:<root>', got {config.dataset!r}")
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _check_positive(field, config[field])
    _check_positive("num_epochs", config.num_epochs, float)
    if config.num_train_steps is not None:
        _check_positive("num_train_steps", config.num_train_steps)
    _check_positive("eval_every_epochs", config.eval_every_epochs, float)
    data = config.data
    _check_interval("data.area_range", data.area_range, 0.0, 1.0)
    _check_interval("data.aspect_ratio_range", data.aspect_ratio_range, 1e-3, 1e3)
    _check_range("data.min_object_covered", data.min_object_covered, 0.0, 1.0, closed_high=True)
    _check_range("data.eval_crop", data.eval_crop, 1e-6, 1.0, closed_high=True)
    _check_interval("data.scale_range", data.scale_range, 1e-3, 1e3)
    _check_range("data.scale_step", data.scale_step, 0.0, float("inf"))
    if data.class_names is not None and not all(isinstance(name, str) for name in data.class_names):
        raise ConfigError(f"data.class_names must be a tuple of strings or None, got {data.class_names!r}")
    if not isinstance(data.mask_feature, str) or not data.mask_feature:
        raise ConfigError(f"data.mask_feature must be the name of a dataset feature, got {data.mask_feature!r}")
    offset = data.mask_label_offset
    if not isinstance(offset, int) or isinstance(offset, bool) or not -MAX_LABEL_OFFSET <= offset <= MAX_LABEL_OFFSET:
        raise ConfigError(
            f"data.mask_label_offset must be an int in [{-MAX_LABEL_OFFSET}, {MAX_LABEL_OFFSET}], got {offset!r}"
        )
    covered = data.crop_min_object_covered
    if not isinstance(covered, tuple) or not covered or not all(_is_number(x) and 0 <= x <= 1 for x in covered):
        raise ConfigError(
            f"data.crop_min_object_covered must be a non-empty tuple of numbers in [0, 1], got {covered!r}"
        )
    _check_interval("data.crop_area_range", data.crop_area_range, 1e-3, 1.0)
    _check_interval("data.crop_aspect_ratio_range", data.crop_aspect_ratio_range, 1e-2, 1e2)
    _check_range("data.keep_image_probability", data.keep_image_probability, 0.0, 1.0, closed_high=True)
    _check_choice("data.photometric", data.photometric, (False, True))
    _check_positive("data.shuffle_buffer", data.shuffle_buffer)
    _check_choice("data.corrupt_images", data.corrupt_images, CORRUPT_IMAGE_POLICIES)
    opt = config.optimizer
    _check_choice("on_nonfinite", config.on_nonfinite, NONFINITE_POLICIES)
    _check_choice("optimizer.name", opt.name, OPTIMIZERS)
    _check_choice("optimizer.lr_scaling", opt.lr_scaling, LR_SCALING)
    _check_choice("optimizer.schedule", opt.schedule, SCHEDULES)
    _check_positive("optimizer.learning_rate", opt.learning_rate, float)
    _check_positive("optimizer.base_batch_size", opt.base_batch_size)
    _check_range("optimizer.decay_rate", opt.decay_rate, 0.0, 1.0, closed_high=True)
    _check_positive("optimizer.decay_epochs", opt.decay_epochs, float)
    _check_range("optimizer.warmup_epochs", opt.warmup_epochs, 0.0, float("inf"))
    _check_range("optimizer.rmsprop_decay", opt.rmsprop_decay, 0.0, 1.0)
    _check_range("optimizer.momentum", opt.momentum, 0.0, 1.0)
    _check_positive("optimizer.epsilon", opt.epsilon, float)
    _check_range("optimizer.weight_decay", opt.weight_decay, 0.0, 1.0)
    _check_range("optimizer.label_smoothing", opt.label_smoothing, 0.0, 1.0)
    if opt.ema_decay is not None:
        _check_range("optimizer.ema_decay", opt.ema_decay, 0.0, 1.0)
    if opt.grad_clip_norm is not None:
        _check_positive("optimizer.grad_clip_norm", opt.grad_clip_norm, float)


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
    """Rebuilds a config saved with `to_dict`, on top of `base_config()` so new fields get defaults."""
    config = base_config()

    def merge(target: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping) and key in target and isinstance(target[key], ml_collections.ConfigDict):
                merge(target[key], value)
            else:
                with target.ignore_type():
                    target[key] = tuple(value) if isinstance(value, list) else value

    merge(config, data)
    return config
