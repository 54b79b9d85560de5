"""The paper's Figure 6a: a linear bottleneck (the projection has no activation) against ReLU6 after it.

    mnv2 sweep configs/sweeps/fig6a_bottleneck_activation.py
    mnv2 sweep configs/sweeps/fig6a_bottleneck_activation.py --report

The quickstart recipe (Fashion-MNIST, width 0.35 at 32x32) for one epoch, evaluated every quarter epoch, three seeds
per variant. The paper (ImageNet, width 1.0) finds the linear bottleneck better; results: docs/ablations.md.
"""


def get_sweep():
    return {
        "config": "configs/quickstart.py:epochs=1",
        "overrides": {"eval_every_epochs": 0.25},
        "variants": [
            {"name": "linear", "model.nonlinear_bottleneck": False},
            {"name": "relu6", "model.nonlinear_bottleneck": True},
        ],
        "seeds": [0, 1, 2],
    }
