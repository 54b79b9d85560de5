"""Mobile DeepLabv3 (paper §6.3): the MobileNetV2 backbone to `layer_18` and DeepLabv3's head.

As released (DeepLab's `model.py` with MobileNetV2, see `shared/reference/mobilenet_v2.md` §9): image pooling
(global average -> 1x1 conv -> upsampling) next to a 1x1 conv, concatenated, projected by a 1x1 conv, dropout,
1x1 logits with a bias, and bilinear upsampling (corners aligned) to the input. The head's batch norms use
epsilon 1e-5 and decay 0.9997, and its activation is ReLU. The paper's ASPP variant adds three 3x3 atrous
convolutions (regular ones: that is what reproduces its 4.52M parameters). Parameter names follow DeepLab's
checkpoints, next to the backbone's own (`image_pooling`, `aspp0`, `aspp1..3`, `concat_projection`, `logits`),
so a classifier's backbone loads by name.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnv2_jax.models.layers import ConvBN, Conventions
from mnv2_jax.models.mobilenet_v2 import BackboneWithHead

SEGMENTATION_OUTPUT_STRIDES = (8, 16)
HEAD_SCOPES = ("image_pooling", "aspp0", "aspp1", "aspp2", "aspp3", "concat_projection", "logits")


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The paper's atrous rates: 6/12/18 at output stride 16, doubled at 8."""
    if output_stride not in SEGMENTATION_OUTPUT_STRIDES:
        raise ValueError(f"output stride must be one of {SEGMENTATION_OUTPUT_STRIDES}, got {output_stride}")
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


def interpolation_matrix(in_size: int, out_size: int, align_corners: bool = True) -> np.ndarray:
    """(out_size, in_size) weights of 1-D linear interpolation, as TF's `resize_bilinear` (and TFLite's
    RESIZE_BILINEAR) compute them: source coordinates in float32, no half-pixel centres."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    low = np.minimum(np.floor(source).astype(int), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    fraction = (source - low).astype(np.float64)
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), low), 1 - fraction)
    np.add.at(weights, (np.arange(out_size), high), fraction)
    return weights


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool = True) -> jax.Array:
    """Bilinear resizing of an NHWC tensor to `size` (height, width), as two small matrix products."""
    rows = jnp.asarray(interpolation_matrix(x.shape[1], size[0], align_corners), x.dtype)
    columns = jnp.asarray(interpolation_matrix(x.shape[2], size[1], align_corners), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", rows, x, columns)


class DeepLabHead(nn.Module):
    """DeepLabv3's head on a feature map: logits at the feature map's resolution."""

    num_classes: int
    conventions: Conventions  # the backbone's; the head's BN constants are below
    features: int = 256
    atrous_rates: tuple[int, ...] = ()  # empty: the released head (no ASPP)
    dropout_rate: float = 0.1  # DeepLab: keep probability 0.9
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-5
    logits_init_stddev: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = dataclasses.replace(self.conventions, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        pooled = jnp.mean(x.astype(conv.param_dtype), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = ConvBN(self.features, conv, activation=nn.relu, name="image_pooling")(pooled, train)
        # Upsampling a 1x1 map (corners aligned) repeats it.
        branches = [jnp.broadcast_to(pooled, (*x.shape[:3], self.features))]
        branches.append(ConvBN(self.features, conv, activation=nn.relu, name="aspp0")(x, train))
        for i, rate in enumerate(self.atrous_rates, start=1):
            branch = ConvBN(self.features, conv, 3, dilation=rate, activation=nn.relu, name=f"aspp{i}")
            branches.append(branch(x, train))
        y = jnp.concatenate(branches, axis=-1)
        y = ConvBN(self.features, conv, activation=nn.relu, name="concat_projection")(y, train)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        logits = nn.Conv(
            self.num_classes,
            (1, 1),
            use_bias=True,
            dtype=conv.dtype,
            param_dtype=conv.param_dtype,
            kernel_init=nn.initializers.truncated_normal(self.logits_init_stddev),
            name="logits",
        )(y)
        return logits.astype(conv.param_dtype)


class MobileDeepLabV3(BackboneWithHead):
    """Mobile DeepLabv3: `backbone` (a `MobileNetV2` with `num_classes=0`) and `head` share one parameter scope.

    Returns `(logits, endpoints)`: per-pixel logits upsampled to the input's size, and the backbone's endpoints
    plus `features` (the head's input) and `logits_features` (logits at the feature map's resolution).
    """

    head: DeepLabHead
    align_corners: bool = True
    # Inference only (DeepLab's eval_scales and add_flipped_images): the network runs on the input rescaled by each
    # scale, and on its mirror image too with `eval_flip`; the class probabilities are averaged.
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False

    @staticmethod
    def part_of(scope: str) -> str:
        """`backbone` or `head`, for a top-level parameter scope."""
        return "head" if scope in HEAD_SCOPES else "backbone"

    @property
    def multi_scale(self) -> bool:
        return tuple(self.eval_scales) != (1.0,) or self.eval_flip

    def _feature_logits(self, images: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        features, endpoints = self.backbone(images, train)
        logits = self.head(features, train)
        return logits, {**endpoints, "features": features, "logits_features": logits}

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        if not train and self.multi_scale:
            return self._multi_scale(images)
        logits, endpoints = self._feature_logits(images, train)
        logits = resize_bilinear(logits, images.shape[1:3], self.align_corners)
        endpoints["logits"] = logits
        return logits, endpoints

    def _multi_scale(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """DeepLab's multi-scale inference (`predict_labels_multi_scale`): for each scale s, the input resized to
        int((side - 1) * s + 1) (corners aligned), its feature-map logits resized straight to the input's size, and
        softmax; with flipping, the mirrored input's logits mirrored back as well. Returns the log of the mean
        probability (its argmax is DeepLab's prediction) and the endpoints of the last pass."""
        size = images.shape[1:3]
        probabilities, endpoints = [], {}
        for scale in self.eval_scales:
            scaled_size = tuple(int((side - 1) * scale + 1) for side in size)
            scaled = images if scaled_size == size else resize_bilinear(images, scaled_size, self.align_corners)
            for flipped in (False, True) if self.eval_flip else (False,):
                logits, endpoints = self._feature_logits(scaled[:, :, ::-1] if flipped else scaled, train=False)
                logits = resize_bilinear(logits[:, :, ::-1] if flipped else logits, size, self.align_corners)
                probabilities.append(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        logits = jnp.log(jnp.mean(jnp.stack(probabilities), axis=0)).astype(self.conventions.param_dtype)
        endpoints["logits"] = logits
        return logits, endpoints
