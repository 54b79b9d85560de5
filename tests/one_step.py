"""One training step of the tiny model in float64, run as its own process (or one of several).

    python tests/one_step.py {all,one} BN_GROUP_SIZE|none OUTPUT.npz

`all` uses every device of every process (start it through `launch/local.py` for several processes), `one` the
first device only. Process 0 writes the parameters, EMA and batch statistics. Needs JAX_ENABLE_X64=1.
"""

import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import train_helpers

from mnv2_jax.training import distributed


def main() -> None:
    which, group, out = sys.argv[1:4]
    distributed.maybe_initialize(timeout_s=60)
    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    mesh = distributed.make_mesh(jax.devices() if which == "all" else jax.devices()[:1])
    config = train_helpers.tiny_config(None if group == "none" else int(group))
    images, labels = train_helpers.fixed_batch(config)
    per_process = len(images) // distributed.mesh_process_count(mesh)
    lo = distributed.mesh_process_index(mesh) * per_process
    local = {"image": images[lo : lo + per_process], "label": labels[lo : lo + per_process]}
    state = train_helpers.one_step(config, mesh, local)
    if jax.process_index() == 0:
        np.savez(out, **train_helpers.flat(state))


if __name__ == "__main__":
    main()
