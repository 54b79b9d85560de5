"""A stand-in for `gcloud compute tpus tpu-vm` that plays a spot TPU pod's life for the recovery tests.

State lives in `$GCLOUD_STUB_STATE` (JSON): the pod's `state` (READY, PREEMPTED, GONE, ...), the `workdir` of the
run, the `plan` of what each `ssh` running the training does, and every call (`calls`). `describe` prints the state
(or fails with NOT_FOUND when GONE), `create` makes it READY, `delete` GONE, `scp` and the set-up `ssh` succeed.
A training `ssh` takes the next plan entry: `{"fail": true}` loses the connection at once (exit 255, pod still
READY); `{"preempt_after_step": K, "then": STATE}` runs the command and, once checkpoint K is committed, kills every
process of it (SIGKILL), sets STATE and exits 255; without an entry it runs the command to its end. The command
runs in a shell with HOME=`$GCLOUD_STUB_HOME` (where `mnv2_jax` links to the checkout) and as one process
(`MNV2_DISTRIBUTED=0`: there is no TPU metadata server here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    path = os.environ["GCLOUD_STUB_STATE"]
    with open(path) as f:
        world = json.load(f)
    action = argv[4]  # argv: this script, compute, tpus, tpu-vm, ACTION, NAME, ...
    world["calls"].append(action)
    status = act(world, action, argv)
    with open(path, "w") as f:
        json.dump(world, f)
    return status


def act(world: dict, action: str, argv: list[str]) -> int:
    if action == "describe":
        if world["state"] == "GONE":
            print(f"ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: {argv[5]} was not found", file=sys.stderr)
            return 1
        print(world["state"])
        return 0
    if action in ("create", "delete"):
        world["state"] = "READY" if action == "create" else "GONE"
        return 0
    if action == "scp":
        return 0
    remote = argv[argv.index("--command") + 1]
    if world["state"] != "READY":
        return 255
    if "pip install" in remote:  # the set-up
        return 0
    step = world["plan"].pop(0) if world["plan"] else {}
    if step.get("fail"):
        return 255
    env = {**os.environ, "HOME": os.environ["GCLOUD_STUB_HOME"]}
    remote = remote.replace("MNV2_DISTRIBUTED=1", "MNV2_DISTRIBUTED=0")
    process = subprocess.Popen(["bash", "-c", remote], env=env, start_new_session=True)
    if "preempt_after_step" not in step:
        return process.wait()
    committed = os.path.join(world["workdir"], "checkpoints", str(step["preempt_after_step"]))
    while not os.path.isdir(committed):
        if process.poll() is not None:
            return process.returncode
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    world["state"] = step["then"]
    return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv))
