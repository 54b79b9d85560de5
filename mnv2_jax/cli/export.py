"""`mnv2 export --workdir DIR [--checkpoint STEP] --format FORMAT --out PATH`: a checkpoint -> another framework."""

from __future__ import annotations

from absl import flags

from mnv2_jax import inference
from mnv2_jax.cli import common
from mnv2_jax.export import routes
from mnv2_jax.training import checkpoint


@common.command
def main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "workdir holding the checkpoint", flag_values=fv)
    flags.DEFINE_integer("checkpoint", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_enum("format", None, routes.FORMATS, "what to write", flag_values=fv)
    flags.DEFINE_string("out", None, "output file (a directory for savedmodel and hf-hub)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace an existing output", flag_values=fv)
    flags.DEFINE_enum(
        "torch_layout",
        None,
        ("torchvision", "timm"),
        "state-dict names for torch/safetensors "
        "(default: torchvision for symmetric padding, timm for TF 'SAME' padding)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "calibration",
        None,
        "tflite-int8: folder or glob of images to calibrate on (default: the config's eval split)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "calibration_images", routes.DEFAULT_CALIBRATION_IMAGES, "tflite-int8: images to calibrate on", flag_values=fv
    )
    flags.DEFINE_string(
        "labels", None, "class names, one per line, for the metadata (default: the dataset's)", flag_values=fv
    )
    common.parse(fv, argv)
    if fv.workdir is None or fv.format is None or fv.out is None:
        raise common.UsageError(f"usage: {argv[0]} --workdir DIR [--checkpoint STEP] --format FORMAT --out PATH")
    options = routes.ExportOptions(
        overwrite=fv.overwrite,
        torch_layout=fv.torch_layout,
        calibration=fv.calibration,
        calibration_images=fv.calibration_images,
        class_names=inference.read_labels(fv.labels) if fv.labels else None,
    )
    step, config = checkpoint.restore_config(fv.workdir, fv.checkpoint)
    routes.check_before_export(config, fv.format, fv.out, options)
    config, _, variables = inference.load_model(fv.workdir, step)
    source = {"workdir": fv.workdir, "step": step}
    metadata = routes.export(config, variables, fv.format, fv.out, options, source)
    print(f"exported {fv.workdir} (step {step}) as {fv.format} -> {fv.out}")
    print(f"metadata -> {routes.metadata_path(fv.out)}")
    if "upload" in metadata:
        print(f"upload with: {metadata['upload']}")
