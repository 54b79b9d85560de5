"""`activation_arena`: TFLite's planned arena, measured from tensor addresses, on models whose plan is known."""

import jax
import numpy as np
import pytest
from conftest import require
from train_helpers import tiny_config

from mnv2_jax import tasks
from mnv2_jax.export import routes
from mnv2_jax.export.tflite_memory import activation_arena
from mnv2_jax.models import memory
from mnv2_jax.models.complexity import layer_rows

KIB = 1024


def convert(tmp_path, fn, input_shape) -> str:
    """A TF function of one float32 input, converted to TFLite with the default converter."""
    import tensorflow as tf

    concrete = tf.function(fn, input_signature=[tf.TensorSpec(input_shape, tf.float32)]).get_concrete_function()
    path = tmp_path / "model.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert())
    return str(path)


def test_chain_of_three_ops_gets_the_plan_derived_by_hand(tmp_path):
    """x (1 KiB) -> RELU a (1 KiB) -> TILE b (4 KiB) -> TANH c (4 KiB). The planner keeps x for the whole run at
    offset 0 and places the rest by size: b after x, c (alive with b) after b, a (alive with x and b, not with c)
    in c's place. The arena is x + b + c, the live bytes at TANH."""
    import tensorflow as tf

    require("ai_edge_litert")
    path = convert(tmp_path, lambda x: tf.tanh(tf.tile(tf.nn.relu(x), [1, 4])), [1, 256])
    arena = activation_arena(path)

    assert [(t["shape"], t["bytes"], t["op"]) for t in arena["tensors"]] == [
        ([1, 256], KIB, -1),
        ([1, 256], KIB, 0),
        ([1, 1024], 4 * KIB, 1),
        ([1, 1024], 4 * KIB, 2),
    ]  # the TILE's multiples, a constant, are not listed
    assert [t["offset"] for t in arena["tensors"]] == [0, 5 * KIB, KIB, 5 * KIB]
    assert arena["scratch"] == []
    assert arena["arena_bytes"] == arena["peak_live_bytes"] == 9 * KIB
    assert arena["largest_op_bytes"] == 8 * KIB  # TANH's input and output
    assert arena["sum_bytes"] == 10 * KIB


def test_a_convolutions_im2col_buffer_is_arena_scratch(tmp_path):
    """A single-threaded float 3x3 CONV_2D unfolds its input into an im2col temporary in the arena: 16x16 positions
    of 3*3*8 values (72 KiB) beside the input (8 KiB) and the output (16 KiB)."""
    import tensorflow as tf

    require("ai_edge_litert")
    kernel = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 8, 16)), tf.float32)
    path = convert(tmp_path, lambda x: tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME")), [1, 16, 16, 8])
    arena = activation_arena(path, num_threads=1)

    assert [t["shape"] for t in arena["tensors"]] == [[1, 16, 16, 8], [1, 16, 16, 16]]
    assert [(t["shape"], t["bytes"]) for t in arena["scratch"]] == [([1, 16, 16, 72], 72 * KIB)]
    assert arena["arena_bytes"] == arena["sum_bytes"] == (8 + 72 + 16) * KIB
    assert arena["largest_op_bytes"] == arena["peak_live_bytes"] == (8 + 16) * KIB


@pytest.mark.slow
def test_mobilenet_v2_arena_holds_the_networks_activations(tmp_path):
    """The exported network's tensors are the layer table's, and TFLite's arena is our naive peak plus the input
    image (which TFLite keeps for the whole run), to the byte."""
    require("ai_edge_litert")
    config = tiny_config()  # width 0.35, 32x32, 10 classes, 8 blocks
    model = tasks.get(config).export_model()
    r = config.resolution
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, r, r, 3), np.float32))
    path = str(tmp_path / "model.tflite")
    routes.export(config, variables, "tflite", path)
    arena = activation_arena(path)

    assert arena["largest_op_bytes"] <= arena["peak_live_bytes"] <= arena["arena_bytes"] < arena["sum_bytes"]
    tensors = arena["tensors"]
    assert (tensors[0]["shape"], tensors[0]["dtype"], tensors[0]["offset"]) == ([1, r, r, 3], "float32", 0)
    assert (tensors[-1]["shape"], tensors[-1]["dtype"]) == ([1, 10], "float32")  # the logits, produced last
    shapes = [t["shape"] for t in tensors]
    rows, _ = layer_rows(model, (1, r, r, 3))
    expansions = [row for row in rows if row.name.endswith("/expand")]
    assert len(expansions) == 7 and expansions[0].output_shape == (16, 16, 48)  # 8 blocks, the first without
    for row in rows:  # every conv's, depthwise conv's and the dense layer's output
        assert [1, *row.output_shape] in shapes, row.name
    assert max(t["offset"] + t["bytes"] for t in tensors + arena["scratch"]) == arena["arena_bytes"]
    # The naive peak is layer_3: the first block's 16x16x8 output expanded to 16x16x48, and its stride-2 depthwise
    # output 8x8x48. At float32, plus the 32x32x3 image.
    naive_peak = memory.activation_memory(model, r, 1)["naive_peak"]
    assert naive_peak == {"elements": 16 * 16 * 48 + 8 * 8 * 48, "layer": "layer_3"}
    assert arena["arena_bytes"] == (16 * 16 * 48 + 8 * 8 * 48) * 4 + 32 * 32 * 3 * 4 == 73_728
