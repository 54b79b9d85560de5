"""The paper's Figure 6b: the shortcut between bottlenecks (MobileNetV2's), between expansions, or none.

    mnv2 sweep configs/sweeps/fig6b_shortcut.py
    mnv2 sweep configs/sweeps/fig6b_shortcut.py --report

`model.residual=expansion` adds each block's expansion output to the next block's (the paper's "shortcut between
expansions"); `none` removes the shortcuts. The quickstart recipe for one epoch, evaluated every quarter epoch, three
seeds per variant. The paper finds shortcuts between bottlenecks best; results: docs/ablations.md.
"""


def get_sweep():
    return {
        "config": "configs/quickstart.py:epochs=1",
        "overrides": {"eval_every_epochs": 0.25},
        "variants": [
            {"name": "bottleneck", "model.residual": "bottleneck"},
            {"name": "expansion", "model.residual": "expansion"},
            {"name": "none", "model.residual": "none"},
        ],
        "seeds": [0, 1, 2],
    }
