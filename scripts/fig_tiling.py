#!/usr/bin/env python
"""Seams of tiled whole-slide sampling: hard-cut tiles with independent noise vs the shipped tiling
(overlapping windows, linear-ramp blending, one noise field locked to slide positions).

Trains a small Diff-ST on a synthetic section for ``--train-seconds`` (or loads ``--checkpoint``), then
super-resolves another synthetic section at ``--scale`` three ways — untiled (one field), naive tiles
(overlap 0, per-tile noise) and the shipped tiling — and writes a figure of one gene with the tile grid
drawn over it plus the seam ratio of each (:func:`napari_diffst.tiling.seam_ratio`: mean jump across tile
borders ÷ mean jump elsewhere; 1 = no seam). With ``--napari`` it also opens the shipped result's OME-Zarr in
napari over the H&E and saves a canvas screenshot (needs a display, e.g. ``xvfb-run -a``).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/fig_tiling.py --out docs/images/tiling_seams.png \\
        --napari docs/images/tiling_napari.png --json docs/tiling_seams.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--napari", default=None, help="also save a napari canvas screenshot here")
    ap.add_argument("--json", default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--train-seconds", type=float, default=120.0)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--size-um", type=float, default=3000.0)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gene", default="ERBB2")
    a = ap.parse_args(argv)

    import torch

    from napari_diffst import pipeline as P
    from napari_diffst.tiling import SlideSource, plan_tiles, seam_ratio, super_resolve_tiled

    torch.manual_seed(0)
    size = (a.size_um, a.size_um)
    if a.checkpoint:
        from napari_diffst._cli_engine import _load_ckpt

        model, _, genes, scale, gs = _load_ckpt(a.checkpoint, "cpu")
    else:
        train = P.load_data("synthetic:1", size_um=size, technology="visium")
        genes = P.choose_genes([train], n_genes=8)
        if a.gene not in genes:
            genes = [a.gene] + genes[:-1]
        fields, gs = P.make_fields([train], genes, a.scale)
        tr = P.make_trainer(fields, budget="quick", steps=100000, seed=0, device="cpu", train_samples=[train],
                            time_limit_s=a.train_seconds, lr=5e-4)
        for _ in tr.iter_train():
            pass
        model, scale = tr.ema, a.scale
        print(f"trained {tr.step} steps in {a.train_seconds:.0f} s", file=sys.stderr)
    test = P.load_data("synthetic:4", size_um=size, technology="visium")
    k = int(model.config["he_per_hr"])
    src = SlideSource.from_sample(test, genes, scale, gene_scale=gs, he_per_hr=k)
    fld = P.make_fields([test], genes, scale, mode="native", gene_scale=gs, he_per_hr=k)[0][0]
    g = genes.index(a.gene) if a.gene in genes else 0
    runs = {}
    t0 = time.perf_counter()
    whole = P.super_resolve(model, fld, steps=a.steps, n_samples=1, seed=0).mean
    runs["untiled"] = (whole, None, time.perf_counter() - t0)
    for name, ov, noise in (("naive tiles", 0, "tile"), ("shipped tiling", a.overlap, "position")):
        t0 = time.perf_counter()
        r = super_resolve_tiled(model, src, tile=a.tile, overlap=ov, steps=a.steps, n_samples=1, seed=0,
                                noise=noise, batch_tiles=4)
        runs[name] = (r.mean, plan_tiles(src.hr_shape, a.tile, ov, mask=src.hr_mask,
                                         multiple=model.pad_multiple), time.perf_counter() - t0)
    mask = src.hr_mask
    ref_plan = runs["shipped tiling"][1]
    report = {"gene": genes[g], "scale": scale, "hr_shape": list(src.hr_shape), "tile": a.tile,
              "overlap": a.overlap, "steps": a.steps, "runs": {}}
    for name, (m, plan, secs) in runs.items():
        pl = plan or ref_plan
        report["runs"][name] = {"seam_ratio": round(seam_ratio(m, pl, mask), 3), "seconds": round(secs, 1),
                                "grid": "own" if plan else "shipped tiling's (reference)"}
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    v = whole[g][mask]
    lo, hi = np.percentile(v, [1, 99])
    for ax, (name, (m, plan, secs)) in zip(axes, runs.items()):
        img = np.where(mask, m[g], np.nan)
        ax.imshow(img, cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
        pl = plan or ref_plan
        for s0 in pl.row_starts[1:]:
            ax.axhline(s0 - 0.5, color="cyan", lw=0.4, alpha=0.5)
        for s0 in pl.col_starts[1:]:
            ax.axvline(s0 - 0.5, color="cyan", lw=0.4, alpha=0.5)
        sr = report["runs"][name]["seam_ratio"]
        ax.set_title(f"{name}: seam ratio {sr:.2f}", fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"SYNTHETIC {genes[g]} at {scale}× ({src.hr_shape[0]}×{src.hr_shape[1]} HR px), tiles of "
                 f"{a.tile} px (cyan: window starts), {a.steps} respaced steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")

    if a.napari:
        import napari

        from napari_diffst.io.writers import read_maps
        from napari_diffst.layer_data import histology_layer_data

        with tempfile.TemporaryDirectory() as tmp:
            zp = Path(tmp) / "tiled.ome.zarr"
            super_resolve_tiled(model, src, tile=a.tile, overlap=a.overlap, steps=a.steps, n_samples=1, seed=0,
                                out=zp)
            mf = read_maps(zp)
            viewer = napari.Viewer(show=True)
            data, kw, _ = histology_layer_data(test)
            viewer.add_image(data, **kw)
            gmap = mf.maps[g]
            lo, hi = np.nanpercentile(gmap, [1, 99])
            viewer.add_image(gmap, name=f"{genes[g]} (tiled, log1p CP10k)", scale=(mf.um_per_px,) * 2,
                             translate=mf.origin_um, units=("um", "um"), colormap="magma", blending="translucent", opacity=0.75,
                             contrast_limits=(float(lo), float(hi)))
            viewer.reset_view()
            napari.qt.get_qapp().processEvents()
            viewer.screenshot(a.napari, canvas_only=True)
            viewer.close()
        print(f"wrote {a.napari}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
