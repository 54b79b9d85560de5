"""The network against the authors' table and code: counts, widths, shapes, endpoints, ablations."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_jax.config import base_config
from mnv2_jax.models import Conventions, MobileNetV2, build_model, layer_specs, predict
from mnv2_jax.models.mobilenet_v2 import resolve_inference_chunk
from mnv2_jax.training import distributed

# slim README (research/slim/nets/mobilenet/README.md): depth multiplier, resolution, MACs (millions, floored), the
# exact MACs in millions to two decimals, parameters (millions, two decimals) and the exact parameter counts, as
# listed in shared/reference/mobilenet_v2.md §6.
PUBLISHED = [
    (1.4, 224, 582, 582.20, 6.06, 6_062_633),
    (1.3, 224, 509, 509.38, 5.34, 5_344_201),
    (1.0, 224, 300, 300.78, 3.47, 3_472_041),
    (1.0, 192, 221, 221.32, 3.47, 3_472_041),
    (1.0, 160, 154, 154.08, 3.47, 3_472_041),
    (1.0, 128, 99, 99.08, 3.47, 3_472_041),
    (1.0, 96, 56, 56.29, 3.47, 3_472_041),
    (0.75, 224, 209, 209.07, 2.61, 2_611_065),
    (0.75, 192, 153, 153.94, 2.61, 2_611_065),
    (0.75, 160, 107, 107.30, 2.61, 2_611_065),
    (0.75, 128, 69, 69.13, 2.61, 2_611_065),
    (0.75, 96, 39, 39.45, 2.61, 2_611_065),
    (0.5, 224, 97, 97.13, 1.95, 1_951_417),
    (0.5, 192, 71, 71.70, 1.95, 1_951_417),
    (0.5, 160, 50, 50.19, 1.95, 1_951_417),
    (0.5, 128, 32, 32.58, 1.95, 1_951_417),
    (0.5, 96, 18, 18.89, 1.95, 1_951_417),
    (0.35, 224, 59, 59.29, 1.66, 1_664_329),
    (0.35, 192, 43, 43.90, 1.66, 1_664_329),
    (0.35, 160, 30, 30.88, 1.66, 1_664_329),
    (0.35, 128, 20, 20.22, 1.66, 1_664_329),
    (0.35, 96, 11, 11.94, 1.66, 1_664_329),
]

# Block output widths per multiplier (stem, the 7 stage outputs, last conv), slim rounding (reference §4).
WIDTHS = {
    0.35: (16, 8, 8, 16, 24, 32, 56, 112, 1280),
    0.5: (16, 8, 16, 16, 32, 48, 80, 160, 1280),
    0.75: (24, 16, 24, 24, 48, 72, 120, 240, 1280),
    1.0: (32, 16, 24, 32, 64, 96, 160, 320, 1280),
    1.3: (40, 24, 32, 40, 80, 128, 208, 416, 1664),
    1.4: (48, 24, 32, 48, 88, 136, 224, 448, 1792),
}
STAGE_OF_LAYER = [0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 8]  # layer_1..layer_19 -> WIDTHS column


# Paper Table 2: (expansion t, repeats n, first stride s) of the seven bottleneck stages.
STAGES = [(1, 1, 1), (6, 2, 2), (6, 3, 2), (6, 4, 2), (6, 3, 1), (6, 3, 2), (6, 1, 1)]


def table1_macs(width: float, resolution: int, num_classes: int = 1001) -> dict[str, int]:
    """Multiply-adds by kind, by the paper's Table 1: a bottleneck of input h x w x k, expansion t, output k' and
    stride s costs h*w*k*tk (expand; none when t = 1) + (h/s)*(w/s)*tk*9 (depthwise 3x3) + (h/s)*(w/s)*tk*k'
    (project); plus the 3x3 stride-2 stem, the last 1x1 conv and the logits. SAME padding: sizes round up."""
    stem, *block_widths, last = WIDTHS[width]
    size = math.ceil(resolution / 2)
    macs = {"conv": size * size * 3 * 9 * stem, "depthwise": 0, "dense": last * num_classes}
    k = stem
    for (t, n, s), k_out in zip(STAGES, block_widths, strict=True):
        for i in range(n):
            out = math.ceil(size / (s if i == 0 else 1))
            macs["conv"] += (size * size * k * t * k if t > 1 else 0) + out * out * t * k * k_out
            macs["depthwise"] += out * out * t * k * 9
            size, k = out, k_out
    macs["conv"] += size * size * k * last
    return macs


def table1_params(width: float, num_classes: int = 1001, bn: bool = True) -> int:
    """Parameters by the paper's Table 1: a bottleneck of input k, expansion t and output k' holds k*tk (expand;
    none when t = 1) + 9*tk (depthwise 3x3) + tk*k' (project) weights, no conv biases, and 2 BN parameters (scale,
    offset) per output channel of each conv; plus the 3x3 stem on 3 channels, the last 1x1 conv and the logits
    (weights and bias; none when num_classes = 0)."""
    stem, *block_widths, last = WIDTHS[width]
    bn_per_channel = 2 if bn else 0
    params = 27 * stem + bn_per_channel * stem
    k = stem
    for (t, n, _), k_out in zip(STAGES, block_widths, strict=True):
        for _ in range(n):
            tk = t * k
            params += (k * tk + bn_per_channel * tk if t > 1 else 0) + 9 * tk + bn_per_channel * tk
            params += tk * k_out + bn_per_channel * k_out
            k = k_out
    params += k * last + bn_per_channel * last
    return params + (last * num_classes + num_classes if num_classes else 0)


def test_table1_params_gives_the_published_parameter_counts():
    """The hand count above, checked against the slim README's exact counts (which exclude BN) before other tests
    use it."""
    for width, *_, params_exact in PUBLISHED:
        assert table1_params(width, bn=False) == params_exact, width


@pytest.mark.parametrize("width, resolution, macs_m, macs_exact_m, params_m, params_exact", PUBLISHED)
def test_summary_matches_published_checkpoints(mnv2, width, resolution, macs_m, macs_exact_m, params_m, params_exact):
    arg = f"width={width},resolution={resolution},num_classes=1001"
    status, out, err = mnv2("summary", "--config", f"configs/imagenet.py:{arg}", "--json")
    assert status == 0, err
    summary = json.loads(out)
    assert summary["macs_by_kind"] == table1_macs(width, resolution)
    assert summary["macs"] == sum(table1_macs(width, resolution).values())
    assert round(summary["macs"] / 1e6, 2) == macs_exact_m
    assert summary["macs_millions"] == summary["macs"] // 1_000_000 == macs_m
    if (width, resolution) == (1.0, 224):
        assert summary["macs"] == 300_775_552  # the README's figure
    assert summary["params_excluding_bn"] == params_exact
    assert round(summary["params_excluding_bn"] / 1e6, 2) == params_m


def test_torchvision_parameter_count(mnv2):
    status, out, _ = mnv2("summary", "--config", "configs/imagenet.py", "--json", "--config.model.num_classes=1000")
    assert status == 0
    assert json.loads(out)["params"] == 3_504_872  # torchvision mobilenet_v2().parameters(), BN scale/offset counted


def test_summary_per_layer_rows(mnv2):
    status, out, _ = mnv2("summary", "--config", "configs/imagenet.py:num_classes=1001", "--json", "--per-layer")
    assert status == 0
    summary = json.loads(out)
    layers = summary["layers"]
    assert len(layers) == 53  # 52 convs + logits
    assert sum(r["kind"] == "depthwise" for r in layers) == 17
    assert sum(r["macs"] for r in layers) == summary["macs"]
    assert layers[0]["name"] == "Conv" and layers[0]["output_shape"] == [112, 112, 32]
    assert layers[-1]["name"] == "Logits" and layers[-1]["macs"] == 1280 * 1001
    _, table, _ = mnv2("summary", "--config", "configs/imagenet.py", "--per-layer")
    assert "expanded_conv_16/project" in table and "excluding BN" in table


def endpoint_shapes(model, resolution):
    images = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    _, endpoints = jax.eval_shape(model.apply, variables, images)
    return {k: v.shape for k, v in endpoints.items()}


@pytest.mark.parametrize("width", sorted(WIDTHS))
@pytest.mark.parametrize("resolution", [96, 128, 160, 192, 224])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_endpoint_shapes(width, resolution, output_stride):
    shapes = endpoint_shapes(MobileNetV2(width=width, num_classes=1001, output_stride=output_stride), resolution)
    # Spatial size: every stride-2 layer (1, 3, 5, 8, 15) halves, rounding up, until the output stride is reached.
    stride_layers = [1, 3, 5, 8, 15][: int(math.log2(output_stride))]
    for n in range(1, 20):
        size = resolution
        for _ in (s for s in stride_layers if s <= n):
            size = math.ceil(size / 2)
        assert shapes[f"layer_{n}"] == (2, size, size, WIDTHS[width][STAGE_OF_LAYER[n - 1]]), f"layer_{n}"
    # slim mobilenet_v2_test.testImageSizes: layer_18 is 7/6/5/4/3 at 224/192/160/128/96 (output stride 32).
    if output_stride == 32:
        assert shapes["layer_18"][1] == {224: 7, 192: 6, 160: 5, 128: 4, 96: 3}[resolution]
    expected_names = {f"layer_{n}" for n in range(1, 20)}
    expected_names |= {f"layer_{n}/depthwise_output" for n in range(2, 19)}
    expected_names |= {f"layer_{n}/expansion_output" for n in range(3, 19)}
    expected_names |= {"pre_logits", "logits"}
    assert set(shapes) == expected_names
    assert shapes["logits"] == (2, 1001)
    assert shapes["pre_logits"] == (2, WIDTHS[width][-1])


def test_expansion_endpoints_at_width_one():
    shapes = endpoint_shapes(MobileNetV2(), 224)
    assert shapes["layer_15/expansion_output"] == (2, 14, 14, 576)  # SSDLite's first feature map
    assert shapes["layer_4/depthwise_output"] == (2, 56, 56, 144)  # DeepLab decoder endpoints
    assert shapes["layer_7/depthwise_output"] == (2, 28, 28, 192)
    assert shapes["layer_14/depthwise_output"] == (2, 14, 14, 576)
    assert shapes["layer_3/expansion_output"] == (2, 112, 112, 96)


def test_output_stride_513_matches_deeplab():
    assert endpoint_shapes(MobileNetV2(num_classes=0, output_stride=16), 513)["layer_18"][1:3] == (33, 33)
    assert endpoint_shapes(MobileNetV2(num_classes=0, output_stride=8), 513)["layer_18"][1:3] == (65, 65)


@pytest.mark.parametrize(
    "output_stride, strides, dilations",
    [
        # layer_1 ... layer_19 (reference §1/§5: slim's atrous rewriting; the 1x1 layer_19 needs no dilation)
        (32, [2, 1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1], [1] * 19),
        (16, [2, 1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 15 + [2, 2, 2, 1]),
        (8, [2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 8 + [2] * 7 + [4] * 3 + [1]),
    ],
)
def test_atrous_rewriting(output_stride, strides, dilations):
    specs = layer_specs(output_stride=output_stride)
    assert [s.stride for s in specs] == strides
    assert [s.dilation for s in specs] == dilations
    assert sum(s.residual for s in specs) == 10  # the same 10 residual blocks at every output stride


def test_stage_repeats_set_the_blocks_per_stage():
    shallow = layer_specs(repeats=(1, 1, 2, 1, 1, 1, 1))
    assert [(s.scope, s.in_features, s.out_features, s.stride) for s in shallow] == [
        ("Conv", 3, 32, 2),
        ("expanded_conv", 32, 16, 1),
        ("expanded_conv_1", 16, 24, 2),
        ("expanded_conv_2", 24, 32, 2),
        ("expanded_conv_3", 32, 32, 1),  # the second block of the stage repeated twice: residual
        ("expanded_conv_4", 32, 64, 2),
        ("expanded_conv_5", 64, 96, 1),
        ("expanded_conv_6", 96, 160, 2),
        ("expanded_conv_7", 160, 320, 1),
        ("Conv_1", 320, 1280, 1),
    ]
    assert [s.residual for s in shallow].count(True) == 1
    assert layer_specs(repeats=(1, 2, 3, 4, 3, 3, 1)) == layer_specs()
    config = base_config()
    config.model.stage_repeats = (1, 1, 2, 1, 1, 1, 1)
    params = jax.eval_shape(build_model(config.model).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    blocks = ["expanded_conv"] + [f"expanded_conv_{i}" for i in range(1, 8)]
    assert sorted(params) == sorted(["Conv", "Conv_1", "Logits", *blocks])


def test_first_block_and_unit_expansions_have_no_expand_conv():
    variables = jax.eval_shape(MobileNetV2().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert "expand" not in variables["params"]["expanded_conv"]
    assert "expand" in variables["params"]["expanded_conv_1"]
    config = base_config()
    config.model.stage_expansion = (1, 1, 4, 6, 6, 8, 10)
    params = jax.eval_shape(build_model(config.model).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    assert "expand" not in params["expanded_conv_1"] and "expand" not in params["expanded_conv_2"]
    assert params["expanded_conv_3"]["expand"]["kernel"].shape == (1, 1, 24, 96)  # 24 * 4
    assert params["expanded_conv_16"]["expand"]["kernel"].shape == (1, 1, 160, 1600)  # 160 * 10


def test_no_conv_biases_and_slim_scope_names():
    params = jax.eval_shape(MobileNetV2(num_classes=1001).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    assert sorted(params) == sorted(
        ["Conv", "Conv_1", "Logits", "expanded_conv"] + [f"expanded_conv_{i}" for i in range(1, 17)]
    )
    assert set(params["expanded_conv_5"]) == {"expand", "depthwise", "project"}
    assert set(params["expanded_conv_5"]["project"]) == {"kernel", "BatchNorm"}  # no bias: BN follows
    assert set(params["Logits"]) == {"kernel", "bias"}


# Blocks as the full network's up to layer_6 (the endpoints these tests inspect), one block a stage after that:
# 10 blocks instead of 17, much less to compile.
FRONT_STAGES = (1, 2, 2, 1, 1, 1, 1)
TINY = dict(width=0.35, num_classes=10, stage_repeats=FRONT_STAGES)


def tiny_variables(model, resolution=32):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))


def apply(model, *args, **kwargs):
    """`model.apply` compiled as one program (much faster than op-by-op on CPU)."""
    return jax.jit(model.apply, static_argnames=("train", "mutable"))(*args, **kwargs)


def zero_projection(variables, scope):
    """Makes one block's projection output exactly 0 (zero kernel; BN bias 0 with unit running statistics)."""
    params = jax.tree.map(lambda x: x, variables["params"])  # a copy
    project = params[scope]["project"]
    project["kernel"] = jnp.zeros_like(project["kernel"])
    project["BatchNorm"]["bias"] = jnp.zeros_like(project["BatchNorm"]["bias"])
    return {**variables, "params": params}


def test_linear_versus_nonlinear_bottleneck():
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    linear = MobileNetV2(**TINY)
    variables = tiny_variables(linear)
    _, lin = apply(linear, variables, images)
    _, nonlin = apply(MobileNetV2(**TINY, nonlinear_bottleneck=True), variables, images)
    assert float(jnp.min(lin["layer_3"])) < 0  # projections are linear by default
    assert float(jnp.min(nonlin["layer_3"])) >= 0 and float(jnp.max(nonlin["layer_3"])) <= 6  # ReLU6 on them
    np.testing.assert_allclose(nonlin["layer_2/depthwise_output"], lin["layer_2/depthwise_output"])


def test_residual_placements():
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    models = {mode: MobileNetV2(**TINY, residual=mode) for mode in ("bottleneck", "expansion", "none")}
    variables = zero_projection(tiny_variables(models["bottleneck"]), "expanded_conv_2")  # the block of layer_4
    for mode in ("expansion", "none"):  # placement changes no parameters
        assert jax.tree.structure(tiny_variables(models[mode])) == jax.tree.structure(variables)
    ends = {mode: apply(model, variables, images)[1] for mode, model in models.items()}

    # With its projection zeroed, layer_4's output is exactly its shortcut.
    np.testing.assert_array_equal(ends["bottleneck"]["layer_4"], ends["bottleneck"]["layer_3"])  # layer_4 residual
    np.testing.assert_array_equal(ends["none"]["layer_4"], 0.0)
    np.testing.assert_array_equal(ends["expansion"]["layer_4"], 0.0)  # no shortcut between bottlenecks...
    # ... but layer_4's expanded tensor is carried into layer_5's expansion (expand(0) = relu6(BN bias 0) = 0).
    np.testing.assert_allclose(
        ends["expansion"]["layer_5/expansion_output"], ends["expansion"]["layer_4/expansion_output"]
    )
    assert float(jnp.max(jnp.abs(ends["expansion"]["layer_4/expansion_output"]))) > 0
    np.testing.assert_array_equal(ends["none"]["layer_5/expansion_output"], 0.0)
    # Stride-2 blocks never get a shortcut: layer_3 (stride 2) is the same in every mode.
    np.testing.assert_array_equal(ends["none"]["layer_3"], ends["bottleneck"]["layer_3"])


def test_head_dropout_and_backbone_mode():
    model = MobileNetV2(**TINY)
    variables = tiny_variables(model)
    images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
    eval_a, _ = apply(model, variables, images)
    eval_b, _ = apply(model, variables, images)
    np.testing.assert_array_equal(eval_a, eval_b)  # dropout is off at inference
    (train_a, _), _ = apply(
        model, variables, images, train=True, rngs={"dropout": jax.random.key(0)}, mutable=("batch_stats",)
    )
    (train_b, _), _ = apply(
        model, variables, images, train=True, rngs={"dropout": jax.random.key(1)}, mutable=("batch_stats",)
    )
    assert train_a.shape == (8, 10) and not np.allclose(train_a, train_b)  # dropout 0.2 before the logits
    backbone = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "Logits"}}
    features, endpoints = apply(MobileNetV2(**{**TINY, "num_classes": 0}), backbone, images)
    assert features.shape == (8, 1, 1, 1280) and "logits" not in endpoints


# "expansion" residuals carry an expanded tensor into the next block as an input, so more of them is kept.
@pytest.mark.parametrize("residual, kept_at_most", [("bottleneck", 1 / 4), ("expansion", 1 / 2)])
def test_remat_gives_identical_gradients_and_keeps_fewer_activations(residual, kept_at_most):
    import contextlib
    import io
    import math
    import re

    from jax.ad_checkpoint import print_saved_residuals

    # float64: the compiled programs with and without remat group float operations differently
    conventions = Conventions(dtype=jnp.float64, depthwise="grouped", pointwise="conv", regular_conv="conv")

    def model(remat: bool) -> MobileNetV2:
        return MobileNetV2(
            width=0.35,
            num_classes=5,
            dropout_rate=0.0,
            residual=residual,
            remat=remat,
            conventions=conventions,
            stage_repeats=FRONT_STAGES,
        )

    def loss_and_grads(remat: bool, images, variables):
        def loss(params):
            (logits, endpoints), _ = model(remat).apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
            )
            # An endpoint inside a block feeds the loss too (as a segmentation or detection head would).
            return jnp.sum(logits**2) + jnp.mean(endpoints["layer_5/expansion_output"] ** 2)

        listing = io.StringIO()
        with contextlib.redirect_stdout(listing):
            print_saved_residuals(loss, variables["params"])
        shapes = re.findall(r"f64\[2,([\d,]+)\]", listing.getvalue())  # activations: leading batch dim 2
        saved_activation_elements = sum(2 * math.prod(int(d) for d in shape.split(",")) for shape in shapes)
        return jax.jit(jax.grad(loss))(variables["params"]), saved_activation_elements

    with jax.enable_x64():
        images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float64)
        variables = model(False).init(jax.random.key(0), images)  # the same variables serve both
        plain, plain_saved = loss_and_grads(False, images, variables)
        remat, remat_saved = loss_and_grads(True, images, variables)
    assert jax.tree.structure(plain) == jax.tree.structure(remat)
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(plain))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14 * scale)  # zero in exact arithmetic: rounding noise
    assert remat_saved < plain_saved * kept_at_most  # block inputs (and stem/head tensors), not expanded tensors


@pytest.mark.parametrize(
    "batch, chunk, shards",
    [
        (18, 2, 1),  # 9 chunks: loop iterations of 4 unrolled chunks, then the remainder
        (7, 2, 1),  # 7 images do not split in 2s: chunks of 1
        (48, 2, 8),  # batch split over 8 devices, 2 images of each device's share per chunk
    ],
)
def test_predict_in_chunks_equals_the_whole_batch(batch, chunk, shards):
    model = MobileNetV2(**TINY, inference_chunk=chunk)
    variables = tiny_variables(model)
    # Stored statistics away from (0, 1), so that inference batch norm does real work.
    stats = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(v.size), v.shape), variables["batch_stats"])
    variables = {**variables, "batch_stats": stats}
    images = jax.random.normal(jax.random.key(4), (batch, 32, 32, 3))
    expected, _ = apply(model, variables, images)

    mesh = distributed.make_mesh(jax.devices()[:shards])
    chunked = jax.jit(
        lambda v, x: predict(model, v, x, batch_shards=shards),
        in_shardings=(distributed.replicated(mesh), distributed.batch_sharded(mesh)),
    )
    images = jax.device_put(images, distributed.batch_sharded(mesh))
    hlo = chunked.lower(variables, images).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in hlo  # every device keeps its own images
    np.testing.assert_allclose(chunked(variables, images), expected, rtol=1e-5, atol=1e-5)
    scans = [
        e for e in jax.make_jaxpr(chunked)(variables, images).eqns[0].params["jaxpr"].eqns if e.primitive.name == "scan"
    ]
    assert len(scans) == 1 and scans[0].params["length"] == batch // shards // (chunk if batch % chunk == 0 else 1)
    whole = jax.make_jaxpr(lambda v, x: predict(model.clone(inference_chunk=0), v, x))(variables, images)
    assert not [e for e in whole.eqns if e.primitive.name == "scan"]


def test_inference_chunk_auto_is_one_image_on_cpu_and_the_whole_batch_elsewhere():
    assert resolve_inference_chunk(None, "cpu") == 1
    assert resolve_inference_chunk(None, "gpu") == resolve_inference_chunk(None, "tpu") == 0
    assert resolve_inference_chunk(5, "gpu") == 5
