"""The default CPU path as users get it: `mnv2` in a process with one CPU device.

`model.depthwise=auto` picks the C++ kernels there (the test session itself has 8 devices, where it does not), so
these tests run tests/one_device.py once in such a process and check what it wrote: which implementation `auto`
picks, a whole model's train step and a few `mnv2 train` steps on the kernels against the XLA forms, `mnv2 bench`'s
FLOPs of the kernels' step, and the train step's memory with `model.remat`.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, one_device_environment, require
from datasets import fashion_mnist_imagefolder
from train_helpers import saved_state

from mnv2_jax.training import run_files

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("one_device")]  # one process, shared


@pytest.fixture(scope="module")
def one_device_run(fashion_mnist_files, tmp_path_factory):
    """tests/one_device.py in a process with one CPU device: `model.depthwise=auto` as users get it."""
    require("g++")
    out = tmp_path_factory.mktemp("one_device")
    dataset = fashion_mnist_imagefolder(fashion_mnist_files, out / "fashion_mnist", {"train": 48, "test": 16})
    script = [sys.executable, str(REPO / "tests" / "one_device.py"), str(out), dataset]
    result = subprocess.run(script, env=one_device_environment(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_auto_trains_on_the_cpu_kernels_in_a_one_device_process(one_device_run):
    resolved = json.loads((one_device_run / "resolved.json").read_text())
    assert resolved["device_count"] == 1
    assert resolved["train"] == "depthwise_cpu_kernel" and resolved["inference"] == "depthwise_shifted"
    assert resolved["auto_calls_kernels"] and resolved["cpu_kernel_calls_kernels"]  # inside the compiled model
    assert resolved["segmenter_calls_kernels"]  # the backbone's fast path under every task
    assert not resolved["shifted_calls_kernels"]


def assert_close_by_norm(actual: dict, expected: dict, rtol: float, floor: float) -> None:
    """Each array within `rtol` of the expected one in norm, plus `floor` times the norm of all of them (arrays that
    are zero in exact arithmetic, such as a projection's BN bias gradient, hold only rounding noise)."""
    assert actual.keys() == expected.keys()
    total = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in expected.values()))
    for name in expected:
        error = np.linalg.norm(np.asarray(actual[name], np.float64) - expected[name])
        assert error <= rtol * np.linalg.norm(expected[name]) + floor * total, (name, error)


def test_a_whole_models_train_step_on_the_kernels_equals_the_xla_form(one_device_run):
    """Loss, logits, updated batch statistics and the gradient of every parameter, in float32, against the shifted
    multiply-adds (equal to XLA's grouped convolution op by op: tests/test_layers.py)."""
    kernels, reference = (dict(np.load(one_device_run / f"step_{impl}.npz")) for impl in ("cpu_kernel", "shifted"))
    assert kernels.keys() == reference.keys() and len(kernels) > 200
    for part in ("['loss']", "['logits']", "['batch_stats']", "['grads']"):
        names = [name for name in kernels if name.startswith(part)]
        assert_close_by_norm({n: kernels[n] for n in names}, {n: reference[n] for n in names}, 1e-4, 1e-6)
    depthwise_grads = [n for n in kernels if n.startswith("['grads']") and n.endswith("['depthwise']['kernel']")]
    assert len(depthwise_grads) == 17 and all(np.abs(kernels[n]).max() > 0 for n in depthwise_grads)


def test_mnv2_train_on_the_kernels_equals_the_shifted_form_on_real_data(one_device_run):
    """Three steps of `mnv2 train` (the quickstart recipe, on the trainer tests' shallow network) on real
    Fashion-MNIST images, then evaluation. The runs start at init, where ReLU6 kink flips (see tests/one_device.py)
    make single gradients differ, and AdamW turns the sign of near-zero gradients into whole steps: the parameters
    are compared as a whole."""
    runs = {impl: one_device_run / f"train_{impl}" for impl in ("auto", "shifted")}
    logged = {impl: run_files.read_metrics(str(workdir)) for impl, workdir in runs.items()}
    losses = {impl: [r["train/loss"] for r in records if "train/loss" in r] for impl, records in logged.items()}
    assert len(losses["auto"]) == 3
    np.testing.assert_allclose(losses["auto"], losses["shifted"], rtol=2e-3)
    evals = {impl: next(r for r in records if "eval/loss" in r) for impl, records in logged.items()}
    assert evals["auto"]["eval/count"] == 16
    assert evals["auto"]["eval/loss"] == pytest.approx(evals["shifted"]["eval/loss"], rel=1e-3)
    (step, kernels), (_, shifted) = saved_state(runs["auto"]), saved_state(runs["shifted"])
    assert step == 3
    params = [name for name in shifted if name.startswith("params")]
    difference = np.sqrt(sum(np.sum(np.square(kernels[n] - shifted[n], dtype=np.float64)) for n in params))
    assert difference <= 2e-3 * np.sqrt(sum(np.sum(np.square(shifted[n], dtype=np.float64)) for n in params))


def test_bench_counts_the_cpu_kernels_multiply_adds_in_the_train_flops(one_device_run):
    """XLA's cost analysis skips custom calls; `mnv2 bench` adds the kernels' multiply-adds: per image, the paper's
    depthwise count (Table 1, computed in the test) in each of the forward, input- and kernel-gradient passes."""
    from test_architecture import table1_macs

    figures = json.loads((one_device_run / "bench.json").read_text())
    depthwise_macs = table1_macs(0.35, 32, num_classes=10)["depthwise"]  # train_helpers.tiny_config's model
    assert figures["flops"] - figures["xla_flops"] == 3 * 2 * depthwise_macs * figures["flops_batch"]
    assert figures["xla_flops"] > 0


def test_remat_lowers_the_train_steps_temporary_memory(one_device_run):
    """XLA's memory analysis of the compiled train step of MobileNetV2 1.0 at 224x224, batch 128, on one device
    (the depthwise on the C++ kernels), with and without `model.remat`: at least 60% less."""
    figures = json.loads((one_device_run / "bench.json").read_text())
    assert figures["temp_bytes_remat_True"] < 0.4 * figures["temp_bytes_remat_False"], figures
