"""`launch/slurm.py` and `mnv2 sweep --runner slurm` on a live one-node SLURM cluster (tests/slurm_cluster.py):
real sbatch, srun, scancel, requeue and partition preemption.

The training runs are the crash tests' small run, 8 steps. To signal a run between two given steps however fast
they are, a test stops its processes (SIGSTOP), sends the signal through SLURM, waits until the processes hold it
pending, and lets them go on (SIGCONT); what is tested is the way SLURM delivers the signal and what the batch
script, the trainer and the requeue do with it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import sys
import time
from collections.abc import Callable

import pytest
import slurm_cluster
from conftest import REPO, WITHOUT_COMPILATION_CACHE, mnv2_command, require, xla_flags
from test_train import small_run_config_args
from train_helpers import assert_bitwise_equal, saved_state

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm_cluster")]

STEPS = 12
# Evaluations at steps 3, 6 and 8, every step logged (the tests wait for logged steps).
RUN = {"num_train_steps": STEPS, "eval_every_epochs": 0.6, "log_every_steps": 1, "checkpoint_every_steps": 100}
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
CHECKPOINTED = re.compile(r"preempted: saved a checkpoint at step (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require("slurm")
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


class Job:
    """A job of the cluster that trains `workdir`; its log is `log`."""

    def __init__(self, cluster, job_id: str, workdir: pathlib.Path, log: pathlib.Path):
        self.cluster, self.id, self.workdir, self.log = cluster, job_id, workdir, log

    @classmethod
    def submit(cls, cluster, chdir: pathlib.Path, name: str, train_args: list[str], *options: str, **env: str) -> Job:
        """`launch/slurm.py --job_name NAME --chdir CHDIR OPTIONS -- mnv2 train --workdir CHDIR/NAME TRAIN_ARGS`."""
        command = [sys.executable, "launch/slurm.py", "--job_name", name, "--chdir", str(chdir), *options, "--"]
        command += mnv2_command("train", "--workdir", chdir / name, *train_args)
        job_id = re.search(r"submitted job (\d+)", cluster.run(*command, cwd=REPO, env=env).stdout).group(1)
        return cls(cluster, job_id, chdir / name, chdir / "slurm_logs" / f"{name}-{job_id}.out")

    def wait(self, *states: str, timeout_s: float = 300) -> dict[str, str]:
        return self.cluster.wait_for_job(self.id, states, timeout_s)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 240) -> None:
        deadline = time.time() + timeout_s
        while not condition():
            fields = self.cluster.job(self.id)
            assert fields.get("JobState") not in ENDED, (fields, self.text())
            assert time.time() < deadline, f"{what} not within {timeout_s} s: {self.text()[-3000:]}"
            time.sleep(0.05)

    def logged_steps(self) -> list[int]:
        """The steps whose training metrics are in `metrics.jsonl`, in order."""
        path = self.workdir / "metrics.jsonl"
        records = [json.loads(line) for line in (path.read_text() if path.exists() else "").splitlines()]
        return [record["step"] for record in records if "train/loss" in record]

    def trainer_pids(self) -> list[int]:
        """The training processes of this job (`python -m mnv2_jax.cli.main train --workdir <workdir>`)."""
        pids = []
        for proc in pathlib.Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if argv[1:4] == ["-m", "mnv2_jax.cli.main", "train"] and str(self.workdir) in argv:
                pids.append(int(proc.name))
        return pids

    def signal(self, when: Callable[[], bool], send: Callable[[], object], signum: int, processes: int = 1) -> None:
        """Once `when()`, stops the training processes, `send()`s `signum` through SLURM, waits until each holds it
        pending (or SLURM continued it), and lets them go on."""
        self.wait_for(lambda: when() and len(self.trainer_pids()) == processes, "the point to interrupt at")
        pids = self.trainer_pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        send()
        self.wait_for(lambda: all(holds(pid, signum) for pid in pids), f"{signum} pending in {pids}", 60)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    def interrupt(self, when: Callable[[], bool], send: Callable[[], object], signum: int, processes: int = 1) -> int:
        """`signal(...)`, then waits for the session's preemption checkpoint and returns its step."""
        sessions = len(CHECKPOINTED.findall(self.text()))
        self.signal(when, send, signum, processes)
        self.wait_for(lambda: len(CHECKPOINTED.findall(self.text())) > sessions, "the preemption checkpoint")
        return int(CHECKPOINTED.findall(self.text())[-1])


def holds(pid: int, signum: int) -> bool:
    """Whether process `pid` has `signum` pending, or is no longer stopped (SLURM sends SIGCONT before a
    preemption's SIGTERM) or gone."""
    try:
        status = dict(line.split(":\t", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return True
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return bool(pending & (1 << (signum - 1))) or not status["State"].startswith("T")


QUICKSTART = str(REPO / "configs" / "quickstart.py")  # the jobs run in their own folders


@pytest.fixture(scope="module")
def run_args(folder):
    config, *args = small_run_config_args(folder, **RUN)[1:]
    assert config == "configs/quickstart.py"
    return ["--config", QUICKSTART, *args]


@pytest.fixture(scope="module")
def uninterrupted(cluster, run_args, tmp_path_factory):
    """The run trained to the end by `mnv2 sweep --runner slurm`, started as `<venv>/bin/mnv2` with the venv's bin
    not on PATH (its jobs once ran a bare `mnv2`, not found). Submitted at once, waited for by the tests."""
    root = tmp_path_factory.mktemp("sweep")
    overrides = dict(arg.removeprefix("--config.").split("=", 1) for arg in run_args[2:])
    sweep = {"config": QUICKSTART, "overrides": overrides, "variants": [{"name": "a"}]}
    (root / "one.py").write_text(f"def get_sweep():\n    return {sweep!r}\n")
    program = pathlib.Path(sys.executable).parent / "mnv2"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if pathlib.Path(p) != program.parent)
    command = [str(program), "sweep", "one.py", "--root", str(root / "runs"), "--runner", "slurm"]
    cluster.run(*command, cwd=root, env={"PATH": path})
    workdir = root / "runs" / "one" / "a"
    job_id = json.loads((workdir / "sweep_run.json").read_text())["slurm_job"]
    return Job(cluster, job_id, workdir, root / "slurm_logs" / f"one.a-{job_id}.out")


def test_a_sweep_from_an_unactivated_venv_trains_its_job_to_the_end(uninterrupted):
    fields = uninterrupted.wait(*ENDED)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "0"), (
        uninterrupted.text()
    )
    assert json.loads((uninterrupted.workdir / "finished.json").read_text())["step"] == STEPS
    assert uninterrupted.logged_steps() == list(range(1, STEPS + 1))


def test_sigterm_every_way_slurm_sends_it_checkpoints_requeues_and_ends_bitwise_equal(
    cluster, uninterrupted, run_args, tmp_path
):
    """One job, interrupted three times: `scancel --signal=TERM` (job steps only), `scancel --full --signal=TERM`
    (the batch shell too), and a job of a higher-priority partition preempting it (SIGTERM, requeue by SLURM)."""
    job = Job.submit(cluster, tmp_path, "interrupted", run_args)
    ends = [job.interrupt(lambda: 1 in job.logged_steps(), lambda: cluster.run("scancel", "--signal=TERM", job.id),
                          signal.SIGTERM)]  # fmt: skip
    assert ends[0] >= 2
    full = lambda: cluster.run("scancel", "--full", "--signal=TERM", job.id)
    ends.append(job.interrupt(lambda: ends[0] + 1 in job.logged_steps(), full, signal.SIGTERM))
    uninterrupted.wait("COMPLETED")  # the preemption below must not preempt it
    urgent = [
        "sbatch", "--parsable", "--partition=urgent", "--exclusive", f"--output={tmp_path}/urgent.out", "--wrap=true",
    ]  # fmt: skip
    ends.append(job.interrupt(lambda: ends[1] + 1 in job.logged_steps(), lambda: cluster.run(*urgent),
                              signal.SIGTERM))  # fmt: skip
    assert ends[0] < ends[1] < ends[2] < STEPS, ends
    fields = job.wait(*ENDED)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "3"), job.text()
    assert job.text().count("requeueing job") >= 2  # by the script; the preempted job SLURM requeues itself
    (last, resumed), (_, expected) = saved_state(job.workdir), saved_state(uninterrupted.workdir)
    assert last == STEPS
    assert_bitwise_equal(resumed, expected)


def test_two_processes_stopped_in_their_first_step_twice_fail_naming_the_time_limit_and_then_resume(
    cluster, run_args, tmp_path
):
    """`--gpus_per_node 2`: one JAX process per (named) GPU, started by srun. Each session is signalled before its
    first step ends, as with a time limit shorter than start-up and compilation: first `scancel --full
    --signal=USR1` (srun turns a SIGTERM it gets itself into SIGKILL of its tasks, but passes SIGUSR1 on; the
    trainer treats it as SIGTERM), then `scancel --signal=TERM` (to the tasks). The second session stops with a
    one-line error in both processes, and the job fails instead of being requeued forever; submitting the script
    again, as the error says, resumes and trains to the end."""
    env = {"XLA_FLAGS": xla_flags(1), **WITHOUT_COMPILATION_CACHE}
    steps = 4  # what it checks happens in the first steps; two processes step slowly
    args = [*run_args, f"--config.num_train_steps={steps}"]
    job = Job.submit(cluster, tmp_path, "two", args, "--gpus_per_node", "2", **env)
    started = lambda sessions: lambda: job.text().count("training steps ") == 2 * sessions
    full_usr1 = lambda: cluster.run("scancel", "--full", "--signal=USR1", job.id)
    assert job.interrupt(started(1), full_usr1, signal.SIGUSR1, processes=2) == 1
    assert "SIGTERM or SIGUSR1: passed on to the training" in job.text()
    job.signal(started(2), lambda: cluster.run("scancel", "--signal=TERM", job.id), signal.SIGTERM, processes=2)
    fields = job.wait(*ENDED)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "2:0", "1"), job.text()
    error = "within the first step in two sessions in a row (steps 0->1, 1->2)"
    assert job.text().count(error) == 2 and "time limit (sbatch --time)" in job.text()
    assert job.text().count("process 1 of 2;") == 2

    done = cluster.run("sbatch", "--parsable", str(tmp_path / "slurm_logs" / "two.sbatch"), env=env)
    again = Job(cluster, done.stdout.strip(), job.workdir, tmp_path / "slurm_logs" / f"two-{done.stdout.strip()}.out")
    fields = again.wait(*ENDED)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), again.text()
    assert json.loads((job.workdir / "finished.json").read_text())["step"] == steps
    assert job.logged_steps() == list(range(1, steps + 1))  # none lost or repeated by the resumes


def test_requeue_off_and_gpu_requests_on_the_live_cluster(cluster, tmp_path):
    """`--no_requeue` overrides the cluster's JobRequeue=1; more GPUs than a node has is an error at submit time."""
    command = [sys.executable, "launch/slurm.py", "--chdir", str(tmp_path), "--extra_sbatch=--hold"]
    requeue = {}
    for name, options in (("default", []), ("off", ["--no_requeue"])):
        done = cluster.run(*command, "--job_name", name, *options, "--", "true", cwd=REPO)
        job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)
        requeue[name] = cluster.job(job_id)["Requeue"]
        cluster.run("scancel", job_id)
    assert requeue == {"default": "1", "off": "0"}
    done = cluster.run(*command, "--job_name", "big", "--gpus_per_node", "4", "--", "true", cwd=REPO, check=False)
    assert done.returncode == 2
    assert "gpus_per_node=4, but the nodes of the cluster have at most 2 GPUs (sinfo: gpu:2)" in done.stderr
    assert not list((tmp_path / "slurm_logs").glob("big-*"))
