"""Weights by name: the registry's data, `mnv2 import NAME` and `--config.init_from=NAME` through a real HTTP server
(a mirror of the publishers' URLs on localhost, `MNV2_WEIGHTS_MIRROR`), offline use."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import urllib.parse

import numpy as np
import pytest
from conftest import REPO, require
from http_origin import serve

from mnv2_jax.weights import download, registry

CORAL = "coral_mobilenet_v2_1.0_224_quant"


def mirror_path(url: str) -> str:
    """Where `MNV2_WEIGHTS_MIRROR` serves `url` from."""
    parts = urllib.parse.urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MNV2_CACHE", str(tmp_path / "cache"))
    for name in ("MNV2_OFFLINE", "HF_HUB_OFFLINE", "MNV2_WEIGHTS_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def test_the_registry_is_well_formed_and_agrees_with_its_sources(shared_data):
    """Checksums by source (torchvision's file-name prefix, the coral files hashed here, none elsewhere), the slim
    accuracies equal to the README table in shared/reference, and a config that validates for every name."""
    entries = registry.REGISTRY.values()
    assert len([e for e in entries if e.fmt == registry.ARCHIVE_FORMAT]) == 44  # 22 float + 22 uint8 slim files
    for entry in entries:
        assert entry.url.startswith(("https://", registry.HF_HUB_PREFIX)), entry.name
        if entry.checksum == registry.PUBLISHER:
            assert re.fullmatch(r"[0-9a-f]{8}", entry.sha256) and entry.url.endswith(f"-{entry.sha256}.pth")
        elif entry.checksum == registry.HASHED_HERE:
            local = shared_data / "coral" / entry.url.rsplit("/", 1)[1]
            assert entry.sha256 == hashlib.sha256(local.read_bytes()).hexdigest(), entry.name
        else:
            assert entry.sha256 is None and entry.checksum in (registry.RECORDED, registry.HUB)
        if entry.fmt != "hf-hub":
            entry.config()
    table = (REPO.parent / "shared" / "reference" / "mobilenet_v2.md").read_text()
    row = r"^\| ([\d.]+) \| (\d+) \| \d+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| [\d,]+ \|$"
    rows = re.findall(row, table, re.M)
    assert len(rows) == 22
    for width, resolution, top1, top5 in rows:
        assert f"top-1 {top1} / top-5 {top5}" in registry.get(f"mobilenet_v2_{width}_{resolution}").metric


def test_unknown_names_and_offline_downloads_are_one_line_errors(mnv2, cache, tmp_path, monkeypatch):
    status, _, err = mnv2("import", "mobilenet_v2_1.0_225", "--workdir", tmp_path / "w")
    assert status == 2 and "did you mean mobilenet_v2_1.0_224" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("MNV2_OFFLINE", "1")
    status, _, err = mnv2("import", "mobilenet_v2_1.0_224", "--workdir", tmp_path / "w")
    url = registry.get("mobilenet_v2_1.0_224").url
    assert status == 2 and url in err and str(download.cached_path(url)) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def _slim_like_archive(model_file) -> bytes:
    """`model_file` packed the way the slim release packs its uint8 models (`quantized_v2_224_100.tgz`)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(model_file, "v2_224_100/model.tflite")
        archive.addfile(tarfile.TarInfo("v2_224_100/labels.txt"), io.BytesIO(b""))
    return buffer.getvalue()


@pytest.mark.slow
def test_import_by_name_downloads_verifies_converts_and_then_works_offline(
    mnv2, cache, shared_data, tmp_path, monkeypatch
):
    """`mnv2 import mobilenet_v2_1.0_224_quant` from a mirror serving the authors' uint8 model packed as the slim
    release packs it: the config is derived (1.0/224, 1001 classes), the variables are the TFLite importer's, the
    digest is recorded; later imports use the cache offline, and a cached file that changed is refused."""
    require("ai_edge_litert")
    import jax

    from mnv2_jax import inference
    from mnv2_jax.convert.importers import import_variables
    from mnv2_jax.weights import pretrained

    entry = registry.get("mobilenet_v2_1.0_224_quant")
    model_file = shared_data / "coral" / "mobilenet_v2_1.0_224_quant.tflite"
    archive = _slim_like_archive(model_file)
    with serve({mirror_path(entry.url): archive}) as origin:
        monkeypatch.setenv("MNV2_WEIGHTS_MIRROR", origin.url(""))
        status, _, err = mnv2("import", entry.name, "--workdir", tmp_path / "imported")
        assert status == 0, err
        assert [path for path, _ in origin.requests] == [mirror_path(entry.url)]
    config, _, imported = inference.load_classifier(str(tmp_path / "imported"))
    assert (config.model.width, config.resolution, config.model.num_classes) == (1.0, 224, 1001)
    expected = import_variables("tflite", str(model_file), entry.config())
    leaves = jax.tree_util.tree_leaves_with_path(imported)
    for (path, leaf), want in zip(leaves, jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=jax.tree_util.keystr(path))
    record = download.cached_path(entry.url).with_name(download.cached_path(entry.url).name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(archive).hexdigest()

    monkeypatch.setenv("MNV2_OFFLINE", "1")
    pretrained.load.cache_clear()  # as in a new `mnv2` process
    status, _, err = mnv2("import", entry.name, "--workdir", tmp_path / "again")
    assert status == 0, err
    download.cached_path(entry.url).write_bytes(archive[:-1] + b"x")  # the cached file no longer matches
    pretrained.load.cache_clear()
    status, _, err = mnv2("import", entry.name, "--workdir", tmp_path / "third")
    assert status == 2 and "sha256" in err and not (tmp_path / "third").exists()


@pytest.mark.slow
def test_a_linear_probe_from_a_name_trains_the_head_only(
    cache, shared_data, fashion_mnist_files, tmp_path, monkeypatch
):
    """`--config.init_from=coral_mobilenet_v2_1.0_224_quant --config.fine_tune.linear_probe=True` on Fashion-MNIST
    (the quickstart's data), the weights fetched from a mirror: the backbone (weights and batch-norm statistics)
    ends bitwise equal to the import, the 10-class head (the source has 1001) trains and beats chance (10%) on 400
    test images. One device, as `mnv2 train` on a CPU."""
    import jax
    from datasets import fashion_mnist_imagefolder
    from train_helpers import saved_state

    from mnv2_jax.cli import common
    from mnv2_jax.training import train
    from mnv2_jax.weights import pretrained

    dataset = fashion_mnist_imagefolder(fashion_mnist_files, tmp_path / "images", {"train": 1000, "test": 400})
    config = common.config_from_spec(
        "configs/quickstart.py:width=1.0,resolution=64",
        f"--config.dataset={dataset}",
        f"--config.init_from={CORAL}",
        "--config.fine_tune.linear_probe=True",
        "--config.num_train_steps=20",
        "--config.batch_size=32",
        "--config.optimizer.base_batch_size=32",
        "--config.optimizer.learning_rate=0.03",
        "--config.optimizer.warmup_epochs=0",
        "--config.eval_batch_size=200",
        "--config.data.cache=False",
    )
    entry = registry.get(CORAL)
    model_file = shared_data / "coral" / "mobilenet_v2_1.0_224_quant.tflite"
    with serve({mirror_path(entry.url): model_file.read_bytes()}) as origin:
        monkeypatch.setenv("MNV2_WEIGHTS_MIRROR", origin.url(""))
        pretrained.load.cache_clear()
        train.train_and_evaluate(config, str(tmp_path / "probe"), devices=jax.devices()[:1])
        assert [path for path, _ in origin.requests] == [mirror_path(entry.url)]
    imported, _ = pretrained.load(CORAL)
    _, saved = saved_state(tmp_path / "probe")
    loaded = {f"{c}/{name}": leaf for c in ("params", "batch_stats") for name, leaf in _names(imported[c]).items()}
    backbone = [name for name in loaded if not name.startswith("params/Logits")]
    for name in backbone:
        np.testing.assert_array_equal(saved[name], loaded[name], err_msg=name)
    assert saved["params/Logits/kernel"].shape == (1280, 10)
    results = _last_eval(tmp_path / "probe")
    assert results["eval/top1"] > 0.4, results


def _names(tree):
    from mnv2_jax.training import checkpoint

    return checkpoint.leaves_by_name(tree)


def _last_eval(workdir):
    import json

    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "eval/top1" in line][-1]
