"""Processes, the device mesh and shardings: one `data` axis over all devices of all processes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mnv2_jax.errors import UserError

DATA_AXIS = "data"

# Set by `launch/local.py` (and usable by any launcher) to start a multi-process job without a cluster manager.
COORDINATOR_ENV = "MNV2_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "MNV2_NUM_PROCESSES"
PROCESS_ID_ENV = "MNV2_PROCESS_ID"
# "1": a cluster (TPU pod, SLURM, Open MPI) whose settings `jax.distributed.initialize()` finds itself.
DISTRIBUTED_ENV = "MNV2_DISTRIBUTED"
# With DISTRIBUTED_ENV: the local devices this process owns, e.g. "0,1,2,3,4,5,6,7" for one process per SLURM node
# (JAX's default there is [SLURM_LOCALID]: one GPU per process). Set by `launch/slurm.py --processes per_node`.
LOCAL_DEVICE_IDS_ENV = "MNV2_LOCAL_DEVICE_IDS"
# Seconds without a heartbeat after which JAX's coordination service declares a process dead (JAX's default: 100).
HEARTBEAT_TIMEOUT_ENV = "MNV2_HEARTBEAT_TIMEOUT_S"
LOST_PROCESS_EXIT_STATUS = 3

# Text of the runtime errors that a dead or unreachable peer causes (Gloo/NCCL collectives, the coordination service).
_LOST_PROCESS_MARKERS = ("gloo", "nccl", "connection", "heartbeat", "unavailable", "deadline_exceeded", "socket")


class LostProcessError(RuntimeError):
    """Another process of a multi-process run died or became unreachable; this one cannot go on."""

    def __init__(self, step: int, cause: Exception, latest_checkpoint: int | None):
        resume = f"step {latest_checkpoint}" if latest_checkpoint is not None else "the start (no checkpoint yet)"
        reason = str(cause).strip().splitlines()[0][:300]
        super().__init__(
            f"process {jax.process_index()} of {jax.process_count()} lost contact with another process at step "
            f"{step} ({reason}); that process probably died or was preempted. Restart the whole job: it resumes "
            f"from {resume}"
        )


def is_lost_process(error: Exception) -> bool:
    """Whether a runtime error of a multi-process run comes from a peer that died or cannot be reached."""
    text = str(error).lower()
    return jax.process_count() > 1 and any(marker in text for marker in _LOST_PROCESS_MARKERS)


def maybe_initialize(timeout_s: int = 300) -> None:
    """Calls `jax.distributed.initialize` when this is one process of several.

    Explicit settings come from the MNV2_* environment variables; on TPU pods,
    SLURM and Open MPI jobs JAX discovers them itself (`MNV2_DISTRIBUTED=1`),
    with `MNV2_LOCAL_DEVICE_IDS` ("0,1,...") naming the local devices of a
    process where JAX's default is one GPU per process (one process per SLURM
    node). A single process needs nothing. A process that stops sending
    heartbeats for `MNV2_HEARTBEAT_TIMEOUT_S` seconds is declared dead and the
    others stop.
    """
    if jax.distributed.is_initialized():
        return
    timeouts = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s())
    if COORDINATOR_ENV in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=int(os.environ[NUM_PROCESSES_ENV]),
            process_id=int(os.environ[PROCESS_ID_ENV]),
            **timeouts,
        )
    elif os.environ.get(DISTRIBUTED_ENV) == "1":
        jax.distributed.initialize(local_device_ids=local_device_ids(), **timeouts)
    logging.info(
        "process %d of %d; %d local and %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )


def local_device_ids() -> list[int] | None:
    """The device ids of `MNV2_LOCAL_DEVICE_IDS` ("0,1,2,3"), or None when it is unset or empty."""
    value = os.environ.get(LOCAL_DEVICE_IDS_ENV, "").strip()
    if not value:
        return None
    ids = [part.strip() for part in value.split(",")]
    if not all(part.isdecimal() for part in ids) or len(set(map(int, ids))) != len(ids):
        raise UserError(
            f"{LOCAL_DEVICE_IDS_ENV} must be distinct comma-separated device numbers such as 0,1,2,3, got {value!r}"
        )
    return [int(part) for part in ids]


def heartbeat_timeout_s() -> int:
    value = os.environ.get(HEARTBEAT_TIMEOUT_ENV, "100")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{HEARTBEAT_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return int(value)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def micro_batches_sharded(mesh: Mesh) -> NamedSharding:
    """A batch split into micro-batches, (micro-batches, examples, ...): each micro-batch sharded on `data`."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def mesh_process_count(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def mesh_process_index(mesh: Mesh) -> int:
    """This process's rank among the processes that own devices of `mesh`."""
    processes = sorted({d.process_index for d in mesh.devices.flat})
    return processes.index(jax.process_index())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch sharded on `data` from this process's slice of it."""
    sharding = batch_sharded(mesh)
    # Host arrays of a dtype JAX narrows (float64 without x64) are converted here, not by the transfer: on CPU the
    # transfer's own conversion can hand back an earlier array's values when the caller reuses its buffer.
    return {k: jax.make_array_from_process_local_data(sharding, _canonical(v)) for k, v in local.items()}


def _canonical(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(jax.dtypes.canonicalize_dtype(array.dtype), copy=False)


def to_host(tree: Any) -> Any:
    """Fully replicated (or fully addressable) arrays -> numpy, without cross-host gathers."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else x, tree)
