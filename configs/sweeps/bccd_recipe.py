"""How `configs/ssdlite_bccd.py` is chosen: candidate recipes trained on BCCD's `train` (205 photos) and compared on
`val` (87), never on `test`. The chosen one then trains on `trainval` over three seeds (`bccd_seeds.py`).

    mnv2 import --from tflite ../shared/data/coral/mobilenet_v2_1.0_224_quant.tflite \
        --config configs/imagenet.py:num_classes=1001 --workdir workdirs/imagenet_backbone
    mnv2 sweep configs/sweeps/bccd_recipe.py
    mnv2 sweep configs/sweeps/bccd_recipe.py --report

Every run starts from the authors' ImageNet backbone and trains 20 epochs (cosine schedule) but the last, which
trains the recipe 50 epochs to choose the length (val every 10 epochs). Results: docs/detection.md.
"""

# The release: class scores start at 1/2 (a zero bias, as class_prior=None), the backbone's batch norms kept.
RELEASE = {"detection.class_prior": 0.5, "fine_tune.frozen_batch_norm": ("backbone",)}


def get_sweep():
    return {
        "config": "configs/ssdlite_bccd.py:epochs=20",
        "overrides": {
            "train_split": "train",
            "eval_split": "val",
            "init_from": "workdirs/imagenet_backbone",
            "eval_every_epochs": 5.0,
        },
        "variants": [
            {"name": "kept_bn", **RELEASE},
            {"name": "kept_bn_lr5e-4", **RELEASE, "optimizer.learning_rate": 5e-4},
            {"name": "learned_bn", **RELEASE, "fine_tune.frozen_batch_norm": ()},
            {
                "name": "learned_bn_fitted_anchors",
                **RELEASE,
                "fine_tune.frozen_batch_norm": (),
                "detection.min_scale": 0.14,
                "detection.max_scale": 0.6,
            },
            {"name": "learned_bn_prior", "detection.class_prior": 0.01, "fine_tune.frozen_batch_norm": ()},
            {
                "name": "learned_bn_prior_50_epochs",
                "detection.class_prior": 0.01,
                "fine_tune.frozen_batch_norm": (),
                "num_epochs": 50.0,
                "eval_every_epochs": 10.0,
            },
        ],
        "report": {"metric": "eval/mAP50"},
    }
