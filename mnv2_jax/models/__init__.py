"""Flax (Linen) models: the MobileNetV2 backbone/classifier and its building blocks."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from mnv2_jax.models.layers import Conventions, make_divisible
from mnv2_jax.models.mobilenet_v2 import LayerSpec, MobileNetV2, layer_specs, predict

__all__ = ["Conventions", "LayerSpec", "MobileNetV2", "build_model", "layer_specs", "make_divisible", "predict"]


def build_model(model_config: ml_collections.ConfigDict, **overrides) -> MobileNetV2:
    """The model described by `config.model`; keyword overrides replace fields (e.g. `depthwise="grouped"`)."""
    cfg = ml_collections.ConfigDict(model_config.to_dict())
    with cfg.ignore_type():
        cfg.update(overrides)
    conventions = Conventions(
        padding=cfg.padding,
        bn_momentum=cfg.bn_momentum,
        bn_epsilon=cfg.bn_epsilon,
        bn_group_size=cfg.bn_group_size,
        depthwise=cfg.depthwise,
        pointwise=cfg.pointwise,
        regular_conv=cfg.regular_conv,
        init_stddev=cfg.init_stddev,
        dtype=jnp.dtype(cfg.dtype),
    )
    expansion = tuple(cfg.stage_expansion) if cfg.stage_expansion is not None else cfg.expansion
    return MobileNetV2(
        width=cfg.width,
        expansion=expansion,
        num_classes=cfg.num_classes,
        output_stride=cfg.output_stride,
        dropout_rate=cfg.dropout_rate,
        residual=cfg.residual,
        nonlinear_bottleneck=cfg.nonlinear_bottleneck,
        remat=cfg.remat,
        inference_chunk=cfg.inference_chunk,
        divisible_by=cfg.divisible_by,
        min_depth=cfg.min_depth,
        conventions=conventions,
    )
