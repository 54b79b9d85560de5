"""Quickstart: MobileNetV2 on Fashion-MNIST in minutes on a laptop CPU, no downloads needed.

    mnv2 train --config configs/quickstart.py --workdir workdirs/quickstart

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (prepared once into the TFDS data dir
as TFDS's own `fashion_mnist`); with internet and no package, TFDS downloads it. Any other dataset works
with the same recipe: `--config.dataset=imagefolder:/path/to/root` (root/<split>/<class>/<image>, with
`--config.train_split` / `--config.eval_split` naming the split folders).
"""

from mnv2_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, epochs=6.0, width=0.35, resolution=32)
    config = base_config()
    config.dataset = "fashion_mnist"
    config.train_split = "train"
    config.eval_split = "test"
    config.resolution = arg.resolution

    model = config.model
    model.width = arg.width
    model.num_classes = None  # from the dataset
    model.output_stride = 16  # a 2x2 final map at 32x32 instead of 1x1 (output stride 8: 4x4, 2.3x slower)
    model.bn_momentum = 0.9  # short runs: the moving statistics must settle within a few hundred steps
    model.dropout_rate = 0.0  # a few epochs underfit rather than overfit: little regularisation

    config.data.area_range = (0.85, 1.0)
    config.data.aspect_ratio_range = (0.9, 1.1)
    config.data.eval_crop = 1.0
    config.data.cache = True
    config.data.shuffle_buffer = 60_000

    config.batch_size = 128
    config.eval_batch_size = 400  # divides the 10,000 test images; divisible by 8 devices
    config.num_epochs = arg.epochs
    opt = config.optimizer
    opt.name = "adamw"
    opt.learning_rate = 6e-3
    opt.base_batch_size = 128
    opt.schedule = "cosine"
    opt.warmup_epochs = 0.2
    opt.weight_decay = 0.01  # decoupled (AdamW): lr * 0.01 * w per step
    opt.label_smoothing = 0.0

    config.log_every_steps = 50
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 500
    return config
