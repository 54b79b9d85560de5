"""The activation memory TFLite's interpreter plans for a model: `activation_arena(path)`.

TFLite's ArenaPlanner places every non-constant tensor it allocates (the model's inputs, each op's outputs, the
kernels' scratch tensors) at an offset in one buffer, the arena, reusing space once a tensor's last reader has run.
Python does not expose the arena's size, but after `allocate_tensors()` each tensor's numpy view
(`interpreter.tensor(i)()`) has its address, from which the arena's span is measured:

- The model's inputs and every op's outputs (`_get_ops_details()`) are the activation tensors. They all lie in one
  region; the constants (op inputs that no op produces: weights, biases, shape operands) point into the model's
  buffer elsewhere.
- Any other tensor with data is a kernel temporary. The interpreter lists them (unnamed, after the model's
  tensors) but says neither which op owns one nor whether it is in the arena or in the persistent arena (e.g.
  CONV_2D's transposed weights on its multi-threaded path) or on the heap. Taken in address order, a temporary
  counts as arena scratch when it starts inside the span found so far or at its 64-byte-aligned end: arena offsets
  are 0 or the aligned end of another arena tensor, and the arena buffer has at least 64 bytes of padding past its
  high-water mark, so a buffer of its own starts further on. MobileNetV2's stem conv has such scratch, an im2col
  buffer (single-threaded only), and so has the SUM of its global pool (three small ones).
- `arena_bytes` is the span `max(address + bytes) - min(address)` of these: the arena's high-water mark. The
  planner places tensors alive for the whole run (the model's inputs) first, at offset 0, so the span starts at
  the arena's start.

Verified on hand-made models whose plan can be derived (`tests/test_tflite_memory.py`). Limits: the interpreter runs
without default delegates, as XNNPACK (delegated by default) would own the tensors of the graph it takes over and
leave only the model's inputs and outputs in the arena; byte counts are the tensors' own sizes, while the planner
rounds each offset up to 64 bytes; the plan follows the kernels' choices, so it can depend on `num_threads`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

ALIGNMENT = 64  # tflite::kDefaultTensorAlignment: arena offsets are multiples of it


def activation_arena(path: str | os.PathLike, num_threads: int | None = None) -> dict[str, Any]:
    """The arena that TFLite's built-in kernels plan for the model at `path`, measured from tensor addresses.

    Returns `arena_bytes` (the arena's span), `tensors` (the activation tensors: model inputs, then each op's
    outputs in execution order, with `name`, `shape`, `dtype`, `bytes`, `offset` from the arena's start and the
    producing `op`, -1 for inputs), `scratch` (kernel temporaries in the arena, same fields, `op` unknown: -1),
    `largest_op_bytes` (the most bytes of non-constant inputs and outputs of one op: no plan can use less, unless
    it computes that op in place), `peak_live_bytes` (the most bytes of activation tensors alive at once, with the
    model inputs alive throughout, as TFLite keeps them, and an op's output that TFLite placed on the input it
    overwrites, such as an ADD's, counted once), and `sum_bytes` (all activation and scratch tensors' bytes: a plan
    without reuse).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=os.fspath(path),
        num_threads=num_threads,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()  # the interpreter's only op-level listing
    details = {d["index"]: d for d in interpreter.get_tensor_details()}  # tensors with a shape
    inputs = [int(d["index"]) for d in interpreter.get_input_details()]
    producers = {int(i): -1 for i in inputs} | {int(i): op["index"] for op in ops for i in op["outputs"] if i >= 0}
    by_index = {i: _describe(interpreter, details, i, op) for i, op in producers.items()}  # in execution order
    tensors = list(by_index.values())
    if None in tensors:
        raise ValueError(f"{path}: some activation tensors are dynamic (allocated at run time, not in the arena)")
    constants = {int(i) for op in ops for i in op["inputs"]}
    temporaries = [_describe(interpreter, details, i, -1) for i in details if i not in producers and i not in constants]
    start = min(t["address"] for t in tensors)
    scratch, end = _arena_scratch(temporaries, start, max(t["address"] + t["bytes"] for t in tensors))
    for t in tensors + scratch:
        t["offset"] = t.pop("address") - start
    return {
        "arena_bytes": end - start,
        "tensors": tensors,
        "scratch": scratch,
        "largest_op_bytes": _largest_op_bytes(ops, by_index),
        "peak_live_bytes": _peak_live_bytes(ops, inputs, by_index, interpreter.get_output_details()),
        "sum_bytes": sum(t["bytes"] for t in tensors + scratch),
    }


def _describe(interpreter: Any, details: dict[int, dict], index: int, op: int) -> dict[str, Any] | None:
    """Tensor `index` as a row of the result, with its `address`."""
    try:
        view = interpreter.tensor(index)()
    except ValueError:  # no data (a dynamic tensor, allocated when its kernel runs): not in the arena
        return None
    detail = details[index]
    entry = {"name": detail["name"], "shape": [int(n) for n in detail["shape"]], "op": op}
    entry.update(dtype=np.dtype(detail["dtype"]).name, bytes=int(view.nbytes), address=view.ctypes.data)
    return entry


def _arena_scratch(temporaries: list[dict[str, Any] | None], start: int, end: int) -> tuple[list[dict], int]:
    """The kernel temporaries in the arena `[start, end)` of the activation tensors, and the arena's end with them.

    Taken in address order, a temporary is arena scratch when it starts inside the span found so far or at its
    `ALIGNMENT`-aligned end (see the module's docstring)."""
    scratch = []
    for temporary in sorted((t for t in temporaries if t), key=lambda t: t["address"]):
        if start <= temporary["address"] <= start + (end - start + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT:
            scratch.append(temporary)
            end = max(end, temporary["address"] + temporary["bytes"])
    return scratch, end


def _largest_op_bytes(ops: list[dict], tensors: dict[int, dict]) -> int:
    """The most bytes of activation tensors (`tensors`, by index) that one op reads or writes."""
    return max(
        sum(tensors[i]["bytes"] for i in {int(i) for i in (*op["inputs"], *op["outputs"])} & tensors.keys())
        for op in ops
    )


def _peak_live_bytes(ops: list[dict], inputs: list[int], tensors: dict[int, dict], outputs: list[dict]) -> int:
    """The most bytes of buffers alive during one op. A tensor lives from its producer (the first op for model
    inputs) to its last reader (the last op for model inputs and outputs); an output placed at the address of an
    input of its own op shares that input's buffer."""
    last = len(ops) - 1
    buffer = {i: i for i in tensors}  # tensor -> the tensor whose buffer it uses
    span = {i: [0, last] for i in inputs}
    for op in ops:
        index, reads = op["index"], [int(i) for i in op["inputs"] if int(i) in tensors]
        for i in reads:
            span[buffer[i]][1] = max(span[buffer[i]][1], index)
        for out in (int(i) for i in op["outputs"] if i >= 0):
            shared = [i for i in reads if tensors[i]["offset"] == tensors[out]["offset"]]
            buffer[out] = buffer[shared[0]] if shared else out
            span.setdefault(buffer[out], [index, index])
    for detail in outputs:
        span[buffer[int(detail["index"])]][1] = last
    size = {b: max(tensors[i]["bytes"] for i in tensors if buffer[i] == b) for b in span}
    return max(sum(size[b] for b, (first, end) in span.items() if first <= step <= end) for step in range(len(ops)))
