"""ImageNet classification with the authors' MobileNetV2.

    mnv2 summary --config configs/imagenet.py:width=0.75,resolution=192,expansion=6
    mnv2 summary --config configs/imagenet.py:convention=torch --config.model.num_classes=1000

Arguments (all optional): width, resolution, expansion, output_stride, num_classes and
convention (`tf`: SAME padding, BN 0.997/1e-3, [-1, 1] input; `torch`: symmetric
padding, BN 0.9/1e-5, ImageNet mean/std).
"""

from mnv2_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, width=1.0, resolution=224, expansion=6.0, output_stride=32, num_classes=1000, convention="tf")
    config = base_config(arg.convention)
    config.resolution = arg.resolution
    config.model.width = arg.width
    config.model.expansion = arg.expansion
    config.model.output_stride = arg.output_stride
    config.model.num_classes = arg.num_classes
    return config
