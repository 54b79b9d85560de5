"""The activation arena TFLite plans for MobileNetV2 exported at float32, batch 1 (`mnv2_jax.export.tflite_memory`).

    python benchmarks/tflite_arena.py [--width 1.0] [--resolution 224] [--threads N] [--out arena.json]

Exports `configs/imagenet.py` (1000 classes, TF conventions) with initialised weights, which do not change the
plan, through the project's TFLite route into a temporary folder, and prints the arena's size beside the least any
plan could use (the largest op's tensors; the peak of live tensors) and the most (no reuse), then the largest
tensors with their offsets in the arena.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np

from mnv2_jax import tasks
from mnv2_jax.cli.common import config_from_spec
from mnv2_jax.export import routes
from mnv2_jax.export.tflite_memory import activation_arena

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "imagenet.py")
MIB = 2**20


def measure(width: float, resolution: int, threads: int | None) -> dict:
    config = config_from_spec(f"{CONFIG}:width={width},resolution={resolution}")
    model = tasks.get(config).export_model()
    images = np.zeros((1, resolution, resolution, 3), np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.tflite")
        routes.export(config, variables, "tflite", path)
        return activation_arena(path, num_threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: its own)")
    parser.add_argument("--out", help="write the full result (every tensor) as JSON here")
    args = parser.parse_args()
    arena = measure(args.width, args.resolution, args.threads)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"width": args.width, "resolution": args.resolution, **arena}, f, indent=1)

    print(f"MobileNetV2 {args.width} {args.resolution}x{args.resolution}, TFLite float32 batch 1")
    rows = [
        ("arena (planned)", arena["arena_bytes"]),
        ("largest op's tensors", arena["largest_op_bytes"]),
        ("peak of live tensors", arena["peak_live_bytes"]),
        ("sum, no reuse", arena["sum_bytes"]),
        ("of which kernel scratch", sum(t["bytes"] for t in arena["scratch"])),
    ]
    for label, value in rows:
        print(f"  {label:<24} {value / MIB:8.3f} MiB  {value:>10,d} B")
    print(f"  {len(arena['tensors'])} activation tensors, {len(arena['scratch'])} scratch tensors; largest:")
    largest = sorted(arena["tensors"] + arena["scratch"], key=lambda t: -t["bytes"])[:5]
    for t in largest:
        producer = f"op {t['op']}" if t["op"] >= 0 else ("input" if t in arena["tensors"] else "scratch")
        name = t["name"].split(";")[-1] or "(unnamed)"
        shape = "x".join(map(str, t["shape"]))
        where = f"at offset {t['offset'] / MIB:7.3f} MiB"
        print(f"    {t['bytes'] / MIB:7.3f} MiB {where}  {shape:<16} {producer:<8} {name}")


if __name__ == "__main__":
    main()
