"""Cloud TPU pods: the gcloud commands that create a pod, install this repository on every worker and run a command.

A pod slice (e.g. v4-32: 4 worker VMs) runs one JAX process per worker, and every worker must run the same
command at the same time: `run` uses `gcloud compute tpus tpu-vm ssh --worker=all`. Each process gets
`MNV2_DISTRIBUTED=1`; `jax.distributed.initialize()` reads the coordinator (worker 0), the process count and this
worker's id from the TPU VM metadata. Workers do not share a disk, so `mnv2 train` needs a `gs://` workdir; after a
preemption (spot VMs are stopped or deleted), create and set up the pod again and rerun the same `run` command: it
resumes from the workdir's latest checkpoint. `run --recover` does this by itself (`tpu_recovery.py`).

Every action is a list of commands built by a pure function (`create_commands`, ...), run or printed by `execute`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mnv2_jax.errors import UserError
from mnv2_jax.launch.options import (
    ArgumentParser,
    add_options,
    check,
    check_command,
    check_keys,
    run_cli,
    split_command,
)
from mnv2_jax.launch.slurm import DISTRIBUTED_ENV

PROG = "launch/tpu.py"
ACTIONS = ("create", "setup", "run", "logs", "stop", "delete")
GCLOUD_TPU = ("gcloud", "compute", "tpus", "tpu-vm")
VENV = ".venv"  # the virtual environment inside the checkout on every worker
# Left out of the copy of the checkout (besides version control): local environments, outputs and caches.
ARCHIVE_EXCLUDES = (".venv", "workdirs", "slurm_logs", "tpu_logs", "__pycache__", "*.egg-info", ".pytest_cache",
                    ".ruff_cache", "build", ".whl")  # fmt: skip
_RELATIVE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_JOB = re.compile(r"^[A-Za-z0-9._,=+@%-]+$")

FIELD_HELP = {
    "name": "the TPU's name",
    "zone": "its zone, e.g. us-central2-b",
    "accelerator_type": "e.g. v4-32, v5litepod-16, v6e-16",
    "runtime_version": "the TPU software version (gcloud --version)",
    "project": "the Google Cloud project (default: gcloud's)",
    "spot": "create a spot TPU (cheaper; can be preempted at any time)",
    "remote_dir": "the checkout on every worker, relative to the home directory",
    "log_dir": "per-worker logs on every worker, relative to the home directory",
    "python": "the Python of the workers' virtual environment (installed with apt-get when missing)",
}


@dataclasses.dataclass(frozen=True)
class TpuPod:
    """A TPU VM pod slice and where this repository lives on its workers; invalid values raise UserError."""

    name: str
    zone: str
    accelerator_type: str = "v4-32"
    runtime_version: str = "tpu-ubuntu2204-base"
    project: str | None = None
    spot: bool = False
    remote_dir: str = "mnv2_jax"
    log_dir: str = "mnv2_logs"
    # The workers' Python: Ubuntu 22.04 (tpu-ubuntu2204-base) has 3.10, and mnv2_jax needs 3.11 or later.
    python: str = "python3.11"

    def __post_init__(self) -> None:
        check(_matches(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name), "name",
              "a TPU name: lowercase letters, digits and hyphens, starting with a letter", self.name)  # fmt: skip
        check(_matches(r"[a-z]+-[a-z]+[0-9]+-[a-z]", self.zone), "zone", "a zone such as us-central2-b", self.zone)
        check(_matches(r"v[0-9][a-z0-9]*-[0-9]+", self.accelerator_type), "accelerator_type",
              "a TPU type such as v4-32, v5litepod-16 or v6e-16", self.accelerator_type)  # fmt: skip
        check(_matches(r"[A-Za-z0-9._-]+", self.runtime_version), "runtime_version",
              "a TPU software version such as tpu-ubuntu2204-base", self.runtime_version)  # fmt: skip
        check(self.project is None or _matches(r"[a-z][-a-z0-9:.]*", self.project), "project",
              "a Google Cloud project id", self.project)  # fmt: skip
        check(isinstance(self.spot, bool), "spot", "True or False", self.spot)
        for field in ("remote_dir", "log_dir"):
            value = getattr(self, field)
            ok = isinstance(value, str) and bool(_RELATIVE_PATH.match(value)) and ".." not in value.split("/")
            check(ok, field, "a path relative to the home directory, such as mnv2_jax", value)
        check(_matches(r"python3(\.[0-9]+)?", self.python), "python", "a Python such as python3.11", self.python)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TpuPod:
        """A pod from option names and values (a sweep file's `tpu` dict); unknown names are errors."""
        check_keys(cls, values, "TPU pod")
        missing = [name for name in ("name", "zone") if name not in values]
        if missing:
            raise UserError(f"{missing[0]} is required")
        return cls(**values)


def location(pod: TpuPod) -> list[str]:
    return ["--zone", pod.zone, *(["--project", pod.project] if pod.project else [])]


def ssh_command(pod: TpuPod, remote: str, worker: str = "all") -> list[str]:
    """`gcloud ... ssh` running shell command `remote` on `worker` ("all": every worker at once)."""
    return [*GCLOUD_TPU, "ssh", pod.name, *location(pod), f"--worker={worker}", "--command", remote]


def home(path: str) -> str:
    """`~/path` for a remote shell: the tilde expands, the rest is quoted."""
    return "~/" + shlex.quote(path)


def create_commands(pod: TpuPod) -> list[list[str]]:
    """Creates the pod (all its workers)."""
    command = [*GCLOUD_TPU, "create", pod.name, *location(pod)]
    command += ["--accelerator-type", pod.accelerator_type, "--version", pod.runtime_version]
    return [command + (["--spot"] if pod.spot else [])]


def pinned_requirements(source_dir: str, packages: Mapping[str, str] | None = None) -> list[str]:
    """`NAME==VERSION` of each dependency of the checkout (its pyproject.toml) and jaxlib, as installed here.

    `packages` ({name: version}) overrides versions or adds packages; jax gets its `[tpu]` extra (libtpu).
    """
    path = os.path.join(source_dir, "pyproject.toml")
    try:
        with open(path, "rb") as f:
            dependencies = tomllib.load(f)["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read the dependencies of {path}: {e}") from None
    names = [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", d).group(0) for d in dependencies] + ["jaxlib"]
    overrides = {_canonical(name): (name, version) for name, version in (packages or {}).items()}
    versions: dict[str, tuple[str, str]] = {}
    for name in names:
        if _canonical(name) not in overrides:
            try:
                versions[_canonical(name)] = (name, importlib.metadata.version(name))
            except importlib.metadata.PackageNotFoundError:
                raise UserError(
                    f"{name} is not installed here, so its version cannot be pinned: install it or give "
                    f"--package {name}==VERSION"
                ) from None
    versions.update(overrides)
    return [f"{name}[tpu]=={v}" if key == "jax" else f"{name}=={v}" for key, (name, v) in versions.items()]


def setup_commands(pod: TpuPod, source_dir: str, packages: Mapping[str, str] | None = None) -> list[list[str]]:
    """Copies the checkout at `source_dir` to every worker and installs it with the versions installed here.

    The same pinned versions on every worker (a jaxlib/libtpu skew between hosts fails at startup).
    """
    requirements = pinned_requirements(source_dir, packages)
    flat = pod.remote_dir.replace("/", "_")
    archive = os.path.join(tempfile.gettempdir(), f"{pod.name}-{flat}.tar.gz")
    remote_archive = f"{flat}.tar.gz"  # in the home directory
    pack = ["tar", "-czf", archive, "--exclude-vcs", *(f"--exclude={p}" for p in ARCHIVE_EXCLUDES)]
    pack += ["-C", source_dir, "."]
    copy = [*GCLOUD_TPU, "scp", archive, f"{pod.name}:{remote_archive}", *location(pod), "--worker=all"]
    checkout, pip = home(pod.remote_dir), f"{home(pod.remote_dir)}/{VENV}/bin/pip"
    steps = [
        f"({pod.python} -c 'import ensurepip' 2>/dev/null || (sudo apt-get update -q && "
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {pod.python}-venv))",
        f"mkdir -p {checkout}",
        f"tar -xzf ~/{remote_archive} -C {checkout}",
        f"rm ~/{remote_archive}",
        f"{pod.python} -m venv {checkout}/{VENV}",
        f"{pip} install -q --upgrade pip",
        f"{pip} install -q {shlex.join(requirements)} -e {checkout}",
    ]
    return [pack, copy, ssh_command(pod, " && ".join(steps))]


def training_workdir(command: Sequence[str]) -> str | None:
    """The `--workdir` of a `mnv2 train` command ("" when it has none); None for any other command."""
    if len(command) < 2 or os.path.basename(command[0]) != "mnv2" or command[1] != "train":
        return None
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return ""


def check_workdir(command: Sequence[str], allow_local_workdir: bool = False) -> None:
    """UserError unless a `mnv2 train` command's workdir is on Cloud Storage (or `allow_local_workdir`)."""
    workdir = training_workdir(command)
    if workdir is None or workdir.startswith("gs://") or allow_local_workdir:
        return
    got = repr(workdir) if workdir else "no --workdir"
    raise UserError(
        f"--workdir must be a gs:// path on a TPU pod, got {got}: the workers do not share a disk, so a local "
        "workdir splits the checkpoints between them and a recreated pod cannot resume; use "
        "--workdir gs://BUCKET/..., or --allow_local_workdir for a directory that every worker mounts"
    )


def run_commands(
    pod: TpuPod, command: Sequence[str], job: str, *, allow_local_workdir: bool = False
) -> list[list[str]]:
    """Runs `command` on every worker at once (`MNV2_DISTRIBUTED=1`), appending its output to `<log_dir>/<job>.log`.

    The program is taken from the workers' virtual environment; the exit status is the command's (`pipefail`).
    Rerunning the same command resumes training from its workdir.
    """
    command = check_command(command)
    check_workdir(command, allow_local_workdir)
    check(isinstance(job, str) and bool(_JOB.match(job)), "job", "a name of letters, digits and ._,=+@%-", job)
    program = command[0] if "/" in command[0] else f"{VENV}/bin/{command[0]}"
    logs = home(pod.log_dir)
    remote = (
        f"set -o pipefail; cd {home(pod.remote_dir)} && mkdir -p {logs} && "
        f"{DISTRIBUTED_ENV}=1 {shlex.join([program, *command[1:]])} 2>&1 | tee -a {logs}/{shlex.quote(job + '.log')}"
    )
    return [ssh_command(pod, remote)]


def logs_commands(pod: TpuPod, job: str, workers: int, local_dir: str) -> list[list[str]]:
    """Copies each worker's log of `job` to `<local_dir>/<job>/worker-K.log`."""
    check(isinstance(job, str) and bool(_JOB.match(job)), "job", "a name of letters, digits and ._,=+@%-", job)
    check(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1, "workers",
          "the number of worker VMs of the pod (e.g. 4 for a v4-32)", workers)  # fmt: skip
    target = os.path.join(local_dir, job)
    commands = [["mkdir", "-p", target]]
    for k in range(workers):
        source = f"{pod.name}:{pod.log_dir}/{job}.log"  # scp paths are relative to the home directory
        target_k = os.path.join(target, f"worker-{k}.log")
        commands.append([*GCLOUD_TPU, "scp", source, target_k, *location(pod), f"--worker={k}"])
    return commands


def stop_commands(pod: TpuPod) -> list[list[str]]:
    """Stops the TPU (the TPU API stops single-host TPUs only: delete a pod slice instead)."""
    return [[*GCLOUD_TPU, "stop", pod.name, *location(pod)]]


def delete_commands(pod: TpuPod) -> list[list[str]]:
    """Deletes the pod without asking."""
    return [[*GCLOUD_TPU, "delete", pod.name, *location(pod), "--quiet"]]


def execute(
    commands: Sequence[Sequence[str]],
    dry_run: bool,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> int:
    """Runs `commands` in order and returns the first failure's exit status (0 if none).

    With `dry_run`, prints each (one line, shell-quoted) and runs nothing.
    """
    for command in commands:
        line = shlex.join(command)
        if dry_run:
            print(line)
            continue
        print(f"+ {line}", file=sys.stderr, flush=True)
        try:
            status = run(list(command), check=False).returncode
        except FileNotFoundError:
            raise UserError(f"{command[0]}: command not found (install the Google Cloud CLI)") from None
        if status != 0:
            return status
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python launch/tpu.py ACTION --name N --zone Z [...] [--dry-run] [-- mnv2 train ...]`."""
    return run_cli(PROG, lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    options, command = split_command(argv)
    parser = ArgumentParser(prog=PROG, description="Create a Cloud TPU pod, set it up, run a command on it.")
    parser.add_argument("action", choices=ACTIONS)
    add_options(parser, TpuPod, FIELD_HELP)
    parser.add_argument("--source_dir", default=".", help="setup: the checkout to copy (default: this directory)")
    parser.add_argument("--package", action="append", default=[], help="setup: NAME==VERSION instead of the local one")
    parser.add_argument("--job", help="run, logs: the log's name (run's default: the workdir's last component)")
    parser.add_argument("--workers", type=int, help="logs: the pod's number of worker VMs (e.g. 4 for a v4-32)")
    parser.add_argument("--local_dir", default="tpu_logs", help="logs: where to copy them (default: tpu_logs)")
    parser.add_argument("--allow_local_workdir", action="store_true", help="run: accept a workdir not on gs://")
    parser.add_argument("--recover", action="store_true", help="run: recreate and set up a preempted or deleted "
                        "pod and rerun until the run finishes (a `mnv2 train` command)")  # fmt: skip
    parser.add_argument("--max_attempts", type=int, default=10, help="run --recover: attempts at most (default 10)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print, run nothing")
    args = vars(parser.parse_args(options))
    action, dry_run = args.pop("action"), args.pop("dry_run")
    extra = {name: args.pop(name) for name in ("source_dir", "package", "job", "workers", "local_dir")}
    allow_local_workdir = args.pop("allow_local_workdir")
    recover, max_attempts = args.pop("recover"), args.pop("max_attempts")
    pod = TpuPod.from_mapping(args)
    if recover and (action != "run" or dry_run):
        raise UserError("--recover goes with run (not with --dry-run: it acts on what the pod's state turns out to be)")
    if command and action != "run":
        raise UserError(f"{action} takes no command after --; only run does")
    if action == "create":
        commands = create_commands(pod)
    elif action == "setup":
        commands = setup_commands(pod, extra["source_dir"], _packages(extra["package"]))
    elif action == "run":
        command = check_command(command)
        if recover:
            from mnv2_jax.launch import tpu_recovery

            tpu_recovery.training_workdir(command)  # before --job: the error that says what --recover needs
        job = extra["job"] or os.path.basename((training_workdir(command) or "").rstrip("/"))
        if not job:
            raise UserError("run needs --job NAME (the log's name) for a command without --workdir")
        if recover:
            packages = _packages(extra["package"])
            recovery = tpu_recovery.Recovery(max_attempts, source_dir=extra["source_dir"], packages=packages,
                                             local_dir=extra["local_dir"])  # fmt: skip
            return tpu_recovery.run_until_finished(pod, command, job, recovery, allow_local_workdir=allow_local_workdir)
        commands = run_commands(pod, command, job, allow_local_workdir=allow_local_workdir)
    elif action == "logs":
        if not extra["job"] or extra["workers"] is None:
            raise UserError("logs needs --job NAME and --workers K (the pod's number of worker VMs)")
        commands = logs_commands(pod, extra["job"], extra["workers"], extra["local_dir"])
    else:
        commands = stop_commands(pod) if action == "stop" else delete_commands(pod)
    return execute(commands, dry_run=dry_run)


def _packages(specs: Sequence[str]) -> dict[str, str]:
    packages = {}
    for spec in specs:
        name, sep, version = spec.partition("==")
        check(bool(sep and name and version), "package", "NAME==VERSION, e.g. jax==0.10.2", spec)
        packages[name] = version
    return packages


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _matches(pattern: str, value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None
