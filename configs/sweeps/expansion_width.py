"""Expansion ratio x width: the paper says smaller networks do better with slightly smaller expansion ratios and
larger networks with larger ones (Section 6.1); this grid tests that.

    mnv2 sweep configs/sweeps/expansion_width.py
    mnv2 sweep configs/sweeps/expansion_width.py --report

`model.expansion` sets t of stages 2-7 (the first stage keeps t=1, as in the paper); per-stage ratios go in
`model.stage_expansion` (seven values), e.g. a grid over `"model.stage_expansion": [(1, 4, 4, 6, 6, 6, 6), ...]`.
The quickstart recipe for one epoch, two seeds; one line per expansion in the multiply-add plot.
Results: docs/ablations.md.
"""


def get_sweep():
    return {
        "config": "configs/quickstart.py:epochs=1",
        "grid": {"model.expansion": [2, 4, 6, 8], "model.width": [0.35, 0.75]},
        "seeds": [0, 1],
        "report": {"lines": "model.expansion"},
    }
