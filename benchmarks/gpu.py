"""GPU benchmark: our train/inference throughput at 224x224 (float32 and bfloat16) against timm and torchvision.

    python benchmarks/gpu.py [--batch 256] [--seconds 10] [--json OUT]

Needs only jax, flax, optax, ml_collections, torch, torchvision and timm (no TensorFlow): the train step is the
trainer's own (`mnv2_jax.training.steps`) on synthetic inputs. Ours is timed for both depthwise implementations and
both 1x1 implementations, so the faster ones on this backend can be chosen (`model.depthwise`, `model.pointwise`).
Peers run with AMP (bf16 autocast) and channels_last, eager and under `torch.compile`. See `benchmarks/gpu.sh` for
the one-command device run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_jax import tasks
from mnv2_jax.config import base_config
from mnv2_jax.training import optim, plan, steps


def ours(mode: str, dtype: str, depthwise: str, pointwise: str, batch: int, resolution: int):
    config = base_config("tf")
    config.resolution = resolution
    config.batch_size = batch
    config.model.dtype = dtype
    config.model.depthwise = depthwise
    config.model.pointwise = pointwise
    task = tasks.get(config)
    model = task.build_model()
    run_plan = plan.make_plan(config, 1000 * batch, batch, 1, 1)
    tx = optim.make_optimizer(config, run_plan)
    state = steps.create_train_state(model, tx, jax.random.key(0), task.input_shape(1), use_ema=False)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, resolution, resolution, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
    if mode == "train":
        schedule = optim.learning_rate_schedule(config, run_plan)
        step = jax.jit(steps.make_train_step(model, tx, schedule, task.loss, None, jax.random.key(1)), donate_argnums=0)
        carry = {"state": state}

        def one():
            carry["state"], metrics = step(carry["state"], {"image": images, "label": labels})
            return metrics

    else:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
        one = lambda: forward(variables, images)

    started = time.perf_counter()
    jax.block_until_ready(one())
    compile_s = time.perf_counter() - started
    return (lambda: jax.block_until_ready(one())), {"compile_s": round(compile_s, 1)}


def torch_peer(name: str, mode: str, batch: int, resolution: int, compiled: bool):
    import torch

    from mnv2_jax.convert.pytorch import import_torchvision

    torchvision = import_torchvision()  # also what timm imports
    if name == "timm":
        import timm

        model = timm.create_model("mobilenetv2_100")
    else:
        model = torchvision.models.mobilenet_v2(weights=None)
    model = model.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, resolution, resolution, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    net = torch.compile(model) if compiled else model
    if mode == "train":
        model.train()
        optimizer = torch.optim.RMSprop(model.parameters(), lr=0.045, alpha=0.9, eps=1.0, momentum=0.9)

        def one():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(net(x), labels)
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def one():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                net(x)

    started = time.perf_counter()
    for _ in range(3):
        one()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started

    def run():
        one()
        torch.cuda.synchronize()

    return run, {"warmup_s": round(warmup_s, 1)}


def images_per_s(run, batch: int, seconds: float) -> float:
    run()
    started = time.perf_counter()
    n = 0
    while time.perf_counter() - started < seconds:
        run()
        n += 1
    return batch * n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    results: dict = {"device": jax.devices()[0].device_kind, "settings": vars(args)}
    for mode in ("train", "infer"):
        rows = {}
        systems = {}
        variants = [
            (dtype, depthwise, "conv") for dtype in ("float32", "bfloat16") for depthwise in ("grouped", "shifted")
        ]
        variants += [("float32", "grouped", "dot"), ("bfloat16", "grouped", "dot")]
        for dtype, depthwise, pointwise in variants:
            systems[f"mnv2_jax {dtype} {depthwise} 1x1-{pointwise}"] = lambda m=mode, v=(dtype, depthwise, pointwise): (
                ours(m, *v, args.batch, args.resolution)
            )
        for peer in ("torchvision", "timm"):
            for compiled in (False, True):
                label = f"{peer} AMP bf16 channels_last{' compile' if compiled else ''}"
                systems[label] = lambda m=mode, p=peer, c=compiled: torch_peer(p, m, args.batch, args.resolution, c)
        for name, build in systems.items():
            try:
                run, info = build()
                rows[name] = {"images_per_s": images_per_s(run, args.batch, args.seconds), **info}
            except Exception as e:  # one failing system must not lose the others' numbers
                rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{mode:<6} {name:<48} {rows[name]}", flush=True)
        results[mode] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
