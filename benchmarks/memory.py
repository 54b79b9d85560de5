"""Memory-efficient inference measured: XLA's memory analysis and images/s of the compiled inference step at batch 1
for blocks in t groups (`model.expansion_splits`), next to `mnv2 summary --memory`'s accounting (docs/memory.md).

    python benchmarks/memory.py [--widths 1.0 1.4] [--splits 1 2 3 4 5 6] [--resolution 224] [--steps 100]
                                [--rounds 3] [--buffers] [--tflite]

Each (width, t) step is compiled once (`mnv2_jax.bench.compile_step`, this backend's default implementations),
then timed in `--rounds` interleaved rounds of `--steps` steps (the median is printed). `--buffers` dumps XLA's
buffer assignment and prints the values alive at each step's peak that are not arguments; `--tflite` adds the
arena TFLite plans for the exported model (`benchmarks/tflite_arena.py`).
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import re
import statistics
import sys
import tempfile

MIB = 2**20


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 1.4])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--buffers", action="store_true", help="print XLA's live values at each step's peak")
    parser.add_argument("--tflite", action="store_true", help="add TFLite's planned arena of the exported model")
    return parser.parse_args()


def peak_values(dump: str, top: int = 6) -> tuple[list[tuple[str, str, int]], int]:
    """(name, shape, bytes) of the largest values, and all values' bytes, alive at the peak of the last compiled
    inference step in `dump` that are not arguments (XLA's `*live-range.txt` and `*buffer-assignment.txt`, written
    with `--xla_dump_to`)."""
    files = sorted(glob.glob(os.path.join(dump, "*jit_infer*live-range.txt")), key=os.path.getmtime)
    text = pathlib.Path(files[-1]).read_text()
    assignment = pathlib.Path(files[-1].replace("live-range.txt", "buffer-assignment.txt")).read_text()
    shapes = dict(re.findall(r"<\d+ (\S+) @\d+> \(size=\d+,offset=\d+\): (\S+)", assignment))
    section = text.split("(peak):", 1)[1].split("\n\n", 1)[0]
    values = re.findall(r"^\s+(\S+?)(?:\{[\d,]*\})?: (\d+) bytes", section, re.MULTILINE)
    arguments = ("variables", "args", "images", "v__")
    temporaries = [(name, shapes.get(name, "?"), int(size)) for name, size in values if not name.startswith(arguments)]
    return sorted(temporaries, key=lambda v: -v[2])[:top], sum(v[2] for v in temporaries)


def main() -> None:
    args = _parse()
    dump = tempfile.mkdtemp(prefix="xla_dump_") if args.buffers else None
    if dump:  # before JAX starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
    import jax

    from mnv2_jax import bench, tasks
    from mnv2_jax.cli.common import config_from_spec
    from mnv2_jax.models import memory

    config_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "imagenet.py")
    size = f"{args.resolution}x{args.resolution}"
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); batch 1, {size}")
    print(
        "| width | t | accounting, float32 (MiB) | XLA temporary (MiB) | vs t=1 | images/s | vs t=1 |\n"
        "|---|---|---|---|---|---|---|"
    )
    for width in args.widths:
        config = config_from_spec(f"{config_file}:width={width},resolution={args.resolution}")
        steps, peaks = {}, {}
        for t in args.splits:
            config.model.expansion_splits = t
            steps[t] = bench.compile_step(config, "infer", batch=1)
            if dump:
                peaks[t] = peak_values(dump)
        seconds = {t: [] for t in args.splits}
        for t in args.splits:
            steps[t].time_steps(0, 3)  # warm-up
        for _ in range(args.rounds):
            for t in args.splits:
                seconds[t].append(steps[t].time_steps(args.steps, 0))
        backbone = tasks.get(config).build_model()
        base_temp = base_rate = None
        for t in args.splits:
            temp = steps[t].compiled.memory_analysis().temp_size_in_bytes
            rate = args.steps / statistics.median(seconds[t])
            base_temp, base_rate = base_temp or temp, base_rate or rate
            accounting = memory.activation_memory(backbone, args.resolution, t)["split_peak"]["elements"] * 4
            print(
                f"| {width} | {t} | {accounting / MIB:.2f} | {temp / MIB:.2f} | {temp / base_temp - 1:+.0%} | "
                f"{rate:.1f} | {rate / base_rate - 1:+.0%} |"
            )
        for t, (values, total) in peaks.items():
            listed = ", ".join(f"{name} {shape} {size / MIB:.2f}" for name, shape, size in values)
            print(f"  width {width}, t={t}: alive at XLA's peak, not arguments: {total / MIB:.2f} MiB; {listed}")
        if args.tflite:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from tflite_arena import measure

            arena = measure(width, args.resolution, None)
            print(
                f"  width {width}: TFLite arena {arena['arena_bytes'] / MIB:.2f} MiB (largest op's tensors "
                f"{arena['largest_op_bytes'] / MIB:.2f} MiB; naive accounting "
                f"{memory.activation_memory(backbone, args.resolution, 1)['naive_peak']['elements'] * 4 / MIB:.2f} MiB)"
            )


if __name__ == "__main__":
    main()
