"""Our MobileNetV2 against its PyTorch peers (and our exports' runtimes), side by side on this machine.

    python benchmarks/peers.py [--width 1.0] [--batch 32] [--train_resolution 128] [--infer_resolution 224]
                               [--rounds 3] [--seconds 10] [--host_allocator auto|jemalloc|huge_pages|system]
                               [--json OUT]

Each system runs in its own worker process (so that one system's threads and memory state do not slow
another: in one shared process our step lost 30% after torch had run), prepared first (built, compiled,
warmed up); then the timed rounds alternate between the workers, so that slow drifts of the machine hit every
system alike. A round runs one system for about `--seconds`. Every worker gets the same environment, including
the host allocator (`--host_allocator`, default `auto` as the `mnv2` command chooses it: jemalloc where installed,
see `mnv2_jax/host_memory.py`; chosen afresh, without the allocator variables of the shell that runs this), which
changes every system's speed here. Reported: median images/s over the rounds,
minor page faults per step, and our/peer ratios. Peers: torchvision `mobilenet_v2` eager (and `torch.compile`
where it works); for inference also our TFLite (XNNPACK) and ONNX (onnxruntime) exports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from mnv2_jax import bench, host_memory
from mnv2_jax.cli.common import config_from_spec

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "imagenet.py")


def _config(width: float, resolution: int, batch: int):
    """The torch convention (symmetric padding, ImageNet normalization), as torchvision."""
    spec = f"{CONFIG}:width={width},resolution={resolution},convention=torch"
    return config_from_spec(spec, f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}")


def ours(mode: str, width: float, resolution: int, batch: int) -> tuple[Callable[[int], float], dict]:
    step = bench.compile_step(_config(width, resolution, batch), mode, batch)
    step.time_steps(1, 2)
    return lambda n: step.time_steps(n, 0), {"compile_s": round(step.compile_s, 1)}


def torchvision_peer(mode: str, width: float, resolution: int, batch: int, compiled: bool):
    import torch

    from mnv2_jax.convert.pytorch import import_torchvision

    model = import_torchvision().models.mobilenet_v2(weights=None, width_mult=width)
    x = torch.randn(batch, 3, resolution, resolution)
    labels = torch.randint(0, 1000, (batch,))
    if mode == "train":
        model.train()
        optimizer = torch.optim.RMSprop(model.parameters(), lr=0.045, alpha=0.9, eps=1.0, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def one():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), labels)
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def one():
            with torch.inference_mode():
                net(x)

    net = torch.compile(model) if compiled else model
    started = time.perf_counter()
    for _ in range(2):
        one()
    warmup_s = time.perf_counter() - started

    def timed(n):
        started = time.perf_counter()
        for _ in range(n):
            one()
        return time.perf_counter() - started

    return timed, {"threads": torch.get_num_threads(), "warmup_s": round(warmup_s, 1)}


def _export(fmt: str, width: float, resolution: int, directory: str) -> str:
    import jax

    from mnv2_jax.export import routes
    from mnv2_jax.models import build_model

    config = _config(width, resolution, 1)
    model = build_model(config.model)
    variables = model.init(jax.random.key(0), np.zeros((1, resolution, resolution, 3), np.float32))
    out = os.path.join(directory, f"model.{fmt}")
    routes.export(config, variables, fmt, out)
    return out


def tflite_peer(width, resolution, batch, directory):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=_export("tflite", width, resolution, directory), num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    x = np.random.default_rng(0).standard_normal((1, resolution, resolution, 3)).astype(np.float32)

    def timed(n):
        started = time.perf_counter()
        for _ in range(n * batch):  # the TFLite export has batch 1
            interpreter.set_tensor(index, x)
            interpreter.invoke()
        return time.perf_counter() - started

    timed(1)
    return timed, {"note": "batch 1, looped"}


def onnx_peer(width, resolution, batch, directory):
    import onnxruntime

    session = onnxruntime.InferenceSession(_export("onnx", width, resolution, directory))
    x = np.random.default_rng(0).standard_normal((batch, resolution, resolution, 3)).astype(np.float32)

    def timed(n):
        started = time.perf_counter()
        for _ in range(n):
            session.run(["logits"], {"images": x})
        return time.perf_counter() - started

    timed(1)
    return timed, {}


def measure(systems: dict, batch: int, rounds: int, seconds: float) -> dict[str, dict]:
    """Alternating rounds; each round runs a system for about `seconds` (steps sized from a probe)."""
    steps = {}
    for name, (timed, _) in systems.items():
        probe = timed(1)
        steps[name] = max(1, int(seconds / max(probe, 1e-6)))
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(rounds):
        for name, (timed, _) in systems.items():
            rates[name].append(batch * steps[name] / timed(steps[name]))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    return {
        name: {"images_per_s": statistics.median(v), "rounds": [round(x, 2) for x in v], **systems[name][1]}
        for name, v in rates.items()
    }


SYSTEMS = {
    "mnv2_jax": lambda a, directory: ours(a.mode, a.width, a.resolution, a.batch),
    "torchvision eager": lambda a, directory: torchvision_peer(a.mode, a.width, a.resolution, a.batch, False),
    "torchvision compile": lambda a, directory: torchvision_peer(a.mode, a.width, a.resolution, a.batch, True),
    "our TFLite export": lambda a, directory: tflite_peer(a.width, a.resolution, a.batch, directory),
    "our ONNX export (onnxruntime)": lambda a, directory: onnx_peer(a.width, a.resolution, a.batch, directory),
}


def worker(args: argparse.Namespace) -> None:
    """Prepares one system, then answers each line `N` on stdin with the seconds and page faults of N steps."""
    with tempfile.TemporaryDirectory() as directory:
        timed, info = SYSTEMS[args.worker](args, directory)
        print("ready " + json.dumps(info), flush=True)
        for line in sys.stdin:
            before = resource.getrusage(resource.RUSAGE_SELF)
            seconds = timed(int(line))
            after = resource.getrusage(resource.RUSAGE_SELF)
            answer = {"seconds": seconds, "faults": after.ru_minflt - before.ru_minflt}
            answer.update(user_s=after.ru_utime - before.ru_utime, system_s=after.ru_stime - before.ru_stime)
            print(json.dumps(answer), flush=True)


class Worker:
    """One system in its own process: `timed(n)` runs n steps there and returns the seconds they took."""

    def __init__(self, name: str, args: argparse.Namespace, mode: str, resolution: int, environ: dict):
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--mode", mode]
        command += ["--width", str(args.width), "--batch", str(args.batch), "--resolution", str(resolution)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ)
        ready = self._line("ready ")
        if ready is None:
            self.process.kill()
            raise RuntimeError(f"{name} could not be prepared (its error is printed above)")
        self.info = json.loads(ready[len("ready ") :])
        self.faults: list[float] = []  # minor page faults per step, per round
        self.system_s: list[float] = []  # kernel CPU seconds per step, per round

    def _line(self, prefix: str) -> str | None:
        """The worker's next line starting with `prefix` (libraries may print other lines); None at its end."""
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line
        return None

    def timed(self, steps: int) -> float:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        answer = json.loads(self._line("{") or "null")
        self.faults.append(answer["faults"] / steps)
        self.system_s.append(answer["system_s"] / steps)
        return answer["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train_resolution", type=int, default=128)
    parser.add_argument("--infer_resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--host_allocator", default="auto", choices=host_memory.ALLOCATORS, help="for every system")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=bench.MODES, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import jax
    import torch

    inherited = {k: v for k, v in os.environ.items() if k not in host_memory.ALLOCATOR_VARIABLES}
    environ = host_memory.environment_for(args.host_allocator, inherited)
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "torch": torch.__version__,
            "host_allocator": host_memory.allocator_in_effect(environ),
        },
        "settings": vars(args),
    }
    for mode in args.modes.split(","):
        resolution = args.train_resolution if mode == "train" else args.infer_resolution
        print(f"{mode} at {resolution}x{resolution}, batch {args.batch}, width {args.width}: preparing", flush=True)
        names = ["mnv2_jax", "torchvision eager"] + ([] if args.no_compile else ["torchvision compile"])
        names += ["our TFLite export", "our ONNX export (onnxruntime)"] if mode == "infer" else []
        workers = {}
        for name in names:
            try:
                workers[name] = Worker(name, args, mode, resolution, environ)
            except RuntimeError as e:  # torch.compile needs a C++ toolchain and may fail on a machine
                if name == "mnv2_jax" or name == "torchvision eager":
                    raise
                print(f"  {name} unavailable: {e}", flush=True)
        table = measure({name: (w.timed, w.info) for name, w in workers.items()}, args.batch, args.rounds, args.seconds)
        for name, w in workers.items():
            table[name]["page_faults_per_step"] = round(statistics.median(w.faults))
            table[name]["kernel_ms_per_step"] = round(1000 * statistics.median(w.system_s), 1)
            w.close()
        ours_rate = table["mnv2_jax"]["images_per_s"]
        rounds, allocator = args.rounds, results["machine"]["host_allocator"]
        print(f"\n{mode}: images/s (median of {rounds} alternating rounds), host allocator {allocator}")
        columns = f"{'images/s':>9} {'mnv2_jax / system':>18} {'page faults/step':>17} {'kernel ms/step':>15}"
        print(f"  {'system':<32} {columns}")
        for name, row in table.items():
            row["ours_over_this"] = ours_rate / row["images_per_s"]
            print(
                f"  {name:<32} {row['images_per_s']:>9.1f} {row['ours_over_this']:>17.2f}x"
                f" {row['page_faults_per_step']:>17,} {row['kernel_ms_per_step']:>15.1f}"
            )
        print()
        results[mode] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
