"""The small files a run keeps in its workdir besides checkpoints, read without importing JAX or TensorFlow.

`config.json` (the run's final config), `metrics.jsonl` (one JSON object per metrics write,
`training.metrics.JsonlWriter`) and `finished.json` (written by process 0 once the run has trained its last step;
`mnv2 sweep` skips such runs). Paths go through `etils.epath`, so a workdir may be local or a `gs://` URI (TensorFlow's
file system, imported only for URIs).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from mnv2_jax.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINISHED_FILE = "finished.json"  # {"step": last step, "train_seconds": the sessions' seconds up to their checkpoints}


def is_uri(path: str) -> bool:
    """`gs://bucket/dir` and other URIs (not local paths)."""
    return "://" in str(path)


def absolute(workdir: str) -> str:
    """`workdir` as an absolute local path, or unchanged when it is a URI."""
    return str(workdir) if is_uri(workdir) else os.path.abspath(workdir)


def write_json(path: str | epath.Path, data: Any, **dump_args: Any) -> None:
    """Writes `data` as JSON under a temporary name, then renames it into place."""
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(data, **dump_args))
    tmp.replace(path)


def read_json(path: str | epath.Path) -> Any | None:
    """The JSON in `path`, or None when there is no such file."""
    path = epath.Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of `<workdir>/metrics.jsonl` (empty when there is none)."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_eval_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of the last evaluation in `records` (`eval/<name>`; not its image count or seconds)."""
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    if not evals:
        return {}
    return {
        key: value
        for key, value in evals[-1].items()
        if key.startswith("eval/") and key.count("/") == 1 and key not in ("eval/count", "eval/seconds")
    }


def write_finished(workdir: str, step: int, train_seconds: float) -> None:
    """Marks `workdir` as trained to its last step (process 0 only)."""
    write_json(epath.Path(workdir) / FINISHED_FILE, {"step": int(step), "train_seconds": round(train_seconds, 3)})


def read_finished(workdir: str) -> dict[str, Any] | None:
    """`<workdir>/finished.json`, or None while the run has not reached its last step."""
    return read_json(epath.Path(workdir) / FINISHED_FILE)


class WorkdirError(UserError):
    """The workdir cannot be created or written."""


def check_writable(workdir: str) -> None:
    """Creates `workdir` if needed and checks that files can be written in it (before anything is compiled)."""
    probe = epath.Path(workdir) / f".mnv2-write-test-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
