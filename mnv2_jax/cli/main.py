"""`mnv2 <command> [flags]`: one entry point, one module per subcommand."""

from __future__ import annotations

import importlib
import os
import sys

from mnv2_jax import host_memory

COMMANDS = {
    "summary": ("mnv2_jax.cli.summary", "parameter and multiply-add counts of a config's model"),
    "import": ("mnv2_jax.cli.import_weights", "import weights from another framework into a workdir checkpoint"),
    "export": (
        "mnv2_jax.cli.export",
        "export a workdir's classifier, segmenter or detector to TFLite, ONNX or SavedModel (classifiers also to "
        "PyTorch, Keras)",
    ),
    "predict": (
        "mnv2_jax.cli.predict",
        "top-k classes, segmentation masks or detected boxes of images with a workdir's checkpoint",
    ),
    "train": ("mnv2_jax.cli.train", "train (and evaluate) a config; resumes from the workdir"),
    "eval": ("mnv2_jax.cli.eval", "evaluate a workdir's checkpoint on the full eval split"),
    "bench": ("mnv2_jax.cli.bench", "throughput, FLOPs and memory of the compiled train or inference step"),
    "sweep": ("mnv2_jax.cli.sweep", "train a sweep file's runs (local, SLURM, TPU pod), or report their results"),
}


def usage() -> str:
    lines = ["usage: mnv2 <command> [flags]   (mnv2 <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line (not a call from Python): an allocator that reuses XLA's step buffers
        try:
            host_memory.restart_with_allocator()
        except ValueError as e:
            print(f"mnv2: {e}", file=sys.stderr)
            return 2
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command not in COMMANDS:
        print(f"mnv2: unknown command {command!r}; expected one of {tuple(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    module = importlib.import_module(COMMANDS[command][0])
    return module.main([f"mnv2 {command}", *argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
