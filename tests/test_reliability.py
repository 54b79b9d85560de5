"""Faults during training: non-finite values, SIGTERM, SIGKILL anywhere, interrupted checkpoints, bad input."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from configs_loader import load
from conftest import REPO, WITHOUT_COMPILATION_CACHE, mnv2_command, xla_flags
from datasets import synthetic_imagefolder
from test_data import folder_with_corrupt_images
from test_train import small_run_config_args
from train_helpers import BATCH, assert_bitwise_equal, fixed_batch, saved_state, tiny_config

from mnv2_jax.data import pipeline
from mnv2_jax.errors import UserError
from mnv2_jax.training import checkpoint, distributed, plan, train


@pytest.mark.parametrize(
    "task, poison",
    [
        ("classification", "nan_pixel"),
        ("classification", "inf_loss"),
        ("segmentation", "nan_pixel"),
        ("detection", "nan_pixel"),
    ],
)
def test_a_nonfinite_step_leaves_the_state_unchanged(task, poison):
    """A NaN pixel poisons the batch statistics, the loss and every gradient; a logit bias of -inf for a class that
    labels carry (label smoothing gives every class a target) makes the loss +Inf while every gradient stays finite."""
    config = tiny_config(task=task)
    config.model.dtype = "float32"
    mesh = distributed.make_mesh()
    trainer = train.build_trainer(config, plan.make_plan(config, 1000, 100, mesh.size, 1), mesh)
    state = jax.jit(trainer.create_state, out_shardings=distributed.replicated(mesh))(jax.random.key(0))
    batch = fixed_batch(config)
    images = batch["image"]
    if poison == "nan_pixel":
        images[3, 5, 7, 1] = np.nan
    else:
        params = jax.tree.map(np.asarray, distributed.to_host(state.params))
        params["Logits"]["bias"] = params["Logits"]["bias"].copy()
        params["Logits"]["bias"][batch["label"][0]] = -np.inf
        state = state.replace(params=jax.device_put(params, distributed.replicated(mesh)))
    before = jax.tree.map(np.asarray, train.state_items(state))
    state, metrics = trainer.train_step(state, distributed.global_batch(batch, mesh))
    assert int(metrics["train/nonfinite"]) == 1 and int(state.step) == 1
    if poison == "inf_loss":
        assert float(metrics["train/loss"]) == np.inf and np.isfinite(float(metrics["train/grad_norm"]))
    after = jax.tree.map(np.asarray, train.state_items(state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.array_equal(a, b)
    if poison == "nan_pixel":
        images[3, 5, 7, 1] = 0.0
        state, metrics = trainer.train_step(state, distributed.global_batch(batch, mesh))
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
    step, state = saved_state(workdir)
    assert step == 2 and all(np.all(np.isfinite(v)) for v in state.values())


def test_skip_policy_drops_the_update_and_finishes(tmp_path, nan_at_step_3):
    config = _config(tmp_path, on_nonfinite="skip", log_every_steps=1)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    step, state = saved_state(workdir)
    assert step == 6 and all(np.all(np.isfinite(v)) for v in state.values())
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    flags = {r["step"]: r["train/nonfinite"] for r in logged if "train/nonfinite" in r}
    assert flags[3] == 1 and flags[2] == 0 and flags[4] == 0


def wait_for_logged_step(workdir, step: int, children, timeout_s: float = 240) -> None:
    """Waits until the run in `workdir` has logged metrics for `step` (its processes must stay alive)."""
    metrics_file, deadline = workdir / "metrics.jsonl", time.time() + timeout_s
    while f'"step": {step},' not in (metrics_file.read_text() if metrics_file.exists() else ""):
        assert all(child.poll() is None for child in children), "a process exited early"
        assert time.time() < deadline, f"step {step} not logged within {timeout_s} s"
        time.sleep(0.05)


def crash_run_args(folder, **overrides) -> list[str]:
    """The runs the crash tests interrupt: the small run, with evaluation at steps 3 and 6 and every step logged."""
    args = {"eval_every_epochs": 0.6, "log_every_steps": 1, **overrides}
    return small_run_config_args(folder, **args)


def train_command(workdir, args) -> list[str]:
    return mnv2_command("train", "--workdir", workdir, *args)


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    """The crash tests' run, uninterrupted: the state every interrupted and resumed run must end with."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    command = train_command(workdir, crash_run_args(folder))
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/top1" in r] == [3, 6]
    return workdir


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")  # the compiled train step of test_train's `trained`
def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes_identically(folder, uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    command = train_command(workdir, crash_run_args(folder, checkpoint_every_steps=100))
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_step(workdir, 2, [child])
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=240)
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = checkpoint.latest_step(str(workdir))
    assert 2 <= step < 6 and f"preempted: saved a checkpoint at step {step}" in err

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (last, resumed), (_, expected) = saved_state(workdir), saved_state(uninterrupted)
    assert last == 6
    assert_bitwise_equal(resumed, expected)


def _run_until_killed(args, point, stderr_path, kill_at=None):
    """`tests/faults.py POINT mnv2 ARGS`; with `kill_at=(step, delay_s)` (and POINT `trace`), SIGKILL from outside
    `delay_s` after train step `step` was dispatched."""
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "faults.py"), point, *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        if kill_at is not None:
            step, delay_s = kill_at
            deadline = time.time() + 240
            while f"faults: step {step} dispatched" not in stderr_path.read_text():
                assert child.poll() is None and time.time() < deadline, stderr_path.read_text()[-3000:]
                time.sleep(0.01)
            time.sleep(delay_s)
            child.kill()
        child.wait(timeout=300)
    return child.returncode, stderr_path.read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")  # the compiled train step of test_train's `trained`
def test_sigkill_anywhere_then_the_same_command_ends_bitwise_equal(folder, uninterrupted, tmp_path):
    """SIGKILL during evaluation, inside an async checkpoint write and at a random moment during the training steps;
    rerunning the same command each time ends with the uninterrupted run's exact state."""
    workdir = tmp_path / "killed"
    args = ["train", "--workdir", str(workdir), *crash_run_args(folder)]
    checkpoints = workdir / "checkpoints"

    status, err = _run_until_killed(args, "eval", tmp_path / "eval.log")
    assert status == -signal.SIGKILL and "training steps" in err, err[-3000:]
    # step 3 is checkpointed after its evaluation; step 2's asynchronous write may not have been committed yet
    assert checkpoint.latest_step(str(workdir)) in (None, 2)

    status, err = _run_until_killed(args, "checkpoint:4", tmp_path / "write.log")
    assert status == -signal.SIGKILL, err[-3000:]
    incomplete = [p.name for p in checkpoints.iterdir() if p.name.startswith("4.")]
    assert incomplete and checkpoint.latest_step(str(workdir)) == 3  # the half-written step 4 is not picked up

    # At a random moment while it trains: some time after the dispatch of step 4 or 5 (it resumes at step 4).
    generator = random.Random(os.getpid())
    kill_at = (generator.choice([4, 5]), generator.uniform(0.0, 0.5))
    rerun_started = time.time()
    status, err = _run_until_killed(args, "trace", tmp_path / "random.log", kill_at=kill_at)
    assert f"removing incomplete checkpoint {checkpoints / incomplete[0]}" in err, err[-3000:]
    # Gone, or written again under the same name by this run's own step-4 checkpoint when the kill came after it.
    leftover = checkpoints / incomplete[0]
    assert not leftover.exists() or leftover.stat().st_ctime >= rerun_started - 1, (kill_at, err[-3000:])
    # The kill, not the end of the run, stopped it, and it stopped inside the training loop.
    assert status == -signal.SIGKILL and "TensorBoard logs" not in err, (kill_at, err[-3000:])

    finished = subprocess.run(train_command(workdir, args[3:]), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (last, resumed), (_, expected) = saved_state(workdir), saved_state(uninterrupted)
    assert last == 6
    assert_bitwise_equal(resumed, expected)


@pytest.mark.parametrize(
    "case, override, message",
    [
        ("batch", "--config.batch_size=12", "batch_size=12 must be divisible by the number of devices (8)"),
        ("corrupt", None, "2 image(s) of split 'train' in"),
        ("workdir", None, "is not writable: Not a directory"),
        ("dataset", "--config.dataset=imagenet2013", "dataset 'imagenet2013' is not a TFDS dataset"),
        ("split", "--config.eval_split=validation", "eval_split='validation' is not a split of"),
    ],
)
def test_bad_input_is_one_line_before_any_compile_or_write(mnv2, tmp_path, monkeypatch, case, override, message):
    def compile_nothing(*args, **kwargs):
        raise AssertionError("the trainer was built before the input was checked")

    monkeypatch.setattr(train, "build_trainer", compile_nothing)
    if case == "corrupt":
        dataset = folder_with_corrupt_images(tmp_path / "corrupt")
    else:
        dataset = synthetic_imagefolder(tmp_path / "folder", {"train": 40, "test": 8})
    workdir = tmp_path / "run"
    if case == "workdir":
        (tmp_path / "a_file").write_text("")
        workdir = tmp_path / "a_file" / "run"
    args = small_run_config_args(dataset) + ([override] if override else [])
    status, _, err = mnv2("train", "--workdir", workdir, *args)
    assert status == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
    if case == "workdir":
        assert f"workdir {workdir} is not writable" in err  # names the workdir (nothing could be written under it)
    else:
        assert not workdir.exists()


def test_init_from_without_a_checkpoint_is_one_line_before_the_dataset_is_opened(mnv2, tmp_path, monkeypatch):
    """A missing or empty `init_from` fails before the dataset is opened; a run that resumes does not read it."""

    def open_nothing(config):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(train, "open_dataset", open_nothing)
    (tmp_path / "empty").mkdir()
    workdir = tmp_path / "run"
    for source in (tmp_path / "nonexistent" / "run", tmp_path / "empty"):
        args = small_run_config_args(f"imagefolder:{tmp_path / 'no_dataset'}", init_from=str(source))
        status, _, err = mnv2("train", "--workdir", workdir, *args)
        assert status == 2 and f"error: init_from='{source}' holds no checkpoint (no step in {source}" in err, err
        assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
        assert not workdir.exists() and not (tmp_path / "nonexistent").exists()
    with checkpoint.manager(str(workdir), items=("params",)) as mngr:
        mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.zeros(2)})))
    with pytest.raises(AssertionError, match="the dataset was opened"):
        mnv2("train", "--workdir", workdir, *args)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_process_makes_the_others_fail_clearly_instead_of_hanging(tmp_path, victim):
    """Two processes train; one is SIGKILLed mid-run (0 is also JAX's coordinator); the survivor must exit with a
    clear error within a minute instead of waiting in a collective: ours (status 3) when its next collective
    fails, JAX's abort when the heartbeat timeout comes first (a slow step on a loaded machine)."""
    folder = synthetic_imagefolder(tmp_path / "folder", {"train": 40, "test": 8})
    args = small_run_config_args(folder, num_train_steps=100_000, log_every_steps=1, checkpoint_every_steps=100_000)
    workdir = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        address = f"localhost:{probe.getsockname()[1]}"
    children, logs = [], []
    for process in range(2):
        env = {
            **os.environ,
            "MNV2_COORDINATOR_ADDRESS": address,
            "MNV2_NUM_PROCESSES": "2",
            "MNV2_PROCESS_ID": str(process),
            "MNV2_HEARTBEAT_TIMEOUT_S": "10",
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(2),
            **WITHOUT_COMPILATION_CACHE,
        }
        logs.append(tmp_path / f"process{process}.log")
        command = train_command(workdir, args)
        with open(logs[-1], "w") as log:
            children.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        metrics_file, deadline = workdir / "metrics.jsonl", time.time() + 240
        while time.time() < deadline and '"step": 3,' not in (
            metrics_file.read_text() if metrics_file.exists() else ""
        ):
            assert all(child.poll() is None for child in children), logs[0].read_text()[-3000:]
            time.sleep(0.1)
        assert metrics_file.exists() and '"step": 3,' in metrics_file.read_text(), "step 3 not logged within 240 s"
        children[victim].kill()
        killed_at = time.time()
        survivor = children[1 - victim]
        status = survivor.wait(timeout=60)
        waited = time.time() - killed_at
    finally:
        for child in children:
            child.kill()
    log = logs[1 - victim].read_text()
    assert waited < 60
    if status == -signal.SIGABRT:
        # JAX's coordination service noticed the missing heartbeats before a collective failed: it aborts the
        # process itself, with its own message (documented in README "Several processes").
        assert "JAX distributed service detected fatal errors" in log and "another task died" in log, log[-3000:]
        return
    assert status == 3, log[-3000:]
    assert f"process {1 - victim} of 2 lost contact with another process at step" in log, log[-3000:]
    assert "Restart the whole job: it resumes from the start (no checkpoint yet)" in log


def test_heartbeat_timeout_must_be_positive_seconds(monkeypatch):
    monkeypatch.setenv(distributed.HEARTBEAT_TIMEOUT_ENV, "30")
    assert distributed.heartbeat_timeout_s() == 30
    monkeypatch.setenv(distributed.HEARTBEAT_TIMEOUT_ENV, "-5")
    with pytest.raises(UserError, match="MNV2_HEARTBEAT_TIMEOUT_S must be a positive number of seconds, got '-5'"):
        distributed.heartbeat_timeout_s()


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")  # the compiled train step of test_train's `trained`
def test_a_spot_pod_preempted_twice_recovers_and_ends_as_the_uninterrupted_run(folder, uninterrupted, tmp_path):
    """`launch/tpu.py run --recover` against a stub gcloud: preempted after step 2's checkpoint, ssh failing once,
    then preempted and deleted after step 4's; each time it recreates and sets up the pod as needed and reruns the
    same command, which ends with the uninterrupted run's exact state."""
    workdir, bin_dir, home = tmp_path / "run", tmp_path / "bin", tmp_path / "home"
    for directory in (bin_dir, home, tmp_path / "source"):
        directory.mkdir()
    (home / "mnv2_jax").symlink_to(REPO)
    (tmp_path / "source" / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\nexec {sys.executable} {REPO / "tests" / "gcloud_stub.py"} "$@"\n')
    gcloud.chmod(0o755)
    plan_ = [{"preempt_after_step": 2, "then": "PREEMPTED"}, {"fail": True}, {"preempt_after_step": 4, "then": "GONE"}]
    state_file = tmp_path / "gcloud.json"
    state_file.write_text(json.dumps({"state": "READY", "workdir": str(workdir), "plan": plan_, "calls": []}))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GCLOUD_STUB_HOME": str(home)}
    env["GCLOUD_STUB_STATE"] = str(state_file)
    pod = ["--name", "spot-pod", "--zone", "us-central2-b", "--spot", "--source_dir", str(tmp_path / "source")]
    command = [sys.executable, "launch/tpu.py", "run", "--recover", *pod, "--local_dir", str(tmp_path / "logs")]
    command += ["--allow_local_workdir", "--", "mnv2", "train", "--workdir", str(workdir), *crash_run_args(folder)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    attempts = [json.loads(line) for line in (tmp_path / "logs" / "run" / "recovery.jsonl").read_text().splitlines()]
    assert [(a["pod_state"], a["status"], a["finished"]) for a in attempts] == [
        ("READY", 255, False),  # preempted after step 2
        ("PREEMPTED", 255, False),  # deleted, created, set up; ssh lost at once
        ("READY", 255, False),  # preempted and deleted after step 4
        ("GONE", 0, True),  # created, set up, resumed to the end
    ]
    calls = json.loads(state_file.read_text())["calls"]
    assert calls.count("create") == 2 and calls.count("delete") == 1 and calls.count("describe") == 4
    (last, resumed), (_, expected) = saved_state(workdir), saved_state(uninterrupted)
    assert last == 6
    assert_bitwise_equal(resumed, expected)


@pytest.mark.parametrize(
    "previous, start, step, stops",
    [
        ([], 0, 1, False),  # the first session stopped in its first step: resumed once
        ([(0, 1)], 1, 2, True),  # and again: a time limit shorter than start-up and compilation
        ([(0, 5)], 5, 6, False),  # the session before trained 5 steps
        ([(0, 1)], 1, 3, False),  # this one trained 2
        ([(0, 1)], 3, 4, False),  # another session (SIGKILLed, or the checkpoint of a later one) came in between
        ([(0, 1), (1, 2)], 2, 9, False),
    ],
)
def test_two_sessions_in_a_row_stopped_in_their_first_step_stop_the_run(tmp_path, previous, start, step, stops):
    from mnv2_jax.training import preemption

    records = [{"start_step": a, "step": b, "time": 0.0} for a, b in previous]
    expected = preemption.NoProgressError if stops else preemption.Preempted
    with pytest.raises(expected) as raised:
        preemption.stop(str(tmp_path), records, start, step)
    if stops:
        assert f"(steps {previous[-1][0]}->{previous[-1][1]}, {start}->{step})" in str(raised.value)
        assert "time limit (sbatch --time)" in str(raised.value) and "\n" not in str(raised.value)
    written = json.loads((tmp_path / preemption.PREEMPTIONS_FILE).read_text())
    assert [(r["start_step"], r["step"]) for r in written] == [*previous, (start, step)]
    assert preemption.previous_preemptions(str(tmp_path)) == written
