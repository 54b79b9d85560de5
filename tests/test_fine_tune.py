"""Fine-tuning controls (`config.fine_tune`): frozen layers, linear probe, learning-rate multipliers, weight decay
exclusions, applied through optax in the real train step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from train_helpers import fixed_batch, tiny_config

from mnv2_jax import config as config_lib
from mnv2_jax import tasks
from mnv2_jax.config_checks import ConfigError
from mnv2_jax.training import checkpoint, distributed, optim, plan, train


def _steps(config, count: int = 2):
    """The initial and the trained state after `count` train steps on one device (float32)."""
    config.model.dtype = "float32"
    mesh = distributed.make_mesh(jax.devices()[:1])
    trainer = train.build_trainer(config, plan.make_plan(config, 1000, 100, 1, 1), mesh)
    initial = jax.jit(trainer.create_state)(jax.random.key(0))
    before = jax.tree.map(np.asarray, {"params": initial.params, "batch_stats": initial.batch_stats})
    state = initial
    for _ in range(count):
        state, metrics = trainer.train_step(state, distributed.global_batch(fixed_batch(config), mesh))
        assert int(metrics["train/nonfinite"]) == 0
    after = jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    return before, after


def _changed(before, after) -> dict[str, bool]:
    return {
        f"{c}/{name}": not np.array_equal(leaf, checkpoint.leaves_by_name(after[c])[name])
        for c in ("params", "batch_stats")
        for name, leaf in checkpoint.leaves_by_name(before[c]).items()
    }


def test_a_linear_probe_keeps_the_backbone_and_its_statistics_bitwise_and_trains_the_head():
    """On a segmenter; on a classifier with real weights:
    `tests/test_pretrained.py::test_a_linear_probe_from_a_name_trains_the_head_only`."""
    config = tiny_config(task="segmentation")
    config.fine_tune.linear_probe = True
    changed = _changed(*_steps(config))
    backbone = [name for name in changed if name.split("/")[1].startswith(("Conv", "expanded_conv"))]
    # the head's kernels and statistics (a BN scale of 1 may not move in float32 within two small steps)
    head = [name for name in changed if name not in backbone and not name.endswith("BatchNorm/scale")]
    assert backbone and head
    assert not any(changed[name] for name in backbone), [name for name in backbone if changed[name]]
    assert all(changed[name] for name in head), [name for name in head if not changed[name]]


def test_frozen_patterns_freeze_their_layers_only():
    config = tiny_config()
    config.fine_tune.freeze = (r"^expanded_conv(_[1-3])?/",)
    changed = _changed(*_steps(config))
    frozen = {
        name for name in changed if name.split("/")[1] in ("expanded_conv", *(f"expanded_conv_{i}" for i in (1, 2, 3)))
    }
    assert frozen and not any(changed[name] for name in frozen)
    others = [name for name in changed if name not in frozen]
    assert all(changed[name] for name in others), [name for name in others if not changed[name]]


def _first_update(config, grads, params):
    the_plan = plan.make_plan(config, 1000, 100, 1, 1)
    tx = optim.make_optimizer(config, the_plan)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return checkpoint.leaves_by_name(updates), the_plan.learning_rate


def test_multipliers_and_weight_decay_exclusions_equal_an_update_computed_by_hand():
    """TF1 RMSProp's first step, by hand: ms = rho + (1 - rho) g'^2, update = -lr m g' / sqrt(ms + eps), where
    g' = g + wd w for the kernels that decay (regular convs, logits) unless excluded, and m the first matching
    multiplier (1 otherwise)."""
    config = tiny_config()
    opt = config.optimizer
    opt.update(schedule="constant", weight_decay=0.1, epsilon=1e-3)
    config.fine_tune.lr_multipliers = (("^Logits/", 10.0), (r"expanded_conv_\d/project", 0.25), ("Conv", 0.5))
    config.fine_tune.no_weight_decay = ("^Conv_1/",)
    config.model.dtype = "float32"
    model = tasks.get(config).build_model()
    params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    updates, lr = _first_update(config, grads, params)
    weights, gradients = checkpoint.leaves_by_name(params), checkpoint.leaves_by_name(grads)
    multipliers = {"Logits/kernel": 10.0, "expanded_conv_3/project/kernel": 0.25, "Conv/kernel": 0.5}
    for name, multiplier in {**multipliers, "Conv_1/kernel": 0.5, "expanded_conv_3/expand/kernel": 1.0}.items():
        decays = name.endswith("kernel") and not name.startswith("Conv_1/")
        g = gradients[name].astype(np.float64) + (0.1 * weights[name] if decays else 0.0)
        expected = -lr * multiplier * g / np.sqrt(opt.rmsprop_decay + (1 - opt.rmsprop_decay) * g**2 + 1e-3)
        np.testing.assert_allclose(updates[name], expected, rtol=2e-5, err_msg=name)
    g = gradients["Logits/bias"]  # biases: no weight decay, multiplier of the first match (Logits)
    expected = -lr * 10.0 * g / np.sqrt(opt.rmsprop_decay + (1 - opt.rmsprop_decay) * g**2 + 1e-3)
    np.testing.assert_allclose(updates["Logits/bias"], expected, rtol=2e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("freeze", ("(",), r"fine_tune.freeze: '\(' is not a regular expression"),
        ("lr_multipliers", (("Logits", -1.0),), r"fine_tune.lr_multipliers: expected \(pattern, multiplier >= 0\)"),
        ("lr_multipliers", ("Logits",), r"fine_tune.lr_multipliers: expected \(pattern, multiplier >= 0\)"),
        ("no_weight_decay", (3,), r"fine_tune.no_weight_decay: patterns are strings"),
    ],
)
def test_bad_fine_tuning_fields_are_one_line_errors(field, value, message):
    config = tiny_config()
    config.fine_tune[field] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_a_pattern_that_matches_no_parameter_is_an_error_naming_it():
    config = tiny_config()
    config.fine_tune.freeze = ("^classifier/",)
    with pytest.raises(ConfigError, match=r"fine_tune.freeze: '\^classifier/' matches no parameter"):
        _steps(config, count=0)


def test_frozen_batch_norm_keeps_the_backbones_statistics_while_its_weights_train():
    """DeepLab's `fine_tune_batch_norm=False` as the rule of every task: `fine_tune.frozen_batch_norm=("backbone",)`."""
    config = tiny_config(task="segmentation")
    config.fine_tune.frozen_batch_norm = ("backbone",)
    changed = _changed(*_steps(config))
    backbone = {name for name in changed if name.split("/")[1].startswith(("Conv", "expanded_conv"))}
    statistics = [name for name in backbone if name.startswith("batch_stats/")]
    assert statistics and not any(changed[name] for name in statistics)
    kernels = [name for name in backbone if name.endswith("kernel")]
    assert sum(changed[name] for name in kernels) > len(kernels) / 2  # the weights train
    head_statistics = [name for name in changed if name.startswith("batch_stats/") and name not in backbone]
    assert head_statistics and all(changed[name] for name in head_statistics)


def test_saved_configs_with_fine_tune_batch_norm_load_with_the_same_meaning():
    saved = config_lib.to_dict(config_lib.base_config(task="detection"))
    del saved["fine_tune"]
    saved["detection"]["fine_tune_batch_norm"] = False
    assert config_lib.from_dict(saved).fine_tune.frozen_batch_norm == ("backbone",)
    saved["detection"]["fine_tune_batch_norm"] = True
    loaded = config_lib.from_dict(saved)
    assert loaded.fine_tune.frozen_batch_norm == () and "fine_tune_batch_norm" not in loaded.detection
