"""Loads a `configs/*.py[:arg]` file the way the `mnv2` command does, for tests."""

from mnv2_jax.cli.common import config_from_spec as load

__all__ = ["load"]
