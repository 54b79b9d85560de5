"""Data sources by name: how `config.dataset` is read, for each task a source serves.

A source module registers a `Reader` per task it serves: the prefix users write (`imagefolder:<root>`,
`voc:<root>`; the empty prefix is TFDS's registered names, tried when no other prefix matches) and a function that
opens the dataset as a TFDS-like builder (`.info.splits[split].num_examples`, `.as_dataset(split=...)`; builders
that read file by file say `reads_files = True`, those that know their classes have `dataset_info()`). A new format
is one module that calls `register`; `open_dataset` finds the reader of a config's dataset and task, and names
what the task reads when none fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from mnv2_jax.errors import UserError


class DatasetError(UserError):
    """The configured dataset or split does not exist or cannot be read."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None  # None: the dataset does not say (segmentation datasets: the config does)
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]


# (the dataset's name without the prefix, the config, prepare) -> a builder; `prepare`: download or build it if needed
Opener = Callable[[str, ml_collections.ConfigDict, bool], Any]


@dataclasses.dataclass(frozen=True)
class Reader:
    prefix: str  # e.g. "imagefolder:"; "" for TFDS names
    serves: str  # the task whose examples (`features`) it reads
    form: str  # how a user names such a dataset, for messages: "'imagefolder:<root>'"
    holds: str  # what such a dataset holds, for messages: "one label per image"
    open: Opener


_READERS: list[Reader] = []


def register(reader: Reader) -> None:
    """Makes `reader` open datasets named `<prefix>...` for `reader.serves` (replacing one of the same pair)."""
    _READERS[:] = [r for r in _READERS if (r.prefix, r.serves) != (reader.prefix, reader.serves)] + [reader]


def forms(task: str) -> str:
    """How datasets of `task` are named, for messages: "'voc:<root>' or a name from tfds.list_builders() ..."."""
    readers = sorted((r for r in _READERS if r.serves == task), key=lambda r: r.prefix == "")
    return " or ".join(r.form for r in readers) or "no registered data source"


def open_dataset(config: ml_collections.ConfigDict, task: str, prepare: bool = True) -> Any:
    """The builder of `config.dataset` for `task`; a one-line `DatasetError` when no registered source fits."""
    dataset = config.dataset
    prefix = max((r.prefix for r in _READERS if dataset.startswith(r.prefix)), key=len, default="")
    reader = next((r for r in _READERS if (r.prefix, r.serves) == (prefix, task)), None)
    if reader is None:
        holds = " or ".join(dict.fromkeys(r.holds for r in _READERS if r.prefix == prefix)) or "no known data"
        raise DatasetError(f"dataset {dataset!r} holds {holds}; task={task} reads {forms(task)}")
    return reader.open(dataset[len(prefix) :], config, prepare)
