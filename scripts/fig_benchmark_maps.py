#!/usr/bin/env python
"""Figure of one test section's maps from a benchmark run: H&E, HR truth, LR input and every method.

Reads the ``<section>.npz`` written by ``napari-diffst benchmark --save-maps DIR`` and saves a PNG with one
row per gene and one column per map.  Values are shown in log1p(CP10k) (model units × gene_scale) with
**shared colour limits per gene** (the 1st–99th percentile of the truth over in-tissue pixels, so every
panel of a row is directly comparable); pixels outside the tissue are left blank.  Each panel's title
carries that gene's PCC against the truth (computed here from the saved maps, over in-tissue pixels).

    python scripts/fig_benchmark_maps.py --maps /tmp/bench_maps --section C6 \\
        --out docs/images/benchmark_c6_maps.png [--genes SCGB2A2,IGHG1,CD24] [--n-genes 3]

Default genes: the ``--n-genes`` panel genes whose truth varies most over the tissue (variance in
log1p(CP10k)).  Sections from synthetic data are titled SYNTHETIC.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def load_maps(maps: str | Path, section: str | None = None) -> dict:
    p = Path(maps)
    if p.is_dir():
        if section is None:
            files = sorted(p.glob("*.npz"))
            if len(files) != 1:
                raise SystemExit(f"{p}: {len(files)} .npz files; pass --section NAME")
            p = files[0]
        else:
            p = p / f"{section}.npz"
    if not p.is_file():
        raise SystemExit(f"{p}: not found (write it with `napari-diffst benchmark ... --save-maps DIR`)")
    z = np.load(p, allow_pickle=False)
    d = {k: z[k] for k in z.files}
    d["path"] = str(p)
    return d


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def make_figure(d: dict, genes: list[str] | None = None, n_genes: int = 3, panel_in: float = 1.9):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_genes = [str(g) for g in d["genes"]]
    gs = np.asarray(d["gene_scale"], np.float32)[:, None, None]
    truth = np.asarray(d["truth"]) * gs
    hr_mask = np.asarray(d["hr_mask"], bool)
    lr_mask = np.asarray(d["lr_mask"], bool)
    s = int(d["scale"])
    lr = np.asarray(d["lr"]) * gs
    methods = [str(m) for m in d["methods"]]
    preds = {m: np.asarray(d[f"pred_{m}"]) * gs for m in methods}
    if genes:
        low = [g.lower() for g in all_genes]
        missing = [g for g in genes if g.lower() not in low]
        if missing:
            raise SystemExit(f"genes {missing} are not in the benchmark panel: {', '.join(all_genes)}")
        gi = [low.index(g.lower()) for g in genes]
    else:
        var = np.array([truth[g][hr_mask].var() for g in range(len(all_genes))])
        gi = list(np.argsort(-var, kind="stable")[:n_genes])
    H, W = hr_mask.shape
    ext = (0, W, H, 0)
    cols = ["H&E", "truth", "LR input"] + methods
    fig, axes = plt.subplots(len(gi), len(cols), figsize=(panel_in * len(cols), panel_in * len(gi) * H / W + 0.6),
                             squeeze=False, constrained_layout=True)
    cmap = matplotlib.colormaps["magma"].copy()
    cmap.set_bad("#f2f2f2")
    he = np.asarray(d["he"]).transpose(1, 2, 0) if "he" in d else None
    for r, g in enumerate(gi):
        tv = truth[g][hr_mask]
        vmin, vmax = np.percentile(tv, [1, 99]) if tv.size else (0, 1)
        if vmax <= vmin:
            vmax = vmin + 1e-6
        lr_up = np.repeat(np.repeat(np.where(lr_mask, lr[g], np.nan), s, 0), s, 1)
        panels = [None, truth[g], lr_up] + [preds[m][g] for m in methods]
        for c, (name, img) in enumerate(zip(cols, panels)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                if he is not None:
                    ax.imshow(he, extent=ext, interpolation="bilinear")
                ax.set_ylabel(all_genes[g], fontsize=10)
                if r == 0:
                    ax.set_title("H&E", fontsize=9)
                continue
            shown = np.where(hr_mask, img, np.nan) if c != 2 else img
            im = ax.imshow(shown, extent=ext, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            title = name
            if c >= 2:
                title += f"\nPCC {pcc(img[hr_mask], truth[g][hr_mask]):.2f}" if c > 2 else \
                    f"\nPCC {pcc(np.repeat(np.repeat(lr[g], s, 0), s, 1)[hr_mask], truth[g][hr_mask]):.2f}"
            ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=axes[r, -1], fraction=0.046, pad=0.04, label="log1p(CP10k)")
    sec = str(d.get("section", "section"))
    tag = "SYNTHETIC — " if bool(d.get("synthetic", False)) else ""
    fig.suptitle(f"{tag}{sec}: truth, LR input ({s}× coarser) and each method's super-resolved map "
                 f"(HR pixel {float(d['hr_um']):.0f} µm; colour limits shared per gene)", fontsize=10)
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", required=True, help="folder given to --save-maps (or one .npz file)")
    ap.add_argument("--section", default=None, help="test section name (e.g. C6)")
    ap.add_argument("--genes", default=None, help="comma-separated genes of the panel")
    ap.add_argument("--n-genes", type=int, default=3, help="number of genes when --genes is not given")
    ap.add_argument("--out", default="docs/images/benchmark_c6_maps.png")
    ap.add_argument("--dpi", type=int, default=130)
    a = ap.parse_args(argv)
    d = load_maps(a.maps, a.section)
    genes = [g.strip() for g in a.genes.split(",") if g.strip()] if a.genes else None
    fig = make_figure(d, genes, a.n_genes)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=a.dpi)
    print(f"wrote {out} from {d['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
