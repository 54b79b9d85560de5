"""The training engine: mesh equivalence, multi-process, the `mnv2 train`/`eval` commands, resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, WITHOUT_COMPILATION_CACHE, mnv2_command, one_device_environment, require, xla_flags
from train_helpers import SHALLOW_STAGES, assert_bitwise_equal, path_names, saved_state

from mnv2_jax.config import base_config
from mnv2_jax.training import checkpoint, distributed, plan, run_files, train


def assert_same_state(a: dict, b: dict, rtol=1e-6, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def run_one_step(tmp_path, meshes, runs, processes=1) -> dict[str, dict[str, np.ndarray]]:
    """tests/one_step.py in float64 on 8 forced CPU devices in all (several processes via launch/local.py); the
    results by `<mesh>-<task>-<group>`."""
    out = tmp_path / f"{meshes}-{runs}-{processes}.npz"
    script = [sys.executable, str(REPO / "tests" / "one_step.py"), meshes, runs, str(out)]
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = xla_flags(8 // processes)
    if processes > 1:
        launcher = [sys.executable, str(REPO / "launch" / "local.py"), f"--processes={processes}", "--timeout_s=240"]
        script = [*launcher, "--", *script]
        env.update(WITHOUT_COMPILATION_CACHE)
    result = subprocess.run(script, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps: dict[str, dict[str, np.ndarray]] = {}
    for key, value in np.load(out).items():
        run, name = key.split(":", 1)
        steps.setdefault(run, {})[name] = value
    return steps


# Every task's step on any mesh; BN per group (of 8 of the 16 images) once, as it does not depend on the task.
ONE_STEP_RUNS = ["classification-none", "classification-8", "segmentation-none", "detection-none"]


@pytest.fixture(scope="module")
def one_process_steps(tmp_path_factory):
    """One step on 1 and on 8 devices of each of ONE_STEP_RUNS, in one process."""
    return run_one_step(tmp_path_factory.mktemp("one_step"), "one,all", ",".join(ONE_STEP_RUNS))


@pytest.mark.slow
@pytest.mark.xdist_group("one_step")
@pytest.mark.parametrize("run", ONE_STEP_RUNS)
def test_one_step_on_8_devices_equals_1_device(run, one_process_steps):
    eight, one = one_process_steps[f"all-{run}"], one_process_steps[f"one-{run}"]
    assert_same_state(eight, one, rtol=1e-9, atol=1e-12)
    # The step really trained, and global vs ghost statistics really differ (so the comparison can fail).
    assert not np.allclose(one["['batch_stats']['Conv']['BatchNorm']['mean']"], 0)
    name = "['params']['Conv']['kernel']"
    global_bn, ghost_bn = (one_process_steps[f"one-classification-{g}"][name] for g in ("none", "8"))
    assert not np.allclose(global_bn, ghost_bn, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("one_step")
def test_two_processes_with_four_devices_each_equal_one_device(one_process_steps, tmp_path):
    """Global BN statistics, whose reductions cross the processes (per-group statistics are checked on 8 devices,
    the same partitioned program), for each task."""
    runs = ["classification-none", "segmentation-none", "detection-none"]
    two_processes = run_one_step(tmp_path, "all", ",".join(runs), processes=2)
    for run in runs:
        assert_same_state(two_processes[f"all-{run}"], one_process_steps[f"one-{run}"], rtol=1e-9, atol=1e-12)


def small_run_config_args(dataset, **overrides):
    """`mnv2 train` arguments of the small runs the training and crash tests share (one compiled train step, kept in
    the session's compilation cache): 6 steps of 8 images at 16x16 on a shallow network, with dropout, so that the
    step-derived dropout key matters."""
    args = {
        "dataset": dataset,
        "train_split": "train",
        "eval_split": "test",
        "resolution": 16,
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_train_steps": 6,
        "log_every_steps": 2,
        "checkpoint_every_steps": 2,
        "model.width": 0.35,
        "model.stage_repeats": SHALLOW_STAGES,
        "model.bn_momentum": 0.9,
        "model.dropout_rate": 0.2,
        "optimizer.schedule": "constant",
        "optimizer.ema_decay": 0.9,
        "eval_every_epochs": 100.0,
    }
    args.update(overrides)
    return ["--config", "configs/quickstart.py"] + [f"--config.{k}={v}" for k, v in args.items() if v is not None]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """`mnv2 train` for 6 steps on 8 devices (in-process), checkpointing every 2."""
    from mnv2_jax.cli.main import main

    workdir = tmp_path_factory.mktemp("run") / "workdir"
    assert main(["mnv2", "train", "--workdir", str(workdir), *small_run_config_args(folder)]) == 0
    return workdir


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")
def test_train_writes_checkpoints_metrics_and_tensorboard(trained):
    records = run_files.read_metrics(str(trained))
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert {"train/loss", "train/top1", "train/lr", "train/grad_norm"} <= train_records[0].keys()
    final_eval = [r for r in records if "eval/top1" in r]
    assert [r["step"] for r in final_eval] == [6] and final_eval[0]["eval/count"] == 13
    assert any("steps_per_sec" in r for r in records)
    assert os.listdir(trained / "tensorboard")
    assert checkpoint.item_names(str(trained), 6) >= {"params", "batch_stats", "opt_state", "ema_params", "config"}
    saved = json.loads((trained / "config.json").read_text())
    assert saved["model"]["num_classes"] == 3  # taken from the dataset


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")
def test_eval_command_matches_training_eval_and_works_on_one_device(mnv2, trained):
    records = run_files.read_metrics(str(trained))
    during_training = next(r for r in records if "eval/top1" in r)
    status, out, err = mnv2("eval", "--workdir", trained)
    assert status == 0, err
    assert f"eval/top1={during_training['eval/top1']:.4f}" in out and "eval/count=13.0000" in out
    # The checkpoint was written from an 8-device mesh; restore and evaluate it on 1 device.
    step, one_device = train.evaluate_checkpoint(str(trained), devices=jax.devices()[:1])
    assert step == 6 and one_device["eval/count"] == 13
    assert one_device["eval/top1"] == pytest.approx(during_training["eval/top1"])
    assert one_device["eval/loss"] == pytest.approx(during_training["eval/loss"], rel=1e-4)
    # Another split of the same data: its own metrics, next to the run's.
    status, out, err = mnv2("eval", "--workdir", trained, "--config.eval_split=train", "--config.eval_batch_size=40")
    assert status == 0, err
    assert "eval_train/count=40.0000" in out
    assert any("eval_train/top1" in r for r in run_files.read_metrics(str(trained)))


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")
def test_resume_continues_at_the_same_step_and_data_position(mnv2, folder, trained, tmp_path):
    workdir = tmp_path / "resumed"
    status, _, err = mnv2("train", "--workdir", workdir, *small_run_config_args(folder, num_train_steps=3))
    assert status == 0, err
    status, _, err = mnv2("train", "--workdir", workdir, *small_run_config_args(folder))  # same run, 6 steps
    assert status == 0, err
    steps = [r["step"] for r in run_files.read_metrics(str(workdir)) if "train/loss" in r]
    assert steps == [2, 3, 4, 6]  # steps 4..6 after the restart, not 1..6 again
    (step, resumed), (_, uninterrupted) = saved_state(workdir), saved_state(trained)
    assert step == 6
    assert_bitwise_equal(resumed, uninterrupted)


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")
def test_restore_onto_a_different_device_count_and_continue(folder, trained, tmp_path):
    """The 8-device run's checkpoint restored onto 1 device holds exactly the saved values; training continues."""
    import shutil

    from mnv2_jax.cli import common

    config = _load(small_run_config_args(folder, num_train_steps=8))
    config.model.num_classes = 3
    one_device = distributed.make_mesh(jax.devices()[:1])
    trainer = train.build_trainer(config, plan.make_plan(config, 40, 13, 1, 1), one_device)
    state = train.restore_train_state(str(trained), trainer, one_device, 6)
    items = train.state_items(state)
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves(items))
    assert state.step.sharding == distributed.replicated(one_device)  # else the first resumed step compiles again
    restored = {name: leaf for item, tree in items.items() for name, leaf in path_names(item, tree).items()}
    step, saved = saved_state(trained)
    assert step == 6 and int(state.step) == 6
    assert_bitwise_equal(restored, saved)

    workdir = tmp_path / "continued"
    shutil.copytree(trained, workdir)
    common.setup_logging()
    results = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    assert results["eval/count"] == 13
    step, continued = saved_state(workdir)
    assert step == 8 and not np.array_equal(continued["params/Conv/kernel"], saved["params/Conv/kernel"])


def test_resuming_with_another_model_lists_every_mismatch(tmp_path):
    """A checkpoint of one model resumed with a config whose model differs: one error, a line per leaf that differs
    (names missing from the checkpoint, names the model lacks, shapes with both sides)."""
    from train_helpers import tiny_config

    mesh = distributed.make_mesh(jax.devices()[:1])

    def abstract_state(config):
        trainer = train.build_trainer(config, plan.make_plan(config, 80, 8, 1, 1), mesh)
        return trainer, jax.eval_shape(trainer.create_state, jax.random.key(0))

    saved = tiny_config()  # 8 blocks (expanded_conv .. expanded_conv_7), 10 classes, EMA kept
    _, state = abstract_state(saved)
    items = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), train.state_items(state))
    with checkpoint.manager(str(tmp_path), items=tuple(items)) as mngr:
        checkpoint.save(mngr, 3, items, saved)

    longer = tiny_config(stage_repeats=(1, 1, 2, 1, 1, 1, 2))  # one more block: expanded_conv_8
    longer.model.num_classes = 5
    with pytest.raises(checkpoint.CheckpointError) as error:
        train.restore_train_state(str(tmp_path), abstract_state(longer)[0], mesh, 3)
    first, *lines = str(error.value).splitlines()
    assert first == f"checkpoint step 3 in {tmp_path / 'checkpoints'} does not match the config:"
    assert "  params Logits/kernel: checkpoint (1280, 10) vs model (1280, 5)" in lines
    assert "  ema_params Logits/bias: checkpoint (10,) vs model (5,)" in lines
    assert "  params expanded_conv_8/project/kernel: missing in checkpoint" in lines
    assert "  batch_stats expanded_conv_8/expand/BatchNorm/var: missing in checkpoint" in lines
    # Every line names a state item, then a leaf of the logits or of the new block, and nothing else differs.
    assert {line.split()[0] for line in lines} == {"params", "batch_stats", "opt_state", "ema_params"}
    assert all("Logits/" in line or "expanded_conv_8/" in line for line in lines)

    shorter = tiny_config(stage_repeats=(1,) * 7)  # 7 blocks: expanded_conv_7 only in the checkpoint
    with pytest.raises(checkpoint.CheckpointError) as error:
        train.restore_train_state(str(tmp_path), abstract_state(shorter)[0], mesh, 3)
    assert "  params expanded_conv_7/depthwise/kernel: in checkpoint but not in the model" in str(error.value)


def _load(args):
    from configs_loader import load

    return load(args[1], *args[2:])


@pytest.mark.slow
def test_quickstart_recipe_learns_another_real_dataset(tmp_path):
    """The quickstart config, only the dataset changed, on real handwritten digits (UCI, via scikit-learn), run as a
    user on a CPU runs it: the `mnv2` command in a process with one device (the C++ depthwise kernels)."""
    require("sklearn")
    import sklearn.datasets as sklearn_datasets

    dataset = digits_imagefolder(sklearn_datasets, tmp_path / "digits")
    workdir = tmp_path / "run"
    command = mnv2_command("train", "--workdir", workdir)
    # 1,437 training images: 15 epochs (169 steps) is 1% of the Fashion-MNIST run; 86.7% top-1 on 2026-12-01
    command += ["--config", "configs/quickstart.py:epochs=15", f"--config.dataset={dataset}"]
    finished = subprocess.run(
        command, cwd=REPO, env=one_device_environment(), capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    final = [r for r in run_files.read_metrics(str(workdir)) if "eval/top1" in r][-1]
    assert final["eval/count"] == 360
    assert final["eval/top1"] > 0.8  # 10 classes: chance is 0.1


def digits_imagefolder(sklearn_datasets, root):
    """sklearn's 1,797 8x8 digits as PNGs: the first 1,437 for train, the last 360 for test."""
    from datasets import write_png

    digits = sklearn_datasets.load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
        split = "train" if i < 1437 else "test"
        write_png(root / split / str(label) / f"{i:04d}.png", image)
    return f"imagefolder:{root}"


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")
@pytest.mark.parametrize("devices", [1, 3, 8])
def test_eval_counts_every_example_once_on_any_device_count(folder, trained, devices):
    """13 eval examples, a global eval batch of 24: one padded batch, split over 1, 3 or 8 devices."""
    reference = next(r for r in run_files.read_metrics(str(trained)) if "eval/top1" in r)
    devices_used = jax.devices()[:devices]
    _, results = train.evaluate_checkpoint(str(trained), devices=devices_used, overrides={"eval_batch_size": 24})
    assert results["eval/count"] == 13
    assert results["eval/top1"] == pytest.approx(reference["eval/top1"])
    assert results["eval/loss"] == pytest.approx(reference["eval/loss"], rel=1e-4)


def test_bfloat16_compute_keeps_float32_parameters():
    config = base_config()
    config.resolution, config.batch_size = 32, 8
    config.model.width, config.model.num_classes, config.model.dtype = 0.35, 10, "bfloat16"
    config.model.stage_repeats = SHALLOW_STAGES
    mesh = distributed.make_mesh(jax.devices()[:1])
    trainer = train.build_trainer(config, plan.make_plan(config, 80, 8, 1, 1), mesh)
    state = jax.jit(trainer.create_state)(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32)}
    state, step_metrics = trainer.train_step(state, distributed.global_batch(batch, mesh))
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.batch_stats)} == {np.dtype("float32")}
    assert np.isfinite(float(step_metrics["train/loss"]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_global_batch_holds_the_values_of_a_reused_host_buffer(dtype):
    """A loader that refills one host buffer gets a batch of the new values each time, also for the dtypes JAX narrows
    (float64, int64 without x64: converting them in the transfer handed back the first batch's values again)."""
    mesh = distributed.make_mesh()
    buffer = np.zeros((mesh.size * 2, 4, 4, 3), dtype)
    for value in range(1, 4):
        buffer[3, 1, 2, 0] = value
        batch = distributed.global_batch({"image": buffer}, mesh)
        assert np.asarray(batch["image"])[3, 1, 2, 0] == value
