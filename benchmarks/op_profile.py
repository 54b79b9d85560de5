"""Where the compiled step spends its time: per-op durations from a JAX profiler trace, grouped by layer role.

    python benchmarks/op_profile.py [SPEC] [--mode train|infer] [--batch 32] [--steps 3] [--top 25] [--hlo OUT]

SPEC defaults to `configs/imagenet.py:resolution=128,convention=torch` (the peers benchmark's training setting).
Each XLA op (a fusion, a YNNPACK call, a loop) of the compiled step is attributed to the layer role it comes
from (stem, expand, depthwise, project, head; forward or backward) and the model operation that XLA's metadata
names (BatchNorm, clip, dot_general, ...). Times are summed over the threads that ran them, per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from mnv2_jax import bench
from mnv2_jax.cli.common import config_from_spec

DEFAULT_SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "imagenet.py")
_RUNTIME_EVENTS = ("$", "Thunk", "Slinky", "Pjit", "Common", "Parse", "end:")


def op_metadata(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op name XLA recorded for it."""
    return {m[1]: m[2] for m in re.finditer(r'\n  %([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo_text)}


def attribute(op_name: str) -> tuple[str, str, str]:
    """(forward/backward, layer role, model operation) of one op's metadata name."""
    direction = "backward" if "transpose(" in op_name else "forward"
    path = re.sub(r"^jit\(\w+\)/", "", op_name)
    path = re.sub(r"^.*?MobileNetV2\)*/", "", path)  # also inside `predict`'s loop: while/body/closed_call/...
    parts = path.split("/")
    role = "other"
    if parts[0] == "Conv":
        role = "stem"
    elif parts[0] in ("Conv_1", "Logits"):
        role = "head"
    elif parts[0].startswith("expanded_conv") and len(parts) > 1 and parts[1] in ("expand", "depthwise", "project"):
        role, parts = parts[1], parts[1:]
    operation = parts[1] if len(parts) > 1 else parts[0]
    operation = re.sub(r"^jit\((\w+)\)$", r"\1", operation)
    return direction, role, operation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=f"{DEFAULT_SPEC}:resolution=128,convention=torch")
    parser.add_argument("--mode", default="train", choices=bench.MODES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", help="also write the compiled HLO here")
    args = parser.parse_args()

    step = bench.compile_step(config_from_spec(args.spec), args.mode, args.batch)
    hlo = step.compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    elapsed = step.time_steps(args.steps, 2)
    print(f"{args.mode} step, batch {args.batch}: {1000 * elapsed / args.steps:.1f} ms untraced")

    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        step.time_steps(args.steps, 0)
    (trace_file,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events

    metadata = op_metadata(hlo)
    by_group: collections.Counter = collections.Counter()
    by_role: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event["name"].startswith(_RUNTIME_EVENTS):
            continue
        direction, role, operation = attribute(metadata.get(event["name"], "?"))
        kind = re.sub(r"\.\d+$", "", event["name"])  # the XLA op kind: a fusion's name, ynn_fusion, dot, ...
        by_group[(direction, role, operation, kind)] += event["dur"] / 1000 / args.steps
        by_role[(direction, role)] += event["dur"] / 1000 / args.steps
    total = sum(by_group.values())
    print(f"op time summed over threads: {total:.1f} ms per step\n\nby layer role")
    for (direction, role), ms in sorted(by_role.items(), key=lambda item: -item[1]):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {direction:8s} {role}")
    print(f"\ntop {args.top} (direction, role, operation, XLA op kind)")
    for (direction, role, operation, kind), ms in by_group.most_common(args.top):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {direction:8s} {role:9s} {operation:20s} {kind}")


if __name__ == "__main__":
    main()
