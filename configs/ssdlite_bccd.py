"""MobileNetV2 + SSDLite on BCCD (blood cells: RBC, WBC, Platelets; PASCAL VOC layout, 640x480): a recipe for a CPU.

    mnv2 train --config configs/ssdlite_bccd.py --workdir workdirs/bccd \
        --config.init_from=coral_mobilenet_v2_1.0_224_quant  # the authors' ImageNet model, by name
    mnv2 eval --workdir workdirs/bccd

From scratch: the same command without `--config.init_from`.

`root` is the dataset folder (default: the repository's `../shared/data/bccd/BCCD`). Training reads `trainval`
(292 images) and evaluates once, after the last step, on `test` (72). Images are resized to `resolution` squares
(the release's fixed-shape resizer) after SSD's random crop, flip and photometric distortion.

The recipe was chosen on `val`, training on `train` only (`configs/sweeps/bccd_recipe.py`); its test figure is
the mean over three seeds (`configs/sweeps/bccd_seeds.py`, docs/detection.md).
"""

from mnv2_jax.config import base_config, parse_arg

BCCD_CLASSES = ("RBC", "WBC", "Platelets")


def get_config(arg=None):
    arg = parse_arg(
        arg,
        root="../shared/data/bccd/BCCD",
        epochs=50.0,
        width=1.0,
        resolution=256,
        head="ssdlite",
    )
    config = base_config(task="detection")
    config.dataset = f"voc:{arg.root}"
    config.train_split = "trainval"
    config.eval_split = "test"
    config.resolution = arg.resolution
    config.data.class_names = BCCD_CLASSES
    config.data.photometric = True
    config.data.cache = True

    model = config.model
    model.width = arg.width
    model.num_classes = len(BCCD_CLASSES)
    model.bn_momentum = 0.9  # short runs: the moving statistics must follow the fine-tuned weights
    det = config.detection
    det.head = arg.head
    det.max_boxes = 40  # BCCD has at most 30 per image
    # Every class starts at a score of 0.01, not the release's 1/2: with 1/2, a short run's scores stay flat, and
    # an image's 100 best detections were nearly all RBC, crowding out the single WBC (docs/detection.md).
    det.class_prior = 0.01
    # The backbone's batch norms learn their statistics, from an imported backbone too (batches of 16): with the
    # imported folded statistics (0/1) kept, as the CamVid recipe does, the backbone's features collapsed to the
    # same output for every image within 20 epochs (docs/detection.md).
    config.fine_tune.frozen_batch_norm = ()

    config.batch_size = 16
    config.eval_batch_size = 24
    config.num_epochs = arg.epochs
    opt = config.optimizer
    opt.name = "adamw"
    opt.learning_rate = 2e-3
    opt.base_batch_size = 16
    opt.schedule = "cosine"
    opt.warmup_epochs = 1.0
    opt.weight_decay = 1e-4

    config.log_every_steps = 20
    config.eval_every_epochs = 2 * arg.epochs  # past the end: the test split is scored once, after the last step
    config.checkpoint_every_steps = 200
    return config
