"""Config files, `key=value` arguments, overrides and validation errors."""

import pytest

from mnv2_jax import config as config_lib
from mnv2_jax.models import build_model


def test_config_argument_sets_fields(mnv2):
    status, out, err = mnv2(
        "summary", "--config", "configs/imagenet.py:width=0.75,resolution=192,expansion=6", "--json"
    )
    assert status == 0, err
    assert '"resolution": 192' in out
    status, out, _ = mnv2("summary", "--config", "configs/imagenet.py", "--config.resolution=160", "--json")
    assert '"resolution": 160' in out


def test_torch_convention_preset():
    from configs_loader import load

    config = load("configs/imagenet.py:convention=torch")
    assert (config.model.padding, config.model.bn_momentum, config.model.bn_epsilon) == ("symmetric", 0.9, 1e-5)
    assert config.model.preprocessing == "imagenet"
    tf = load("configs/imagenet.py")
    assert (tf.model.padding, tf.model.bn_momentum, tf.model.bn_epsilon) == ("same", 0.997, 1e-3)
    model = build_model(config.model)
    assert model.conventions.padding == "symmetric" and model.conventions.bn_epsilon == 1e-5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.widht=2"], 'unknown config field: --config.model.widht (did you mean "width"?)'),
        (["--config.model.width=abc"], "--config.model.width=abc"),
        (["--config.model.width=-1"], "model.width must be a positive float, got -1"),
        (["--config.model.expansion=0.5"], "model.expansion must be >= 1, got 0.5"),
        (["--config.model.output_stride=4"], "model.output_stride must be one of (8, 16, 32), got 4"),
        (["--config.model.padding=valid"], "model.padding must be one of ('same', 'symmetric'), got 'valid'"),
        (["--config.model.residual=dense"], "model.residual must be one of ('bottleneck', 'expansion', 'none')"),
        (
            ["--config.model.depthwise=fft"],
            "model.depthwise must be one of ('auto', 'grouped', 'shifted', 'cpu_kernel')",
        ),
        (["--config.model.regular_conv=fft"], "model.regular_conv must be one of ('auto', 'conv', 'patches')"),
        (["--config.model.inference_chunk=-2"], "model.inference_chunk must be an int >= 0 (0 = the whole batch)"),
        (["--config.model.stage_expansion=(6, 6)"], "model.stage_expansion needs 7 values"),
        (["--config.model.stage_repeats=(1, 1, 0, 1, 1, 1, 1)"], "model.stage_repeats needs 7 ints >= 1"),
        (["--config.model.num_classes=-3"], "model.num_classes must be an int >= 0"),
        (["--config.on_nonfinite=ignore"], "on_nonfinite must be one of ('stop', 'skip'), got 'ignore'"),
        (["--config.resolution=0"], "resolution must be a positive int, got 0"),
        (["--config.resolution=16"], "resolution=16 is too small for model.output_stride=32"),
        (["--config.data.corrupt_images=keep"], "data.corrupt_images must be one of ('fail', 'skip'), got 'keep'"),
    ],
)
def test_bad_overrides_give_one_line_errors(mnv2, args, message):
    status, out, err = mnv2("summary", "--config", "configs/imagenet.py", *args)
    assert status == 2
    assert message in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    "arg, message",
    [
        ("foo=1", "config argument 'foo=1': expected key=value with key one of ('width'"),
        ("width=wide", "config argument width: expected a float, got 'wide'"),
        ("convention=jax", "convention must be one of ('tf', 'torch'), got 'jax'"),
    ],
)
def test_bad_config_arguments(mnv2, arg, message):
    status, _, err = mnv2("summary", "--config", f"configs/imagenet.py:{arg}")
    assert status == 2 and message in err and "Traceback" not in err


def test_missing_config_file_and_flag(mnv2):
    status, _, err = mnv2("summary", "--config", "configs/nope.py")
    assert status == 2 and "cannot load config file configs/nope.py" in err
    status, _, err = mnv2("summary")
    assert status == 2 and "--config is required" in err
    status, _, err = mnv2("frobnicate")
    assert status == 2 and "unknown command 'frobnicate'" in err


def test_parse_arg_types():
    arg = config_lib.parse_arg("a=2,b=0.5,c=true,d=x", a=1, b=1.0, c=False, d="y", e=3)
    assert (arg.a, arg.b, arg.c, arg.d, arg.e) == (2, 0.5, True, "x", 3)
    assert isinstance(arg.b, float) and isinstance(arg.a, int)
    assert config_lib.parse_arg(None, a=1).a == 1


def test_config_round_trips_through_json():
    config = config_lib.base_config("torch")
    config.model.stage_expansion = (1, 4, 4, 6, 6, 6, 6)
    config.model.bn_group_size = 16
    restored = config_lib.from_dict(config_lib.to_dict(config))
    assert restored.model.stage_expansion == (1, 4, 4, 6, 6, 6, 6)
    assert restored.to_dict() == config.to_dict()
    config_lib.validate(restored)
