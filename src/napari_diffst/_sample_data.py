"""npe2 sample data: a seeded synthetic H&E + spatial-transcriptomics section (opens in seconds).

Layers: the H&E image, the spots (Points coloured by a gene) and, hidden, the known HR truth of
that gene in log1p(CP10k) units (the same units as the spots' colours) so super-resolution output
can be compared by eye. Everything is in µm.
"""
from __future__ import annotations

import numpy as np

__all__ = ["make_synthetic_sample", "truth_layer_data"]

#: Default sample: legacy-ST lattice over a 3 mm × 3 mm section at 1 µm/px.
SAMPLE_KWARGS = dict(seed=0, size_um=(3000.0, 3000.0), um_per_px=1.0, technology="legacy_st")
DISPLAY_GENE = "ERBB2"


def truth_layer_data(sample, gene: str, visible: bool = False):
    """An image LayerDataTuple of the HR truth of ``gene`` (log1p CP10k), placed in µm."""
    from .data.synthetic import truth_log1p_cp10k

    t = sample.hr_truth
    g = list(t["genes"]).index(gene)
    hr = float(t["um_per_px"])
    x0, y0 = (float(v) for v in t.get("origin_px", (0.0, 0.0)))
    v = truth_log1p_cp10k(t["maps"])[g]
    # world µm = full-res px × um_per_px (the H&E layer's frame); the truth grid's top-left corner is
    # at origin_px, so HR pixel (0, 0)'s centre is half an HR pixel further (napari's translate)
    translate = (y0 * sample.um_per_px + hr / 2, x0 * sample.um_per_px + hr / 2)
    hi = float(np.percentile(v[v > 0], 99.5)) if (v > 0).any() else 1.0
    return (
        v,
        {
            "name": f"{sample.name} truth {gene}",
            "scale": (hr, hr),
            "translate": translate,
            "units": ("um", "um"),
            "colormap": "magma",
            "contrast_limits": (0.0, max(hi, 1e-6)),
            "opacity": 0.7,
            "visible": visible,
            "metadata": {"diffst_role": "truth", "gene": gene, "genes": [gene], "um_per_px": hr,
                         "units": "log1p(CP10k)"},
        },
        "image",
    )


def make_synthetic_sample() -> list[tuple]:
    """H&E + spots (+ hidden truth of one gene) of :func:`napari_diffst.data.synthetic.make_synthetic`."""
    from .data.synthetic import make_synthetic
    from .layer_data import sample_to_layer_data

    sample = make_synthetic(**SAMPLE_KWARGS)
    gene = DISPLAY_GENE if DISPLAY_GENE in sample.genes else sample.genes[0]
    layers = sample_to_layer_data(sample, gene=gene)
    layers.insert(1, truth_layer_data(sample, gene))
    return layers
