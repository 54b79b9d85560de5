"""`mnv2 bench`: XLA's FLOP count against the authors' multiply-adds, and the harness's own figures."""

import json

import pytest
from configs_loader import load

from mnv2_jax import bench


def test_forward_flops_match_published_macs():
    config = load("configs/imagenet.py:num_classes=1001")
    result = bench.run(config, mode="infer", batch=8, steps=0)  # one image per device of the 8-device test mesh
    published_macs = 300e6  # slim README: MobileNetV2 1.0/224, 300 M multiply-adds
    assert result.flops_per_image == pytest.approx(2 * published_macs, rel=0.10)


def test_bench_command_reports_throughput_and_memory(mnv2):
    status, out, err = mnv2(
        "bench",
        "--config",
        "configs/quickstart.py",
        "--config.model.num_classes=10",
        "--config.resolution=16",
        "--batch=8",
        "--steps=2",
        "--peak_tflops=1.0",
        "--json",
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["mode"] == "train" and result["batch"] == 8 and result["devices"] == 8
    assert result["images_per_s"] > 0 and result["step_ms"] > 0 and result["compile_s"] > 0
    assert result["flops_per_image"] > 0 and result["temp_bytes"] > 0
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 1.0)


def test_bench_measures_the_input_pipeline_and_says_if_training_is_input_bound(mnv2, tmp_path):
    from datasets import synthetic_imagefolder

    dataset = synthetic_imagefolder(tmp_path / "folder", {"train": 24, "test": 4})
    args = ["--config", "configs/quickstart.py", f"--config.dataset={dataset}", "--config.model.num_classes=3"]
    args += ["--config.resolution=16", "--batch=8", "--steps=2", "--pipeline_steps=3"]
    status, out, err = mnv2("bench", *args, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["pipeline_images_per_s"] > 0
    assert result["input_bound"] == (result["pipeline_images_per_s"] < result["images_per_s"])
    status, out, err = mnv2("bench", *args)
    assert status == 0, err
    assert "input pipeline" in out and "input-bound: " in out


def test_remat_lowers_the_train_steps_temporary_memory():
    """XLA's memory analysis of the compiled train step, with and without `model.remat` (issue 5 point 3)."""

    def temp_bytes(remat: bool) -> int:
        config = load("configs/imagenet.py:num_classes=10")
        config.resolution, config.model.width, config.model.remat = 96, 0.5, remat
        return bench.run(config, batch=32, steps=0).temp_bytes

    assert temp_bytes(True) < 0.7 * temp_bytes(False)
