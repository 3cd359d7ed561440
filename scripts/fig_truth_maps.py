"""Figure of the real-truth benchmark's maps (docs/images/truth_maps_10um.png).

    napari-diffst benchmark --truth ../shared/data/merscope_mouse_brain_mini --lr-um 50 --scale 5 --folds 2 \\
        --n-genes 25 --methods all --budget quick --seed 0 --save-maps runs/truth_maps --out /tmp/x.json
    python scripts/fig_truth_maps.py runs/truth_maps/merscope_mouse_brain_mini@5x.npz --genes Slc17a7,Gfap

One row per gene: the DAPI (as the fields saw it), the HR truth (log1p counts per 10 µm square), the LR input
(50 µm, log1p of the mean count per HR square), and each method's held-out map (both folds put together).  All
expression panels of a row share one colour scale (0 to the truth's 99.5th percentile in tissue); squares outside
the tissue mask are grey.  Each title gives that gene's PCC against the truth over the tissue, from the saved maps.
"""
from __future__ import annotations

import argparse

import numpy as np


def _pcc(a, b):
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("maps", help="the .npz that benchmark --truth --save-maps wrote")
    ap.add_argument("--genes", default=None, help="comma list (default: the two most abundant)")
    ap.add_argument("--out", default="docs/images/truth_maps_10um.png")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.load(a.maps)
    genes = [str(g) for g in d["genes"]]
    methods = [str(m) for m in d["methods"]]
    pick = a.genes.split(",") if a.genes else genes[:2]
    s = int(d["scale"])
    hr_um = float(d["hr_um"])
    mask = d["hr_mask"].astype(bool)
    lr_up = np.repeat(np.repeat(d["lr"], s, axis=1), s, axis=2)
    lr_mask_up = np.repeat(np.repeat(d["lr_mask"], s, 0), s, 1)
    he = d["he"].transpose(1, 2, 0)
    cols = ["DAPI", "truth", f"LR ({hr_um * s:g} µm)"] + methods
    fig, axs = plt.subplots(len(pick), len(cols), figsize=(1.9 * len(cols), 2.0 * len(pick) + 0.6), squeeze=False)
    cmap = matplotlib.colormaps["magma"].copy()
    cmap.set_bad("#bbbbbb")
    for r, g in enumerate(pick):
        gi = genes.index(g)
        truth = d["truth"][gi]
        vmax = float(np.percentile(truth[mask], 99.5)) or 1.0
        panels = [("img", he), ("truth", truth), ("lr", lr_up[gi])] + [(m, d[f"pred_{m}"][gi]) for m in methods]
        for c, (kind, arr) in enumerate(panels):
            ax = axs[r, c]
            if kind == "img":
                ax.imshow(he[..., 0], cmap="gray")
                ax.set_title("DAPI" if r == 0 else "", fontsize=9)
                ax.set_ylabel(g, fontsize=11)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            m = mask if kind != "lr" else lr_mask_up
            ax.imshow(np.ma.masked_where(~m, arr), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            title = cols[c] if r == 0 else ""
            if kind != "truth":
                title = (title + "\n" if title else "") + f"PCC {_pcc(arr[mask], truth[mask]):.3f}"
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.suptitle(a.title or f"MERSCOPE region, {hr_um:g} µm HR ({s}×), held-out stripes of 2 folds; colour: "
                 "log1p count per HR square (0 to the truth's p99.5); grey: outside the tissue mask", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
