"""Command-line and option checking shared by the launchers (`slurm.py`, `tpu.py`): one-line errors, status 2."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mnv2_jax.errors import UserError

NO_SPACE = re.compile(r"^\S+$")


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors become UserError (one line, exit status 2 under `run_cli`) instead of usage text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Runs a launcher's command line: a UserError is one line `<prog>: error: ...` on stderr and status 2."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The launcher's own options, and the command after `--`."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def check_command(command: Sequence[str]) -> list[str]:
    """The command to launch, which must not be empty."""
    command = list(command)
    if not command or not command[0]:
        raise UserError("no command: give it after --, e.g. -- mnv2 train --config configs/imagenet.py --workdir DIR")
    return command


def add_options(parser: argparse.ArgumentParser, cls: type, helps: Mapping[str, str]) -> None:
    """`--FIELD` for each field of dataclass `cls`; only the given ones are parsed (the dataclass has the defaults).

    Booleans are flags (`--spot`, or `--no_requeue` for a field that defaults to True); tuples are repeatable.
    """
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = helps.get(field.name, "")
        if isinstance(default, bool):
            flag, action = (f"--no_{field.name}", "store_false") if default else (f"--{field.name}", "store_true")
            help_text = f"do not {help_text}" if default else help_text
            parser.add_argument(flag, dest=field.name, action=action, default=argparse.SUPPRESS, help=help_text)
            continue
        help_text += "" if default in (None, ()) else f" (default: {default})"
        if isinstance(default, tuple):
            parser.add_argument(f"--{field.name}", action="append", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = int if "int" in str(field.type) else str
            required = field.default is dataclasses.MISSING
            parser.add_argument(
                f"--{field.name}", type=kind, required=required, default=argparse.SUPPRESS, help=help_text
            )


def check_keys(cls: type, values: Mapping[str, Any], what: str) -> None:
    """UserError naming the first key of `values` that is not a field of dataclass `cls`, and the allowed ones."""
    allowed = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(str(key) for key in values if key not in allowed)
    if unknown:
        raise UserError(f"unknown {what} option {unknown[0]!r}; allowed: {', '.join(allowed)}")


def check(ok: bool, field: str, expected: str, value: Any) -> None:
    """UserError `FIELD must be EXPECTED, got VALUE` unless `ok`."""
    if not ok:
        raise UserError(f"{field} must be {expected}, got {value!r}")


def lines(value: str | Sequence[str], field: str) -> tuple[str, ...]:
    """A tuple of one-line strings from one string or a sequence of them."""
    items = (value,) if isinstance(value, str) else value
    ok = isinstance(items, Sequence) and all(isinstance(x, str) and x.strip() and "\n" not in x for x in items)
    check(ok, field, "a non-empty line or a list of them", value)
    return tuple(items)


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def word(value: Any) -> bool:
    return isinstance(value, str) and bool(NO_SPACE.match(value))
