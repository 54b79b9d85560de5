"""Flax (Linen) models: the MobileNetV2 backbone/classifier, Mobile DeepLabv3, and their building blocks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mnv2_jax.detection import anchors
from mnv2_jax.models.deeplab import DeepLabHead, MobileDeepLabV3, aspp_rates
from mnv2_jax.models.layers import Conventions, make_divisible
from mnv2_jax.models.mobilenet_v2 import BackboneWithHead, LayerSpec, MobileNetV2, layer_specs, predict, stage_repeats
from mnv2_jax.models.ssdlite import SSDHead, SSDLite, feature_endpoints

__all__ = [
    "Conventions",
    "DeepLabHead",
    "LayerSpec",
    "MobileDeepLabV3",
    "MobileNetV2",
    "SSDHead",
    "SSDLite",
    "abstract_variables",
    "backbone_of",
    "build_detector",
    "build_model",
    "build_segmenter",
    "layer_specs",
    "make_divisible",
    "predict",
    "with_backbone",
]


def _fields_of(cls, cfg: ml_collections.ConfigDict) -> dict:
    """The dataclass fields of `cls` that `cfg` sets (config and module use the same names; `model.name` names
    the architecture, not a Flax scope)."""
    names = {field.name for field in dataclasses.fields(cls)} - {"name", "parent"}
    return {name: cfg[name] for name in names if name in cfg}


def _model_config(model_config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(model_config.to_dict())
    with cfg.ignore_type():
        cfg.update(overrides)
    return cfg


def _backbone(cfg: ml_collections.ConfigDict, **fields) -> MobileNetV2:
    conventions = Conventions(**{**_fields_of(Conventions, cfg), "dtype": jnp.dtype(cfg.dtype)})
    expansion = tuple(cfg.stage_expansion) if cfg.stage_expansion is not None else cfg.expansion
    kwargs = {**_fields_of(MobileNetV2, cfg), "expansion": expansion, "conventions": conventions, **fields}
    return MobileNetV2(**kwargs)


def build_model(model_config: ml_collections.ConfigDict, **overrides) -> MobileNetV2:
    """The classifier described by `config.model`; keyword overrides replace fields (e.g. `depthwise="grouped"`)."""
    return _backbone(_model_config(model_config, overrides))


def build_segmenter(
    model_config: ml_collections.ConfigDict, segmentation: ml_collections.ConfigDict, **overrides
) -> MobileDeepLabV3:
    """Mobile DeepLabv3 described by `config.model` (backbone, classes) and `config.segmentation` (head)."""
    cfg = _model_config(model_config, overrides)
    backbone = _backbone(cfg, num_classes=0, final_endpoint=segmentation.feature_endpoint)
    rates = () if not segmentation.aspp else tuple(segmentation.atrous_rates or aspp_rates(cfg.output_stride))
    head = DeepLabHead(
        num_classes=cfg.num_classes,
        conventions=backbone.conventions,
        features=segmentation.head_features,
        atrous_rates=rates,
        dropout_rate=segmentation.head_dropout_rate,
        bn_momentum=segmentation.head_bn_momentum,
        bn_epsilon=segmentation.head_bn_epsilon,
    )
    return MobileDeepLabV3(
        backbone,
        head,
        eval_scales=tuple(segmentation.eval_scales),
        eval_flip=segmentation.eval_flip,
    )


def class_bias_init(prior: float | None) -> float:
    """The class logits' initial bias for an initial sigmoid score of `prior` (RetinaNet's); 0 (a score of 1/2,
    the SSDLite release's) when None."""
    return 0.0 if prior is None else -math.log((1 - prior) / prior)


def build_detector(
    model_config: ml_collections.ConfigDict, detection: ml_collections.ConfigDict, **overrides
) -> SSDLite:
    """SSD(Lite) described by `config.model` (backbone, object classes) and `config.detection` (head, anchors)."""
    cfg = _model_config(model_config, overrides)
    endpoints = feature_endpoints(stage_repeats(cfg.stage_repeats))
    backbone = _backbone(cfg, num_classes=0, head_endpoints=endpoints)
    spec = anchors.spec_of(detection)
    head = SSDHead(
        num_classes=cfg.num_classes,
        conventions=backbone.conventions,
        anchors_per_location=tuple(anchors.anchors_per_location(spec)),
        head=detection.head,
        depth_multiplier=cfg.width,
        class_bias_init=class_bias_init(
            detection.class_prior
        ),  # the extra layers' depths, as the API's feature extractor scales them
        feature_endpoints=endpoints,
    )
    return SSDLite(backbone, head)


TaskModel = MobileNetV2 | MobileDeepLabV3 | SSDLite


def abstract_variables(model: nn.Module, resolution: int, in_channels: int = 3) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s variables for square inputs, without allocating them."""
    images = jax.ShapeDtypeStruct((1, resolution, resolution, in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def backbone_of(model: TaskModel) -> MobileNetV2:
    """The MobileNetV2 inside a task's model (the classifier is its own backbone)."""
    return model.backbone if isinstance(model, BackboneWithHead) else model


def with_backbone(model: TaskModel, backbone: MobileNetV2) -> TaskModel:
    """`model` with its MobileNetV2 replaced (e.g. by a clone with other inference settings)."""
    return model.clone(backbone=backbone) if isinstance(model, BackboneWithHead) else backbone
