"""The one-line checks of config fields: each raises `ConfigError` naming the field, the allowed values and the value
given. Shared by `mnv2_jax.config` (model, data source, optimizer, loop) and each task's own section."""

from __future__ import annotations

from typing import Any

from mnv2_jax.errors import UserError


class ConfigError(UserError):
    """A config field holds a value outside what is allowed."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} must be one of {allowed}, got {value!r}")


def check_positive(field: str, value: Any, kind: type = int) -> None:
    if not is_number(value) or value <= 0:
        raise ConfigError(f"{field} must be a positive {kind.__name__}, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"{field} must be a positive int, got {value!r}")


def check_range(field: str, value: Any, low: float, high: float, *, closed_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{field} must be in [{low}, {high}{bracket}, got {value!r}")


def check_interval(field: str, value: Any, low: float, high: float) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and low <= value[0] <= value[1] <= high):
        raise ConfigError(f"{field} must be a pair (lo, hi) with {low} <= lo <= hi <= {high}, got {value!r}")


def check_numbers(field: str, value: Any, low: float, high: float) -> None:
    """A non-empty tuple of numbers in [low, high]."""
    if not isinstance(value, tuple) or not value or not all(is_number(x) and low <= x <= high for x in value):
        raise ConfigError(f"{field} must be a non-empty tuple of numbers in [{low}, {high}], got {value!r}")


def check_class_count(field: str, value: Any, task: str, what: str = "") -> None:
    """`model.num_classes` must be an int >= 1 for a task that predicts classes of its own."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field} must be an int >= 1 for {task}{what}, got {value!r}")
