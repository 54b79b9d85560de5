"""`mnv2 export --format hf-hub --out DIR`: a folder to upload to the Hugging Face Hub as is (`hf upload`).

- `model.safetensors`: timm's state dict where timm builds the same model (a standard MobileNetV2 classifier of a
  width timm names, with the torch conventions: symmetric padding, BN epsilon 1e-5), so that
  `timm.create_model("hf-hub:USER/REPO", pretrained=True)` loads it; otherwise our Flax variables by name
  (`params/Conv/kernel`, `batch_stats/...`).
- `config.json`: for the timm layout the fields timm's Hub loader reads (`architecture`, `num_classes`,
  `pretrained_cfg`); always our config and the layout under `mnv2_jax`: `{"config", "layout", "step"}`.
- `README.md`: a model card with the eval metrics the workdir's `metrics.jsonl` holds for the exported step.

`mnv2_jax.weights.hf_hub` reads such a folder or Hub repository back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from mnv2_jax import tasks
from mnv2_jax.convert import pytorch
from mnv2_jax.convert.layout import model_layers
from mnv2_jax.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from mnv2_jax.export import routes
from mnv2_jax.export.files import atomic_output
from mnv2_jax.training import run_files

WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
SECTION = "mnv2_jax"  # config.json's key for our config, layout and step
LAYOUTS = ("timm", "flax")
# model.preprocessing <-> timm's mean/std of pixels in [0, 1] (inception: pixels / 127.5 - 1).
MEAN_STD = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
PIPELINE_TAGS = {
    "classification": "image-classification",
    "segmentation": "image-segmentation",
    "detection": "object-detection",
}


def layout(config: ml_collections.ConfigDict) -> str:
    """`timm` where timm builds the same classifier from its defaults, else `flax`."""
    model = config.model
    timm_builds = (
        tasks.get(config).name == "classification"
        and model.width in pytorch.TIMM_VARIANTS
        and (model.padding, model.bn_epsilon) == (pytorch.TORCHVISION_PADDING, pytorch.TORCHVISION_BN_EPSILON)
        and not routes.standard_architecture_departures(model)
    )
    return "timm" if timm_builds else "flax"


def tensors(config: ml_collections.ConfigDict, variables: Mapping[str, Any], chosen: str) -> dict[str, np.ndarray]:
    """The safetensors content: timm's state dict, or our variables flattened by `/`-joined names."""
    if chosen == "flax":
        return {k: np.ascontiguousarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    layers, _ = model_layers(tasks.get(config).export_model(), config.resolution)
    return pytorch.export_state_dict(variables, layers, "timm")


def timm_fields(config: ml_collections.ConfigDict, variables: Mapping[str, Any]) -> dict[str, Any]:
    """What timm's Hub loader reads from config.json (`timm.models._hub._parse_model_cfg`)."""
    mean, std = MEAN_STD[config.model.preprocessing]
    r, n = config.resolution, config.model.num_classes
    return {
        "architecture": pytorch.TIMM_VARIANTS[config.model.width],
        "num_classes": n,
        "num_features": int(variables["params"]["Logits"]["kernel"].shape[0]),
        "global_pool": "avg",
        "pretrained_cfg": {
            "input_size": [3, r, r],
            "fixed_input_size": False,
            "interpolation": "bilinear",
            "crop_pct": config.data.eval_crop,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": n,
            "first_conv": "conv_stem",
            "classifier": "classifier",
        },
    }


def write(
    config: ml_collections.ConfigDict,
    variables: Mapping[str, Any],
    out: str,
    options: routes.ExportOptions,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes the folder `out` (atomically); returns what the export metadata adds."""
    chosen = layout(config)
    source = metadata.get("source") or {}
    step = source.get("step")
    records = run_files.read_metrics(source["workdir"]) if source.get("workdir") else []
    hub_config = timm_fields(config, variables) if chosen == "timm" else {}
    if metadata.get("class_names"):
        hub_config["label_names"] = list(metadata["class_names"])
    hub_config[SECTION] = {"config": metadata["config"], "layout": chosen, "step": step}
    repo = f"USER/{os.path.basename(os.path.abspath(out))}"
    parameters = sum(int(np.size(a)) for a in traverse_util.flatten_dict(variables["params"]).values())
    card = model_card(config, chosen, metadata, records, repo, parameters)
    with atomic_output(out, options.overwrite) as tmp:
        os.makedirs(tmp)
        pytorch.save(os.path.join(tmp, WEIGHTS_FILE), tensors(config, variables, chosen))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hub_config, f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            f.write(card)
    loader = f"timm.create_model('hf-hub:{repo}', pretrained=True)" if chosen == "timm" else None
    return {
        "layout": chosen,
        "files": [WEIGHTS_FILE, CONFIG_FILE, CARD_FILE],
        "upload": f"hf upload {repo} {out} .",
        "runtime": loader or f"mnv2_jax.weights.hf_hub.load_variables('hf-hub:{repo}')",
    }


def evaluations(records: Sequence[Mapping[str, Any]], step: int | None) -> dict[str, dict[str, float]]:
    """The metrics recorded at `step` by each evaluation (`eval`: the run's own split; `eval_<dataset>_<split>`:
    `mnv2 eval` on another), the last record winning; not their seconds."""
    found: dict[str, dict[str, float]] = {}
    for record in records:
        if step is None or record.get("step") != step:
            continue
        for key, value in record.items():
            prefix, _, name = key.partition("/")
            if prefix.startswith("eval") and name and "/" not in name and name != "seconds":
                found.setdefault(prefix, {})[name] = value
    return found


def _evaluation_section(config, records: Sequence[Mapping[str, Any]], step: int | None) -> list[str]:
    found = evaluations(records, step)
    lines = ["## Evaluation", ""]
    if not found:
        where = "" if step is None else f" at step {step}"
        return [*lines, f"Not evaluated{where}: its workdir's `metrics.jsonl` holds no eval metrics for it.", ""]
    lines += ["Measured by mnv2_jax on the checkpoint exported here (the workdir's `metrics.jsonl`):", ""]
    lines += ["| evaluation | data | metric | value |", "|---|---|---|---|"]
    for prefix, metrics in found.items():
        data = f"{config.dataset}:{config.eval_split}" if prefix == "eval" else prefix.removeprefix("eval_")
        for name, value in metrics.items():
            shown = str(int(value)) if name == "count" else f"{value:.4f}"
            lines.append(f"| {prefix} | {data} | {name} | {shown} |")
    metric = tasks.get(config).best_metric
    history = [(r[metric], r["step"]) for r in records if metric in r]
    if history and max(history)[1] != step:
        lines += ["", f"The run's best `{metric}` was {max(history)[0]:.4f}, at step {max(history)[1]}."]
    return [*lines, ""]


def _details(config, chosen: str, metadata: Mapping[str, Any], parameters: int) -> list[str]:
    model, task = config.model, tasks.get(config)
    mean, std = MEAN_STD[model.preprocessing]
    timm_name = f" (timm `{pytorch.TIMM_VARIANTS[model.width]}`)" if chosen == "timm" else ""
    weights = "timm's state-dict layout" if chosen == "timm" else "mnv2_jax's Flax variables by name"
    source = metadata.get("source") or {}
    return [
        "## Model details",
        "",
        f"- **Task:** {task.name} ({model.num_classes} classes)",
        f"- **Architecture:** MobileNetV2{timm_name}, width multiplier {model.width}, expansion {model.expansion}, "
        f"output stride {model.output_stride}; {parameters / 1e6:.2f}M parameters",
        f"- **Input:** {config.resolution}x{config.resolution} RGB, pixels in [0, 1] less mean {list(mean)}, over std "
        f"{list(std)}",
        f"- **Conventions:** {model.padding} padding, batch-norm epsilon {model.bn_epsilon}",
        f"- **Training data:** `{config.dataset}`, the config's dataset (its eval split: `{config.eval_split}`)",
        f"- **Weights:** `{WEIGHTS_FILE}` in {weights}; mnv2_jax step {source.get('step', 'unknown')}",
        "",
    ]


def _usage(chosen: str, repo: str) -> list[str]:
    lines = [
        "## How to use",
        "",
        "With mnv2_jax (`pixels`: NHWC float images with values in [0, 255]):",
        "",
        "```python",
        "from mnv2_jax import tasks",
        "from mnv2_jax.data.preprocessing import normalize",
        "from mnv2_jax.models import predict",
        "from mnv2_jax.weights import hf_hub",
        "",
        f'variables, config = hf_hub.load_variables("hf-hub:{repo}")',
        "model = tasks.get(config).build_model()",
        "outputs = predict(model, variables, normalize(pixels, config.model.preprocessing))",
        "```",
        "",
    ]
    if chosen == "timm":
        lines += [
            "With [timm](https://github.com/huggingface/pytorch-image-models) (NCHW input):",
            "",
            "```python",
            "import timm",
            "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
            "```",
            "",
        ]
    return lines


def model_card(
    config: ml_collections.ConfigDict,
    chosen: str,
    metadata: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    repo: str,
    parameters: int,
) -> str:
    """README.md: YAML front matter, the model, its measured metrics (or "not evaluated"), how to load it."""
    task = tasks.get(config).name
    tags = ["mobilenetv2", "mnv2_jax", "jax", "flax", *(["timm"] if chosen == "timm" else [])]
    front = ["---", f"library_name: {'timm' if chosen == 'timm' else 'mnv2_jax'}", "tags:"]
    front += [f"- {tag}" for tag in [PIPELINE_TAGS.get(task, task), *tags]]
    front += [f"pipeline_tag: {PIPELINE_TAGS[task]}"] if task in PIPELINE_TAGS else []
    model = config.model
    title = f"# MobileNetV2 {model.width} ({config.resolution}x{config.resolution}) {task}, `{config.dataset}`"
    lines = [*front, "---", title, ""]
    lines += _details(config, chosen, metadata, parameters)
    lines += _evaluation_section(config, records, (metadata.get("source") or {}).get("step"))
    lines += _usage(chosen, repo)
    return "\n".join(lines)
