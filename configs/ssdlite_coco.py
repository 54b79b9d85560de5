"""MobileNetV2 + SSDLite on COCO (paper §6.2; the Object Detection API's `ssdlite_mobilenet_v2_coco` release).

    mnv2 summary --config configs/ssdlite_coco.py --json
    mnv2 summary --config configs/ssdlite_coco.py:head=ssd,resolution=300
    mnv2 train --config configs/ssdlite_coco.py --workdir workdirs/ssdlite_coco

The paper's model: 320x320 inputs, COCO's 80 classes (81 outputs with the background), 4.3M parameters and 0.8B
multiply-adds. Training as released: batch 24, RMSProp (momentum 0.9, decay 0.9, epsilon 1.0) at a constant 0.004
(the release's decay of 0.95 every 800,720 steps never fires in its 200,000 steps), L2 4e-5, batch norm decay
0.9997, `ssd_random_crop` and horizontal flips. `head=ssd` selects the regular-SSD predictors of Table 5.
"""

from mnv2_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, head="ssdlite", resolution=320, width=1.0, steps=200_000, dataset="coco/2017")
    config = base_config(task="detection")
    config.dataset = arg.dataset
    config.train_split = "train"
    config.eval_split = "validation"
    config.resolution = arg.resolution
    config.detection.head = arg.head

    model = config.model
    model.width = arg.width
    model.num_classes = 80
    model.bn_momentum = 0.9997
    model.init_stddev = 0.09

    config.batch_size = 24
    config.eval_batch_size = 32
    config.num_train_steps = arg.steps
    opt = config.optimizer
    opt.name = "rmsprop"
    opt.learning_rate = 0.004
    opt.base_batch_size = 24
    opt.schedule = "constant"
    opt.rmsprop_decay = 0.9
    opt.momentum = 0.9
    opt.epsilon = 1.0
    opt.weight_decay = 4e-5

    config.log_every_steps = 100
    config.eval_every_epochs = 5.0
    config.checkpoint_every_steps = 5000
    return config
