"""The CamVid recipe (`configs/deeplab_camvid.py`, from the authors' ImageNet backbone) over three seeds.

    mnv2 import --from tflite ../shared/data/coral/mobilenet_v2_1.0_224_quant.tflite \
        --config configs/imagenet.py:num_classes=1001 --workdir workdirs/imagenet_backbone
    mnv2 sweep configs/sweeps/camvid_seeds.py
    mnv2 sweep configs/sweeps/camvid_seeds.py --report

The recipe was tuned on `val`, the split these runs report: their mIoU is not a held-out estimate (README "Segmentation
on CamVid"). Results: docs/segmentation.md.
"""


def get_sweep():
    return {
        "config": "configs/deeplab_camvid.py",
        "overrides": {"init_from": "workdirs/imagenet_backbone"},
        "seeds": [0, 1, 2],
    }
