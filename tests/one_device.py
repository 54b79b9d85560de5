"""The default CPU path, in a process with one CPU device (what `mnv2` users on a CPU get); for test_one_device.py.

    python tests/one_device.py OUT_DIR DATASET

Writes to OUT_DIR:
- `resolved.json`: the device count, what `model.depthwise=auto` resolves to for training and for inference, and
  whether each implementation's compiled train step calls the C++ kernels;
- `step_<impl>.npz` for impl in cpu_kernel, shifted: the loss, logits, updated batch statistics and the
  gradient of every parameter of one training step of a whole model. Every batch norm's bias is 3, so that
  ReLU6's inputs stay away from its kinks at 0 and 6: there, float32 rounding differences between two correct
  implementations flip single elements' gradients (at init, about one element a step changes some tensors'
  gradients by up to 10%);
- `bench.json`: `mnv2 bench`'s FLOPs of the kernels' train step (batch 8) and XLA's own count of that program, and
  the train step's temporary memory at 224x224, batch 128, with and without `model.remat`;
- `train_<impl>/` for impl in auto, shifted: the workdir of a few `mnv2 train` steps on DATASET (an image folder),
  with the trainer tests' shallow network.
"""

import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import train_helpers
from configs_loader import load

from mnv2_jax import bench
from mnv2_jax.cli.main import main as mnv2
from mnv2_jax.models import build_model, layers
from mnv2_jax.tasks import classification
from mnv2_jax.training import distributed, plan, train

IMPLEMENTATIONS = ("cpu_kernel", "shifted")  # the shifted form equals XLA's grouped one (tests/test_layers.py)
TRAIN_IMPLEMENTATIONS = ("auto", "shifted")


def tiny_float32_config():
    config = train_helpers.tiny_config(stage_repeats=None)
    config.model.dtype = "float32"  # the kernels' dtype
    config.model.dropout_rate = 0.0
    return config


def train_step_values_and_gradients(depthwise: str, run: bool = True) -> tuple[dict[str, np.ndarray], bool]:
    """One step's loss, logits, batch statistics and parameter gradients (the train step's loss, compiled; none
    unless `run`), and whether the program calls the C++ kernels."""
    config = tiny_float32_config()
    model = build_model(config.model, depthwise=depthwise)
    batch = train_helpers.fixed_batch(config)
    images, labels = batch["image"].astype(np.float32), batch["label"]
    variables = jax.jit(model.init)(jax.random.key(0), images[:1])
    at_3 = lambda path, v: v + 3.0 if jax.tree_util.keystr(path).endswith("['BatchNorm']['bias']") else v
    variables = {**variables, "params": jax.tree_util.tree_map_with_path(at_3, variables["params"])}

    def loss_fn(params):
        (logits, _), updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
        )
        loss = classification.cross_entropy(logits, labels, config.model.num_classes).mean()
        return loss, (logits, updates["batch_stats"])

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    calls_kernels = "ffi_call" in str(jax.make_jaxpr(value_and_grad)(variables["params"]))
    if not run:
        return {}, calls_kernels
    (loss, (logits, batch_stats)), grads = value_and_grad(variables["params"])
    tree = {"loss": loss, "logits": logits, "batch_stats": batch_stats, "grads": grads}
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}
    return flat, calls_kernels


def segmenter_train_step_calls_kernels() -> bool:
    """Whether the segmenter's train step (the trainer's, with `model.depthwise=auto`) calls the C++ kernels; traced
    only."""
    config = train_helpers.tiny_config(task="segmentation")
    config.model.dtype = "float32"
    the_plan = plan.make_plan(config, 80, 8, 1, 1)
    trainer = train.build_trainer(config, the_plan, distributed.make_mesh())
    state = jax.eval_shape(trainer.create_state, jax.random.key(0))
    batch = train_helpers.fixed_batch(config)
    batch["image"] = batch["image"].astype(np.float32)
    return "ffi_call" in str(jax.make_jaxpr(trainer.train_step)(state, batch))


def bench_figures(started: list[float]) -> dict[str, float]:
    step = bench.compile_step(tiny_float32_config(), "train", batch=8)
    figures = {"flops": step.flops, "xla_flops": bench._cost_flops(step.compiled), "flops_batch": step.batch}
    timed("bench FLOPs", started)
    for remat in (False, True):
        config = load("configs/imagenet.py:num_classes=10")
        config.model.remat = remat
        figures[f"temp_bytes_remat_{remat}"] = bench.run(config, batch=128, steps=0).temp_bytes
        timed(f"memory with remat={remat}", started)
    return figures


def timed(phase: str, started: list[float]) -> None:
    """Prints how long `phase` took (the fixture is among the suite's slowest: where its time goes)."""
    now = time.perf_counter()
    print(f"one_device: {phase} {now - started[0]:.1f} s", flush=True)
    started[0] = now


def main() -> None:
    out, dataset = pathlib.Path(sys.argv[1]), sys.argv[2]
    started = [time.perf_counter()]
    resolved = {
        "device_count": jax.device_count(),
        "train": layers.resolve_depthwise("auto", train=True).__name__,
        "inference": layers.resolve_depthwise("auto", train=False).__name__,
    }
    resolved["auto_calls_kernels"] = train_step_values_and_gradients("auto", run=False)[1]
    resolved["segmenter_calls_kernels"] = segmenter_train_step_calls_kernels()
    timed("kernel build and traces", started)
    for impl in IMPLEMENTATIONS:
        flat, calls_kernels = train_step_values_and_gradients(impl)
        np.savez(out / f"step_{impl}.npz", **flat)
        resolved[f"{impl}_calls_kernels"] = calls_kernels
        timed(f"train step on {impl}", started)
    (out / "resolved.json").write_text(json.dumps(resolved))
    (out / "bench.json").write_text(json.dumps(bench_figures(started)))

    args = ["--config", "configs/quickstart.py", f"--config.dataset={dataset}", "--config.batch_size=16"]
    args += ["--config.eval_batch_size=16", "--config.num_train_steps=3", "--config.log_every_steps=1"]
    args += ["--config.optimizer.warmup_epochs=0", "--config.data.cache=False"]
    args += [f"--config.model.stage_repeats={train_helpers.SHALLOW_STAGES}"]  # the whole model's step is above
    for impl in TRAIN_IMPLEMENTATIONS:
        workdir = out / f"train_{impl}"
        status = mnv2(["mnv2", "train", "--workdir", str(workdir), *args, f"--config.model.depthwise={impl}"])
        assert status == 0, f"mnv2 train with model.depthwise={impl} exited with {status}"
        timed(f"mnv2 train with model.depthwise={impl}", started)


if __name__ == "__main__":
    main()
