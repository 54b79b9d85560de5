"""Mobile DeepLabv3 on CamVid (11 road-scene classes, PASCAL VOC layout, train/val): a recipe for a CPU.

    mnv2 train --config configs/deeplab_camvid.py --workdir workdirs/camvid \
        --config.init_from=coral_mobilenet_v2_1.0_224_quant  # the authors' ImageNet model, by name
    mnv2 eval --workdir workdirs/camvid

From scratch: `configs/deeplab_camvid.py:from_scratch=True` and no `init_from`.

`root` is the dataset folder (default: the repository's `../shared/data/camvid`). Training crops `resolution`
squares from images rescaled by 0.5-1.0 (CamVid's photos are 480x360); evaluation runs on whole images at their
own size, padded to `eval_resolution`, so every labelled pixel counts once.

The recipe was tuned on `val`, the split it evaluates on, so its val mIoU is not a held-out estimate (README
"Segmentation on CamVid"; three seeds: `configs/sweeps/camvid_seeds.py`).
"""

from mnv2_jax.config import base_config, parse_arg

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)


def get_config(arg=None):
    arg = parse_arg(
        arg,
        root="../shared/data/camvid",
        epochs=32.0,
        width=1.0,
        resolution=241,
        eval_resolution=481,
        aspp=False,
        from_scratch=False,
    )
    config = base_config(task="segmentation")
    config.dataset = f"voc:{arg.root}"
    config.train_split = "train"
    config.eval_split = "val"
    config.resolution = arg.resolution
    config.eval_resolution = arg.eval_resolution
    config.data.class_names = CAMVID_CLASSES
    config.data.scale_range = (0.5, 1.0)
    config.data.scale_step = 0.25
    config.data.cache = True

    model = config.model
    model.width = arg.width
    model.num_classes = len(CAMVID_CLASSES)
    model.output_stride = 16
    model.bn_momentum = 0.9  # short runs: the moving statistics must follow the fine-tuned weights
    if arg.width != 1.0:  # DeepLab's feature_extractor.py: min_depth=1, divisible_by=1 unless the width is 1.0
        model.divisible_by = model.min_depth = 1
    config.segmentation.aspp = arg.aspp
    config.segmentation.head_bn_momentum = 0.9
    # From an imported backbone (folded batch norm: stored statistics 0/1) and batches of 8, the backbone's batch
    # norms keep their statistics, as DeepLab fine-tunes below a batch of 12; from scratch they must learn them.
    config.fine_tune.frozen_batch_norm = () if arg.from_scratch else ("backbone",)

    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = arg.epochs
    opt = config.optimizer
    opt.name = "adamw"
    opt.learning_rate = 1e-3
    opt.base_batch_size = 8
    opt.schedule = "cosine"
    opt.warmup_epochs = 0.5
    opt.weight_decay = 1e-4

    config.log_every_steps = 20
    config.eval_every_epochs = 8.0
    config.checkpoint_every_steps = 200
    return config
