"""MobileNetV2 (Sandler et al., 2018) as in the authors' TF-slim code.

Layer table, channel rounding, output-stride rewriting and endpoint names follow
`research/slim/nets/mobilenet/` (see `shared/reference/mobilenet_v2.md`). The
model returns `(logits, endpoints)`; with `num_classes=0` it is the backbone and
returns the last feature map instead of logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mnv2_jax.models import splits
from mnv2_jax.models.layers import ConvBN, Conventions, make_divisible, relu6
from mnv2_jax.models.rematerialization import rematerialized

# (expansion t, output channels c, repeats n, first stride s) of paper Table 2.
BLOCK_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_FEATURES = 32
LAST_FEATURES = 1280
RESIDUAL_MODES = ("bottleneck", "expansion", "none")
OUTPUT_STRIDES = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One of the 19 spec ops: `layer_1` (stem), `layer_2..18` (blocks), `layer_19` (last 1x1 conv)."""

    endpoint: str
    scope: str
    in_features: int
    out_features: int
    expanded_features: int | None  # None for plain convs; == in_features when the block has no expansion
    stride: int
    dilation: int

    @property
    def has_expansion(self) -> bool:
        return self.expanded_features is not None and self.expanded_features > self.in_features

    @property
    def residual(self) -> bool:
        return self.expanded_features is not None and self.stride == 1 and self.in_features == self.out_features


def stage_expansions(expansion: float | Sequence[float]) -> tuple[float, ...]:
    """Expansion factor per stage: a global value applies to every stage but the first (t=1)."""
    if isinstance(expansion, (int, float)):
        return (1,) + (expansion,) * (len(BLOCK_STAGES) - 1)
    expansion = tuple(expansion)
    if len(expansion) != len(BLOCK_STAGES):
        raise ValueError(
            f"model.expansion per stage needs {len(BLOCK_STAGES)} values (one per stage), got {len(expansion)}"
        )
    return expansion


def stage_repeats(repeats: Sequence[int] | None) -> tuple[int, ...]:
    """Blocks per stage: Table 2's `n` column unless given (7 values, e.g. shallower networks for a depth sweep)."""
    if repeats is None:
        return tuple(n for _, _, n, _ in BLOCK_STAGES)
    repeats = tuple(repeats)
    if len(repeats) != len(BLOCK_STAGES) or any(not isinstance(n, int) or n < 1 for n in repeats):
        raise ValueError(f"model.stage_repeats needs {len(BLOCK_STAGES)} ints >= 1 (one per stage), got {repeats!r}")
    return repeats


def layer_specs(
    width: float = 1.0,
    expansion: float | Sequence[float] = 6,
    output_stride: int = 32,
    divisible_by: int = 8,
    min_depth: int = 8,
    in_features: int = 3,
    repeats: Sequence[int] | None = None,
) -> list[LayerSpec]:
    """The backbone's layer table for a width multiplier, expansion ratio(s), output stride and blocks per stage.

    Widths follow slim's `depth_multiplier` (the last conv stays 1280 below
    width 1.0); expansions are `make_divisible(in * t, 8)` of the already scaled
    input. Once the running stride reaches `output_stride`, later strides become
    1 and their depthwise convs are dilated instead (atrous rewriting).
    """

    def depth(channels: float) -> int:
        return make_divisible(channels * width, divisible_by, min_depth)

    current_stride, rate = 1, 1

    def place(stride: int) -> tuple[int, int]:
        nonlocal current_stride, rate
        if current_stride == output_stride:
            layer_stride, layer_rate = 1, rate
            rate *= stride
        else:
            layer_stride, layer_rate = stride, 1
            current_stride *= stride
        return layer_stride, layer_rate

    specs = []
    stem = depth(STEM_FEATURES)
    stride, dilation = place(2)
    specs.append(LayerSpec("layer_1", "Conv", in_features, stem, None, stride, dilation))
    features, block = stem, 0
    stages = zip(stage_expansions(expansion), BLOCK_STAGES, stage_repeats(repeats), strict=True)
    for t, (_, c, _, s), n in stages:
        out = depth(c)
        for i in range(n):
            stride, dilation = place(s if i == 0 else 1)
            expanded = features if t == 1 else make_divisible(features * t, 8)
            scope = "expanded_conv" if block == 0 else f"expanded_conv_{block}"
            specs.append(LayerSpec(f"layer_{len(specs) + 1}", scope, features, out, expanded, stride, dilation))
            features, block = out, block + 1
    last = make_divisible(LAST_FEATURES * max(1.0, width), divisible_by, min_depth)
    specs.append(LayerSpec(f"layer_{len(specs) + 1}", "Conv_1", features, last, None, 1, 1))
    return specs


class InvertedResidual(nn.Module):
    """[1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN (+ residual).

    `expansion_shortcut`, when given, is added to this block's expanded tensor
    (the paper's "shortcut between expansions" ablation).
    """

    spec: LayerSpec
    conventions: Conventions
    residual: str = "bottleneck"
    nonlinear_bottleneck: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool, expansion_shortcut: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        spec, conv = self.spec, self.conventions
        endpoints = {}
        inputs = x
        if spec.has_expansion:
            x = ConvBN(spec.expanded_features, conv, name="expand")(x, train)
            if expansion_shortcut is not None:
                x = x + expansion_shortcut
            endpoints["expansion_output"] = x
        x = ConvBN(
            spec.expanded_features,
            conv,
            kernel_size=3,
            stride=spec.stride,
            dilation=spec.dilation,
            depthwise=True,
            name="depthwise",
        )(x, train)
        endpoints["depthwise_output"] = x
        activation = relu6 if self.nonlinear_bottleneck else None
        x = ConvBN(spec.out_features, conv, activation=activation, name="project")(x, train)
        if self.residual == "bottleneck" and spec.residual:
            x = x + inputs
        return x, endpoints


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier or backbone (`num_classes=0`).

    Returns `(logits, endpoints)` where endpoints hold `layer_1` ... `layer_19`,
    `layer_N/expansion_output`, `layer_N/depthwise_output`, and for a classifier
    `pre_logits` (pooled features) and `logits`. Without a head the first
    element is the last feature map (`layer_19`).
    """

    width: float = 1.0
    expansion: float | tuple[float, ...] = 6.0
    num_classes: int = 1000
    output_stride: int = 32
    dropout_rate: float = 0.2
    residual: str = "bottleneck"
    nonlinear_bottleneck: bool = False
    divisible_by: int = 8
    min_depth: int = 8
    conventions: Conventions = Conventions()
    remat: bool = False  # rematerialise each inverted-residual block (its expanded tensors) for the gradient
    inference_chunk: int | None = None  # images per device run together by `predict` (0: all; None: auto)
    final_endpoint: str | None = None  # None: the last layer; a backbone (`num_classes=0`) may stop earlier (slim's)
    stage_repeats: tuple[int, ...] | None = None  # blocks per stage; None: the paper's (1, 2, 3, 4, 3, 3, 1)
    # Inference only: each block run in this many groups of its expansion channels (`mnv2_jax.models.splits`); the
    # stem joins the first block, the last conv the pooling. 1: every tensor whole. Blocks whose inner endpoints
    # are in `head_endpoints` (read by a task's head) stay whole.
    expansion_splits: int = 1
    head_endpoints: tuple[str, ...] = ()

    def specs(self, in_features: int = 3) -> list[LayerSpec]:
        specs = layer_specs(
            self.width,
            self.expansion,
            self.output_stride,
            self.divisible_by,
            self.min_depth,
            in_features,
            self.stage_repeats,
        )
        endpoints = [spec.endpoint for spec in specs]
        if self.final_endpoint is None:
            return specs
        if self.final_endpoint not in endpoints:
            raise ValueError(f"final_endpoint must be one of layer_1 ... {endpoints[-1]}, got {self.final_endpoint!r}")
        if self.num_classes and self.final_endpoint != endpoints[-1]:
            raise ValueError(f"a classifier ends at {endpoints[-1]}; final_endpoint needs num_classes=0")
        return specs[: endpoints.index(self.final_endpoint) + 1]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.residual not in RESIDUAL_MODES:
            raise ValueError(f"model.residual must be one of {RESIDUAL_MODES}, got {self.residual!r}")
        conv = self.conventions
        endpoints: dict[str, jax.Array] = {}
        x = images
        pending_shortcut = None  # expanded tensor carried to the next block ("expansion" residuals)
        specs = self.specs(images.shape[-1])
        split = self.split_plan(specs) if self.expansion_splits > 1 and not train and not self.is_initializing() else {}
        for index, spec in enumerate(specs):
            if spec.endpoint in split:
                pending_shortcut = None
                if split[spec.endpoint] == "stem":  # computed with the first block
                    continue
                x = self._split_layer(x, specs, index, split[spec.endpoint])
                if split[spec.endpoint] == "conv+pool":  # x: the pooled features
                    break
                endpoints[spec.endpoint] = x
                continue
            if spec.expanded_features is None:
                kernel = 3 if spec.endpoint == "layer_1" else 1
                x = ConvBN(spec.out_features, conv, kernel, spec.stride, spec.dilation, name=spec.scope)(x, train)
                pending_shortcut = None
            else:
                block = InvertedResidual(spec, conv, self.residual, self.nonlinear_bottleneck, name=spec.scope)
                shortcut = pending_shortcut if spec.has_expansion else None
                if shortcut is not None and shortcut.shape[-1] != spec.expanded_features:
                    shortcut = None
                if self.remat:
                    x, block_endpoints = rematerialized(block, x, train, shortcut)
                else:
                    x, block_endpoints = block(x, train, shortcut)
                endpoints.update({f"{spec.endpoint}/{k}": v for k, v in block_endpoints.items()})
                has_shortcut = self.residual == "expansion" and spec.residual and spec.has_expansion
                pending_shortcut = block_endpoints["expansion_output"] if has_shortcut else None
            endpoints[spec.endpoint] = x
        if not self.num_classes:
            return x, endpoints

        pooled = x if x.ndim == 2 else jnp.mean(x.astype(conv.param_dtype), axis=(1, 2))
        endpoints["pre_logits"] = pooled
        pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
        logits = nn.Dense(
            self.num_classes,
            dtype=conv.dtype,
            param_dtype=conv.param_dtype,
            kernel_init=nn.initializers.truncated_normal(conv.init_stddev),
            name="Logits",
        )(pooled)
        logits = logits.astype(conv.param_dtype)
        endpoints["logits"] = logits
        return logits, endpoints

    def split_plan(self, specs: list[LayerSpec]) -> dict[str, str]:
        """Which layers run in groups (`expansion_splits`) and how: `{endpoint: "block" | "stem+block" |
        "conv+pool" | "stem"}` ("stem": computed inside the next block, so skipped)."""
        plan = {}
        for index, spec in enumerate(specs):
            if spec.expanded_features is not None:
                if any(name.startswith(f"{spec.endpoint}/") for name in self.head_endpoints):
                    continue
                if spec.has_expansion and self.residual != "expansion":
                    plan[spec.endpoint] = "block"
                elif index == 1 and specs[0].endpoint not in self.head_endpoints:
                    plan[specs[0].endpoint], plan[spec.endpoint] = "stem", "stem+block"
            elif index == len(specs) - 1 and index > 0 and self.num_classes:
                plan[spec.endpoint] = "conv+pool"
        return plan

    def _split_layer(self, x: jax.Array, specs: list[LayerSpec], index: int, how: str) -> jax.Array:
        """Layer `specs[index]` computed in groups of channels, from this model's stored variables."""
        spec, conv = specs[index], self.conventions
        variables = self.variables
        if how == "conv+pool":
            last_conv = splits.folded_conv(variables, (spec.scope,), conv)
            return splits.conv_and_pool(x, last_conv, conv, self.expansion_splits)
        stem = None
        if how == "stem+block":
            first = specs[0]
            stem = (splits.folded_conv(variables, (first.scope,), conv), first.stride, first.dilation)
        return splits.inverted_residual(
            x,
            splits.folded_conv(variables, (spec.scope, "expand"), conv) if spec.has_expansion else None,
            splits.folded_conv(variables, (spec.scope, "depthwise"), conv),
            splits.folded_conv(variables, (spec.scope, "project"), conv),
            spec,
            conv,
            self.expansion_splits,
            residual=self.residual == "bottleneck" and spec.residual,
            nonlinear_bottleneck=self.nonlinear_bottleneck,
            stem=stem,
        )


class BackboneWithHead(nn.Module):
    """A task's model: `backbone` (a `MobileNetV2` with `num_classes=0`) and a task's `head`, in one parameter scope,
    so that an ImageNet classifier's backbone loads by name."""

    backbone: MobileNetV2
    head: nn.Module

    def setup(self) -> None:
        if self.backbone.num_classes:
            raise ValueError(f"the backbone of {type(self).__name__} must have num_classes=0")
        nn.share_scope(self, self.backbone)
        nn.share_scope(self, self.head)

    @property
    def conventions(self) -> Conventions:
        return self.backbone.conventions

    @property
    def inference_chunk(self) -> int | None:
        return self.backbone.inference_chunk


# Chunks per loop iteration in `predict`: XLA runs the unrolled chunks concurrently; a loop of single chunks
# was slower on XLA:CPU than the whole batch at once (measured in docs/benchmarks.md, as the CPU default below).
_PREDICT_UNROLL = 4
_AUTO_INFERENCE_CHUNK = {"cpu": 1}


def resolve_inference_chunk(chunk: int | None, backend: str | None = None) -> int:
    """Images per device per chunk in inference, 0 for the whole batch; `None` picks per backend (CPU: 1)."""
    if chunk is None:
        return _AUTO_INFERENCE_CHUNK.get(backend or jax.default_backend(), 0)
    return chunk


def predict(model: nn.Module, variables: dict, images: jax.Array, batch_shards: int = 1) -> Any:
    """`model.apply(variables, images, train=False)[0]`, run `model.inference_chunk` images per device at a time.

    Chunking changes only the order of the work: every image goes through the same network (inference batch
    norm uses the stored statistics). On CPU, one image at a time keeps each layer's activations in cache.
    `batch_shards` is the number of devices the batch is split over (contiguous blocks, as `NamedSharding`
    splits it); each chunk takes the same number of images from every block, so no device exchanges images.
    """

    def forward(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, train=False)[0]

    batch = images.shape[0]
    per_device = batch // batch_shards
    chunk = resolve_inference_chunk(model.inference_chunk)
    if not chunk or chunk >= per_device or batch % batch_shards:
        return forward(images)
    chunk = max(c for c in range(1, chunk + 1) if per_device % c == 0)
    steps = per_device // chunk

    def by_step(x: jax.Array) -> jax.Array:  # (batch, ...) -> (steps, batch_shards * chunk, ...)
        x = x.reshape(batch_shards, steps, chunk, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(steps, batch_shards * chunk, *x.shape[3:])

    def in_batch_order(y: jax.Array) -> jax.Array:  # (steps, batch_shards * chunk, ...) -> (batch, ...)
        y = y.reshape(steps, batch_shards, chunk, *y.shape[2:]).swapaxes(0, 1)
        return y.reshape(batch, *y.shape[3:])

    _, outputs = lax.scan(lambda _, x: (None, forward(x)), None, by_step(images), unroll=min(_PREDICT_UNROLL, steps))
    return jax.tree.map(in_batch_order, outputs)  # logits, or a detector's dict of outputs
