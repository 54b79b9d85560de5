"""A tiny model/config and one compiled training step, shared by the mesh-equivalence tests."""

from __future__ import annotations

import contextlib
import io
import os

import jax
import numpy as np

from mnv2_jax.config import base_config
from mnv2_jax.training import checkpoint, distributed, plan, train

BATCH = 16
# The trainer tests' network: the first block of every stage plus one residual block (8 blocks, not 17). What they
# check does not depend on depth, and it halves their compile time.
SHALLOW_STAGES = (1, 1, 2, 1, 1, 1, 1)


def tiny_config(bn_group_size=None, stage_repeats=SHALLOW_STAGES, task="classification"):
    config = base_config(task=task)
    config.model.stage_repeats = stage_repeats
    if task == "segmentation":
        config.model.output_stride = 16
        config.segmentation.feature_endpoint = "layer_9" if stage_repeats == SHALLOW_STAGES else "layer_18"
        config.segmentation.head_features = 16
        config.segmentation.head_bn_momentum = 0.9
    if task == "detection":
        config.detection.max_boxes = 8
    config.resolution = 32
    # float64: in float32 one step of a deep ReLU6/BN network at init is chaotic (a 1e-7 relative change of the input
    # moves some parameters by up to 1e-2 relative), which would hide real differences between meshes.
    config.model.dtype = "float64"
    config.batch_size = BATCH
    config.eval_batch_size = BATCH
    config.model.width = 0.35
    config.model.num_classes = 10
    config.model.bn_momentum = 0.9
    config.model.bn_group_size = bn_group_size
    config.optimizer.label_smoothing = 0.1
    config.optimizer.ema_decay = 0.99
    return config


def fixed_batch(config, size: int = BATCH) -> dict[str, np.ndarray]:
    """One global batch of `size` images and the task's targets (a label per image; per pixel with a tenth of the
    pixels ignored; or up to 5 boxes per image, padded to `detection.max_boxes`)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (size, config.resolution, config.resolution, 3))
    if config.task == "segmentation":
        labels = rng.integers(0, 10, (size, config.resolution, config.resolution)).astype(np.int32)
        labels[rng.uniform(size=labels.shape) < 0.1] = 255
        return {"image": images, "label": labels}
    if config.task == "detection":
        max_boxes = config.detection.max_boxes
        corners = np.sort(rng.uniform(0, 1, (size, max_boxes, 2, 2)), axis=2)
        counts = rng.integers(0, 6, size)
        box_mask = np.arange(max_boxes)[None] < counts[:, None]
        return {
            "image": images,
            "boxes": np.concatenate([corners[:, :, 0], corners[:, :, 1]], -1) * box_mask[..., None],
            "classes": rng.integers(0, config.model.num_classes, (size, max_boxes)).astype(np.int32) * box_mask,
            "box_mask": box_mask,
            "crowd": np.zeros_like(box_mask),
        }
    return {"image": images, "label": rng.integers(0, 10, size).astype(np.int32)}


def _trainer(config, mesh):
    the_plan = plan.make_plan(config, 1000, 100, mesh.size, distributed.mesh_process_count(mesh))
    return train.build_trainer(config, the_plan, mesh)


def initial_state(config, mesh):
    """The initial train state as host arrays."""
    create_state = jax.jit(_trainer(config, mesh).create_state, out_shardings=distributed.replicated(mesh))
    return distributed.to_host(create_state(jax.random.key(config.seed)))


def one_step(config, mesh, local_batch, initial):
    """`initial` (host arrays) -> one train step on `mesh`, from this process's slice of the global batch."""
    state = jax.device_put(initial, distributed.replicated(mesh))
    state, _ = _trainer(config, mesh).train_step(state, distributed.global_batch(local_batch, mesh))
    return state


def flat(state) -> dict[str, np.ndarray]:
    """Params, EMA params and batch statistics as a flat name -> array dict."""
    tree = {"params": state.params, "ema": state.ema_params, "batch_stats": state.batch_stats}
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(distributed.to_host(tree))
    }


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def path_names(item: str, tree) -> dict[str, np.ndarray]:
    """`tree`'s arrays by `item/path/to/leaf`, the same for a restored state and for its checkpoint files (where
    the optimizer's named tuples became dicts)."""
    return {
        f"{item}/{jax.tree_util.keystr(path, simple=True, separator='/')}": np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def saved_state(workdir) -> tuple[int, dict[str, np.ndarray]]:
    """The latest checkpoint's step and every array of its training state, by `item/path/to/leaf`."""
    import orbax.checkpoint as ocp

    step = checkpoint.latest_step(str(workdir))
    arrays = {}
    for item in sorted(set(train.STATE_ITEMS) & checkpoint.item_names(str(workdir), step)):
        tree = ocp.StandardCheckpointer().restore(
            os.path.join(checkpoint.checkpoint_dir(str(workdir)), str(step), item)
        )
        arrays.update(path_names(item, tree))
    return step, arrays


def run_mnv2(*args) -> tuple[int, str]:
    """`mnv2 ARGS...` in this process; (exit status, stderr)."""
    from mnv2_jax.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["mnv2", *map(str, args)])
    return status, err.getvalue()


def assert_resume_is_exact(train_args: list[str], workdir, uninterrupted_workdir, steps: int = 6) -> None:
    """`mnv2 train` stopped at step 3 and run again in `workdir` ends bitwise equal to the uninterrupted run of
    `steps` steps in `uninterrupted_workdir` (the same `train_args`)."""
    status, err = run_mnv2("train", "--workdir", workdir, *train_args, "--config.num_train_steps=3")
    assert status == 0, err[-3000:]
    status, err = run_mnv2("train", "--workdir", workdir, *train_args)
    assert status == 0, err[-3000:]
    assert "resumed from" in err
    (step, resumed), (_, uninterrupted) = saved_state(workdir), saved_state(uninterrupted_workdir)
    assert step == steps
    assert_bitwise_equal(resumed, uninterrupted)


# What the dense tasks' small `mnv2 train` runs share: 6 steps of 8 images on the shallow network, evaluated every
# epoch (16 training images: 2 steps), a checkpoint every 2 steps, EMA, a constant rate (the resume tests stop at 3).
SMALL_TASK_RUN = {
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_train_steps": 6,
    "log_every_steps": 2,
    "checkpoint_every_steps": 2,
    "eval_every_epochs": 1.0,
    "keep_checkpoints": 1,
    "model.stage_repeats": SHALLOW_STAGES,
    "data.cache": False,
    "optimizer.ema_decay": 0.9,
    "optimizer.schedule": "constant",
}


def small_task_run_args(config: str, dataset: str, **fields) -> list[str]:
    """`mnv2 train` arguments of a small run of `config` on `dataset`: `SMALL_TASK_RUN` and `fields`."""
    args = {"dataset": dataset, **SMALL_TASK_RUN, **fields}
    return ["--config", config] + [f"--config.{k}={v}" for k, v in args.items()]
