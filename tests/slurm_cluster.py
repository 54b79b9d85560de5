"""A live one-node SLURM cluster for the tests: munged, slurmctld and slurmd in a temporary folder, stopped by PID.

scripts/test.sh installs SLURM (`apt-get install slurm-wlm munge`); the daemons need root. The node has this
machine's CPUs and two GPUs that are only names (`Gres=gpu:2` on /dev/null and /dev/zero), so that
`--gpus_per_node 2` gives a job two tasks, one per "GPU", as on a GPU cluster (JAX runs on the CPU). Two
partitions: `debug` (the default) and `urgent`, whose jobs preempt `debug`'s (`PreemptMode=REQUEUE`: SIGTERM, then
SIGKILL after `GraceTime`). `AuthInfo=cred_expire` shortens the wait of a requeued job before it may start again
(SLURM's default is 120 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
REQUEUE_HOLD_S = 5  # AuthInfo=cred_expire: how long a requeued job waits before it may start again

CONFIG = """\
ClusterName=mnv2test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=cred_expire={hold}
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
GresTypes=gpu
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} CPUs={cpus} RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2
"""


def missing() -> str | None:
    """Why a live cluster cannot start here, or None."""
    absent = [name for name in (*DAEMONS, "sbatch", "scontrol") if not shutil.which(name)]
    if absent:
        return f"{', '.join(absent)} not found (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the SLURM daemons need root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Cluster:
    root: pathlib.Path
    env: dict[str, str]  # SLURM_CONF for the client commands
    pid_files: list[pathlib.Path]

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env={**os.environ, **self.env, **kwargs.pop("env", {})}, capture_output=True,
                              text=True, timeout=60, **kwargs)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {done.returncode}: {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, Requeue, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job(self, job_id: str, states: tuple[str, ...], timeout_s: float = 300) -> dict[str, str]:
        """Waits until the job is in one of `states` (e.g. COMPLETED, FAILED); returns its `scontrol` fields."""
        deadline = time.time() + timeout_s
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            assert time.time() < deadline, f"job {job_id} not {'/'.join(states)} within {timeout_s} s: {fields}"
            time.sleep(0.2)

    def stop(self) -> None:
        for pid_file in reversed(self.pid_files):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), 15)


def _munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if encoded.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True, timeout=10).returncode == 0


def _start_munged() -> pathlib.Path | None:
    """Starts munged as the munge user unless one is answering; returns its PID file when it started one."""
    if shutil.which("munge") and _munge_works():
        return None
    for directory in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(directory, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True, timeout=30)
    pid_file = pathlib.Path("/run/munge/munged.pid")
    deadline = time.time() + 20
    while not _munge_works():
        assert time.time() < deadline, "munged did not answer within 20 s"
        time.sleep(0.1)
    return pid_file


def start(root: pathlib.Path) -> Cluster:
    """Starts the cluster's daemons with their files under `root`; its node is idle when this returns."""
    host = socket.gethostname().split(".")[0]
    for name in ("state", "spool"):
        (root / name).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(CONFIG.format(host=host, root=root, cpus=os.cpu_count(), hold=REQUEUE_HOLD_S,
                                  ctld_port=free_port(), slurmd_port=free_port()))  # fmt: skip
    (root / "gres.conf").write_text(f"NodeName={host} Name=gpu File=/dev/null,/dev/zero\n")
    cluster = Cluster(root, {"SLURM_CONF": str(conf)}, [])
    munged = _start_munged()
    if munged is not None:
        cluster.pid_files.append(munged)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(conf)], env={**os.environ, **cluster.env}, check=True, timeout=30)
        cluster.pid_files.append(root / f"{daemon}.pid")
    deadline = time.time() + 60
    while "idle" not in cluster.run("sinfo", "--noheader", "--format=%t", check=False).stdout:
        assert time.time() < deadline, f"the node is not idle within 60 s: see {root}/slurmctld.log, slurmd.log"
        time.sleep(0.2)
    return cluster
