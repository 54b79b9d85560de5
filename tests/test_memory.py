"""Memory-efficient inference: blocks in groups of expansion channels (`model.expansion_splits`), the activation
memory accounting (`mnv2 summary --memory`) and the paper's Table 3 (docs/memory.md)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_jax import config as config_lib
from mnv2_jax import models, tasks
from mnv2_jax.models import memory
from mnv2_jax.models.layers import Conventions
from mnv2_jax.models.mobilenet_v2 import MobileNetV2

# Table 3 of the paper (arXiv v4), MobileNetV2 column: size -> (max channels, memory in K = 1000 bytes at 16 bits).
TABLE3_MOBILENET_V2 = {112: (16, 400), 56: (32, 200), 28: (64, 100), 14: (160, 62), 7: (320, 32), 1: (1280, 2)}
TABLE3_MOBILENET_V1 = {112: (64, 1600), 56: (128, 800), 28: (256, 400), 14: (512, 200), 1: (1024, 2)}


def _kilobytes(size: int, channels: int, bytes_per_element: int = 2) -> float:
    return size * size * channels * bytes_per_element / 1000


def _close_to_printed(value: float, printed: float) -> bool:
    """The paper prints two or three digits, rounded or cut: within 1 K or 3%."""
    return abs(value - printed) <= max(1.0, 0.03 * printed)


def _calibrated(model, variables: dict, images: jax.Array, seed: int = 3) -> dict:
    """Random batch norm offsets (so that ReLU6 leaves about half the channels alive), then the stored statistics
    set to the images' own batch statistics, layer after layer, as training would leave them: activations of order
    1 throughout, so that rounding differences are not amplified from block to block."""

    def offset(path, leaf):
        if jax.tree_util.keystr(path).endswith("['BatchNorm']['bias']"):
            key = jax.random.fold_in(jax.random.key(seed), hash(jax.tree_util.keystr(path)) % 2**31)
            return jax.random.uniform(key, leaf.shape, leaf.dtype, -0.5, 1.0)
        return leaf

    variables = jax.tree_util.tree_map_with_path(offset, variables)
    backbone = models.backbone_of(model)
    momentum_zero = backbone.clone(conventions=dataclasses.replace(backbone.conventions, bn_momentum=0.0))
    calibrating = models.with_backbone(model, momentum_zero)
    _, stats = jax.jit(
        lambda v, x: calibrating.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    )(variables, images)
    return {**variables, **stats}


def _assert_close(actual, desired, tolerance: float) -> None:
    """Equal up to `tolerance` relative to the tensor's largest value (rounding differs only in the order of the
    projection's additions)."""
    scale = float(np.max(np.abs(desired)))
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tolerance * scale)


# (width, groups, padding, other options): every width of the released checkpoints and more; groups that do not
# divide the channel counts; both padding conventions; the ablations' bottleneck variants.
SPLIT_CASES = [
    (0.35, 5, "same", {}),
    (0.5, 7, "symmetric", {}),
    (0.75, 3, "same", {"nonlinear_bottleneck": True}),
    (1.0, 6, "symmetric", {}),
    (1.3, 7, "same", {"residual": "none"}),
    (1.4, 5, "same", {}),
]


@pytest.mark.parametrize("width, splits, padding, options", SPLIT_CASES)
def test_split_blocks_equal_whole_blocks(width, splits, padding, options):
    """Every block output and the logits of the split network equal the whole network's in float64 (the only
    difference is the order of the projection's additions), for groups that do not divide the channels."""
    with jax.enable_x64():
        model = MobileNetV2(
            width=width, num_classes=10, conventions=Conventions(padding=padding, dtype=jnp.float64), **options
        )
        images = jax.random.normal(jax.random.key(1), (2, 33, 33, 3), jnp.float64)
        variables = _calibrated(model, jax.jit(model.init)(jax.random.key(0), images), images)
        specs = model.specs()
        split_channels = [spec.expanded_features or spec.out_features for spec in specs[1:]]  # blocks, last conv
        assert any(channels % splits for channels in split_channels), "a ragged last group"
        split_model = model.clone(expansion_splits=splits)
        both = jax.jit(lambda v, x: (model.apply(v, x), split_model.apply(v, x)))  # one compilation
        (whole_logits, whole), (split_logits, split) = both(variables, images)
        assert sorted(model.split_plan(specs).values()).count("block") == sum(s.has_expansion for s in specs)
        for spec in specs[1:-1]:  # the stem's and the last conv's outputs are never whole when split
            _assert_close(split[spec.endpoint], whole[spec.endpoint], 1e-9)
        _assert_close(split_logits, whole_logits, 1e-9)
        assert "layer_1" not in split and "layer_19" not in split
        if width == 1.0:  # training ignores the option: the same outputs and updated statistics
            rngs = {"dropout": jax.random.key(2)}
            both_train = [model, split_model]
            train = jax.jit(
                lambda v, x: [m.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs) for m in both_train]
            )(variables, images)
            jax.tree.map(np.testing.assert_array_equal, train[0], train[1])


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_split_backbone_under_a_head(task):
    """The segmenter and the detector give the same outputs with split blocks; the detector keeps the block whose
    expansion it reads (layer_15/expansion_output) whole."""
    config = config_lib.base_config(task=task)
    config.resolution = 64
    config.model.width, config.model.num_classes = 0.35, 3
    whole_model = tasks.get(config).build_model()
    config.model.expansion_splits = 4
    split_model = tasks.get(config).build_model()
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    variables = _calibrated(whole_model, jax.jit(whole_model.init)(jax.random.key(0), images), images)
    whole, split = jax.jit(lambda v, x: [m.apply(v, x)[0] for m in (whole_model, split_model)])(variables, images)
    jax.tree.map(lambda a, b: _assert_close(a, b, 1e-4), split, whole)  # float32
    plan = split_model.backbone.split_plan(split_model.backbone.specs())
    if task == "detection":
        assert "layer_15" not in plan and plan["layer_16"] == "block"
    assert "conv+pool" not in plan.values()  # no classifier's pooling to join


def test_accounting_reproduces_table3_of_the_paper():
    """Table 3's MobileNetV2 column from the layer table: the paper's rule (the widest tensor materialised at each
    spatial size, 16-bit, K = 1000 bytes) gives its 112x112, 7x7 and 1x1 rows and its maximum, 400K (arXiv v4);
    the other printed version's 200K drops the 112x112 row (1/O(1)) and takes the 56x56 row's 32 channels.
    The paper's 56, 28 and 14 rows list the widest block output among the blocks that read that size (the stage
    that strides down from it), not a tensor kept at that size; ours are asserted exactly."""
    model = MobileNetV2()
    rows = {r["size"]: r for r in memory.with_bytes(memory.activation_memory(model, 224, 6), "float16")["table3"]}
    assert sorted(rows) == sorted(TABLE3_MOBILENET_V2)
    for size in (112, 7, 1):
        channels, printed = TABLE3_MOBILENET_V2[size]
        assert rows[size]["channels"] == channels
        assert _close_to_printed(rows[size]["bytes"] / 1000, printed), (size, rows[size])
    assert max(rows.values(), key=lambda r: r["bytes"])["size"] == 112
    assert _close_to_printed(max(r["bytes"] for r in rows.values()) / 1000, 400)
    assert not _close_to_printed(max(r["bytes"] for r in rows.values()) / 1000, 200)
    # the printed memory column is size^2 x channels x 2 bytes for both networks (16-bit activations, K = 1000)
    for table in (TABLE3_MOBILENET_V2, TABLE3_MOBILENET_V1):
        for size, (channels, printed) in table.items():
            assert _close_to_printed(_kilobytes(size, channels), printed), (size, channels, printed)
    # the other version: without the 112x112 row, the maximum is the 56x56 row, 200K (800K for MobileNetV1)
    assert _close_to_printed(max(_kilobytes(s, c) for s, (c, _) in TABLE3_MOBILENET_V2.items() if s < 112), 200)
    assert _close_to_printed(max(_kilobytes(s, c) for s, (c, _) in TABLE3_MOBILENET_V1.items() if s < 112), 800)
    # where the paper's 56/28/14/7 channels come from: the widest output of the blocks whose input has that size
    specs, size, read_at = model.specs(), 112, {}  # the blocks start after the stem's stride 2
    for spec in specs[1:-1]:
        read_at[size] = max(read_at.get(size, 0), spec.out_features)
        size = -(-size // spec.stride)
    for size in (56, 28, 14, 7):
        assert read_at[size] == TABLE3_MOBILENET_V2[size][0], size
    assert read_at[112] == 24 != TABLE3_MOBILENET_V2[112][0]  # that rule does not give the 112x112 row
    # Our rows, from the layer table: the widest tensor kept whole at each size, 2 bytes per element. Every block
    # runs split, so its outputs are its only whole tensors: 112x112, the first block's 16 (the stem's 32 never
    # whole); 56x56, layer_3-4's 24; 28x28, layer_5-7's 32; 14x14, layer_8-11's 64 and layer_12-14's 96; 7x7,
    # layer_15-17's 160 and layer_18's 320; 1x1, the 1280 pooled features (the logits have 1001).
    assert {size: (row["channels"], row["bytes"]) for size, row in rows.items()} == {
        112: (16, 112 * 112 * 16 * 2),
        56: (24, 56 * 56 * 24 * 2),
        28: (32, 28 * 28 * 32 * 2),
        14: (96, 14 * 14 * 96 * 2),
        7: (320, 7 * 7 * 320 * 2),
        1: (1280, 1280 * 2),
    }


def test_split_schedule_peaks():
    """The accounting's live sets for MobileNetV2 1.0 at 224x224, checked by hand from the layer table: the naive
    peak is layer_3 (112x112x96 expanded + 56x56x96 filtered); split in t groups it holds the input, the output and
    1/t of both; one channel per group leaves the first block (image + 112x112x16 output) as the peak."""
    model = MobileNetV2()
    naive = memory.activation_memory(model, 224, 1)
    assert naive["naive_peak"] == naive["split_peak"] == {"elements": 112 * 112 * 96 + 56 * 56 * 96, "layer": "layer_3"}
    for t in (2, 3, 4, 5, 6):
        peak = memory.activation_memory(model, 224, t)["split_peak"]
        assert peak["layer"] == "layer_3"
        group = -(-96 // t)
        assert peak["elements"] == 112 * 112 * 16 + 56 * 56 * 24 + group * (112 * 112 + 56 * 56), t
    finest = memory.activation_memory(model, 224, 1280)["split_peak"]
    assert finest == {"elements": 224 * 224 * 3 + 112 * 112 * 16 + 2 * 112 * 112, "layer": "layer_2"}
    shapes = {row["endpoint"]: row["split_as"] for row in naive["layers"]}
    assert shapes["layer_1"] == shapes["layer_2"] == shapes["layer_19"] == "whole"


def test_summary_memory_cli(mnv2):
    """`mnv2 summary --memory` as JSON and as a table: per-layer rows, the peaks by t in bytes of the chosen dtype."""
    status, out, err = mnv2("summary", "--config", "configs/imagenet.py", "--memory", "--per-layer", "--json")
    assert status == 0, err
    summary = json.loads(out)["memory"]
    assert summary["activation_dtype"] == "float16" and summary["bytes_per_element"] == 2
    assert summary["splits"] == 6 and len(summary["layers"]) == 19
    by_t = summary["split_peak_by_splits"]
    assert by_t["1"]["elements"] == summary["naive_peak"]["elements"]
    assert by_t["6"] == summary["split_peak"]
    sizes = [by_t[str(t)]["bytes"] for t in range(1, 7)] + [by_t["per_channel"]["bytes"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert summary["naive_peak"]["bytes"] == 2 * summary["naive_peak"]["elements"]
    status, out, err = mnv2(
        "summary", "--config", "configs/imagenet.py", "--memory", "--splits", "3", "--activation_dtype", "float32"
    )
    assert status == 0, err
    assert "split, t=3" in out and "Table 3 (split)    112x112: 16 ch, 802.8 KB" in out


def test_expansion_splits_config_errors():
    config = config_lib.base_config()
    config.model.expansion_splits = 0
    with pytest.raises(config_lib.ConfigError, match=r"model\.expansion_splits"):
        config_lib.validate(config)
    config.model.expansion_splits, config.model.residual = 2, "expansion"
    with pytest.raises(config_lib.ConfigError, match=r"model\.expansion_splits > 1 needs model\.residual"):
        config_lib.validate(config)


def test_split_blocks_lower_the_compiled_inference_peak():
    """XLA's memory analysis of the compiled inference step, MobileNetV2 1.0, batch 1, 224x224 (this backend's
    default implementations): the temporary memory with 6 groups per block is at least 50% below whole blocks
    (the issue asked for 30%; measured: 71%, docs/memory.md)."""
    config = config_lib.base_config()
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    temp = {}
    for t in (1, 6):
        config.model.expansion_splits = t
        model = tasks.get(config).build_model()
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        compiled = jax.jit(lambda v, x, m=model: m.apply(v, x)[0]).lower(variables, images).compile()
        temp[t] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[6] <= 0.5 * temp[1], temp
