"""`mnv2 bench`: XLA's FLOP count against the authors' multiply-adds, and the harness's own figures."""

import json
import os
import subprocess

import pytest
from configs_loader import load
from conftest import REPO, mnv2_command, one_device_environment, require
from train_helpers import SHALLOW_STAGES

from mnv2_jax import bench, host_memory


def test_forward_flops_match_published_macs():
    config = load("configs/imagenet.py:num_classes=1001")
    result = bench.run(config, mode="infer", batch=8, steps=0)  # one image per device of the 8-device test mesh
    published_macs = 300e6  # slim README: MobileNetV2 1.0/224, 300 M multiply-adds
    assert result.flops_per_image == pytest.approx(2 * published_macs, rel=0.10)


def test_bench_command_reports_throughput_memory_and_the_input_pipeline(mnv2, tmp_path):
    from datasets import synthetic_imagefolder

    dataset = synthetic_imagefolder(tmp_path / "folder", {"train": 24, "test": 4})
    args = ["--config", "configs/quickstart.py", f"--config.dataset={dataset}", "--config.model.num_classes=3"]
    args += ["--config.resolution=16", f"--config.model.stage_repeats={SHALLOW_STAGES}"]
    args += ["--batch=8", "--steps=2", "--pipeline_steps=3", "--peak_tflops=1.0"]
    status, out, err = mnv2("bench", *args, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["mode"] == "train" and result["batch"] == 8 and result["devices"] == 8
    assert result["images_per_s"] > 0 and result["step_ms"] > 0 and result["compile_s"] > 0
    assert result["flops_per_image"] > 0 and result["temp_bytes"] > 0 and 0 < result["mfu"] < 1
    assert result["pipeline_images_per_s"] > 0 and isinstance(result["input_bound"], bool)
    text = bench.format_result(bench.BenchResult(**result))  # what the command prints without --json
    assert "images/s" in text and "MFU" in text and "input pipeline" in text and "input-bound: " in text


def test_figures_of_a_hand_computed_step(monkeypatch):
    """`bench.run`'s arithmetic on a step with known numbers: 8 devices, a global batch of 64, 3 GFLOP per device
    program, 10 timed steps in 2 s, a host pipeline of 200 images/s (2 processes), peak 2 TFLOP/s."""

    class Compiled:
        def memory_analysis(self):
            return None

    def compile_step(config, mode, batch):
        time_steps = lambda steps, warmup=2: 0.2 * steps
        return bench.CompiledStep(mode, 64, 8, 1.5, Compiled(), 3e9, time_steps)

    monkeypatch.setattr(bench, "compile_step", compile_step)
    monkeypatch.setattr(bench, "pipeline_images_per_s", lambda config, batch, steps: 200.0)
    monkeypatch.setattr(bench.jax, "process_count", lambda: 2)
    result = bench.run(load("configs/quickstart.py"), steps=10, peak_tflops=2.0, pipeline_steps=5)
    assert result.step_ms == pytest.approx(200.0)
    assert result.images_per_s == pytest.approx(320.0)  # 64 images in 0.2 s
    assert result.flops_per_image == pytest.approx(375e6)  # 3 GFLOP x 8 devices / 64 images
    assert result.achieved_tflops == pytest.approx(0.12)  # 375 MFLOP x 320 images/s
    assert result.mfu == pytest.approx(0.06)
    assert result.input_bound is False  # each process feeds 160 images/s: 200 suffice
    monkeypatch.setattr(bench, "pipeline_images_per_s", lambda config, batch, steps: 150.0)
    assert bench.run(load("configs/quickstart.py"), steps=10, pipeline_steps=5).input_bound is True


def bench_in_a_new_process(**env: str) -> dict:
    """`mnv2 bench --json` as a command line (which picks its host allocator first), with `env` added."""
    allocator_variables = (*host_memory.ALLOCATOR_VARIABLES, host_memory.VARIABLE)
    # One device: a step buffer well above malloc's mmap size. The suite's fast-compile flags: the host allocator,
    # not the compiled code, decides how often a step's buffers fault in.
    environment = one_device_environment(optimized=False)
    inherited = {name: value for name, value in environment.items() if name not in allocator_variables}
    env = {**inherited, **env}
    args = ["--config", "configs/imagenet.py:num_classes=10", "--config.resolution=96", "--config.model.width=0.5"]
    args += [f"--config.model.stage_repeats={SHALLOW_STAGES}", "--batch=16", "--warmup=4", "--steps=4", "--json"]
    command = mnv2_command("bench", *args)
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout)


@pytest.fixture(scope="module")
def system_allocator_bench() -> dict:
    """The bench on glibc's malloc as configured by default: the reference of the allocator tests."""
    return bench_in_a_new_process(MNV2_HOST_ALLOCATOR="system")


@pytest.mark.xdist_group("allocators")  # one reference run for both
def test_the_command_runs_on_jemalloc_and_steps_stop_faulting_in_their_buffers(system_allocator_bench):
    """By default `mnv2` restarts itself on jemalloc, which hands each step the previous step's pages again."""
    require("jemalloc")
    default, system = bench_in_a_new_process(), system_allocator_bench
    assert default["host_allocator"] == "jemalloc" and system["host_allocator"] != "jemalloc"
    faults = {"jemalloc": default["page_faults_per_step"], "system": system["page_faults_per_step"]}
    assert faults["jemalloc"] * 20 < faults["system"], faults


@pytest.mark.skipif(
    host_memory.transparent_huge_pages_mode() != "madvise" or not host_memory._glibc(),
    reason="needs glibc and the kernel's transparent huge pages in `madvise` mode (else the tunable changes nothing)",
)
@pytest.mark.xdist_group("allocators")
def test_glibc_with_huge_pages_faults_its_buffers_in_2_mib_at_a_time(system_allocator_bench):
    huge_pages = bench_in_a_new_process(MNV2_HOST_ALLOCATOR="huge_pages")
    system = system_allocator_bench
    assert huge_pages["host_allocator"] == "huge_pages" and system["host_allocator"] == "system"
    faults = {"huge_pages": huge_pages["page_faults_per_step"], "system": system["page_faults_per_step"]}
    assert faults["huge_pages"] * 10 < faults["system"], faults


@pytest.fixture
def host(monkeypatch):
    """Sets this host's THP mode, libc and jemalloc for `host_memory`: host(thp="madvise", glibc=True, jemalloc=...)."""

    def set_host(thp: str | None = "madvise", glibc: bool = True, jemalloc: str | None = "libjemalloc.so.2"):
        monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: thp)
        monkeypatch.setattr(host_memory, "_glibc", lambda: glibc)
        monkeypatch.setattr(host_memory, "find_jemalloc", lambda: jemalloc)

    return set_host


def test_auto_prefers_jemalloc_then_glibc_huge_pages_and_keeps_the_users_choice(host):
    env = host_memory.environment_for
    for thp in ("madvise", "always", "never", None):
        host(thp=thp)
        assert env("auto", {}) == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": host_memory._JEMALLOC_CONF}
    host(jemalloc=None)
    assert env("auto", {}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    for thp, glibc in (("always", True), ("never", True), (None, True), ("madvise", False)):
        host(thp=thp, glibc=glibc, jemalloc=None)
        assert env("auto", {"A": "1"}) == {"A": "1"}  # nothing to gain: unchanged, no restart
    host()
    tpu_vm = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"}
    assert env("auto", tpu_vm) == tpu_vm and host_memory.allocator_in_effect(tpu_vm) == "tcmalloc"
    users_tunable = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert env("auto", users_tunable) == users_tunable
    once = env("auto", {})
    assert env("auto", once) == once and host_memory.allocator_in_effect(once) == "jemalloc"  # restarts once


def test_named_allocators_join_the_users_settings_or_say_why_they_cannot(host):
    env = host_memory.environment_for
    host()
    assert env("huge_pages", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert env("huge_pages", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert env("system", {"LD_PRELOAD": "libfoo.so"}) == {"LD_PRELOAD": "libfoo.so"}
    with_jemalloc = env("jemalloc", {"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:1"})
    assert with_jemalloc == {"LD_PRELOAD": "libjemalloc.so.2 libfoo.so", "MALLOC_CONF": "narenas:1"}
    host(jemalloc=None)
    custom = {"LD_PRELOAD": "/opt/lib/libjemalloc_custom.so"}
    assert env("jemalloc", custom) == {**custom, "MALLOC_CONF": host_memory._JEMALLOC_CONF}
    with pytest.raises(ValueError, match=r"MNV2_HOST_ALLOCATOR=jemalloc, but jemalloc is not installed"):
        env("jemalloc", {})
    host(thp="never")
    with pytest.raises(ValueError, match=r"MNV2_HOST_ALLOCATOR=huge_pages needs glibc .* \(here: THP never, glibc\)"):
        env("huge_pages", {})
    with pytest.raises(ValueError, match=r"MNV2_HOST_ALLOCATOR must be one of \('auto', 'jemalloc'"):
        env("tcmalloc", {})


def test_the_command_rejects_an_unknown_allocator_before_doing_anything():
    env = {**os.environ, "MNV2_HOST_ALLOCATOR": "mimalloc"}
    command = mnv2_command("bench", "--config", "configs/quickstart.py")
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "MNV2_HOST_ALLOCATOR must be one of ('auto', 'jemalloc', 'huge_pages', 'system'), got 'mimalloc'" in (
        finished.stderr
    )


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_runs_detection_steps(mnv2, tmp_path, mode):
    """The detector's train step (matching, mined loss) and inference step (with NMS), on synthetic targets."""
    args = [
        "--config",
        "configs/ssdlite_bccd.py:width=0.35,resolution=32",
        f"--config.model.stage_repeats={SHALLOW_STAGES}",
    ]
    status, out, err = mnv2("bench", *args, f"--mode={mode}", "--batch=8", "--steps=2", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["mode"] == mode and result["resolution"] == 32 and result["images_per_s"] > 0
    summary = json.loads(mnv2("summary", *args, "--json")[1])
    assert result["flops_per_image"] > 2 * summary["macs"]  # the network's multiply-adds, and more for training
