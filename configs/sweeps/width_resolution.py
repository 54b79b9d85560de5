"""Width x input resolution (the paper's Figure 5 trade-off: accuracy against multiply-adds).

    mnv2 sweep configs/sweeps/width_resolution.py
    mnv2 sweep configs/sweeps/width_resolution.py --report

The quickstart recipe for one epoch on Fashion-MNIST (28x28 images resized to the input resolution); one line per
width in the report's multiply-add plot. Results: docs/ablations.md.
"""


def get_sweep():
    return {
        "config": "configs/quickstart.py:epochs=1",
        "grid": {"model.width": [0.35, 0.75], "resolution": [16, 32]},
        "report": {"lines": "model.width"},
    }
