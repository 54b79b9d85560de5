"""Learning-rate schedule, TF1 RMSProp, the weight-decay mask, EMA and the derived plan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnv2_jax.config import ConfigError, base_config
from mnv2_jax.models import MobileNetV2
from mnv2_jax.training import optim
from mnv2_jax.training.plan import make_plan


def plan_for(config, examples=960, devices=1, processes=1):
    return make_plan(config, examples, 100, devices, processes)


def test_paper_schedule_decays_098_per_epoch():
    config = base_config()  # lr 0.045 at batch 96, x0.98 every epoch, staircase
    plan = plan_for(config)
    assert plan.steps_per_epoch == 10 and plan.decay_steps == 10
    schedule = optim.learning_rate_schedule(config, plan)
    for step in (0, 9, 10, 25, 100):
        assert float(schedule(step)) == pytest.approx(0.045 * 0.98 ** (step // 10), rel=1e-6)


def test_smooth_decay_warmup_and_cosine():
    config = base_config()
    config.optimizer.staircase = False
    config.optimizer.decay_epochs = 2.5  # slim README recipe
    plan = plan_for(config)
    schedule = optim.learning_rate_schedule(config, plan)
    assert float(schedule(5)) == pytest.approx(0.045 * 0.98 ** (5 / 25), rel=1e-6)

    config.optimizer.warmup_epochs = 1.0
    plan = plan_for(config)
    schedule = optim.learning_rate_schedule(config, plan)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.0225, rel=1e-6)
    assert float(schedule(10)) == pytest.approx(0.045, rel=1e-6)  # decay starts after the warm-up

    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 0.0
    config.num_epochs = 2.0
    plan = plan_for(config)
    schedule = optim.learning_rate_schedule(config, plan)
    assert float(schedule(10)) == pytest.approx(0.0225, rel=1e-5) and float(schedule(20)) == pytest.approx(0.0)


def test_derived_values_follow_batch_size_overrides():
    config = base_config()
    config.batch_size = 960
    plan = plan_for(config, examples=96_000, devices=8)
    assert plan.learning_rate == pytest.approx(0.45)  # linear scaling from 0.045 at 96
    assert plan.steps_per_epoch == 100 and plan.decay_steps == 100
    assert plan.total_steps == 300 * 100
    config.optimizer.lr_scaling = "sqrt"
    assert plan_for(config, devices=8).learning_rate == pytest.approx(0.045 * np.sqrt(10))
    config.num_train_steps = 7
    assert plan_for(config, devices=8).total_steps == 7
    with pytest.raises(ConfigError, match=r"batch_size=960 must be divisible by the number of devices \(7\)"):
        plan_for(config, devices=7)


def tf1_rmsprop_reference(w, grads, lrs, rho=0.9, mu=0.9, eps=1.0, wd=0.0):
    """tf.compat.v1.train.RMSPropOptimizer written out (tensorflow/python/training/rmsprop.py), coupled L2."""
    w = np.array(w, np.float64)
    ms, mom = np.ones_like(w), np.zeros_like(w)
    for g, lr in zip(grads, lrs, strict=True):
        g = g + wd * w
        ms = rho * ms + (1 - rho) * g * g
        mom = mu * mom + lr * g / np.sqrt(ms + eps)
        w = w - mom
    return w


@pytest.mark.parametrize("epsilon", [1.0, 1e-3])
def test_rmsprop_matches_tf1_semantics(epsilon):
    config = base_config()
    config.optimizer.epsilon = epsilon
    config.optimizer.staircase = False
    plan = plan_for(config, examples=96 * 3)  # lr decays within the few steps tested
    tx = optim.make_optimizer(config, plan)
    schedule = optim.learning_rate_schedule(config, plan)
    rng = np.random.default_rng(0)
    params = {
        "Conv": {"kernel": rng.normal(size=(3, 3, 3, 4)), "BatchNorm": {"scale": rng.normal(size=4)}},
        "expanded_conv": {"depthwise": {"kernel": rng.normal(size=(3, 3, 1, 4))}},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(5)]
    state, current = tx.init(params), params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, current)
        current = optax.apply_updates(current, updates)
    lrs = [float(schedule(i)) for i in range(5)]
    decayed = {
        ("Conv", "kernel"): 4e-5,
        ("Conv", "BatchNorm", "scale"): 0.0,
        ("expanded_conv", "depthwise", "kernel"): 0.0,
    }
    for path, wd in decayed.items():
        leaf = lambda tree, path=path: functools.reduce(lambda t, k: t[k], path, tree)
        grads = [np.asarray(leaf(g)) for g in grads_seq]
        expected = tf1_rmsprop_reference(leaf(params), grads, lrs, eps=epsilon, wd=wd)
        np.testing.assert_allclose(leaf(current), expected, rtol=2e-5, atol=1e-6, err_msg=str(path))


def test_weight_decay_mask_selects_slim_regularised_kernels():
    params = jax.eval_shape(MobileNetV2(num_classes=1001).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    assert len(decayed) == 36  # stem, 16 expand, 17 project, Conv_1 and the logits kernel
    assert "['Logits']['kernel']" in decayed and "['Logits']['bias']" not in decayed
    assert "['Conv']['kernel']" in decayed and "['expanded_conv_3']['expand']['kernel']" in decayed
    assert not any("depthwise" in k or "BatchNorm" in k for k in decayed)


def test_ema_decay_follows_tf_num_updates():
    assert float(optim.ema_decay_at(jnp.float32(0), 0.9999)) == pytest.approx(0.1)
    assert float(optim.ema_decay_at(jnp.float32(90), 0.9999)) == pytest.approx(0.91)
    assert float(optim.ema_decay_at(jnp.float32(1e7), 0.9999)) == pytest.approx(0.9999)
