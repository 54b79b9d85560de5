#!/usr/bin/env python3
"""Run one command as N JAX processes on this machine (multi-host code without a cluster).

    python launch/local.py --processes 2 --cpu_devices_per_process 4 -- \
        mnv2 train --config configs/quickstart.py --workdir workdirs/two_process

Each process gets MNV2_COORDINATOR_ADDRESS / MNV2_NUM_PROCESSES / MNV2_PROCESS_ID, which
`mnv2_jax.training.distributed.maybe_initialize` passes to `jax.distributed.initialize`.
Output lines are prefixed with the process id. If one process fails, the others are
stopped after `--grace_s` seconds instead of hanging on a collective.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def launch(command: list[str], processes: int, cpu_devices: int | None, grace_s: float, timeout_s: float) -> int:
    address = f"localhost:{free_port()}"
    children = []
    for pid in range(processes):
        env = dict(os.environ)
        env.update(MNV2_COORDINATOR_ADDRESS=address, MNV2_NUM_PROCESSES=str(processes), MNV2_PROCESS_ID=str(pid))
        if cpu_devices:
            env["JAX_PLATFORMS"] = "cpu"
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(child.stdout, f"[{pid}] ", sys.stdout), daemon=True).start()
        children.append(child)

    deadline = time.time() + timeout_s
    failed_at = None
    while any(c.poll() is None for c in children):
        if failed_at is None and any(c.poll() not in (None, 0) for c in children):
            failed_at = time.time()
        if (failed_at is not None and time.time() - failed_at > grace_s) or time.time() > deadline:
            for c in children:
                if c.poll() is None:
                    c.kill()
            break
        time.sleep(0.2)
    codes = [c.wait() for c in children]
    return next((code for code in codes if code != 0), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu_devices_per_process", type=int, default=None, help="force N CPU devices per process")
    parser.add_argument("--grace_s", type=float, default=30.0, help="wait after a failure before killing the rest")
    parser.add_argument("--timeout_s", type=float, default=24 * 3600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return launch(command, args.processes, args.cpu_devices_per_process, args.grace_s, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
