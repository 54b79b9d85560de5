"""Steady-state throughput of the compiled train or inference step, with XLA's cost and memory analyses.

Used by `mnv2 bench`. Inputs are synthetic (the input pipeline is measured
separately), the batch is sharded over every device, and timing starts after
compilation and warm-up steps.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from mnv2_jax import host_memory, models
from mnv2_jax.data import preprocessing
from mnv2_jax.models import complexity, convolutions, layers
from mnv2_jax.training import distributed, train
from mnv2_jax.training import plan as plan_lib

MODES = ("train", "infer")


@dataclasses.dataclass(frozen=True)
class BenchResult:
    mode: str
    backend: str
    devices: int
    batch: int
    resolution: int
    steps: int
    compile_s: float
    step_ms: float | None
    images_per_s: float | None
    flops_per_image: float | None  # from XLA's cost analysis of the compiled step
    achieved_tflops: float | None
    temp_bytes: int | None  # from XLA's memory analysis
    argument_bytes: int | None
    output_bytes: int | None
    mfu: float | None  # achieved / peak, when a peak is given
    pipeline_images_per_s: float | None = None  # the training input pipeline alone, on this host
    input_bound: bool | None = None  # the pipeline delivers fewer images/s than this host's share of the step takes
    page_faults_per_step: float | None = None  # minor page faults of this process per timed step
    host_allocator: str | None = None  # serving XLA's host buffers: jemalloc, tcmalloc, huge_pages, system


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _memory(compiled) -> dict[str, int | None]:
    analysis = compiled.memory_analysis()
    get = lambda name: int(getattr(analysis, name)) if analysis is not None and hasattr(analysis, name) else None
    return {
        "temp_bytes": get("temp_size_in_bytes"),
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
    }


@dataclasses.dataclass
class CompiledStep:
    """One compiled train or inference step on synthetic inputs, ready to time."""

    mode: str
    batch: int
    devices: int
    compile_s: float
    compiled: Any
    flops: float | None  # per device program
    time_steps: Callable[[int, int], float]  # (steps, warmup) -> seconds for `steps` steps


def _synthetic_inputs(
    config: ml_collections.ConfigDict, trainer: train.Trainer, mesh: jax.sharding.Mesh, batch: int
) -> dict[str, jax.Array]:
    """A global batch of uniform-noise images (normalised as the model expects) and the task's synthetic targets."""
    rng = np.random.default_rng(0)
    local = batch // distributed.mesh_process_count(mesh)
    pixels = rng.uniform(0, 255, (local, config.resolution, config.resolution, 3)).astype(np.float32)
    images = preprocessing.normalize(pixels, config.model.preprocessing)
    return distributed.global_batch({**trainer.task.synthetic_batch(local, rng), "image": images}, mesh)


def _jit_inference(
    config: ml_collections.ConfigDict, trainer: train.Trainer, mesh: jax.sharding.Mesh, model: Any
) -> Callable:
    """`(variables, images) -> outputs` of `model` jitted over `mesh`: the model, then the task's post-processing
    (detection: NMS)."""

    def infer(variables, images):
        outputs = models.predict(model, variables, images, batch_shards=mesh.size)
        return trainer.task.postprocess(outputs, config.resolution)

    return jax.jit(infer, in_shardings=(distributed.replicated(mesh), distributed.batch_sharded(mesh)))


def _step_flops(
    config: ml_collections.ConfigDict,
    mode: str,
    trainer: train.Trainer,
    mesh: jax.sharding.Mesh,
    compiled: Any,
    args: tuple,
) -> float | None:
    """FLOPs of one device's program of the compiled step (`config.batch_size` images over the mesh), counting
    what XLA's cost analysis leaves out."""
    flops = _cost_flops(compiled)
    backbone = models.backbone_of(trainer.model)
    if mode == "infer" and (backbone.inference_chunk != 0 or backbone.expansion_splits > 1):
        # XLA's cost analysis counts a loop's body once: count the same network run on the whole batch, whole blocks.
        whole_batch = models.with_backbone(trainer.model, backbone.clone(inference_chunk=0, expansion_splits=1))
        flops = _cost_flops(_jit_inference(config, trainer, mesh, whole_batch).lower(*args).compile())
    on_kernels = layers.resolve_depthwise(config.model.depthwise) is convolutions.depthwise_cpu_kernel
    if mode == "train" and on_kernels and flops is not None and backbone.conventions.dtype == np.float32:
        # nor does it count custom calls: add the C++ kernels' own multiply-adds, one per tap and output element in
        # each of the forward (twice with remat), input-gradient and kernel-gradient passes (2 FLOPs each)
        depthwise_macs = complexity.summarize(trainer.model, config.resolution)["macs_by_kind"]["depthwise"]
        passes = 4 if backbone.remat else 3
        flops += passes * 2 * depthwise_macs * config.batch_size / mesh.size
    return flops


def _step_timer(mode: str, compiled: Any, create_state: Callable, step_args: Callable) -> Callable[[int, int], float]:
    """`time_steps(steps, warmup)`: seconds for `steps` runs of `compiled` after `warmup` untimed ones, on a state
    created at the first call (a train step carries its state from one step to the next)."""
    carry = {}

    def time_steps(steps: int, warmup: int = 2) -> float:
        if not carry:
            carry["args"] = step_args(create_state(jax.random.key(0)))

        def one():
            outputs = compiled(*carry["args"])
            if mode == "train":  # (state, metrics): the next step starts from the new state
                carry["args"] = (outputs[0], *carry["args"][1:])
            return outputs

        for _ in range(warmup):
            jax.block_until_ready(one())
        started = time.perf_counter()
        out = None
        for _ in range(steps):
            out = one()
        jax.block_until_ready(out)
        return time.perf_counter() - started

    return time_steps


def compile_step(config: ml_collections.ConfigDict, mode: str = "train", batch: int | None = None) -> CompiledStep:
    """Builds and compiles one step of `mode` for `config` on synthetic inputs sharded over every device."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    config = ml_collections.ConfigDict(config.to_dict())
    batch = batch or config.batch_size
    config.batch_size = config.eval_batch_size = batch
    if config.model.num_classes is None:
        config.model.num_classes = 1000
    mesh = distributed.make_mesh()
    plan = plan_lib.make_plan(config, 100 * batch, batch, mesh.size, distributed.mesh_process_count(mesh))
    trainer = train.build_trainer(config, plan, mesh)
    create_state = jax.jit(trainer.create_state, out_shardings=distributed.replicated(mesh))
    state = jax.eval_shape(create_state, jax.random.key(0))  # compiling needs shapes only; timing makes one
    inputs = _synthetic_inputs(config, trainer, mesh, batch)

    def step_args(state):
        return (state, inputs) if mode == "train" else (state.eval_variables(), inputs["image"])

    step_fn = trainer.train_step if mode == "train" else _jit_inference(config, trainer, mesh, trainer.model)
    args = step_args(state)
    started = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    compile_s = time.perf_counter() - started
    flops = _step_flops(config, mode, trainer, mesh, compiled, args)
    time_steps = _step_timer(mode, compiled, create_state, step_args)
    return CompiledStep(mode, batch, mesh.size, compile_s, compiled, flops, time_steps)


def pipeline_images_per_s(config: ml_collections.ConfigDict, batch: int, steps: int, warmup: int = 3) -> float:
    """Images/s of this host's training input pipeline alone (decode, augment, batch) on the config's dataset."""
    from mnv2_jax.data import pipeline

    process_count, process_index = jax.process_count(), jax.process_index()
    builder = pipeline.builder_for(config)
    pipeline.check_split(builder, config.train_split, "config.train_split")
    local_batch = batch // process_count
    batches = pipeline.train_iterator(
        builder, config, local_batch, process_index=process_index, process_count=process_count
    )
    for _ in range(warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return local_batch * steps / (time.perf_counter() - started)


def run(
    config: ml_collections.ConfigDict,
    mode: str = "train",
    batch: int | None = None,
    steps: int = 20,
    warmup: int = 2,
    peak_tflops: float | None = None,
    pipeline_steps: int = 0,
) -> BenchResult:
    """Compiles one step of `mode` for `config`, then times `steps` of them (0: compile and analyse only).

    With `pipeline_steps`, also times that many batches of the training input pipeline alone and reports whether
    the step would wait for its input.
    """
    step = compile_step(config, mode, batch)
    flops = step.flops
    step_ms = images_per_s = achieved = faults = None
    if steps > 0:
        step.time_steps(0, warmup)
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        elapsed = step.time_steps(steps, 0)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps
        step_ms = 1000 * elapsed / steps
        images_per_s = step.batch * steps / elapsed
        if flops is not None:
            # cost_analysis counts one device's program; every device runs its own share of the batch.
            achieved = flops * step.devices * steps / elapsed / 1e12
    flops_per_image = flops * step.devices / step.batch if flops is not None else None
    pipeline_rate = input_bound = None
    if pipeline_steps > 0:
        pipeline_rate = pipeline_images_per_s(config, step.batch, pipeline_steps)
        if images_per_s is not None:
            input_bound = pipeline_rate < images_per_s / jax.process_count()
    return BenchResult(
        mode=mode,
        backend=jax.default_backend(),
        devices=step.devices,
        batch=step.batch,
        resolution=config.resolution,
        steps=steps,
        compile_s=step.compile_s,
        step_ms=step_ms,
        images_per_s=images_per_s,
        flops_per_image=flops_per_image,
        achieved_tflops=achieved,
        mfu=achieved / peak_tflops if achieved is not None and peak_tflops else None,
        **_memory(step.compiled),
        pipeline_images_per_s=pipeline_rate,
        input_bound=input_bound,
        page_faults_per_step=faults,
        host_allocator=host_memory.allocator_in_effect(),
    )


def format_result(result: BenchResult) -> str:
    def fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value / scale:,.{digits}f}{unit}"

    return "\n".join(
        [
            f"{result.mode} step on {result.devices} {result.backend} device(s), batch {result.batch}, "
            f"{result.resolution}x{result.resolution}",
            f"  compile            {result.compile_s:.1f} s",
            f"  step               {fmt(result.step_ms, ' ms')}",
            f"  throughput         {fmt(result.images_per_s, ' images/s')}",
            f"  FLOPs per image    {fmt(result.flops_per_image, ' MFLOP', 1e6)} (XLA cost analysis)",
            f"  achieved           {fmt(result.achieved_tflops, ' TFLOP/s', digits=3)}"
            + (f", MFU {result.mfu:.1%}" if result.mfu is not None else ""),
            f"  temporary memory   {fmt(result.temp_bytes, ' MiB', 2**20)} (XLA memory analysis)",
            f"  arguments          {fmt(result.argument_bytes, ' MiB', 2**20)}",
            f"  page faults        {fmt(result.page_faults_per_step, ' per step', digits=0)}, host allocator: "
            + f"{result.host_allocator} (mnv2_jax/host_memory.py)",
        ]
        + (
            [
                f"  input pipeline     {fmt(result.pipeline_images_per_s, ' images/s')} on this host"
                + ("" if result.input_bound is None else f" -> input-bound: {'yes' if result.input_bound else 'no'}")
            ]
            if result.pipeline_images_per_s is not None
            else []
        )
    )
