"""A fourth task defined entirely here (issue 32): multi-label attribute classification with a sigmoid loss and mean
average precision, read from its own data source, registered by name and run through `mnv2 train`, `eval`,
`predict`, `export --format onnx` and `summary` with nothing outside this file changed for it. docs/tasks.md
("Adding a task") walks through this code."""

from __future__ import annotations

import json
import os
import subprocess

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf
from conftest import REPO, mnv2_command, one_device_environment
from datasets import write_png

from mnv2_jax import config_checks, tasks
from mnv2_jax.data import image_folder, preprocessing, sources
from mnv2_jax.evaluators import GatheredEvaluator
from mnv2_jax.models import build_model

pytestmark = [pytest.mark.slow]

COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}
SHAPES = ("square", "disc")


# The data source: `attributes:<root>`, an image folder whose class folders are named by attributes
# (`red_square/`), read as images with a multi-hot `attributes` vector.


class AttributeFolder:
    """An image folder (`root/<split>/<attribute>_<attribute>/<image>`) as examples of `image` (bytes) and
    `attributes` (multi-hot over the sorted attribute words of the folder names)."""

    reads_files = True

    def __init__(self, root: str, corrupt_images: str):
        self.folder = image_folder.CheckedImageFolder(root, corrupt_images)
        self.name, self.info = f"attributes:{root}", self.folder.info
        folders = self.folder.info.features["label"].names
        self.attributes = tuple(sorted({word for name in folders for word in name.split("_")}))
        self.table = np.array([[word in name.split("_") for word in self.attributes] for name in folders], np.int32)

    def dataset_info(self) -> sources.DatasetInfo:
        sizes = {name: split.num_examples for name, split in self.info.splits.items()}
        return sources.DatasetInfo(len(self.attributes), self.attributes, sizes)

    def as_dataset(self, split, shuffle_files=False, decoders=None):
        table = tf.constant(self.table)
        examples = self.folder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders)
        return examples.map(lambda ex: {"image": ex["image"], "attributes": tf.gather(table, ex["label"])})


def open_attribute_folder(root, config, prepare):
    return AttributeFolder(os.path.expanduser(root), config.data.corrupt_images)


READER = sources.Reader("attributes:", "attributes", "'attributes:<root>'", "attributes", open_attribute_folder)


# The task: a sigmoid per attribute, binary cross-entropy, mean average precision over the eval split.


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """The mean of the precision at the rank of each positive (None without positives)."""
    if not positives.any():
        return None
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


class MeanAveragePrecision(GatheredEvaluator):
    def __init__(self, names):
        super().__init__()
        self.names = names

    def metrics(self, arrays):
        per_attribute = [
            average_precision(arrays["scores"][:, k], arrays["label"][:, k]) for k in range(len(self.names))
        ]
        metrics = {f"eval/AP/{n}": ap for n, ap in zip(self.names, per_attribute, strict=True) if ap is not None}
        found = [ap for ap in per_attribute if ap is not None]
        metrics["eval/mAP"] = float(np.mean(found)) if found else 0.0
        metrics["eval/loss"] = float(np.mean(arrays["loss"])) if len(arrays["loss"]) else 0.0
        metrics["eval/count"] = float(len(arrays["loss"]))
        return metrics


class Attributes(tasks.Task):
    name = "attributes"
    features = ("image", "attributes")
    best_metric = "eval/mAP"
    section = "attributes"
    export_meaning = "attribute logits; a sigmoid gives each attribute's probability"

    @classmethod
    def add_config(cls, config):
        config.attributes = ml_collections.ConfigDict({"threshold": 0.5})  # predict: attributes at this probability

    @classmethod
    def validate_config(cls, config):
        config_checks.check_range("attributes.threshold", config.attributes.threshold, 0.0, 1.0)

    def with_dataset(self, config, info):
        config.data.class_names = config.data.class_names or info.class_names

    def build_model(self, **overrides):
        return build_model(self.config.model, **overrides)

    def label_shape(self, resolution):
        return (self.num_classes,)

    def _example(self, image, attributes):
        image = preprocessing.resize(preprocessing.decode_image(image), self.config.resolution)
        return {"image": preprocessing.normalize(image, self.config.model.preprocessing), "label": attributes}

    def train_example(self, example, seed):
        example = self._example(example["image"], example["attributes"])
        example["image"] = tf.image.stateless_random_flip_left_right(example["image"], seed)
        return example

    def eval_example(self, example):
        return self._example(example["image"], example["attributes"])

    def loss(self, logits, batch):
        labels = batch["label"].astype(logits.dtype)
        correct = jnp.all((logits > 0) == (labels > 0), axis=-1)
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), {"train/exact_match": correct.mean()}

    def eval_outputs(self, logits, batch):
        losses = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(logits.dtype)).mean(-1)
        return {"scores": jax_sigmoid(logits), "label": batch["label"], "loss": losses, "mask": batch["mask"]}

    def evaluator(self):
        return MeanAveragePrecision(self.class_names())

    def predict(self, model, variables, paths, options):
        from mnv2_jax.models import predict

        images = np.stack([preprocessing.load_image(path, self.config.resolution) for path in paths])
        inputs = preprocessing.normalize(images, self.config.model.preprocessing)
        probabilities = np.asarray(jax_sigmoid(predict(model, variables, jnp.asarray(inputs))))
        names, threshold = self.class_names(options.labels), self.config.attributes.threshold
        for path, row in zip(paths, probabilities, strict=True):
            found = {name: round(float(p), 4) for name, p in zip(names, row, strict=True) if p >= threshold}
            print(json.dumps({"image": path, "attributes": found, "probabilities": row.round(4).tolist()}))


def jax_sigmoid(logits):
    return 1 / (1 + jnp.exp(-logits))


@pytest.fixture
def registered(monkeypatch):
    """The task and its data source registered by name for this test only."""
    monkeypatch.setattr(tasks, "_TASK_TYPES", dict(tasks._TASK_TYPES))
    monkeypatch.setattr(sources, "_READERS", list(sources._READERS))
    tasks.register(Attributes)
    sources.register(
        sources.Reader("attributes:", "attributes", "'attributes:<root>'", "attributes", open_attribute_folder)
    )


CONFIG_FILE = """
from mnv2_jax.config import base_config


def get_config():
    config = base_config(task="attributes")
    config.resolution, config.model.width, config.model.num_classes = 32, 0.35, None
    config.model.stage_repeats = (1, 1, 1, 1, 1, 1, 1)
    config.train_split, config.eval_split = "train", "val"
    config.batch_size, config.eval_batch_size, config.num_train_steps = 8, 8, 4
    config.log_every_steps, config.checkpoint_every_steps, config.eval_every_epochs = 2, 2, 100.0
    config.optimizer.schedule, config.optimizer.learning_rate = "constant", 0.01
    return config
"""


def write_attribute_folder(root) -> None:
    """Discs and squares in two colours on noise: 16 train and 6 val images."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[:24, :24]
    for split, count in (("train", 16), ("val", 6)):
        for i in range(count):
            colour, shape = list(COLOURS)[i % 2], SHAPES[(i // 2) % 2]
            image = rng.integers(100, 156, (24, 24, 3)).astype(np.uint8)
            inside = (np.hypot(ys - 12, xs - 12) < 8) if shape == "disc" else (abs(ys - 12) < 7) & (abs(xs - 12) < 7)
            image[inside] = COLOURS[colour]
            write_png(root / split / f"{colour}_{shape}" / f"{i:03d}.png", image)


def test_a_task_defined_in_a_test_module_runs_every_command(registered, mnv2, tmp_path):
    write_attribute_folder(tmp_path / "data")
    config_file = tmp_path / "attributes_config.py"
    config_file.write_text(CONFIG_FILE)
    workdir, dataset = tmp_path / "run", f"attributes:{tmp_path / 'data'}"

    status, _, err = mnv2("train", "--workdir", workdir, "--config", config_file, f"--config.dataset={dataset}")
    assert status == 0, err[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "eval/mAP" in r][-1]
    assert trained["eval/count"] == 6 and 0 < trained["eval/mAP"] <= 1
    assert {f"eval/AP/{name}" for name in ("blue", "disc", "red", "square")} <= trained.keys()
    assert [r["train/exact_match"] for r in records if "train/exact_match" in r]

    status, out, err = mnv2("eval", "--workdir", workdir)
    assert status == 0, err[-3000:]
    assert f"eval/mAP={trained['eval/mAP']:.4f}" in out and "eval/count=6.0000" in out

    images = sorted((tmp_path / "data" / "val").glob("*/*.png"))[:2]
    status, out, err = mnv2("predict", "--workdir", workdir, *images)
    assert status == 0, err[-3000:]
    predicted = [json.loads(line) for line in out.splitlines()]
    assert [p["image"] for p in predicted] == [str(path) for path in images]
    assert all(len(p["probabilities"]) == 4 for p in predicted)

    out_file = tmp_path / "attributes.onnx"
    status, _, err = mnv2("export", "--workdir", workdir, "--format", "onnx", "--out", out_file)
    assert status == 0, err[-3000:]
    metadata = json.loads(out_file.with_suffix(".onnx.metadata.json").read_text())
    assert metadata["output"]["meaning"] == Attributes.export_meaning and metadata["class_names"] == sorted(
        ["blue", "disc", "red", "square"]
    )
    import onnxruntime

    pixels = np.stack([preprocessing.load_image(str(path), 32) for path in images])
    inputs = preprocessing.normalize(pixels, "inception").astype(np.float32)
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    probabilities = jax_sigmoid(session.run(None, {session.get_inputs()[0].name: inputs})[0])
    np.testing.assert_allclose(probabilities, [p["probabilities"] for p in predicted], atol=2e-4)

    status, out, err = mnv2("summary", "--config", config_file, "--config.model.num_classes=4")
    assert status == 0 and "parameters" in out, err
    status, _, err = mnv2("summary", "--config", config_file, "--config.task=keypoints")
    assert status == 2 and "task must be one of ('classification', 'segmentation', 'detection', 'attributes')" in err


def test_a_plugin_module_registers_its_task_in_another_process(tmp_path):
    """`mnv2` in a new process finds a task that is not built in through `$MNV2_PLUGINS`."""
    plugin = tmp_path / "attributes_plugin.py"
    plugin.write_text(
        "from test_task_plugin import READER, Attributes\n"
        "from mnv2_jax import tasks\n"
        "from mnv2_jax.data import sources\n"
        "tasks.register(Attributes)\n"
        "sources.register(READER)\n"
    )
    (tmp_path / "config.py").write_text(CONFIG_FILE)
    env = one_device_environment(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "tests"), str(REPO)]), MNV2_PLUGINS="attributes_plugin"
    )
    command = mnv2_command("summary", "--config", tmp_path / "config.py", "--config.model.num_classes=4", "--json")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["resolution"] == 32


def test_the_sources_name_what_a_task_reads(registered):
    from mnv2_jax.config import base_config

    config = base_config(task="attributes")
    config.dataset = "imagefolder:/nowhere"
    with pytest.raises(
        sources.DatasetError, match="holds one label per image; task=attributes reads 'attributes:<root>'"
    ):
        sources.open_dataset(config, "attributes")
