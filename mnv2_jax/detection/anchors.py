"""SSD anchors: the Object Detection API's `create_ssd_anchors` (multiple grid anchor generator)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """`ssd_anchor_generator` of `ssdlite_mobilenet_v2_coco.config` unless changed."""

    num_layers: int = 6
    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True


def layer_box_specs(spec: AnchorSpec) -> list[list[tuple[float, float]]]:
    """Per layer, its anchors' (scale, aspect ratio) pairs in the API's order."""
    scales = [
        spec.min_scale + (spec.max_scale - spec.min_scale) * i / (spec.num_layers - 1) for i in range(spec.num_layers)
    ] + [1.0]
    layers = []
    for layer, (scale, next_scale) in enumerate(itertools.pairwise(scales)):
        if layer == 0 and spec.reduce_boxes_in_lowest_layer:
            layers.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
            continue
        boxes = [(scale, ratio) for ratio in spec.aspect_ratios]
        if spec.interpolated_scale_aspect_ratio > 0:
            boxes.append((math.sqrt(scale * next_scale), spec.interpolated_scale_aspect_ratio))
        layers.append(boxes)
    return layers


def anchors_per_location(spec: AnchorSpec) -> list[int]:
    """The number of anchors at each position of each feature map (3, 6, 6, 6, 6, 6 for the release)."""
    return [len(boxes) for boxes in layer_box_specs(spec)]


def feature_map_sizes(resolution: int, num_layers: int = 6) -> list[int]:
    """The sides of SSDLite's feature maps for square inputs: output stride 16, 32, then halving (SAME padding)."""
    sizes = [math.ceil(resolution / 16), math.ceil(resolution / 32)]
    while len(sizes) < num_layers:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def generate(spec: AnchorSpec, sizes: list[tuple[int, int]]) -> np.ndarray:
    """All anchors `[N, 4]` (float32, normalised, not clipped) for feature maps of `sizes` (height, width): map by
    map, row-major positions, the anchors of a position in `layer_box_specs` order, which is the order of the
    predictors' outputs."""
    if len(sizes) != spec.num_layers:
        raise ValueError(f"{len(sizes)} feature maps for {spec.num_layers} anchor layers")
    boxes = []
    for (height, width), layer in zip(sizes, layer_box_specs(spec), strict=True):
        scales, ratios = np.array(layer, np.float64).T
        box_heights = scales / np.sqrt(ratios)
        box_widths = scales * np.sqrt(ratios)
        y_centers = (np.arange(height) + 0.5) / height
        x_centers = (np.arange(width) + 0.5) / width
        cy, cx, h = np.meshgrid(y_centers, x_centers, box_heights, indexing="ij")
        _, _, w = np.meshgrid(y_centers, x_centers, box_widths, indexing="ij")
        layer_boxes = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)
        boxes.append(layer_boxes.reshape(-1, 4))
    return np.concatenate(boxes).astype(np.float32)


def for_resolution(resolution: int, spec: AnchorSpec = AnchorSpec()) -> np.ndarray:
    """The anchors of square `resolution` inputs: 1917 at 300, 2034 at 320 with the release's spec."""
    return generate(spec, [(size, size) for size in feature_map_sizes(resolution, spec.num_layers)])


def spec_of(detection) -> AnchorSpec:
    """The anchor spec of a config's `detection` section (its scales; the rest as released)."""
    return AnchorSpec(min_scale=detection.min_scale, max_scale=detection.max_scale)
