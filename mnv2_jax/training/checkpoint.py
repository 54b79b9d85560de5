"""Checkpoints in a workdir, through orbax's `CheckpointManager`.

Layout: `<workdir>/checkpoints/<step>/` with one item per part of the state
(`params`, `batch_stats`, and during training the optimizer state and more)
plus the run's `config` and, during training, the input stream's position
(`data`) as JSON. Restores take abstract targets built from the config, so
arrays land with the current shardings and shape mismatches are reported by
layer. Orbax writes each step into a temporary directory and renames it when
complete; `discard_incomplete` reports and removes what an interrupted write
left behind.
"""

from __future__ import annotations

import logging as std_logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mnv2_jax import config as config_lib
from mnv2_jax.errors import UserError
from mnv2_jax.training import run_files

CHECKPOINT_DIR = "checkpoints"
CONFIG_ITEM = "config"
DATA_ITEM = "data"  # the training input stream's position, e.g. {"examples_per_process": 4096}
JSON_ITEMS = (CONFIG_ITEM, DATA_ITEM)


def _write_replicated_arrays_whole() -> None:
    """Replicated arrays are written whole, by their first replica.

    Orbax's default on CPU and TPU ("replica-parallel") splits every replicated array into one slice per device,
    each a separately dispatched op compiled on first use: for MobileNetV2 on 8 CPU devices that made the first
    save 18 s and every later one 5 s (1.6 s and 1.3 s without), to spread writes of a few MB that take milliseconds.
    """
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    absl_logger = std_logging.getLogger("absl")  # orbax warns about every override; this one is intended
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


_write_replicated_arrays_whole()


class CheckpointError(UserError):
    """A checkpoint is missing or does not fit the model it is restored into."""


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute (a `gs://` workdir stays a URI)."""
    return os.path.join(run_files.absolute(workdir), CHECKPOINT_DIR)


def manager(
    workdir: str,
    items: tuple[str, ...] = ("params", "batch_stats"),
    options: ocp.CheckpointManagerOptions | None = None,
) -> ocp.CheckpointManager:
    """The orbax manager of `<workdir>/checkpoints` for the named pytree items plus the JSON items."""
    handlers = {name: ocp.StandardCheckpointHandler() for name in items}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    items: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
    data_position: Mapping[str, float] | None = None,
) -> bool:
    """Saves the named pytrees, the config and the data position at `step` (asynchronously when the manager is)."""
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args[CONFIG_ITEM] = ocp.args.JsonSave(config_lib.to_dict(config))
    if data_position is not None:
        args[DATA_ITEM] = ocp.args.JsonSave(dict(data_position))
    return mngr.save(step, args=ocp.args.Composite(**args), metrics=dict(metrics) if metrics else None, force=force)


def item_names(workdir: str, step: int) -> set[str]:
    """The items stored in checkpoint `step` (e.g. params, batch_stats, opt_state, ema_params, config)."""
    path = epath.Path(checkpoint_dir(workdir)) / str(step)  # epath: a gs:// workdir is not a local folder
    return {child.name for child in path.iterdir() if child.is_dir()}


def latest_step(workdir: str) -> int | None:
    if not epath.Path(checkpoint_dir(workdir)).is_dir():
        return None
    with manager(workdir, items=()) as mngr:
        return mngr.latest_step()


def _resolve_step(mngr: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; available: {sorted(steps)}")
    return step


def restore_json(workdir: str, name: str, step: int | None = None) -> tuple[int, dict[str, Any] | None]:
    """The step and JSON item `name` stored with a checkpoint (the latest by default); None if it has none."""
    with manager(workdir, items=()) as mngr:
        step = _resolve_step(mngr, workdir, step)
        if name not in item_names(workdir, step):
            return step, None
        restored = mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    return step, restored[name]


def restore_config(workdir: str, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
    """The step and config stored with a checkpoint (the latest one by default)."""
    step, saved = restore_json(workdir, CONFIG_ITEM, step)
    if saved is None:
        raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir(workdir)} has no config")
    return step, config_lib.from_dict(saved)


def discard_incomplete(workdir: str) -> list[str]:
    """Removes the checkpoints whose write was interrupted (a crash or kill mid-save); returns their names.

    Orbax lists only committed steps, so an incomplete one is never restored;
    this reports and deletes what it left behind. Call on one process only.
    """
    directory = epath.Path(checkpoint_dir(workdir))
    if not directory.is_dir():
        return []
    incomplete = sorted(path.name for path in directory.iterdir() if ocp.step.is_tmp_checkpoint(path))
    for name in incomplete:
        logging.warning("removing incomplete checkpoint %s (its write was interrupted)", directory / name)
        (directory / name).rmtree()
    return incomplete


def path_name(path: tuple) -> str:
    """A tree path as `a/b/c`, the same whatever the containers (orbax metadata turns namedtuples into dicts or
    lists)."""

    def part(key) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return "/".join(part(k) for k in path)


def leaves_by_name(tree: Any) -> dict[str, Any]:
    """Leaves keyed by `path_name`."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_mismatches(target: Any, saved: Any) -> list[str]:
    target_leaves, saved_leaves = leaves_by_name(target), leaves_by_name(saved)
    problems = []
    for path in sorted(set(target_leaves) | set(saved_leaves)):
        name = f" {path}"
        if path not in saved_leaves:
            problems.append(f"{name}: missing in checkpoint")
        elif path not in target_leaves:
            problems.append(f"{name}: in checkpoint but not in the model")
        elif tuple(target_leaves[path].shape) != tuple(saved_leaves[path].shape):
            problems.append(
                f"{name}: checkpoint {tuple(saved_leaves[path].shape)} vs model {tuple(target_leaves[path].shape)}"
            )
    return problems


def restore(workdir: str, targets: Mapping[str, Any], step: int | None = None) -> tuple[int, dict[str, Any]]:
    """Restores the named items onto abstract `targets` (pytrees of `jax.ShapeDtypeStruct` with shardings).

    Raises `CheckpointError` listing every leaf whose shape or presence differs
    from the target, before reading any array.
    """
    with manager(workdir, items=tuple(targets)) as mngr:
        step = _resolve_step(mngr, workdir, step)
        metadata = mngr.item_metadata(step)
        problems = []
        for name, target in targets.items():
            saved = metadata.get(name, None)
            if saved is None:
                problems.append(f"{name}: not in checkpoint")
                continue
            problems += [f"{name}{p}" for p in _shape_mismatches(target, saved)]
        if problems:
            raise CheckpointError(
                f"checkpoint step {step} in {checkpoint_dir(workdir)} does not match the config:\n  "
                + "\n  ".join(problems)
            )
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    return step, {name: restored[name] for name in targets}


def restore_as_saved(
    workdir: str, names: tuple[str, ...], sharding: jax.sharding.Sharding, step: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Items `names` of a checkpoint with the shapes they were saved with, whatever model reads them."""
    with manager(workdir, items=names) as mngr:
        step = _resolve_step(mngr, workdir, step)
        metadata = mngr.item_metadata(step)
        missing = [name for name in names if metadata.get(name, None) is None]
        if missing:
            raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir(workdir)} has no {', '.join(missing)}")
        targets = {name: abstract_like(metadata[name], sharding) for name in names}
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    return step, {name: restored[name] for name in names}


def restore_model_variables(
    workdir: str, abstract_variables: Mapping[str, Any], sharding: jax.sharding.Sharding, step: int | None = None
) -> tuple[int, dict[str, Any]]:
    """`{'params', 'batch_stats'}` to evaluate with: the EMA of the weights when the run kept one."""
    if step is None:
        step = latest_step(workdir)
        if step is None:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
    params_item = "ema_params" if "ema_params" in item_names(workdir, step) else "params"
    targets = {
        params_item: abstract_like(abstract_variables["params"], sharding),
        "batch_stats": abstract_like(abstract_variables["batch_stats"], sharding),
    }
    step, items = restore(workdir, targets, step)
    return step, {"params": items[params_item], "batch_stats": items["batch_stats"]}


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves with one sharding for all (e.g. replicated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding), tree)


def saved_train_seconds(workdir: str, step: int) -> float:
    """Seconds the run's earlier sessions spent up to checkpoint `step` (0 for a new run)."""
    if step == 0:
        return 0.0
    _, position = restore_json(workdir, DATA_ITEM, step)
    return float((position or {}).get("train_seconds", 0.0))


def saved_data_position(workdir: str, step: int, local_batch_size: int, process_count: int) -> int:
    """Examples of this process's training stream consumed up to checkpoint `step`."""
    _, position = restore_json(workdir, DATA_ITEM, step)
    if position is None:  # written before positions were saved: every step consumed one local batch
        return step * local_batch_size
    if position["process_count"] != process_count:
        logging.warning(
            "checkpoint written by %d processes, resumed by %d: each process continues its new share of the data "
            "after %d examples (the batch order differs from an uninterrupted run)",
            position["process_count"],
            process_count,
            position["examples_per_process"],
        )
    return position["examples_per_process"]
