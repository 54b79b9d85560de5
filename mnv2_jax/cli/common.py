"""Flag parsing and error reporting shared by the subcommands."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from mnv2_jax import config as config_lib
from mnv2_jax.errors import UserError


class UsageError(UserError):
    """Bad command-line usage."""


def define_config(flag_values: flags.FlagValues, argv: list[str]) -> flags.FlagHolder:
    """`--config path[:arg]` plus `--config.FIELD=VALUE` overrides (typos and wrong types are errors)."""
    return config_flags.DEFINE_config_file(
        "config",
        None,
        "config file, optionally with an argument: configs/imagenet.py:width=0.75,resolution=192",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )


def parse(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parses flags; returns the positional arguments. `--help` prints the flags and exits."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} [flags]\n\n{flag_values.main_module_help() or flag_values}")
        raise SystemExit(0)
    try:
        return flag_values(argv, known_only=False)[1:]
    except flags.Error as e:
        message = str(e)
        if "ConfigError: " in message:  # raised inside a config file's get_config(arg)
            message = message.rsplit("ConfigError: ", 1)[1].strip()
        raise UsageError(message) from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a field that does not exist
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")), "--config.*")
        suggestion = re.search(r'Did you mean \\?"([\w.]+)\\?"', str(e))
        hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
        raise UsageError(f"unknown config field: {flag}{hint}") from None


def load_config(holder: flags.FlagHolder):
    """The validated config."""
    if holder.value is None:
        raise UsageError("--config is required, e.g. --config configs/imagenet.py")
    config = holder.value
    try:
        config_lib.validate(config)
    except OSError as e:  # ml_collections loads the file lazily and reports a missing one here
        path = config_flags.get_config_filename(holder._flagvalues[holder.name])
        raise UsageError(f"cannot load config file {path}: {str(e).splitlines()[-1].strip()}") from None
    return config


def config_from_spec(spec: str, *overrides: str):
    """The validated config of `configs/x.py[:arg]` plus `--config.FIELD=VALUE` overrides, as the CLI loads it."""
    argv = ["mnv2", f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    holder = define_config(flag_values, argv)
    parse(flag_values, argv)
    return load_config(holder)


def setup_logging() -> None:
    """absl INFO logging to stderr (progress, metrics) for long-running commands."""
    from absl import logging

    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


class _QuietLibraries:
    """Drops INFO chatter of libraries (orbax logs every file it writes); keeps their warnings."""

    NOISY = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in self.NOISY)


def command(fn: Callable[[list[str]], int | None]) -> Callable[[list[str]], int]:
    """Wraps a subcommand: user errors become `mnv2 <cmd>: error: ...` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(argv: list[str]) -> int:
        try:
            return fn(argv) or 0
        except (UserError, FileNotFoundError) as e:
            print(f"{argv[0]}: error: {e}", file=sys.stderr)
            return 2

    return wrapper
