"""Import routes (torchvision, timm, Keras) and round trips; every mismatch gives a clear error."""

import numpy as np
import pytest
from configs_loader import load
from export_helpers import (
    jax_logits,
    random_inputs,
    random_variables,
    randomize_torch_bn,
    timm_model,
    torch_logits,
    torchvision_model,
)

from mnv2_jax import inference
from mnv2_jax.convert import ConversionError, keras_applications
from mnv2_jax.convert.importers import import_variables
from mnv2_jax.export import routes

# Absolute, plus 1e-5 relative: float32 logits of size ~20 differ in summation order (the CPU stem over patches).
TOLERANCE = 1e-4


def config_for(convention, width=0.35, resolution=96, num_classes=10):
    spec = f"configs/imagenet.py:width={width},resolution={resolution},num_classes={num_classes}"
    return load(f"{spec},convention={convention}")


def import_with_cli(mnv2, tmp_path, fmt, path, convention, width, resolution, num_classes):
    workdir = tmp_path / "imported"
    config = f"configs/imagenet.py:width={width},resolution={resolution},num_classes={num_classes}"
    status, _, err = mnv2(
        "import", "--from", fmt, str(path), "--config", f"{config},convention={convention}", "--workdir", str(workdir)
    )
    assert status == 0, err
    config, _, variables = inference.load_classifier(str(workdir))
    return config, variables


@pytest.mark.parametrize(("width", "resolution"), [(0.35, 96), (1.0, 128)])
def test_torchvision_import_matches_torchvision(mnv2, tmp_path, width, resolution):
    import torch

    model = torchvision_model(width, 10)
    randomize_torch_bn(model)
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    config, variables = import_with_cli(mnv2, tmp_path, "torch", tmp_path / "tv.pth", "torch", width, resolution, 10)
    images = random_inputs(config)
    np.testing.assert_allclose(
        jax_logits(config, variables, images), torch_logits(model, images), atol=TOLERANCE, rtol=1e-5
    )


def test_timm_safetensors_import_matches_timm(mnv2, tmp_path):
    from safetensors.torch import save_file

    model = timm_model("mobilenetv2_140", num_classes=10, pad_type="same", bn_eps=1e-3)
    randomize_torch_bn(model)
    save_file(model.state_dict(), tmp_path / "timm.safetensors")
    config, variables = import_with_cli(mnv2, tmp_path, "timm", tmp_path / "timm.safetensors", "tf", 1.4, 96, 10)
    images = random_inputs(config)
    np.testing.assert_allclose(
        jax_logits(config, variables, images), torch_logits(model, images), atol=TOLERANCE, rtol=1e-5
    )


def _random_keras_model(width, resolution, num_classes, seed=0):
    model = keras_applications.build(width, resolution, num_classes)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            c = layer.get_weights()[0].shape
            layer.set_weights(
                [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)]
            )
    return model


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras", ".h5"])
def test_keras_import_matches_keras(mnv2, tmp_path, suffix):
    model = _random_keras_model(1.0, 96, 10)
    path = tmp_path / f"model{suffix}"
    model.save_weights(path) if suffix == ".weights.h5" else model.save(path)  # .h5: Keras's legacy whole-model file
    config, variables = import_with_cli(mnv2, tmp_path, "keras", path, "tf", 1.0, 96, 10)
    images = random_inputs(config)
    np.testing.assert_allclose(
        jax_logits(config, variables, images), np.asarray(model(images, training=False)), atol=TOLERANCE
    )


@pytest.mark.parametrize(
    ("convention", "fmt", "source", "name"),
    [
        ("torch", "torch", "torch", "model.pth"),
        ("torch", "safetensors", "torch", "model.safetensors"),
        ("tf", "torch", "timm", "model.pth"),
        ("tf", "keras", "keras", "model.weights.h5"),
        ("tf", "keras", "keras", "model.keras"),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, convention, fmt, source, name):
    config = config_for(convention)
    variables = random_variables(config)
    routes.export(config, variables, fmt, str(tmp_path / name))
    back = import_variables(source, str(tmp_path / name), config)
    for part in ("params", "batch_stats"):
        ours, theirs = _flat(variables[part]), _flat(back[part])
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert np.array_equal(ours[key], theirs[key]), key


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)})
    return out


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("tv") / "tv.pth"
    torch.save(torchvision_model(0.35, 10).state_dict(), path)
    return path


def test_names_that_do_not_map_are_listed(torchvision_file):
    with pytest.raises(ConversionError) as error:
        import_variables("timm", str(torchvision_file), config_for("torch"))
    message = str(error.value)
    assert "missing (262): blocks.0.0.bn1.bias, blocks.0.0.bn1.running_mean," in message
    assert "unexpected (262): classifier.1.bias, classifier.1.weight, features.0.0.weight," in message
    assert "(250 more)" in message and "no name matches" in message


def test_a_partial_mismatch_lists_only_the_differing_names(tmp_path):
    import torch

    state = torchvision_model(0.35, 10).state_dict()
    state["classifier.2.weight"] = state.pop("classifier.1.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ConversionError, match=r"missing \(1\): classifier.1.weight\n  unexpected \(1\): classifier.2"):
        import_variables("torch", str(tmp_path / "renamed.pth"), config_for("torch"))


def test_shape_mismatches_name_layer_and_both_shapes(torchvision_file):
    with pytest.raises(ConversionError) as error:
        import_variables("torch", str(torchvision_file), config_for("torch", width=0.5))
    message = str(error.value)
    assert "187 shapes disagree" in message
    first = message.splitlines()[1]
    expected = "expanded_conv_1/project/kernel: (1, 1, 48, 8) in our layout, the model expects (1, 1, 48, 16)"
    assert first == f"  features.2.conv.2.weight (8, 48, 1, 1) -> {expected}"
    assert message.endswith("... (175 more)")


def test_class_count_mismatch_is_named(torchvision_file):
    with pytest.raises(
        ConversionError, match=r"classifier.1.weight \(10, 1280\) -> Logits/kernel.*expects \(1280, 5\)"
    ):
        import_variables("torch", str(torchvision_file), config_for("torch", num_classes=5))


def test_convention_mismatch_is_refused(torchvision_file):
    with pytest.raises(ConversionError, match="torchvision's mobilenet_v2 uses symmetric padding"):
        import_variables("torch", str(torchvision_file), config_for("tf"))


def test_wrong_kind_of_file(tmp_path, shared_data, torchvision_file):
    image = shared_data / "coral" / "cat.bmp"
    with pytest.raises(ConversionError, match="neither a PyTorch file"):
        import_variables("torch", str(image), config_for("torch"))
    with pytest.raises(ConversionError, match="Keras weights files end in one of"):
        import_variables("keras", str(torchvision_file), config_for("tf"))
    fake = tmp_path / "model.weights.h5"
    fake.write_bytes(b"not hdf5 at all")
    with pytest.raises(ConversionError, match="is not a Keras file"):
        import_variables("keras", str(fake), config_for("tf"))
    with pytest.raises(ConversionError, match="is not a TFLite model"):
        import_variables("tflite", str(torchvision_file), config_for("tf"))


def test_pickled_objects_are_not_loaded(tmp_path):
    import torch

    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "payload": _Unsafe()}, path)
    with pytest.raises(ConversionError, match="is not a plain PyTorch state dict"):
        import_variables("torch", str(path), config_for("torch"))
    assert not _Unsafe.unpickled


class _Unsafe:
    unpickled = False

    def __reduce__(self):
        return (_mark_unpickled, ())


def _mark_unpickled():
    _Unsafe.unpickled = True
    return None


def test_init_from_an_imported_workdir_loads_every_tensor(mnv2, tmp_path):
    """`--config.init_from` of an `mnv2 import` workdir into the same architecture loads each tensor as imported
    (the train state is abstract: what `mnv2 train` does to it before its first step, without compiling)."""
    import jax
    import torch

    from mnv2_jax.training import distributed, plan, train, transfer

    torch.save(torchvision_model(0.35, 3).state_dict(), tmp_path / "tv.pth")
    imported = tmp_path / "imported"
    spec = "configs/imagenet.py:width=0.35,resolution=32,num_classes=3,convention=torch"
    status, _, err = mnv2(
        "import", "--from", "torch", str(tmp_path / "tv.pth"), "--workdir", imported, "--config", spec
    )
    assert status == 0, err
    config, _, variables = inference.load_model(str(imported))
    mesh = distributed.make_mesh()
    trainer = train.build_trainer(config, plan.make_plan(config, 80, 8, mesh.size, 1), mesh)
    state = jax.eval_shape(trainer.create_state, jax.random.key(0))
    state, report = transfer.initialise_from(state, str(imported), distributed.replicated(mesh))
    assert not report.new and not report.left_out and len(report.loaded) > 200
    for collection in ("params", "batch_stats"):
        ours = dict(jax.tree_util.tree_leaves_with_path(getattr(state, collection)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables[collection]):
            np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(leaf), err_msg=str(path))
