"""Evaluators: what a task makes of its compiled eval step's outputs over a whole eval split.

The trainer has one evaluation path: `evaluator = task.evaluator()`, then `evaluator.update(outputs)` with each
padded global batch's outputs of `task.eval_outputs` (replicated over the mesh, so every device's and every host's
examples are in them), then `evaluator.result()`, the `eval/...` metrics. Two ways to accumulate serve every task so
far, as in big_vision's and scenic's evaluators:

- `SummedEvaluator`: the outputs are sums over the batch (padding counted 0); they are added up on the device and
  copied to the host once (classification's counts, segmentation's confusion matrix).
- `GatheredEvaluator`: the outputs are per-example arrays (leading batch axis, `mask` among them); each batch is
  copied to the host and the arrays are concatenated (detection's boxes for COCO mAP).
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import numpy as np

from mnv2_jax.training import distributed


class Evaluator(abc.ABC):
    """Accumulates the eval step's outputs of one evaluation; `result()` turns them into metrics."""

    @abc.abstractmethod
    def update(self, outputs: dict[str, Any]) -> None:
        """Takes one global batch's outputs of `task.eval_outputs`."""

    @abc.abstractmethod
    def result(self) -> dict[str, float]:
        """`eval/...` metrics over every batch given to `update`; includes `eval/count`."""


class SummedEvaluator(Evaluator):
    """Adds up per-batch sums on the device; `metrics(totals)` (on the host) gives the results."""

    def __init__(self) -> None:
        self._totals: Any = None

    def update(self, outputs: dict[str, Any]) -> None:
        self._totals = outputs if self._totals is None else jax.tree.map(lambda a, b: a + b, self._totals, outputs)

    def result(self) -> dict[str, float]:
        return self.metrics(distributed.to_host(self._totals))

    @abc.abstractmethod
    def metrics(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of the sums over the whole split."""


class GatheredEvaluator(Evaluator):
    """Copies each batch's per-example arrays to the host; `metrics(arrays)` gets them concatenated, padding left out
    (`mask` False)."""

    def __init__(self) -> None:
        self._parts: list[dict[str, np.ndarray]] = []

    def update(self, outputs: dict[str, Any]) -> None:
        self._parts.append(distributed.to_host(outputs))

    def result(self) -> dict[str, float]:
        arrays = {name: np.concatenate([part[name] for part in self._parts]) for name in self._parts[0]}
        real = np.asarray(arrays.pop("mask"), bool)
        return self.metrics({name: values[real] for name, values in arrays.items()})

    @abc.abstractmethod
    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of every real example's arrays."""
