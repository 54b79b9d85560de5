"""Mobile DeepLabv3 on PASCAL VOC 2012 (paper §6.3, Table 7): 513x513, output stride 16, the released head.

    mnv2 summary --config configs/deeplab_voc.py
    mnv2 summary --config configs/deeplab_voc.py:aspp=True,output_stride=8,width=0.5

`aspp=True` adds the paper's ASPP branches; `output_stride=8` runs the last stages atrous at 1/8 of the input.
Width 0.5 follows DeepLab's released `dm05` models, which turn channel rounding off below width 1.0.
"""

from mnv2_jax.config import base_config, parse_arg
from mnv2_jax.data.voc import PASCAL_CLASSES as VOC_CLASSES


def get_config(arg=None):
    arg = parse_arg(arg, aspp=False, output_stride=16, width=1.0, resolution=513)
    config = base_config(task="segmentation")
    config.resolution = arg.resolution
    model = config.model
    model.width = arg.width
    model.num_classes = len(VOC_CLASSES)  # 20 VOC classes and the background
    config.data.class_names = VOC_CLASSES
    model.output_stride = arg.output_stride
    if arg.width != 1.0:  # DeepLab's feature_extractor.py: min_depth=1, divisible_by=1 unless the width is 1.0
        model.divisible_by = model.min_depth = 1
    config.segmentation.aspp = arg.aspp
    return config
