"""The Hugging Face Hub both ways: `mnv2 export --format hf-hub` folders (timm's layout where timm builds the model,
our Flax variables otherwise) and `hf-hub:` names read back (`mnv2_jax.weights.hf_hub`), timm parity, a Hub cache read
offline, and the model card's measured metrics. No network: Hub repos come from a cache laid out as huggingface_hub
writes it."""

import functools
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from configs_loader import load
from conftest import REPO, one_device_environment
from export_helpers import jax_logits, random_inputs, random_variables, randomize_torch_bn, timm_model, torch_logits
from flax import traverse_util

from mnv2_jax import config as config_lib
from mnv2_jax import inference, tasks
from mnv2_jax.convert import ConversionError
from mnv2_jax.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from mnv2_jax.export import routes
from mnv2_jax.weights import hf_hub

TOLERANCE = 1e-4
TORCH_CLASSIFIER = "configs/imagenet.py:width=0.5,resolution=64,num_classes=10,convention=torch"
FLAX_CASES = {
    "tf-classifier": "configs/imagenet.py:width=0.35,resolution=64,num_classes=10,convention=tf",
    "width-timm-lacks": "configs/imagenet.py:width=0.6,resolution=64,num_classes=10,convention=torch",
    "segmenter": "configs/deeplab_voc.py:width=0.5,resolution=65",
}
TIMM_REPO = "timm/mobilenetv2_050.lamb_in1k"
# The config.json of timm's Hub repos (this one's, as published).
TIMM_HUB_CONFIG = {
    "architecture": "mobilenetv2_050",
    "num_classes": 1000,
    "num_features": 1280,
    "pretrained_cfg": {
        "tag": "lamb_in1k",
        "custom_load": False,
        "input_size": [3, 224, 224],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
        "pool_size": [7, 7],
        "first_conv": "conv_stem",
        "classifier": "classifier",
    },
}


@functools.cache
def case(spec: str):
    config = load(spec)
    return config, random_variables(config)


def export_hub(config, variables, out, source=None):
    """`routes.export(..., "hf-hub", ...)` with every class named (looking the dataset's up takes TFDS seconds)."""
    options = routes.ExportOptions(class_names=tasks.get(config).class_names())
    return routes.export(config, variables, "hf-hub", str(out), options, source)


def assert_bit_exact(actual, expected):
    actual, expected = traverse_util.flatten_dict(actual, sep="/"), traverse_util.flatten_dict(expected, sep="/")
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        value, got = np.asarray(value), np.asarray(actual[key])
        assert got.dtype == value.dtype and np.array_equal(got, value), key


def hub_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.slow
def test_torch_convention_classifier_exports_in_timm_layout_that_timm_loads(mnv2, tmp_path):
    config, variables = case(TORCH_CLASSIFIER)
    labels = [f"class {i}" for i in range(10)]  # given: looking the dataset's up takes TFDS seconds
    routes.export(config, variables, "torch", str(tmp_path / "model.pth"), routes.ExportOptions(class_names=labels))
    workdir, out = tmp_path / "workdir", tmp_path / "hub"
    status, _, err = mnv2(
        "import", "--from", "torch", tmp_path / "model.pth", "--config", TORCH_CLASSIFIER, "--workdir", workdir
    )
    assert status == 0, err
    (tmp_path / "labels.txt").write_text("\n".join(labels))
    status, stdout, err = mnv2(
        "export", "--workdir", workdir, "--format", "hf-hub", "--out", out, "--labels", tmp_path / "labels.txt"
    )
    assert status == 0, err
    assert f"upload with: hf upload USER/hub {out} ." in stdout
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    written = hub_config(out)
    assert written["architecture"] == "mobilenetv2_050" and written["num_classes"] == 10
    assert written["label_names"] == labels
    assert written["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert written["mnv2_jax"]["layout"] == "timm" and written["mnv2_jax"]["step"] == 0

    assert hf_hub.resolve(f"hf-hub:{out}")[:2] == ("timm", str(out / "model.safetensors"))
    saved_config, _, saved = inference.load_model(str(workdir))
    back, back_config = hf_hub.load_variables(f"hf-hub:{out}")
    assert_bit_exact(back, saved)
    assert config_lib.to_dict(back_config) == config_lib.to_dict(saved_config)

    model = timm_model(f"local-dir:{out}", pretrained=True)  # timm's Hub loader on the folder: config.json + weights
    import timm

    assert model.pretrained_cfg["label_names"] == labels
    data = timm.data.resolve_model_data_config(model)  # what timm's transforms will do: config.json's, as JSON
    assert data == {
        "input_size": [3, 64, 64],
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": config.data.eval_crop,
        "crop_mode": "center",
    }
    images = random_inputs(config)
    logits = jax_logits(config, back, images)
    assert logits.std() > 0.05
    np.testing.assert_allclose(torch_logits(model, images), logits, atol=TOLERANCE, rtol=1e-5)


@pytest.mark.parametrize("spec", list(FLAX_CASES.values()), ids=list(FLAX_CASES))
def test_other_models_export_in_flax_layout_and_read_back_bit_exact(tmp_path, spec):
    config, variables = case(spec)
    out = tmp_path / "hub"
    metadata = export_hub(config, variables, out)
    written = hub_config(out)
    assert metadata["layout"] == written["mnv2_jax"]["layout"] == "flax" and "architecture" not in written
    assert hf_hub.resolve(f"hf-hub:{out}")[0] == hf_hub.FLAX_FORMAT
    back, back_config = hf_hub.load_variables(f"hf-hub:{out}")
    assert_bit_exact(back, variables)
    assert config_lib.to_dict(back_config) == config_lib.to_dict(config)


def hub_cache_repo(cache, repo_id: str, files: dict[str, bytes]) -> None:
    """`files` as huggingface_hub caches repo `repo_id` at `main`: blobs named by their hash (sha256 for LFS files,
    git's blob sha1 for the others), `snapshots/<commit>/<name>` relative symlinks to them, `refs/main` the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for folder in (snapshot, repo / "blobs", repo / "refs"):
        folder.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        lfs = name.endswith(".safetensors")
        blob = hashlib.sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)
        (repo / "blobs" / blob.hexdigest()).write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / blob.hexdigest(), snapshot))


OFFLINE = """
import json, sys
import numpy as np
from flax import traverse_util
from mnv2_jax import config as config_lib
from mnv2_jax.convert import ConversionError
from mnv2_jax.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from mnv2_jax.weights import hf_hub

found, cached, missing, damaged, out = sys.argv[1:]
print(hf_hub.resolve(found)[1])
variables, config = hf_hub.load_variables(found)
np.savez(out + ".npz", **traverse_util.flatten_dict(variables, sep="/"))
with open(out + ".json", "w") as f:
    json.dump(config_lib.to_dict(config), f)
for spec in (missing, damaged):
    try:
        hf_hub.resolve(spec)
    except ConversionError as e:
        print(e)
"""


@pytest.mark.slow
def test_timm_repo_reads_offline_from_the_hub_cache_and_matches_timm(tmp_path):
    from safetensors.torch import save

    model = timm_model("mobilenetv2_050")
    randomize_torch_bn(model)
    cache = tmp_path / "hub_cache"
    config_json = json.dumps(TIMM_HUB_CONFIG, indent=2).encode()
    weights = save(model.state_dict())
    hub_cache_repo(cache, TIMM_REPO, {"config.json": config_json, "model.safetensors": weights})
    damaged = "timm/mobilenetv2_100.ra_in1k"  # its blob no longer has the content its SHA-256 name says
    hub_cache_repo(cache, damaged, {"config.json": config_json, "model.safetensors": weights})
    blob = cache / "models--timm--mobilenetv2_100.ra_in1k" / "blobs" / hashlib.sha256(weights).hexdigest()
    blob.write_bytes(weights[:-1] + b" ")
    env = one_device_environment(
        optimized=False, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home")
    )
    missing = "hf-hub:timm/mobilenetv2_140.ra_in1k"
    args = [f"hf-hub:{TIMM_REPO}", str(cache), missing, f"hf-hub:{damaged}", str(tmp_path / "loaded")]
    run = subprocess.run(
        [sys.executable, "-c", OFFLINE, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    path, error, damaged_error, *rest = run.stdout.strip().splitlines()
    assert path.startswith(str(cache / "models--timm--mobilenetv2_050.lamb_in1k" / "snapshots")), path
    assert not rest and "timm/mobilenetv2_140.ra_in1k" in error and "HF_HUB_OFFLINE" in error and str(cache) in error
    assert damaged in damaged_error and "does not match its LFS SHA-256" in damaged_error, damaged_error

    config = config_lib.from_dict(json.loads((tmp_path / "loaded.json").read_text()))
    assert (config.model.width, config.model.num_classes, config.resolution) == (0.5, 1000, 224)
    conventions = (config.model.padding, config.model.bn_epsilon, config.model.preprocessing)
    assert conventions == ("symmetric", 1e-5, "imagenet")
    with np.load(tmp_path / "loaded.npz") as loaded:
        variables = traverse_util.unflatten_dict(dict(loaded), sep="/")
    images = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)  # any size: all conv
    logits = jax_logits(config, variables, images)
    assert logits.std() > 0.05
    np.testing.assert_allclose(torch_logits(model, images), logits, atol=TOLERANCE, rtol=1e-5)


@pytest.mark.slow  # alone: the metrics writer imports TensorFlow (through clu)
def test_model_card_holds_the_measured_metrics_or_says_not_evaluated(tmp_path):
    from mnv2_jax.training.metrics import JsonlWriter  # imports clu, which imports TensorFlow

    config, variables = case(FLAX_CASES["tf-classifier"])
    workdir = tmp_path / "run"
    workdir.mkdir()
    writer = JsonlWriter(str(workdir / "metrics.jsonl"))  # the trainer's and `mnv2 eval`'s metrics file
    writer.write_scalars(100, {"eval/loss": 0.6, "eval/top1": 0.8125, "eval/top5": 0.95, "eval/count": 320})
    writer.write_scalars(200, {"train/loss": 0.4321, "train/top1": 0.9})
    writer.write_scalars(200, {"eval/loss": 0.7021, "eval/top1": 0.7843, "eval/top5": 0.9371, "eval/count": 320})
    writer.write_scalars(200, {"eval_otherset_test/top1": 0.6523, "eval_otherset_test/count": 64})
    writer.close()
    source = {"workdir": str(workdir), "step": 200}
    export_hub(config, variables, tmp_path / "hub", source)
    card = (tmp_path / "hub" / "README.md").read_text()
    data = f"{config.dataset}:{config.eval_split}"
    for row in [
        f"| eval | {data} | top1 | 0.7843 |",
        f"| eval | {data} | top5 | 0.9371 |",
        f"| eval | {data} | loss | 0.7021 |",
        f"| eval | {data} | count | 320 |",
        "| eval_otherset_test | otherset_test | top1 | 0.6523 |",
    ]:
        assert row in card
    assert "best `eval/top1` was 0.8125, at step 100" in card and "0.4321" not in card and "Not evaluated" not in card
    assert card.startswith("---\nlibrary_name: mnv2_jax\ntags:\n- image-classification\n")

    export_hub(config, variables, tmp_path / "hub300", {"workdir": str(workdir), "step": 300})
    card = (tmp_path / "hub300" / "README.md").read_text()
    assert "Not evaluated at step 300" in card and "| eval |" not in card  # no other step's numbers
    export_hub(config, variables, tmp_path / "hub_new", {"workdir": str(tmp_path / "untrained"), "step": 0})
    assert "Not evaluated at step 0" in (tmp_path / "hub_new" / "README.md").read_text()


def test_names_that_cannot_be_read_fail_in_one_line(tmp_path):
    folder = tmp_path / "resnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TIMM_HUB_CONFIG, "architecture": "resnet50"}))
    with pytest.raises(ConversionError) as error:
        hf_hub.resolve(f"hf-hub:{folder}")
    message = str(error.value)
    assert "\n" not in message and "'resnet50' is not a MobileNetV2" in message and "mobilenetv2_035, mob" in message
    with pytest.raises(ConversionError, match="model_args act_layer='silu' change the model"):
        hf_hub.timm_config({**TIMM_HUB_CONFIG, "model_args": {"in_chans": 3, "act_layer": "silu"}}, "hf-hub:x")
    with pytest.raises(ConversionError, match="is not an hf-hub:<repo_id>"):
        hf_hub.resolve("timm/mobilenetv2_050.lamb_in1k")

    config, variables = case(FLAX_CASES["tf-classifier"])
    export_hub(config, variables, tmp_path / "hub")
    written = hub_config(tmp_path / "hub")
    written["mnv2_jax"]["config"]["model"]["width"] = 0.5
    (tmp_path / "hub" / "config.json").write_text(json.dumps(written))
    with pytest.raises(ConversionError, match=r"does not match the model of its config.json: shapes \(file vs"):
        hf_hub.load_variables(f"hf-hub:{tmp_path / 'hub'}")
