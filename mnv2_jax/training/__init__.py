"""The training engine: plan (derived values), optimizer, sharded steps, loop, checkpoints, metrics."""
