"""What the test suite's XLA flags buy: compile and step times of the trainer tests' program under flag sets.

    python benchmarks/test_compile.py [--rounds 3] [--devices 8] [--task classification]

The suite compiles far more than it runs (tests/conftest.py `xla_flags`). For each flag set, in a fresh process
(XLA reads its flags once), this compiles the train state's init and the train step of `tests/train_helpers.py`'s
tiny network (float32, 32x32, batch 16) on a mesh of forced CPU devices without the persistent cache, and times one
step after compilation. Flag sets alternate round by round; medians are printed with their ratio to XLA's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FLAG_SETS = {
    "default": "",
    "O0": "--xla_backend_optimization_level=0",
    "O0 + legacy fusion emitters (the suite's)": (
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    ),
    "legacy fusion emitters": "--xla_cpu_use_fusion_emitters=false",
}


def measure(task: str) -> dict[str, float]:
    """In this process: compile seconds of init and train step, and one step's seconds."""
    sys.path.insert(0, str(REPO / "tests"))
    import jax
    import numpy as np
    import train_helpers

    from mnv2_jax.training import distributed

    config = train_helpers.tiny_config(task=task)
    config.model.dtype = "float32"
    mesh = distributed.make_mesh()
    trainer = train_helpers._trainer(config, mesh)
    images, labels = train_helpers.fixed_batch(config)
    batch = distributed.global_batch({"image": images.astype(np.float32), "label": labels}, mesh)
    started = time.perf_counter()
    create_state = jax.jit(trainer.create_state, out_shardings=distributed.replicated(mesh))
    compiled_init = create_state.lower(jax.random.key(0)).compile()
    init_s = time.perf_counter() - started
    state = compiled_init(jax.random.key(0))
    started = time.perf_counter()
    compiled_step = jax.jit(trainer.train_step).lower(state, batch).compile()
    step_compile_s = time.perf_counter() - started
    state, _ = compiled_step(state, batch)
    jax.block_until_ready(state)
    started = time.perf_counter()
    state, _ = compiled_step(state, batch)
    jax.block_until_ready(state)
    return {"init_compile_s": init_s, "step_compile_s": step_compile_s, "step_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--task", default="classification", choices=["classification", "segmentation"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.task)))
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name in FLAG_SETS}
    for _ in range(args.rounds):
        for name, flags in FLAG_SETS.items():
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false"}
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} {flags}".strip()
            command = [sys.executable, __file__, "--child", f"--task={args.task}"]
            finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
            results[name].append(json.loads(finished.stdout.strip().splitlines()[-1]))
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    reference = medians["default"]
    print(f"{args.task}, {args.devices} CPU devices, median of {args.rounds} rounds")
    print(f"{'flags':44s} {'init compile':>14s} {'step compile':>14s} {'step':>10s}")
    for name, m in medians.items():
        ratios = {k: m[k] / reference[k] for k in m}
        print(
            f"{name:44s} {m['init_compile_s']:6.2f} s {ratios['init_compile_s']:4.2f}x"
            f" {m['step_compile_s']:6.2f} s {ratios['step_compile_s']:4.2f}x"
            f" {1000 * m['step_s']:5.0f} ms {ratios['step_s']:4.2f}x"
        )


if __name__ == "__main__":
    main()
