"""The SLURM and TPU-pod launchers, checked offline: dry runs, stub executables and JAX's own cluster detection.

Nothing here reaches a cluster: `srun`, `scontrol`, `sbatch` and `gcloud` are stubs on PATH or are never run.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import tempfile
from unittest import mock

import jax
import pytest
from conftest import REPO
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster
from jax._src.clusters import cluster as cluster_module

from mnv2_jax.errors import UserError
from mnv2_jax.launch import slurm, tpu
from mnv2_jax.training import distributed, preemption

# A command whose last argument holds shell metacharacters: it must reach the trainer unchanged.
TRAIN = [
    "mnv2",
    "train",
    "--config",
    "configs/imagenet.py",
    "--workdir",
    "/shared/workdirs/imagenet",
    "--config.model.stage_expansion=(1,4,4,6,6,6,6)",
]
GS_TRAIN = [*TRAIN[:5], "gs://my-bucket/workdirs/imagenet", TRAIN[6]]
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
POD = tpu.TpuPod(name="mnv2-pod", zone="us-central2-b")

# The batch script of `job()` running TRAIN from directory {chdir}.
EXPECTED_SCRIPT = """\
#!/bin/bash
#SBATCH --job-name=imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
#SBATCH --chdir={chdir}
#SBATCH --output=slurm_logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --qos=high
# Written by launch/slurm.py. To resume, submit it again (or rerun the command): training resumes from the
# workdir's latest checkpoint.
set -uo pipefail
# SLURM may signal this shell (preemption, scancel --full or --batch): it passes the signal on to the
# training and waits for it to checkpoint.
trap 'echo "SIGTERM or SIGUSR1: passed on to the training, which checkpoints and stops" >&2; if [ -n "${{pid:-}}" ]; \
then kill -s "$forward" "$pid" 2>/dev/null; else signalled=1; fi' TERM USR1
cd {chdir}
source .venv/bin/activate
export MNV2_DISTRIBUTED=1
forward=USR1  # srun turns a SIGTERM into SIGKILL of its tasks; it passes SIGUSR1 on
srun --kill-on-bad-exit=1 mnv2 train --config configs/imagenet.py --workdir /shared/workdirs/imagenet \
'--config.model.stage_expansion=(1,4,4,6,6,6,6)' &
pid=$!
# a signal that came before $pid was set is passed on now
[ -n "${{signalled:-}}" ] && kill -s "$forward" "$pid" 2>/dev/null
# a trapped signal ends `wait` early: wait again until the training has exited, then take its status
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"
status=$?
if [ "$status" -eq 143 ]; then
  echo "training checkpointed and stopped (preemption or time limit): requeueing job $SLURM_JOB_ID; its rerun \
resumes from the checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID" || exit "$status"
  exit 0
fi
exit "$status"
"""
# `launch/slurm.py` options of that job, and what its dry run prints after the script.
SLURM_ARGV = ["--job_name", "imagenet", "--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time",
              "24:00:00", "--cpus_per_task", "12", "--setup", "source .venv/bin/activate", "--extra_sbatch=--qos=high",
              "--chdir", "/shared/mnv2"]  # fmt: skip
DRY_RUN_PLAN = "# dry run: would write the script above to {script} and run:\nsbatch --parsable {script}\n"


def job(**overrides) -> slurm.SlurmJob:
    """The 2-node x 8-GPU job of the examples."""
    values = dict(job_name="imagenet", nodes=2, gpus_per_node=8, partition="gpu", time="24:00:00", cpus_per_task=12,
                  setup=("source .venv/bin/activate",), extra_sbatch=("--qos=high",))  # fmt: skip
    return slurm.SlurmJob(**{**values, **overrides})


def must_not_run(*args, **kwargs):
    raise AssertionError(f"a dry run ran {args}")


def stub(directory, name: str, body: str) -> None:
    """An executable shell script `directory/name`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def script_exports(script: str) -> dict[str, str]:
    """The variables the script exports to srun's tasks."""
    exports = [line.removeprefix("export ") for line in script.splitlines() if line.startswith("export ")]
    return dict(line.split("=", 1) for line in exports)


def slurm_task_environment(job_: slurm.SlurmJob, task: int) -> dict[str, str]:
    """What SLURM sets for task `task` of `job_` (job 4242 on nodes gpu001 and gpu002), plus the script's exports."""
    per_node = slurm.tasks_per_node(job_)
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[001-002]",
        "SLURM_NTASKS": str(job_.nodes * per_node),
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task % per_node),
    }
    return {**env, **script_exports(slurm.sbatch_script(job_, TRAIN, "/shared/mnv2"))}


# Variables by which JAX recognises a cluster, or that our launchers set: removed for each simulated process.
CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAX_COORDINATOR",
                     "JAX_LOCAL_DEVICE_IDS", "MNV2_")  # fmt: skip


def cluster_environment(variables: dict[str, str]) -> dict[str, str]:
    """This process's environment without cluster variables (XLA_FLAGS, PATH... stay), plus `variables`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}, **variables}


def detect() -> tuple:
    """JAX's own detection of the distributed settings from this process's environment (what initialize() uses)."""
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator_address=None,
        num_processes=None,
        process_id=None,
        local_device_ids=None,
        cluster_detection_method=None,
        initialization_timeout=10,
    )


# SLURM: the script


def test_slurm_dry_run_is_the_exact_script_and_writes_and_submits_nothing(tmp_path, capsys):
    script_path = tmp_path / "scripts" / "imagenet.sbatch"
    text = slurm.submit(job(), TRAIN, "/shared/mnv2", str(script_path), dry_run=True, run=must_not_run)
    expected = EXPECTED_SCRIPT.format(chdir="/shared/mnv2") + DRY_RUN_PLAN.format(script=script_path)
    assert text == expected
    assert not (tmp_path / "scripts").exists()

    # The command line prints the same and submits nothing either.
    with mock.patch.object(subprocess, "run", must_not_run):
        assert slurm.main([*SLURM_ARGV, "--script", str(script_path), "--dry-run", "--", *TRAIN]) == 0
    assert capsys.readouterr().out == expected
    assert not (tmp_path / "scripts").exists()


def test_slurm_per_node_runs_one_process_per_node_owning_all_its_gpus():
    lines = slurm.sbatch_script(job(processes="per_node"), TRAIN, "/shared/mnv2").splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --gpus-per-node=8" in lines
    assert not any("gpus-per-task" in line for line in lines)
    assert lines.index("export MNV2_DISTRIBUTED=1") < lines.index("export MNV2_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7")
    assert lines.index("export MNV2_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7") < next(
        i for i, line in enumerate(lines) if line.startswith("srun ")
    )
    # One process per GPU: JAX's own default (SLURM_LOCALID) picks the GPU, so nothing is exported.
    assert "MNV2_LOCAL_DEVICE_IDS" not in slurm.sbatch_script(job(), TRAIN, "/shared/mnv2")


def test_slurm_options_are_left_out_when_unset_and_requeue_can_be_off(tmp_path, capsys):
    script = slurm.sbatch_script(slurm.SlurmJob(job_name="quick", requeue=False), TRAIN, "/repo")
    argv = ["--job_name", "quick", "--no_requeue", "--chdir", "/repo", "--script", str(tmp_path / "q"), "--dry-run"]
    assert slurm.main([*argv, "--", *TRAIN]) == 0
    assert capsys.readouterr().out.startswith(script)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=quick",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",  # no GPUs asked for: one process per node, no --gpus-per-node
        "#SBATCH --chdir=/repo",
        "#SBATCH --output=slurm_logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=TERM@300",
        "#SBATCH --no-requeue",  # not only no --requeue: a cluster's JobRequeue=1 would requeue it
    ]
    assert "scontrol" not in script


def sinfo_and_sbatch(gres: str):
    """A `run` answering `sinfo --format=%G` with `gres` (one line per node) and sbatch with job 99."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        stdout = gres if command[0] == "sinfo" else "99\n"
        return subprocess.CompletedProcess(command, 0, stdout, "")

    return run, calls


def test_gpus_are_requested_only_when_asked_and_must_fit_the_partitions_nodes(tmp_path):
    script = str(tmp_path / "j.sbatch")
    cpu_only = slurm.SlurmJob(job_name="cpu", nodes=2)
    run, calls = sinfo_and_sbatch("(null)\n(null)\n")
    assert slurm.submit(cpu_only, TRAIN, str(tmp_path), script, dry_run=False, run=run) == "99"
    assert [c[0] for c in calls] == ["sbatch"] and "--gpus-per-node" not in (tmp_path / "j.sbatch").read_text()
    for gres, message in (
        ("gpu:2\ngpu:a100:2(S:0-1)\n", "gpus_per_node=8, but the nodes of partition gpu have at most 2 GPUs"),
        ("(null)\n", "gpu have no GPUs (sinfo: (null)); leave out --gpus_per_node or choose another --partition"),
    ):
        run, calls = sinfo_and_sbatch(gres)
        with pytest.raises(UserError, match=re.escape(message)):
            slurm.submit(job(), TRAIN, str(tmp_path), script, dry_run=False, run=run)
        assert calls == [["sinfo", "--noheader", "--format=%G", "--partition=gpu"]]  # nothing submitted
    run, calls = sinfo_and_sbatch("gpu:8,mps:100\ngpu:4\n")
    assert slurm.submit(job(), TRAIN, str(tmp_path), script, dry_run=False, run=run) == "99"
    with pytest.raises(UserError, match="processes must be per_node when no GPUs are requested"):
        slurm.SlurmJob(job_name="j", processes="per_gpu")


def test_launcher_names_agree_with_the_trainer():
    assert slurm.DISTRIBUTED_ENV == tpu.DISTRIBUTED_ENV == distributed.DISTRIBUTED_ENV
    assert slurm.LOCAL_DEVICE_IDS_ENV == distributed.LOCAL_DEVICE_IDS_ENV
    assert slurm.PREEMPTED_EXIT_STATUS == preemption.PREEMPTED_EXIT_STATUS


# SLURM: what each process gets, and what JAX makes of it


@pytest.mark.parametrize("task", [0, 9, 15])
def test_slurm_task_environment_gives_jax_the_coordinator_count_id_and_one_gpu(task):
    env = slurm_task_environment(job(), task)
    assert env["MNV2_DISTRIBUTED"] == "1" and "MNV2_LOCAL_DEVICE_IDS" not in env
    with mock.patch.dict(os.environ, cluster_environment(env), clear=True):
        address, count, process_id, local_device_ids = detect()
    # The first node of the step; the port is 61440 + SLURM_JOB_ID % 4096 (JAX's slurm_cluster.py).
    assert address == "gpu001:61586"
    assert (count, process_id, local_device_ids) == (16, task, [task % 8])


@pytest.mark.parametrize("processes, expected", [("per_gpu", None), ("per_node", list(range(8)))])
def test_maybe_initialize_passes_the_local_device_ids_of_the_script(monkeypatch, processes, expected):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    env = slurm_task_environment(job(processes=processes), task=1)
    with mock.patch.dict(os.environ, cluster_environment(env), clear=True):
        distributed.maybe_initialize(timeout_s=60)
        assert len(calls) == 1 and calls[0]["local_device_ids"] == expected
        assert calls[0]["initialization_timeout"] == 60
        # What JAX then uses: the given device ids, or its own [SLURM_LOCALID] when none are given.
        address, count, process_id, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, calls[0]["local_device_ids"], None, 10
        )
    if processes == "per_node":
        assert (address, count, process_id, devices) == ("gpu001:61586", 2, 1, list(range(8)))
    else:
        assert (address, count, process_id, devices) == ("gpu001:61586", 16, 1, [1])


@pytest.mark.parametrize("value", ["0,x", "0,,1", "0,0", "-1"])
def test_bad_local_device_ids_are_a_user_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", must_not_run)
    with (
        mock.patch.dict(os.environ, cluster_environment({"MNV2_DISTRIBUTED": "1", "MNV2_LOCAL_DEVICE_IDS": value})),
        pytest.raises(UserError, match="MNV2_LOCAL_DEVICE_IDS must be"),
    ):
        distributed.maybe_initialize()


# SLURM: the script's behaviour, run with bash and stub srun/scontrol


def run_script(tmp_path, job_: slurm.SlurmJob, srun_body: str, scontrol_status: int = 0, command=TRAIN, **env: str):
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "srun", srun_body)
    stub(bin_dir, "scontrol", f'printf "%s\\n" "$@" > "$STUB_DIR/scontrol.args"\nexit {scontrol_status}\n')
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.sbatch_script(job_, command, str(tmp_path)))
    variables = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "777",
                 "STUB_DIR": str(tmp_path), **env}  # fmt: skip
    return subprocess.run(["bash", str(script)], env=variables, capture_output=True, text=True, timeout=30)


# A stub srun: records its arguments and the variable every task must get.
SRUN = 'printf "%s\\n" "$@" > "$STUB_DIR/srun.args"\necho "MNV2_DISTRIBUTED=$MNV2_DISTRIBUTED" > "$STUB_DIR/srun.env"\n'


@pytest.mark.parametrize(
    "srun_status, requeue, scontrol_status, script_status, requeued",
    [
        (143, True, 0, 0, True),  # preempted or at the time limit: checkpointed, requeued
        (0, True, 0, 0, False),  # finished
        (1, True, 0, 1, False),  # failed: not requeued (it would fail again)
        (143, False, 0, 143, False),  # requeue off
        (143, True, 1, 143, True),  # the requeue itself failed: the job fails with the trainer's status
    ],
)
def test_sbatch_script_requeues_only_a_preempted_run(
    tmp_path, srun_status, requeue, scontrol_status, script_status, requeued
):
    job_ = slurm.SlurmJob(job_name="j", nodes=2, requeue=requeue)
    done = run_script(tmp_path, job_, SRUN + f"exit {srun_status}\n", scontrol_status)
    assert done.returncode == script_status, done.stderr
    assert (tmp_path / "srun.args").read_text().splitlines() == ["--kill-on-bad-exit=1", *TRAIN]
    assert (tmp_path / "srun.env").read_text() == "MNV2_DISTRIBUTED=1\n"
    scontrol = tmp_path / "scontrol.args"
    assert scontrol.exists() == requeued
    if requeued:
        assert scontrol.read_text().splitlines() == ["requeue", "777"]


# A stand-in for the training (or for srun and its tasks): checkpoints and exits 143 on SIGTERM or SIGUSR1 (as the
# trainer does), after signalling the batch shell as a preemption or `scancel --batch` would.
TRAINING = (
    "trap 'echo TERM > \"$STUB_DIR/signal\"; exit 143' TERM; trap 'echo USR1 > \"$STUB_DIR/signal\"; exit 143' USR1; "
    "kill -TERM $PPID; sleep 10 & wait; exit 1"
)


@pytest.mark.parametrize("nodes, forwarded", [(1, "TERM"), (2, "USR1")])
def test_sbatch_script_passes_its_own_sigterm_on_and_requeues(tmp_path, nodes, forwarded):
    """SLURM can signal the batch shell alone (`scancel --batch`, `--signal=B:...`): it passes the signal on, as
    SIGTERM to a single process it runs itself, as SIGUSR1 to srun (which would turn a SIGTERM into SIGKILL of its
    tasks), waits for the training and requeues."""
    if nodes == 1:  # the training runs in the batch step; srun only starts the signal relay
        command, srun = ["bash", "-c", TRAINING], SRUN
    else:
        command, srun = TRAIN, TRAINING
    done = run_script(tmp_path, slurm.SlurmJob(job_name="j", nodes=nodes), srun, command=command)
    assert done.returncode == 0, done.stderr
    assert "SIGTERM or SIGUSR1: passed on to the training" in done.stderr
    assert (tmp_path / "signal").read_text().strip() == forwarded
    assert (tmp_path / "scontrol.args").read_text().splitlines() == ["requeue", "777"]
    if nodes == 1:
        srun_args = (tmp_path / "srun.args").read_text().splitlines()
        assert (
            srun_args[:4] == ["--overlap", "--ntasks=1", "bash", "-c"]
            and "MNV2_DISTRIBUTED=\n" in (tmp_path / "srun.env").read_text()
        )


def test_a_signal_to_the_batch_shell_before_the_training_started_is_passed_on_once_it_has(tmp_path):
    """SLURM may signal the batch shell before `$pid` is set (a preemption at start-up): the signal is not lost."""
    waits = "trap 'echo TERM > \"$STUB_DIR/signal\"; exit 143' TERM; sleep 10 & wait; exit 1"
    job_ = slurm.SlurmJob(job_name="j", nodes=1, setup=("kill -TERM $$",))
    done = run_script(tmp_path, job_, SRUN, command=["bash", "-c", waits])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "scontrol.args").read_text().splitlines() == ["requeue", "777"]


# SLURM: submission with a stub sbatch


def test_submit_writes_the_script_runs_sbatch_and_returns_the_job_id(tmp_path, monkeypatch):
    stub(tmp_path / "bin", "sbatch", 'printf "%s\\n" "$@" > "$STUB_DIR/sbatch.args"\necho "31337;cluster"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_DIR", str(tmp_path))
    chdir, script_path = tmp_path / "repo", tmp_path / "a" / "b" / "imagenet.sbatch"
    assert slurm.submit(job(), TRAIN, str(chdir), str(script_path), dry_run=False) == "31337"
    assert script_path.read_text() == EXPECTED_SCRIPT.format(chdir=chdir)
    assert (tmp_path / "sbatch.args").read_text().splitlines() == ["--parsable", str(script_path)]
    assert (chdir / "slurm_logs").is_dir()  # sbatch would not create the log's directory


def test_submit_reports_an_sbatch_failure_in_one_line(tmp_path, monkeypatch):
    stub(tmp_path / "bin", "sbatch", 'echo "sbatch: error: invalid partition specified: gpux" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(UserError, match=r"^sbatch failed with exit status 1: sbatch: error: invalid partition"):
        slurm.submit(job(), TRAIN, str(tmp_path), str(tmp_path / "j.sbatch"), dry_run=False)


# SLURM: options and command-line errors


def test_slurm_job_from_mapping_validates_each_field():
    assert slurm.SlurmJob.from_mapping({"job_name": "j", "setup": "module load cuda"}).setup == ("module load cuda",)
    assert slurm.SlurmJob.from_mapping({"job_name": "j", "extra_sbatch": ["--qos=high"]}).extra_sbatch == (
        "--qos=high",
    )
    numbers = slurm.SlurmJob.from_mapping({"job_name": "j", "time": 90, "account": 1234})  # as `mnv2 sweep` types them
    assert (numbers.time, numbers.account) == ("90", "1234")
    with pytest.raises(UserError, match=r"unknown SLURM job option 'gpus'; allowed: job_name, nodes, gpus_per_node"):
        slurm.SlurmJob.from_mapping({"job_name": "j", "gpus": 8})
    with pytest.raises(UserError, match="job_name is required"):
        slurm.SlurmJob.from_mapping({"nodes": 2})
    bad = {
        "processes": ("per_task", "processes must be one of per_gpu, per_node, got 'per_task'"),
        "nodes": (True, "nodes must be a positive integer, got True"),
        "gpus_per_node": (0, "gpus_per_node must be a positive integer, got 0"),
        "time": ("1 day", "time must be a SLURM time limit"),
        "extra_sbatch": ("qos=high", "extra_sbatch must be sbatch options such as --qos=high"),
        "signal_before_end_s": (0, "signal_before_end_s must be a number of seconds"),
        "requeue": ("yes", "requeue must be True or False"),
        "job_name": ("a b", "job_name must be a name without spaces"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(UserError, match=f"^{message}"):
            slurm.SlurmJob.from_mapping({"job_name": "j", field: value})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--job_name", "j", "--processes", "per_task", "--", *TRAIN], "processes must be one of per_gpu, per_node"),
        (["--job_name", "j", "--nodes", "0", "--", *TRAIN], "nodes must be a positive integer, got 0"),
        (["--job_name", "j", "--nodes", "two", "--", *TRAIN], "argument --nodes: invalid int value: 'two'"),
        (["--job_name", "j"], "no command: give it after --"),
        (["--job_name", "j", "--"], "no command: give it after --"),
        (["--nodes", "2", "--", *TRAIN], "the following arguments are required: --job_name"),
        (["--job_name", "j", "--gpus", "8", "--", *TRAIN], "unrecognized arguments: --gpus 8"),
    ],
)
def test_slurm_command_line_errors_are_one_line_with_status_2(argv, message, capsys):
    with mock.patch.object(subprocess, "run", must_not_run):
        assert slurm.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("launch/slurm.py: error: ") and message in err


# TPU pod: the commands


def test_tpu_create_stop_delete_commands():
    pod = tpu.TpuPod(name="mnv2-pod", zone="us-central2-b", accelerator_type="v4-32", project="my-proj", spot=True)
    where = ["--zone", "us-central2-b", "--project", "my-proj"]
    assert tpu.create_commands(pod) == [
        [
            *GCLOUD,
            "create",
            "mnv2-pod",
            *where,
            "--accelerator-type",
            "v4-32",
            "--version",
            "tpu-ubuntu2204-base",
            "--spot",
        ]
    ]
    assert tpu.create_commands(POD) == [
        [
            *GCLOUD,
            "create",
            "mnv2-pod",
            "--zone",
            "us-central2-b",
            "--accelerator-type",
            "v4-32",
            "--version",
            "tpu-ubuntu2204-base",
        ]
    ]
    assert tpu.stop_commands(pod) == [[*GCLOUD, "stop", "mnv2-pod", *where]]
    assert tpu.delete_commands(pod) == [[*GCLOUD, "delete", "mnv2-pod", *where, "--quiet"]]


def test_tpu_setup_installs_the_local_versions_on_every_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pack, copy, install = tpu.setup_commands(POD, str(REPO), packages={"optax": "0.2.9"})
    archive = str(tmp_path / "mnv2-pod-mnv2_jax.tar.gz")
    assert pack[:3] == ["tar", "-czf", archive] and pack[-3:] == ["-C", str(REPO), "."]
    assert copy == [*GCLOUD, "scp", archive, "mnv2-pod:mnv2_jax.tar.gz", "--zone", "us-central2-b", "--worker=all"]
    assert install[:10] == [*GCLOUD, "ssh", "mnv2-pod", "--zone", "us-central2-b", "--worker=all", "--command"]
    remote = shlex.split(install[10])
    version = importlib.metadata.version
    for requirement in [f"jax[tpu]=={version('jax')}", f"jaxlib=={version('jaxlib')}", f"flax=={version('flax')}",
                        f"orbax-checkpoint=={version('orbax-checkpoint')}", "optax==0.2.9"]:  # fmt: skip
        assert requirement in remote
    assert remote[-2:] == ["-e", "~/mnv2_jax"]
    assert "python3.11 -m venv ~/mnv2_jax/.venv" in install[10]
    assert "tar -xzf ~/mnv2_jax.tar.gz -C ~/mnv2_jax" in install[10]


def test_tpu_setup_archive_holds_the_sources_without_local_environments(tmp_path, monkeypatch):
    source = tmp_path / "src"
    for path in ["pyproject.toml", "mnv2_jax/a.py", "configs/c.py", ".venv/bin/python", ".git/HEAD",
                 "workdirs/run/checkpoint", "mnv2_jax/__pycache__/a.pyc", "mnv2_jax.egg-info/PKG-INFO"]:  # fmt: skip
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text("[project]\ndependencies = ['jax>=0.10']\n" if path == "pyproject.toml" else "x")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pack = tpu.setup_commands(POD, str(source))[0]
    subprocess.run(pack, check=True, timeout=30)
    with tarfile.open(pack[2]) as archive:
        names = {name.removeprefix("./") for name in archive.getnames() if archive.getmember(name).isfile()}
    assert names == {"pyproject.toml", "mnv2_jax/a.py", "configs/c.py"}


def test_tpu_setup_refuses_a_dependency_it_cannot_pin(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\ndependencies = ['no-such-package-here>=1']\n")
    with pytest.raises(UserError, match="no-such-package-here is not installed here"):
        tpu.setup_commands(POD, str(tmp_path))
    commands = tpu.setup_commands(POD, str(tmp_path), packages={"no-such-package-here": "1.2"})
    assert "no-such-package-here==1.2" in shlex.split(commands[-1][-1])


def test_tpu_run_is_one_command_on_every_worker_and_the_same_on_a_rerun():
    (command,) = tpu.run_commands(POD, GS_TRAIN, job="imagenet")
    assert command[:10] == [*GCLOUD, "ssh", "mnv2-pod", "--zone", "us-central2-b", "--worker=all", "--command"]
    remote = shlex.split(command[10])
    assert remote == ["set", "-o", "pipefail;", "cd", "~/mnv2_jax", "&&", "mkdir", "-p", "~/mnv2_logs", "&&",
                      "MNV2_DISTRIBUTED=1", ".venv/bin/mnv2", *GS_TRAIN[1:], "2>&1", "|", "tee", "-a",
                      "~/mnv2_logs/imagenet.log"]  # fmt: skip
    # Resuming is running the same command again.
    assert tpu.run_commands(POD, GS_TRAIN, job="imagenet") == [command]


def test_tpu_run_remote_command_in_a_shell_keeps_the_arguments_and_the_exit_status(tmp_path):
    # The remote command, run by bash in a home directory with a stub trainer in the checkout's virtualenv.
    trainer = 'printf "%s\\n" "$@"\necho "MNV2_DISTRIBUTED=$MNV2_DISTRIBUTED"\nexit 143\n'
    stub(tmp_path / "mnv2_jax" / ".venv" / "bin", "mnv2", trainer)
    remote = tpu.run_commands(POD, GS_TRAIN, job="imagenet")[0][-1]
    env = {**os.environ, "HOME": str(tmp_path)}
    for _ in range(2):  # preempted, then rerun: the log is appended to
        done = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 143  # the trainer's, not tee's
    once = [*GS_TRAIN[1:], "MNV2_DISTRIBUTED=1"]
    assert (tmp_path / "mnv2_logs" / "imagenet.log").read_text().splitlines() == once + once


def test_tpu_run_refuses_a_workdir_the_workers_do_not_share():
    refusal = r"--workdir must be a gs:// path on a TPU pod, got '/shared/workdirs/imagenet': the workers do not share"
    with pytest.raises(UserError, match=refusal):
        tpu.run_commands(POD, TRAIN, job="imagenet")
    with pytest.raises(UserError, match="got no --workdir"):
        tpu.run_commands(POD, TRAIN[:4], job="imagenet")
    assert tpu.run_commands(POD, TRAIN, job="imagenet", allow_local_workdir=True)
    assert tpu.run_commands(POD, [*TRAIN[:4], "--workdir=gs://b/w"], job="w")
    assert tpu.run_commands(POD, ["python3", "-c", "import jax; print(jax.devices())"], job="devices")


def test_tpu_logs_copies_each_workers_log():
    pod = tpu.TpuPod(name="mnv2-pod", zone="us-central2-b", project="p")
    assert tpu.logs_commands(pod, "imagenet", workers=3, local_dir="tpu_logs") == [
        ["mkdir", "-p", "tpu_logs/imagenet"],
        *[
            [
                *GCLOUD,
                "scp",
                "mnv2-pod:mnv2_logs/imagenet.log",
                f"tpu_logs/imagenet/worker-{k}.log",
                "--zone",
                "us-central2-b",
                "--project",
                "p",
                f"--worker={k}",
            ]
            for k in range(3)
        ],
    ]


def test_tpu_execute_runs_in_order_and_stops_at_the_first_failure():
    ran = []

    def run(command, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, {"b": 5}.get(command[0], 0))

    assert tpu.execute([["a"], ["b", "x y"], ["c"]], dry_run=False, run=run) == 5
    assert ran == [["a"], ["b", "x y"]]
    assert tpu.execute([["a"], ["c"]], dry_run=False, run=run) == 0


# What `launch/tpu.py ACTION --name mnv2-pod --zone us-central2-b --project my-proj --spot --dry-run` prints, for
# setup with `--source_dir {source} --package jax==0.10.2 --package jaxlib==0.10.2` and an archive in {tmp}.
WHERE = "--zone us-central2-b --project my-proj"
SETUP_REMOTE = (
    "(python3.11 -c 'import ensurepip' 2>/dev/null || (sudo apt-get update -q && "
    "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11-venv)) && mkdir -p ~/mnv2_jax && "
    "tar -xzf ~/mnv2_jax.tar.gz -C ~/mnv2_jax && rm ~/mnv2_jax.tar.gz && python3.11 -m venv ~/mnv2_jax/.venv && "
    "~/mnv2_jax/.venv/bin/pip install -q --upgrade pip && "
    "~/mnv2_jax/.venv/bin/pip install -q 'jax[tpu]==0.10.2' jaxlib==0.10.2 -e ~/mnv2_jax"
)
RUN_REMOTE = (
    "set -o pipefail; cd ~/mnv2_jax && mkdir -p ~/mnv2_logs && MNV2_DISTRIBUTED=1 .venv/bin/mnv2 train "
    "--config configs/imagenet.py --workdir gs://my-bucket/workdirs/imagenet "
    "'--config.model.stage_expansion=(1,4,4,6,6,6,6)' 2>&1 | tee -a ~/mnv2_logs/imagenet.log"
)
TPU_DRY_RUNS = {
    "create": [
        f"gcloud compute tpus tpu-vm create mnv2-pod {WHERE} --accelerator-type v4-32 --version tpu-ubuntu2204-base "
        "--spot"
    ],
    "setup": [
        "tar -czf {tmp}/mnv2-pod-mnv2_jax.tar.gz --exclude-vcs --exclude=.venv --exclude=workdirs "
        "--exclude=slurm_logs --exclude=tpu_logs --exclude=__pycache__ '--exclude=*.egg-info' "
        "--exclude=.pytest_cache --exclude=.ruff_cache --exclude=build --exclude=.whl -C {source} .",
        f"gcloud compute tpus tpu-vm scp {{tmp}}/mnv2-pod-mnv2_jax.tar.gz mnv2-pod:mnv2_jax.tar.gz {WHERE} "
        "--worker=all",
        f"gcloud compute tpus tpu-vm ssh mnv2-pod {WHERE} --worker=all --command {shlex.quote(SETUP_REMOTE)}",
    ],
    "run": [f"gcloud compute tpus tpu-vm ssh mnv2-pod {WHERE} --worker=all --command {shlex.quote(RUN_REMOTE)}"],
    "logs": [
        "mkdir -p tpu_logs/imagenet",
        *[
            f"gcloud compute tpus tpu-vm scp mnv2-pod:mnv2_logs/imagenet.log tpu_logs/imagenet/worker-{k}.log {WHERE} "
            f"--worker={k}"
            for k in range(4)
        ],
    ],
    "stop": [f"gcloud compute tpus tpu-vm stop mnv2-pod {WHERE}"],
    "delete": [f"gcloud compute tpus tpu-vm delete mnv2-pod {WHERE} --quiet"],
}


def test_tpu_dry_run_prints_each_command_and_runs_nothing(tmp_path, monkeypatch, capsys):
    for program in ("gcloud", "tar", "mkdir"):  # if anything ran, it would leave a mark
        stub(tmp_path / "bin", program, f'touch "{tmp_path}/ran-{program}"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text("[project]\ndependencies = ['jax>=0.10']\n")
    base = ["--name", "mnv2-pod", "--zone", "us-central2-b", "--project", "my-proj", "--spot", "--dry-run"]
    extra = {
        "setup": ["--source_dir", str(source), "--package", "jax==0.10.2", "--package", "jaxlib==0.10.2"],
        "run": ["--", *GS_TRAIN],
        "logs": ["--job", "imagenet", "--workers", "4"],
    }
    for action, lines in TPU_DRY_RUNS.items():
        assert tpu.main([action, *base, *extra.get(action, [])]) == 0
        expected = "".join(line.format(tmp=tmp_path, source=source) + "\n" for line in lines)
        assert capsys.readouterr().out == expected, action
    assert not list(tmp_path.glob("ran-*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", "--name", "My_Pod", "--zone", "us-central2-b"], "name must be a TPU name"),
        (["create", "--zone", "us-central2-b"], "the following arguments are required: --name"),
        (["resize", "--name", "p", "--zone", "us-central2-b"], "argument action: invalid choice: 'resize'"),
        (["create", "--name", "p", "--zone", "us-central2-b", "--", *GS_TRAIN], "create takes no command after --"),
        (["run", "--name", "p", "--zone", "us-central2-b"], "no command: give it after --"),
        (["run", "--name", "p", "--zone", "us-central2-b", "--", *TRAIN], "--workdir must be a gs:// path"),
        (["logs", "--name", "p", "--zone", "us-central2-b", "--job", "j"], "logs needs --job NAME and --workers K"),
        (["setup", "--name", "p", "--zone", "us-central2-b", "--package", "jax"], "package must be NAME==VERSION"),
    ],
)
def test_tpu_command_line_errors_are_one_line_with_status_2(argv, message, capsys):
    assert tpu.main([*argv, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("launch/tpu.py: error: ") and message in err


def test_tpu_pod_from_mapping_validates_each_field():
    assert tpu.TpuPod.from_mapping({"name": "p", "zone": "us-central2-b", "spot": True}).spot
    with pytest.raises(UserError, match=r"unknown TPU pod option 'type'; allowed: name, zone, accelerator_type"):
        tpu.TpuPod.from_mapping({"name": "p", "zone": "us-central2-b", "type": "v4-32"})
    with pytest.raises(UserError, match="zone is required"):
        tpu.TpuPod.from_mapping({"name": "p"})
    with pytest.raises(UserError, match="remote_dir must be a path relative to the home directory"):
        tpu.TpuPod.from_mapping({"name": "p", "zone": "us-central2-b", "remote_dir": "/opt/mnv2"})
    with pytest.raises(UserError, match="accelerator_type must be a TPU type"):
        tpu.TpuPod.from_mapping({"name": "p", "zone": "us-central2-b", "accelerator_type": "v4 32"})


def test_tpu_worker_environment_gives_jax_the_coordinator_count_and_id(monkeypatch):
    # What jax.distributed.initialize() reads on worker 2 of a 4-worker pod: the TPU VM metadata (faked here).
    metadata = {
        "agent-worker-number": "2",
        "worker-network-endpoints": "10.130.0.5,10.130.0.6,10.130.0.7,10.130.0.8",
        "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\n",
    }
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata.get(key, ""), 200))
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(cluster_module, "running_in_cloud_tpu_vm", True)
    with mock.patch.dict(os.environ, cluster_environment({"MNV2_DISTRIBUTED": "1"}), clear=True):
        address, count, process_id, local_device_ids = detect()
    assert address == f"10.130.0.5:{cloud_tpu_cluster.coordinator_port}"
    assert (count, process_id, local_device_ids) == (4, 2, None)  # None: every local TPU chip


# The scripts


def test_scripts_run_from_the_repository_root():
    def launch(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)

    done = launch("launch/slurm.py", *SLURM_ARGV, "--dry-run", "--", *TRAIN)
    assert done.returncode == 0, done.stderr
    script = "/shared/mnv2/slurm_logs/imagenet.sbatch"  # the default: <chdir>/<log_dir>/<job_name>.sbatch
    assert done.stdout == EXPECTED_SCRIPT.format(chdir="/shared/mnv2") + DRY_RUN_PLAN.format(script=script)
    done = launch("launch/tpu.py", "stop", "--name", "mnv2-pod", "--zone", "us-central2-b", "--dry-run")
    assert (done.returncode, done.stdout) == (0, "gcloud compute tpus tpu-vm stop mnv2-pod --zone us-central2-b\n")
    done = launch("launch/slurm.py", "--job_name", "j", "--processes", "per_core", "--", *TRAIN)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == "launch/slurm.py: error: processes must be one of per_gpu, per_node, got 'per_core'\n"


# Recovery of a spot pod (`run --recover`); the end-to-end run against a stub gcloud is in test_reliability.py.


def fake_gcloud(states: list[str], statuses: dict[str, list[int]]):
    """A `run` for `tpu.execute`/`pod_state`: `describe` answers the next of `states` (GONE: NOT_FOUND), the other
    actions the next of their `statuses` (default 0); every call is recorded."""
    calls = []

    def run(command, check=False, **kwargs):
        action = command[4] if command[:4] == GCLOUD else command[0]
        calls.append(action)
        if action == "describe":
            state = states.pop(0)
            gone = state == "GONE"
            return subprocess.CompletedProcess(command, int(gone), "" if gone else state, "NOT_FOUND" if gone else "")
        return subprocess.CompletedProcess(command, (statuses.get(action) or [0]).pop(0), "", "")

    return run, calls


def test_recovery_commands_follow_the_pods_state(tmp_path, monkeypatch):
    from mnv2_jax.launch import tpu_recovery

    monkeypatch.setattr(tpu, "pinned_requirements", lambda *args: ["jax[tpu]==0.10.2"])
    recovery = tpu_recovery.Recovery(source_dir=str(tmp_path))
    actions = {
        state: [c[4] if c[:4] == GCLOUD else c[0] for c in tpu_recovery.repair_commands(POD, state, recovery)]
        for state in ("READY", "GONE", "PREEMPTED", "TERMINATED")
    }
    assert actions == {
        "READY": [],
        "GONE": ["create", "tar", "scp", "ssh"],
        "PREEMPTED": ["delete", "create", "tar", "scp", "ssh"],
        "TERMINATED": ["delete", "create", "tar", "scp", "ssh"],
    }
    with pytest.raises(tpu_recovery.RecoveryError, match="TPU mnv2-pod is STOPPED: neither running nor preempted"):
        tpu_recovery.repair_commands(POD, "STOPPED", recovery)
    run, _ = fake_gcloud(["GONE"], {})
    assert tpu_recovery.pod_state(POD, run) == "GONE"


def test_recovery_stops_at_a_real_failure_and_after_its_attempts(tmp_path, monkeypatch):
    from mnv2_jax.launch import tpu_recovery

    recovery = tpu_recovery.Recovery(max_attempts=3, poll_s=0.0, local_dir=str(tmp_path / "logs"))
    command = ["mnv2", "train", "--workdir", str(tmp_path / "run")]
    run, calls = fake_gcloud(["READY", "READY"], {"ssh": [2]})  # the command fails on a READY pod
    with pytest.raises(tpu_recovery.RecoveryError, match="failed with exit status 2 on a READY pod"):
        tpu_recovery.run_until_finished(POD, command, "run", recovery, run, allow_local_workdir=True)
    assert calls == ["describe", "ssh", "describe"]
    run, calls = fake_gcloud(["CREATING", "READY", "READY", "READY"], {"ssh": [255, 255, 255]})
    with pytest.raises(tpu_recovery.RecoveryError, match="did not finish in 3 attempts"):
        tpu_recovery.run_until_finished(POD, command, "run", recovery, run, allow_local_workdir=True)
    assert calls == ["describe", "describe", "ssh", "describe", "ssh", "describe", "ssh"]
    logged = (tmp_path / "logs" / "run" / "recovery.jsonl").read_text().splitlines()
    assert len(logged) == 4  # one line per attempt: 1 of the first call, 3 of the second


def test_recover_needs_a_training_run_and_no_dry_run(capsys):
    argv = ["run", "--name", "mnv2-pod", "--zone", "us-central2-b", "--recover"]
    assert tpu.main([*argv, "--", "mnv2", "eval", "--workdir", "gs://b/w"]) == 2
    assert "--recover needs a `mnv2 train --workdir ...` command" in capsys.readouterr().err
    assert tpu.main([*argv, "--dry-run", "--", *GS_TRAIN]) == 2
    assert "--recover goes with run (not with --dry-run" in capsys.readouterr().err
    assert tpu.main([*argv, "--max_attempts", "0", "--", *GS_TRAIN]) == 2
    assert "max_attempts must be an int >= 1, got 0" in capsys.readouterr().err
