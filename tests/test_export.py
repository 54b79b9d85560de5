"""Export routes: each exported model runs in its real runtime and matches our JAX logits."""

import functools
import json

import numpy as np
import pytest
from configs_loader import load
from export_helpers import (
    jax_logits,
    random_inputs,
    random_variables,
    tflite_logits,
    timm_model,
    torch_logits,
    torchvision_model,
)

from mnv2_jax import tasks
from mnv2_jax.convert import ConversionError
from mnv2_jax.export import routes

TOLERANCE = 1e-4
# Every width, at one resolution each, both resolutions among them (a 3x3 and a 4x4 last feature map): the routes
# through TensorFlow's converters take 20-40 s an export on the CI machine.
CASES = [(0.35, 96), (1.0, 128), (1.4, 96)]
CASE_IDS = [f"w{w}-r{r}" for w, r in CASES]
NUM_CLASSES = 10
SUFFIX = {
    "tflite": "model.tflite",
    "tflite-int8": "model.int8.tflite",
    "onnx": "model.onnx",
    "savedmodel": "savedmodel",
    "torch": "model.pth",
    "safetensors": "model.safetensors",
    "keras": "model.weights.h5",
}


@functools.cache
def case(convention: str, width: float, resolution: int):
    """Config, random weights, inputs and our logits; cached across the route tests."""
    config = load(
        f"configs/imagenet.py:width={width},resolution={resolution},num_classes={NUM_CLASSES},convention={convention}"
    )
    variables = random_variables(config)
    images = random_inputs(config)
    logits = jax_logits(config, variables, images)
    assert logits.std() > 0.05, "logits too small for a meaningful 1e-4 comparison"
    return config, variables, images, logits


def export(tmp_path, convention, width, resolution, fmt, **options):
    config, variables, images, logits = case(convention, width, resolution)
    out = tmp_path / SUFFIX[fmt]
    metadata = routes.export(config, variables, fmt, str(out), routes.ExportOptions(**options))
    return out, images, logits, metadata


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(("width", "resolution"), CASES, ids=CASE_IDS)
def test_tflite_matches_and_is_phone_friendly(tmp_path, width, resolution):
    from mnv2_jax.export.tensorflow import op_counts

    out, images, logits, _ = export(tmp_path, "tf", width, resolution, "tflite")
    assert_close(tflite_logits(out, images), logits)
    ops = op_counts(out)
    assert ops["DEPTHWISE_CONV_2D"] == 17  # one per inverted-residual block
    assert ops["CONV_2D"] == 35  # stem, 16 expansions, 17 projections, last conv
    assert ops["ADD"] == 10  # the residual connections only: BN is folded into the convolutions
    assert ops["FULLY_CONNECTED"] == 1
    # No unfolded BN (MUL/SUB/RSQRT), no separate ReLU6 (fused), no padding or broadcast ops.
    assert set(ops) <= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUM", "MEAN", "FULLY_CONNECTED", "RESHAPE"}, ops


@pytest.mark.parametrize(("width", "resolution"), CASES, ids=CASE_IDS)
def test_onnx_matches_with_dynamic_batch(tmp_path, width, resolution):
    import onnxruntime

    out, images, logits, metadata = export(tmp_path, "torch", width, resolution, "onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert_close(session.run(["logits"], {"images": images})[0], logits)
    assert_close(session.run(["logits"], {"images": images[:1]})[0], logits[:1])
    assert metadata["input"]["shape"] == [None, resolution, resolution, 3]


@pytest.mark.slow
@pytest.mark.parametrize(("width", "resolution"), CASES, ids=CASE_IDS)
def test_savedmodel_matches_with_polymorphic_batch(tmp_path, width, resolution):
    import tensorflow as tf

    out, images, logits, metadata = export(tmp_path, "tf", width, resolution, "savedmodel")
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    assert_close(serve(images=tf.constant(images))["logits"].numpy(), logits)
    assert_close(serve(images=tf.constant(images[:1]))["logits"].numpy(), logits[:1])
    assert metadata["platforms"] == ["cpu", "cuda"]
    assert savedmodel_platforms(out) == [b"CPU", b"CUDA"]


def savedmodel_platforms(path):
    """The platforms the SavedModel's StableHLO `XlaCallModule` was lowered for."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(path)).signatures["serving_default"].graph
    graphs = [graph] + [f.graph for f in graph._functions.values()]
    ops = [op for g in graphs for op in g.get_operations() if op.type == "XlaCallModule"]
    assert len(ops) == 1
    return list(ops[0].get_attr("platforms"))


@pytest.mark.parametrize(("width", "resolution"), CASES, ids=CASE_IDS)
def test_torch_state_dict_loads_strictly_into_torchvision(tmp_path, width, resolution):
    import torch

    out, images, logits, metadata = export(tmp_path, "torch", width, resolution, "torch")
    model = torchvision_model(width, NUM_CLASSES)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert_close(torch_logits(model, images), logits)
    assert metadata["layout"] == "torchvision"


@pytest.mark.parametrize(("width", "resolution"), CASES, ids=CASE_IDS)
def test_safetensors_load_strictly_into_timm_with_tf_conventions(tmp_path, width, resolution):
    import torch
    from safetensors.torch import load_file

    out, images, logits, metadata = export(tmp_path, "tf", width, resolution, "safetensors")
    assert metadata["target"].startswith("timm.create_model(")
    model = timm_model(metadata["target"].split("'")[1], num_classes=NUM_CLASSES, pad_type="same", bn_eps=1e-3)
    model.load_state_dict(load_file(out), strict=True)
    assert_close(torch_logits(model, images), logits)
    assert isinstance(model.conv_stem, torch.nn.Conv2d)


@pytest.mark.parametrize(("width", "resolution"), CASES, ids=CASE_IDS)
def test_keras_weights_load_into_keras_applications(tmp_path, width, resolution):
    from mnv2_jax.convert import keras_applications

    out, images, logits, _ = export(tmp_path, "tf", width, resolution, "keras")
    model = keras_applications.build(width, resolution, NUM_CLASSES)
    model.load_weights(str(out))
    assert_close(np.asarray(model(images, training=False)), logits)


def test_keras_whole_model_file(tmp_path):
    import keras

    config, variables, images, logits = case("tf", 0.35, 96)
    out = tmp_path / "model.keras"
    routes.export(config, variables, "keras", str(out))
    assert_close(np.asarray(keras.models.load_model(out)(images, training=False)), logits)


def test_metadata_describes_the_export(tmp_path):
    _, _, _, metadata = export(tmp_path, "torch", 0.35, 96, "onnx", class_names=[f"c{i}" for i in range(10)])
    on_disk = json.loads((tmp_path / "model.onnx.metadata.json").read_text())
    assert on_disk == json.loads(json.dumps(metadata))
    assert on_disk["class_names"][3] == "c3"
    assert on_disk["preprocessing"]["mode"] == "imagenet"  # the torch convention's
    assert on_disk["config"]["model"]["width"] == 0.35
    assert on_disk["input"]["shape"] == [None, 96, 96, 3]


def test_export_refuses_what_the_target_cannot_hold(tmp_path):
    config, variables, *_ = case("tf", 0.35, 96)
    with pytest.raises(ConversionError, match=r"model.padding='same'.*model.bn_epsilon=0.001"):
        routes.export(
            config, variables, "torch", str(tmp_path / "m.pth"), routes.ExportOptions(torch_layout="torchvision")
        )
    dilated = config.copy_and_resolve_references()
    dilated.model.output_stride = 16
    with pytest.raises(ConversionError, match=r"model.output_stride=16 \(needs 32\)"):
        routes.export(dilated, variables, "keras", str(tmp_path / "m.weights.h5"))
    with pytest.raises(ConversionError, match="end in one of"):
        routes.export(config, variables, "keras", str(tmp_path / "m.bin"))
    torch_config, *_ = case("torch", 0.35, 96)
    with pytest.raises(ConversionError, match=r"keras\.applications\.MobileNetV2 uses TF 'SAME' padding"):
        routes.export(torch_config, variables, "keras", str(tmp_path / "m.weights.h5"))
    assert not list(tmp_path.iterdir())


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    config, variables, *_ = case("torch", 0.35, 96)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        routes.export(config, variables, "onnx", str(out))
    assert out.read_bytes() == b"previous"


def test_failed_export_leaves_previous_output_untouched(tmp_path, monkeypatch):
    from mnv2_jax.convert import pytorch

    config, variables, *_ = case("torch", 0.35, 96)
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"previous")

    def crash(path, tensors):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pytorch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        routes.export(config, variables, "safetensors", str(out), routes.ExportOptions(overwrite=True))
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no partial files left


# shared/data/README.md's confidently classified photos; the int8 test checks top-1 agreement on their views.
CONFIDENT_PHOTOS = ["grace_hopper.bmp", "cat.bmp", "bird.bmp", "dragonfly.bmp", "parrot.jpg", "hot_dog.jpg"]
# Calibration uses other real images only: the remaining photos, the segmentation photos and blood-cell micrographs.
CALIBRATION_PHOTOS = ["owl.jpg", "pets.jpg", "face.jpg", "bird_segmentation.bmp", "dog_segmentation_256.bmp"]


def _views(path, resolution):
    """Eight views of a photo: whole, four 80% corner crops, 80% centre crop, two mirrored."""
    import tensorflow as tf

    from mnv2_jax.data import preprocessing

    image = preprocessing.decode_image(tf.io.read_file(str(path)))
    h, w = image.shape[0], image.shape[1]
    ch, cw = int(h * 0.8), int(w * 0.8)
    top, left = (h - ch) // 2, (w - cw) // 2
    crops = [image, image[:ch, :cw], image[:ch, -cw:], image[-ch:, :cw], image[-ch:, -cw:]]
    crops += [image[top : top + ch, left : left + cw], image[:, ::-1], image[:ch, :cw][:, ::-1]]
    return [preprocessing.normalize(preprocessing.resize(c, resolution).numpy(), "inception") for c in crops]


@pytest.mark.slow
def test_tflite_int8_of_the_authors_weights_agrees_on_real_photos(mnv2, tmp_path, shared_data):
    """The coral model imported (real ImageNet weights), re-exported as full-integer int8 with held-out calibration."""
    import shutil

    from mnv2_jax import inference
    from mnv2_jax.export.tensorflow import op_counts

    coral = shared_data / "coral"
    workdir, out, calibration = tmp_path / "coral", tmp_path / "int8.tflite", tmp_path / "calibration"
    calibration.mkdir()
    for name in CALIBRATION_PHOTOS:
        shutil.copy(coral / name, calibration)
    for path in sorted((shared_data / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))[:40]:
        shutil.copy(path, calibration)
    model_file = str(coral / "mobilenet_v2_1.0_224_quant.tflite")
    config = "configs/imagenet.py:num_classes=1001"
    status, _, err = mnv2("import", "--from", "tflite", model_file, "--config", config, "--workdir", str(workdir))
    assert status == 0, err
    status, _, err = mnv2(
        "export", "--workdir", str(workdir), "--format", "tflite-int8", "--out", str(out),
        "--calibration", str(calibration), "--labels", str(coral / "imagenet_labels.txt"),
    )  # fmt: skip
    assert status == 0, err

    config, _, variables = inference.load_classifier(str(workdir))
    confident = [v for name in CONFIDENT_PHOTOS for v in _views(coral / name, 224)]
    others = [v for name in ("owl.jpg", "pets.jpg", "face.jpg") for v in _views(coral / name, 224)]
    images = np.stack(confident + others).astype(np.float32)
    expected = jax_logits(config, variables, images)
    actual = tflite_logits(out, images)
    n = len(confident)
    agreement = np.mean(actual[:n].argmax(1) == expected[:n].argmax(1))
    cosine = np.sum(actual * expected, 1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)
    assert agreement >= 0.95, agreement
    assert cosine.min() >= 0.97, cosine.min()

    ops = op_counts(out)
    assert ops["DEPTHWISE_CONV_2D"] == 17 and "BROADCAST_TO" not in ops and "PAD" not in ops, ops
    metadata = json.loads(out.with_name("int8.tflite.metadata.json").read_text())
    assert metadata["input"]["dtype"] == "int8" and metadata["quantization"]["input"]["dtype"] == "int8"
    assert metadata["calibration"]["images"] == len(CALIBRATION_PHOTOS) + 40
    assert metadata["class_names"][653] == "military uniform"


def test_export_command(mnv2, tmp_path):
    import torch

    config, variables, images, logits = case("torch", 0.35, 96)
    routes.export(config, variables, "torch", str(tmp_path / "ours.pth"))
    workdir = tmp_path / "workdir"
    spec = "configs/imagenet.py:width=0.35,resolution=96,num_classes=10,convention=torch"
    status, _, err = mnv2(
        "import", "--from", "torch", str(tmp_path / "ours.pth"), "--config", spec, "--workdir", str(workdir)
    )
    assert status == 0, err

    status, _, err = mnv2("export", "--workdir", str(workdir), "--format", "keras", "--out", str(tmp_path / "k.keras"))
    assert status == 2 and "keras.applications.MobileNetV2 uses TF 'SAME' padding" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "k.keras").exists()

    out = tmp_path / "again.pth"
    status, stdout, err = mnv2("export", "--workdir", str(workdir), "--format", "torch", "--out", str(out))
    assert status == 0, err
    assert "again.pth.metadata.json" in stdout
    model = torchvision_model(0.35, NUM_CLASSES)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert_close(torch_logits(model, images), logits)
    status, _, err = mnv2("export", "--workdir", str(workdir), "--format", "torch", "--out", str(out))
    assert status == 2 and "already exists; pass --overwrite" in err


def test_int8_calibration_defaults_to_the_configs_eval_split(tmp_path):
    from datasets import synthetic_imagefolder

    dataset = synthetic_imagefolder(tmp_path / "folder", {"train": 4, "test": 5})
    config = load("configs/quickstart.py", f"--config.dataset={dataset}", "--config.eval_split=test")
    images = routes.calibration_images(config, None, 3)
    assert len(images) == 3
    assert images[0].shape == (config.resolution, config.resolution, 3)
    assert images[0].min() >= -1.0 and images[0].max() <= 1.0  # the model's input, not raw pixels
    with pytest.raises(ConversionError, match="matches no image files"):
        routes.calibration_images(config, str(tmp_path / "empty*"), 3)


SEGMENTER = "configs/deeplab_voc.py:width=0.5,resolution=65"


@functools.cache
def segmenter_case():
    """Mobile DeepLabv3 (width 0.5, 21 classes) with random weights; the logits layer scaled up from its 0.01
    init so that per-pixel logits are large enough for a meaningful 1e-4 comparison."""
    config = load(SEGMENTER)
    variables = random_variables(config)
    variables["params"]["logits"]["kernel"] = variables["params"]["logits"]["kernel"] * 50
    images = random_inputs(config)
    logits = jax_logits(config, variables, images)
    assert logits.shape == (2, 65, 65, 21) and logits.std() > 0.05
    return config, variables, images, logits


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite", "onnx", "savedmodel"])
def test_segmenter_exports_give_the_same_per_pixel_logits_in_their_runtimes(tmp_path, fmt):
    config, variables, images, logits = segmenter_case()
    out = tmp_path / SUFFIX[fmt]
    metadata = routes.export(config, variables, fmt, str(out))
    if fmt == "tflite":
        assert_close(tflite_logits(out, images), logits)
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert_close(session.run(["logits"], {"images": images})[0], logits)
    else:
        import tensorflow as tf

        serve = tf.saved_model.load(str(out)).signatures["serving_default"]
        assert_close(serve(images=tf.constant(images))["logits"].numpy(), logits)
    assert metadata["output"]["shape"][1:] == [65, 65, 21] and "per-pixel" in json.dumps(metadata)
    assert metadata["class_names"][3] == "bird"


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "keras"])
def test_segmenter_refuses_classifier_only_formats(tmp_path, fmt):
    with pytest.raises(ConversionError, match=f"--format {fmt} holds classifiers only; task='segmentation'"):
        routes.check_before_export(load(SEGMENTER), fmt, str(tmp_path / SUFFIX[fmt]), routes.ExportOptions())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "savedmodel"])
def test_detector_exports_give_the_same_boxes_and_scores_in_their_runtimes(tmp_path, fmt):
    """SSDLite (width 0.35, 64x64, random weights): per anchor the decoded box and the class scores
    (`tests/test_detection_training.py` checks TFLite on BCCD's photos)."""
    config = load("configs/ssdlite_bccd.py:width=0.35,resolution=64")
    variables, images = random_variables(config), random_inputs(config)
    expected = np.asarray(tasks.get(config).export_function(tasks.get(config).export_model())(variables, images))
    out = tmp_path / SUFFIX[fmt]
    metadata = routes.export(config, variables, fmt, str(out))
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"images": images})[0]
    else:
        import tensorflow as tf

        got = tf.saved_model.load(str(out)).signatures["serving_default"](images=tf.constant(images))["logits"].numpy()
    assert got.shape == expected.shape == (2, metadata["output"]["shape"][1], 4 + 3)
    np.testing.assert_allclose(got[..., :4], expected[..., :4], atol=1e-4)  # normalised boxes
    np.testing.assert_allclose(got[..., 4:], expected[..., 4:], atol=1e-5)  # scores
    assert "nms.select" in metadata["output"]["meaning"]
