"""Importing the authors' quantized MobileNetV2 TFLite model; parity with the real TFLite interpreter."""

import re

import jax
import numpy as np
import pytest
import tflite_reference
from conftest import require

from mnv2_jax import inference
from mnv2_jax.data import preprocessing

pytestmark = pytest.mark.xdist_group("coral")  # the imported model is shared


@pytest.fixture(autouse=True, scope="module")
def tflite_interpreter():
    require("ai_edge_litert")


MODEL = "coral/mobilenet_v2_1.0_224_quant.tflite"
PHOTOS = [
    "grace_hopper.bmp",
    "cat.bmp",
    "bird.bmp",
    "dragonfly.bmp",
    "parrot.jpg",
    "owl.jpg",
    "hot_dog.jpg",
    "pets.jpg",
    "face.jpg",
]
# shared/data/README.md §1.1: the int8 model's confident top-1 classes (1001-class indices).
PUBLISHED_TOP1 = {
    "grace_hopper.bmp": 653,
    "cat.bmp": 286,
    "bird.bmp": 20,
    "parrot.jpg": 89,
    "dragonfly.bmp": 320,
    "hot_dog.jpg": 935,
}


@pytest.fixture(scope="module")
def imported(shared_data, tmp_path_factory):
    from mnv2_jax.cli.main import main

    workdir = tmp_path_factory.mktemp("coral") / "workdir"
    status = main(
        [
            "mnv2",
            "import",
            "--from",
            "tflite",
            str(shared_data / MODEL),
            "--config",
            "configs/imagenet.py:num_classes=1001",
            "--workdir",
            str(workdir),
        ]
    )
    assert status == 0
    return workdir


@pytest.fixture(scope="module")
def pixels(shared_data):
    """The nine photos decoded and resized as `mnv2 predict` does (float RGB in [0, 255])."""
    return np.stack([preprocessing.load_image(str(shared_data / "coral" / name), 224) for name in PHOTOS])


def test_predict_top1_matches_tflite_interpreter(mnv2, imported, pixels, shared_data):
    photos = [str(shared_data / "coral" / name) for name in PHOTOS]
    labels = str(shared_data / "coral" / "imagenet_labels.txt")
    status, out, err = mnv2("predict", "--workdir", imported, "--labels", labels, *photos)
    assert status == 0, err
    blocks = out.strip().split("\n")
    ours = {}
    for i, line in enumerate(blocks):
        if not line.startswith(" "):
            first = re.match(r"\s+([\d.]+)\s+(\d+)\s+(.*)", blocks[i + 1])
            ours[line.rsplit("/", 1)[-1]] = int(first.group(2))
            assert len([b for b in blocks[i + 1 : i + 6] if b.startswith("  ")]) == 5  # top-5 printed
    assert "military uniform" in out

    # The real interpreter on the same resized photos (rounded to the uint8 input it takes).
    uint8_images = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    reference = tflite_reference.quantized_probabilities(str(shared_data / MODEL), uint8_images)
    theirs = {name: int(np.argmax(p)) for name, p in zip(PHOTOS, reference, strict=True)}
    assert ours == theirs
    for name, index in PUBLISHED_TOP1.items():
        assert ours[name] == index, name


def test_float_logits_match_dequantized_reference(imported, pixels, shared_data):
    config, model, variables = inference.load_classifier(str(imported))
    inputs = preprocessing.normalize(pixels, config.model.preprocessing)
    logits, _ = jax.jit(model.apply)(variables, inputs)
    reference = tflite_reference.float_logits(str(shared_data / MODEL), inputs)
    relative = np.max(np.abs(np.asarray(logits, np.float64) - reference)) / np.max(np.abs(reference))
    assert relative < 1e-3, relative
    assert np.array_equal(np.argmax(logits, -1), np.argmax(reference, -1))


def test_import_reports_mismatched_config(mnv2, shared_data, tmp_path):
    model = str(shared_data / MODEL)
    status, _, err = mnv2(
        "import", "--from", "tflite", model, "--config", "configs/imagenet.py", "--workdir", tmp_path / "a"
    )
    assert status == 2 and "layer Logits" in err and "(1280, 1001)" in err and "(1280, 1000)" in err
    status, _, err = mnv2(
        "import", "--from", "tflite", model, "--config", "configs/imagenet.py:width=0.5", "--workdir", tmp_path / "b"
    )
    assert status == 2 and "layer Conv:" in err
    status, _, err = mnv2(
        "import", "--from", "tflite", model, "--config", "configs/imagenet.py:convention=torch", "--workdir", tmp_path
    )
    assert status == 2 and "padding=same" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written on failure


def test_import_rejects_other_files_and_used_workdirs(mnv2, shared_data, imported, tmp_path):
    status, _, err = mnv2(
        "import",
        "--from",
        "tflite",
        shared_data / "coral" / "cat.bmp",
        "--config",
        "configs/imagenet.py",
        "--workdir",
        tmp_path,
    )
    assert status == 2 and "is not a TFLite model" in err
    model = str(shared_data / MODEL)
    cfg = "configs/imagenet.py:num_classes=1001"
    status, _, err = mnv2("import", "--from", "tflite", model, "--config", cfg, "--workdir", imported)
    assert status == 2 and "already holds checkpoints" in err


@pytest.mark.parametrize("logits_bias", ["zero", "random"])  # TF's converter drops an all-zero bias
def test_a_float_tflite_model_imports_with_its_logits(mnv2, tmp_path, logits_bias):
    """A float32 `.tflite` (exported by us from random weights with random BN statistics) read back by `mnv2 import
    --from tflite`: the imported checkpoint gives the TFLite interpreter's logits and the original model's."""
    from configs_loader import load
    from export_helpers import jax_logits, random_inputs, random_variables, tflite_logits

    from mnv2_jax.export import routes

    spec = "configs/imagenet.py:width=0.35,resolution=96,num_classes=10"
    config = load(spec)
    variables = random_variables(config)
    if logits_bias == "random":
        variables["params"]["Logits"]["bias"] = np.random.default_rng(0).normal(0, 0.5, 10).astype(np.float32)
    model_file = tmp_path / "model.tflite"
    routes.export(config, variables, "tflite", str(model_file))
    workdir = tmp_path / "imported"
    status, _, err = mnv2("import", "--from", "tflite", model_file, "--config", spec, "--workdir", workdir)
    assert status == 0, err
    imported_config, _, imported = inference.load_classifier(str(workdir))
    images = random_inputs(config)
    logits = jax_logits(imported_config, imported, images)
    np.testing.assert_allclose(logits, tflite_logits(model_file, images), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(logits, jax_logits(config, variables, images), rtol=1e-5, atol=1e-4)
    assert logits.std() > 0.05
