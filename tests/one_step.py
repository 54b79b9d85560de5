"""One training step of the tiny model in float64, run as its own process (or one of several).

    python tests/one_step.py MESHES RUNS OUTPUT.npz

For each mesh in MESHES (comma-separated: `all` uses every device of every process, start it through
`launch/local.py` for several processes; `one` the first device only) and each run in RUNS (comma-separated
`<task>-<BN group size or none>`), one step from the same initial state and batch. Process 0 writes the
parameters, EMA and batch statistics as `<mesh>-<run>:<name>`. Needs JAX_ENABLE_X64=1.
"""

import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import train_helpers

from mnv2_jax.training import distributed


def main() -> None:
    meshes, runs, out = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
    distributed.maybe_initialize(timeout_s=60)
    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    results, initial = {}, {}
    for which in meshes:
        mesh = distributed.make_mesh(jax.devices() if which == "all" else jax.devices()[:1])
        for run in runs:
            task, group = run.split("-")
            config = train_helpers.tiny_config(None if group == "none" else int(group), task=task)
            batch = train_helpers.fixed_batch(config)
            per_process = train_helpers.BATCH // distributed.mesh_process_count(mesh)
            lo = distributed.mesh_process_index(mesh) * per_process
            local = {name: values[lo : lo + per_process] for name, values in batch.items()}
            if task not in initial:  # the same for every mesh and BN grouping: compiled once
                initial[task] = train_helpers.initial_state(config, mesh)
            state = train_helpers.one_step(config, mesh, local, initial[task])
            results.update({f"{which}-{run}:{k}": v for k, v in train_helpers.flat(state).items()})
    if jax.process_index() == 0:
        np.savez(out, **results)


if __name__ == "__main__":
    main()
