"""The BCCD recipe (`configs/ssdlite_bccd.py`, chosen on `val` by `bccd_recipe.py`) trained on `trainval` and scored
once on `test`, over three seeds.

    mnv2 import --from tflite ../shared/data/coral/mobilenet_v2_1.0_224_quant.tflite \
        --config configs/imagenet.py:num_classes=1001 --workdir workdirs/imagenet_backbone
    mnv2 sweep configs/sweeps/bccd_seeds.py
    mnv2 sweep configs/sweeps/bccd_seeds.py --report

Results (mean ± std over the seeds): README "Detection on BCCD" and docs/detection.md.
"""


def get_sweep():
    return {
        "config": "configs/ssdlite_bccd.py",
        "overrides": {"init_from": "workdirs/imagenet_backbone"},
        "seeds": [0, 1, 2],
        "report": {"metric": "eval/mAP50"},
    }
