"""Loads a `configs/*.py[:arg]` file the way the `mnv2` command does, for tests."""

from __future__ import annotations

from absl import flags

from mnv2_jax.cli import common


def load(spec: str, *overrides: str):
    argv = ["test", f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    holder = common.define_config(flag_values, argv)
    common.parse(flag_values, argv)
    return common.load_config(holder)
