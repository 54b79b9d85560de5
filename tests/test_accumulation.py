"""Gradient accumulation (`config.accumulate_steps`): k micro-batches and one update equal one step of the whole batch
with per-micro-batch ghost BN, on any device count; k=1 is the plain step; resume stays exact; bad values fail early."""

import jax
import numpy as np
import pytest
from test_train import small_run_config_args
from train_helpers import assert_resume_is_exact, fixed_batch, initial_state, path_names, run_mnv2, tiny_config

from mnv2_jax.training import distributed, plan, steps, train

K, MICRO = 4, 8
BATCH = K * MICRO


def train_steps(config, devices, initial, *batches) -> list[dict[str, np.ndarray]]:
    """For each global batch, 2 train steps on it from `initial` (host arrays); every array of the final states."""
    mesh = distributed.make_mesh(devices)
    trainer = train.build_trainer(config, plan.make_plan(config, 1000, 100, mesh.size, 1), mesh)
    results = []
    for batch in batches:
        state = jax.device_put(initial, distributed.replicated(mesh))
        for _ in range(2):
            state, _ = trainer.train_step(state, distributed.global_batch(batch, mesh))
        items = distributed.to_host(train.state_items(state))
        results.append({name: leaf for item, tree in items.items() for name, leaf in path_names(item, tree).items()})
    return results


@pytest.mark.slow
def test_micro_batches_equal_one_batch_with_ghost_bn_of_their_size_on_1_and_8_devices():
    """float64: 4 micro-batches of 8 (global BN in each) and one step of 32 with `bn_group_size=8`, fed the batch
    permuted so that its groups of 8 are the micro-batches (examples j with j % 4 == i), give the same params, batch
    statistics (the mean of the micro-batches' updates), optimizer state and EMA after 2 steps; on 8 devices each
    holds 1 example of each micro-batch (one step of 32 is the same on 1 device and on 8: tests/test_train.py)."""
    with jax.enable_x64():
        whole = tiny_config(bn_group_size=MICRO)
        whole.batch_size = BATCH
        whole.model.dropout_rate = 0.0
        accumulated = tiny_config()
        accumulated.update(batch_size=BATCH, accumulate_steps=K)
        accumulated.model.dropout_rate = 0.0
        batch = fixed_batch(whole, BATCH)
        micro_batches_in_order = np.arange(BATCH).reshape(MICRO, K).T.reshape(-1)
        permuted = {name: values[micro_batches_in_order] for name, values in batch.items()}
        initial = initial_state(whole, distributed.make_mesh(jax.devices()[:1]))
        expected, unpermuted = train_steps(whole, jax.devices()[:1], initial, permuted, batch)
        for devices in (jax.devices()[:1], jax.devices()):
            [got] = train_steps(accumulated, devices, initial, batch)
            assert got.keys() == expected.keys()
            for name in expected:
                np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # The steps trained, and which examples share a micro-batch matters (so the comparison can fail).
    assert not np.allclose(expected["params/Conv/kernel"], initial.params["Conv"]["kernel"], rtol=1e-6)
    name = "batch_stats/Conv/BatchNorm/var"
    assert not np.allclose(unpermuted[name], expected[name], rtol=1e-6)


def test_one_micro_batch_compiles_the_plain_step():
    """`accumulate_steps=1` traces exactly the step built without accumulation arguments: no scan, the same
    dropout key, so runs from before the field resume bitwise."""
    config = tiny_config()
    config.model.dtype = "float32"
    mesh = distributed.make_mesh(jax.devices()[:1])
    the_plan = plan.make_plan(config, 1000, 100, 1, 1)
    trainer = train.build_trainer(config, the_plan, mesh)
    state = jax.eval_shape(trainer.create_state, jax.random.key(0))
    batch = {
        name: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype))
        for name, v in fixed_batch(config).items()
    }
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    pieces = (trainer.model, trainer.tx, trainer.schedule, trainer.task.loss, config.optimizer.ema_decay, rng)

    def jaxpr(*accumulation) -> str:
        return str(jax.make_jaxpr(steps.make_train_step(*pieces, *accumulation))(state, batch))

    one = jaxpr(1, distributed.micro_batches_sharded(mesh))
    assert one == jaxpr()
    assert jaxpr(2).count(" scan[") == one.count(" scan[") + 1  # the micro-batches' loop, which k=1 does not run


@pytest.mark.slow
def test_resume_with_accumulation_is_bitwise_exact(folder, tmp_path):
    """Steps are whole updates: a run stopped after step 3 and resumed ends bitwise equal to the uninterrupted run of 4
    steps (16 images in 2 micro-batches of 8 on 8 devices, with dropout: each micro-batch's key folds in its index;
    past the 40 images' first epoch)."""
    args = small_run_config_args(folder, batch_size=16, accumulate_steps=2, num_train_steps=4)
    status, err = run_mnv2("train", "--workdir", tmp_path / "uninterrupted", *args)
    assert status == 0, err[-3000:]
    assert_resume_is_exact(args, tmp_path / "resumed", tmp_path / "uninterrupted", steps=4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("accumulate_steps=0", "accumulate_steps must be a positive int, got 0"),
        (
            "accumulate_steps=3",
            "accumulate_steps=3 must divide batch_size=8 (the micro-batches are equal); use one of [1, 2, 4, 8]",
        ),
        ("accumulate_steps=2", "micro-batches of batch_size // accumulate_steps = 4 examples, which must be divisible"),
    ],
)
def test_bad_accumulate_steps_is_one_line_before_any_compile(mnv2, folder, tmp_path, monkeypatch, override, message):
    def compile_nothing(*args, **kwargs):
        raise AssertionError("the trainer was built before the config was checked")

    monkeypatch.setattr(train, "build_trainer", compile_nothing)
    status, _, err = mnv2(
        "train", "--workdir", tmp_path / "run", *small_run_config_args(folder), f"--config.{override}"
    )
    assert status == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
