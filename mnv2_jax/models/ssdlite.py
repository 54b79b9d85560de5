"""SSDLite (paper §6.2) on MobileNetV2, as the Object Detection API's `ssdlite_mobilenet_v2_coco` release builds it.

Feature maps (`ssd_mobilenet_v2_feature_extractor.py`): `layer_15/expansion_output` (output stride 16) and
`layer_19` (32), then four extra layers of depths 512, 256, 256, 128, each a 1x1 conv to half the depth, a 3x3
stride-2 conv (depthwise for SSDLite, regular for SSD) and a 1x1 conv to the depth, all BN + ReLU6. On each of the
six maps a box predictor: for SSDLite a depthwise 3x3 (BN, ReLU6) then a 1x1 conv with a bias, once for the box
codes (4 per anchor) and once for the class logits (classes + background per anchor); for regular SSD (Table 5's
comparison) one 3x3 conv with a bias each. Scope names follow the API's checkpoints
(`layer_19_1_Conv2d_2_1x1_256`, `BoxPredictor_0/BoxEncodingPredictor_depthwise`, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnv2_jax.models.layers import ConvBN, Conventions
from mnv2_jax.models.mobilenet_v2 import BackboneWithHead

HEADS = ("ssdlite", "ssd")
FEATURE_ENDPOINTS = ("layer_15/expansion_output", "layer_19")
EXTRA_DEPTHS = (512, 256, 256, 128)


def extra_layer_scopes(index: int, depth: int) -> tuple[str, str]:
    """The API's names of extra layer `index` (2..5)'s 1x1 and 3x3 convolutions."""
    return f"layer_19_1_Conv2d_{index}_1x1_{depth // 2}", f"layer_19_2_Conv2d_{index}_3x3_s2_{depth}"


def feature_endpoints(stage_repeats: tuple[int, ...]) -> tuple[str, str]:
    """The endpoints SSD reads from a backbone of `stage_repeats` blocks per stage: the expansion of stage 6's first
    block (output stride 16) and the last layer (32); `layer_15/expansion_output` and `layer_19` for the paper's."""
    first_of_stage_6 = 2 + sum(stage_repeats[:5])  # layer_1 is the stem
    return f"layer_{first_of_stage_6}/expansion_output", f"layer_{2 + sum(stage_repeats)}"


class BoxPredictor(nn.Module):
    """One feature map's box codes `[B, H*W*A, 4]` and class logits `[B, H*W*A, classes + 1]`."""

    num_anchors: int
    num_outputs: int  # classes + background
    conventions: Conventions
    head: str = "ssdlite"
    stddev: float = 0.03
    class_bias_init: float = 0.0  # the class logits' initial bias (the API's `class_prediction_bias_init`)

    def _branch(self, x: jax.Array, features: int, name: str, train: bool, bias_init: float = 0.0) -> jax.Array:
        conv = self.conventions
        kernel = 3
        if self.head == "ssdlite":
            x = ConvBN(x.shape[-1], conv, 3, depthwise=True, name=f"{name}_depthwise")(x, train)
            kernel = 1
        y = nn.Conv(
            features,
            (kernel, kernel),
            padding="SAME",
            use_bias=True,
            dtype=conv.dtype,
            param_dtype=conv.param_dtype,
            kernel_init=nn.initializers.truncated_normal(self.stddev),
            bias_init=nn.initializers.constant(bias_init),
            name=name,
        )(x.astype(conv.dtype))
        return y.reshape(y.shape[0], -1, features // self.num_anchors).astype(conv.param_dtype)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        boxes = self._branch(x, 4 * self.num_anchors, "BoxEncodingPredictor", train)
        classes = self._branch(x, self.num_outputs * self.num_anchors, "ClassPredictor", train, self.class_bias_init)
        return boxes, classes


class SSDHead(nn.Module):
    """The extra feature layers and the six box predictors, on the backbone's endpoints."""

    num_classes: int
    conventions: Conventions
    anchors_per_location: tuple[int, ...] = (3, 6, 6, 6, 6, 6)
    head: str = "ssdlite"
    extra_depths: tuple[int, ...] = EXTRA_DEPTHS
    depth_multiplier: float = 1.0
    min_depth: int = 16
    class_bias_init: float = 0.0
    # The backbone's maps the first two predictors read: stage 6's first expansion and the last 1x1 conv (other
    # layer numbers for networks of other depths, see `feature_endpoints`).
    feature_endpoints: tuple[str, str] = FEATURE_ENDPOINTS

    @nn.compact
    def __call__(self, endpoints: dict[str, jax.Array], train: bool) -> tuple[dict[str, jax.Array], list[jax.Array]]:
        if self.head not in HEADS:
            raise ValueError(f"detection.head must be one of {HEADS}, got {self.head!r}")
        conv = self.conventions
        maps = [endpoints[name] for name in self.feature_endpoints]
        x = maps[-1]
        for index, depth in enumerate(self.extra_depths, start=len(self.feature_endpoints)):
            depth = max(int(depth * self.depth_multiplier), self.min_depth)
            reduce_scope, conv_scope = extra_layer_scopes(index, depth)
            x = ConvBN(depth // 2, conv, name=reduce_scope)(x, train)
            if self.head == "ssdlite":
                x = ConvBN(depth // 2, conv, 3, stride=2, depthwise=True, name=f"{conv_scope}_depthwise")(x, train)
                x = ConvBN(depth, conv, name=conv_scope)(x, train)
            else:
                x = ConvBN(depth, conv, 3, stride=2, name=conv_scope)(x, train)
            maps.append(x)
        if len(maps) != len(self.anchors_per_location):
            raise ValueError(f"{len(maps)} feature maps for {len(self.anchors_per_location)} anchor layers")
        box_codes, class_logits = [], []
        for index, (feature_map, anchors) in enumerate(zip(maps, self.anchors_per_location, strict=True)):
            predictor = BoxPredictor(
                anchors,
                self.num_classes + 1,
                conv,
                self.head,
                class_bias_init=self.class_bias_init,
                name=f"BoxPredictor_{index}",
            )
            boxes, classes = predictor(feature_map, train)
            box_codes.append(boxes)
            class_logits.append(classes)
        outputs = {"box_codes": jnp.concatenate(box_codes, 1), "class_logits": jnp.concatenate(class_logits, 1)}
        return outputs, maps


class SSDLite(BackboneWithHead):
    """SSD(Lite): `backbone` (a `MobileNetV2` with `num_classes=0`) and `head` in one parameter scope.

    Returns `({"box_codes": [B, N, 4], "class_logits": [B, N, num_classes + 1]}, endpoints)` for the N anchors of
    `mnv2_jax.detection.anchors` in their order (column 0 of the logits is the background); the endpoints hold the
    backbone's and `feature_map_0` ... `feature_map_5`.
    """

    head: SSDHead

    @staticmethod
    def part_of(scope: str) -> str:
        """`backbone`, `extra_layers` or `predictors`, for a top-level parameter scope."""
        if scope.startswith("BoxPredictor_"):
            return "predictors"
        return "extra_layers" if scope.startswith("layer_19_") else "backbone"

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        _, endpoints = self.backbone(images, train)
        outputs, maps = self.head(endpoints, train)
        endpoints.update({f"feature_map_{i}": feature_map for i, feature_map in enumerate(maps)})
        return outputs, endpoints
