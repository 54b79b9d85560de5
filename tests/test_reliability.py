"""Faults during training: non-finite losses or gradients."""

import json

import jax
import numpy as np
import pytest
from configs_loader import load
from datasets import synthetic_imagefolder
from test_train import final_params, small_run_config_args
from train_helpers import BATCH, fixed_batch, tiny_config

from mnv2_jax.data import pipeline
from mnv2_jax.training import checkpoint, distributed, plan, train


def test_a_nonfinite_step_leaves_the_state_unchanged():
    config = tiny_config()
    config.model.dtype = "float32"
    mesh = distributed.make_mesh()
    trainer = train.build_trainer(config, plan.make_plan(config, 1000, 100, mesh.size, 1), mesh)
    state = jax.jit(trainer.create_state, out_shardings=distributed.replicated(mesh))(jax.random.key(0))
    before = jax.tree.map(np.asarray, train.state_items(state))
    images, labels = fixed_batch(config)
    images[3, 5, 7, 1] = np.nan  # one bad pixel poisons the batch statistics, the loss and every gradient
    state, metrics = trainer.train_step(state, distributed.global_batch({"image": images, "label": labels}, mesh))
    assert int(metrics["train/nonfinite"]) == 1 and int(state.step) == 1
    after = jax.tree.map(np.asarray, train.state_items(state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.array_equal(a, b)
    images[3, 5, 7, 1] = 0.0
    state, metrics = trainer.train_step(state, distributed.global_batch({"image": images, "label": labels}, mesh))
    assert int(metrics["train/nonfinite"]) == 0 and int(state.step) == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(distributed.to_host(state.params)))
    assert BATCH % mesh.size == 0


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The training stream yields a NaN image in its third batch."""
    real = pipeline.train_iterator

    def poisoned(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                batch = {**batch, "image": batch["image"].copy()}
                batch["image"][0, 0, 0, 0] = np.nan
            yield batch

    monkeypatch.setattr(pipeline, "train_iterator", poisoned)


def _config(tmp_path, **overrides):
    folder = synthetic_imagefolder(tmp_path / "folder", {"train": 40, "test": 8})
    args = small_run_config_args(folder, checkpoint_every_steps=1, **overrides)
    return load(args[1], *args[2:])


def test_stop_policy_names_the_step_and_never_checkpoints_past_it(tmp_path, nan_at_step_3):
    config = _config(tmp_path)
    workdir = str(tmp_path / "run")
    with pytest.raises(
        train.NonFiniteError, match=r"non-finite loss or gradients at step 3; .*latest checkpoint .*: step 2"
    ):
        train.train_and_evaluate(config, workdir)
    assert checkpoint.latest_step(workdir) == 2
    step, params = final_params(workdir)
    assert step == 2 and all(np.all(np.isfinite(v)) for v in params.values())


def test_skip_policy_drops_the_update_and_finishes(tmp_path, nan_at_step_3):
    config = _config(tmp_path, on_nonfinite="skip", log_every_steps=1)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    step, params = final_params(workdir)
    assert step == 6 and all(np.all(np.isfinite(v)) for v in params.values())
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    flags = {r["step"]: r["train/nonfinite"] for r in logged if "train/nonfinite" in r}
    assert flags[3] == 1 and flags[2] == 0 and flags[4] == 0


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes_identically(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from test_train import assert_same_state

    folder = synthetic_imagefolder(tmp_path / "folder", {"train": 40, "test": 13})
    workdir = tmp_path / "preempted"
    command = [sys.executable, "-m", "mnv2_jax.cli.main", "train", "--workdir", str(workdir)]
    command += small_run_config_args(folder, log_every_steps=1, checkpoint_every_steps=100)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file, deadline = workdir / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and '"step": 2,' not in (metrics_file.read_text() if metrics_file.exists() else ""):
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=240)
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = checkpoint.latest_step(str(workdir))
    assert 2 <= step < 6 and f"preempted: saved a checkpoint at step {step}" in err

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    uninterrupted = tmp_path / "uninterrupted"
    command[command.index(str(workdir))] = str(uninterrupted)
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    (last, resumed), (_, expected) = final_params(workdir), final_params(uninterrupted)
    assert last == 6
    assert_same_state(resumed, expected, rtol=1e-6, atol=1e-7)
