"""Tasks as plug-ins: what differs between classification, segmentation and detection, chosen by name.

A task is a `Task` subclass that registers itself with `@tasks.register`; `config.task` names it, `get(config)`
returns its object, and the trainer, evaluation, the input pipeline, `bench`, `eval`, `predict`, `export` and
`summary` only talk to that object, so a new task plugs into the same loop and keeps its guarantees (exact resume,
any mesh, the non-finite guard, masked padded evaluation). docs/tasks.md walks through adding one.

Tasks outside this package register when their module is imported: a config file may import it, and the
commands that read a workdir (`eval`, `predict`, `export`) import the modules named in `$MNV2_PLUGINS`
(comma-separated) and the `mnv2_jax.plugins` entry points of installed packages when a name is not registered.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

import ml_collections

from mnv2_jax.config_checks import ConfigError
from mnv2_jax.tasks.base import PredictError, PredictOptions, Task

PLUGINS_ENV = "MNV2_PLUGINS"
PLUGINS_ENTRY_POINTS = "mnv2_jax.plugins"

_TASK_TYPES: dict[str, type[Task]] = {}
_plugins_loaded = False


def register(task_type: type[Task]) -> type[Task]:
    """Makes `task_type` available as `config.task = task_type.name` (a class decorator)."""
    _TASK_TYPES[task_type.name] = task_type
    return task_type


def load_plugins() -> None:
    """Imports, once, the modules named in `$MNV2_PLUGINS` and the `mnv2_jax.plugins` entry points; they register
    their tasks and data sources on import."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import {module!r}: {e}") from None
    for entry_point in importlib.metadata.entry_points(group=PLUGINS_ENTRY_POINTS):
        entry_point.load()


def names() -> tuple[str, ...]:
    """The registered tasks' names (plugins included)."""
    load_plugins()
    return tuple(_TASK_TYPES)


def task_type(name: str) -> type[Task]:
    """The task class registered as `name`; a one-line `ConfigError` naming the registered ones otherwise."""
    if name not in _TASK_TYPES:
        load_plugins()
    if name not in _TASK_TYPES:
        raise ConfigError(f"task must be one of {names()}, got {name!r}")
    return _TASK_TYPES[name]


def get(config: ml_collections.ConfigDict) -> Task:
    """The task object of `config.task`: the one place a task is looked up by name."""
    return task_type(config.task)(config)


def require(config: ml_collections.ConfigDict, served: tuple[str, ...], what: str) -> Task:
    """The config's task; a one-line error when `what` (a command, a workdir's use) does not serve it."""
    task = get(config)
    if task.name not in served:
        raise ConfigError(f"{what} does not serve task={task.name!r} yet; it serves task in {served}")
    return task


# The built-in tasks register themselves on import, in this order.
# isort: off
from mnv2_jax.tasks import classification  # noqa: E402
from mnv2_jax.tasks import segmentation  # noqa: E402
from mnv2_jax.tasks import detection  # noqa: E402
# isort: on

__all__ = [
    "PredictError",
    "PredictOptions",
    "Task",
    "classification",
    "detection",
    "get",
    "load_plugins",
    "names",
    "register",
    "require",
    "segmentation",
    "task_type",
]
