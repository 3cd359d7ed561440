#!/usr/bin/env python
"""Spatial domains on her2st sections: SR-map domains vs LR-spot domains (ARI / NMI), JSON + figure.

For each section (default C2..C6 of ../shared/data/her2st) the script builds the 2x ``native`` field
(LR = the observed spots, HR = pitch / 2 = 100 um), super-resolves it and clusters both grids with
:mod:`napari_diffst.domains`:

* SR maps: ``nearest`` (block copy, a reference for the procedure itself), ``bicubic`` (edge-aware
  cubic spline) and, with ``--diffst``, a Diff-ST model trained with the benchmark's quick budget on
  C2-C4 in degrade mode (so C2-C4 are in-sample for that row);
* domains: :func:`napari_diffst.domains.sr_domains` on the SR maps and
  :func:`napari_diffst.domains.lr_domains` on the spots, same procedure (z-score per gene, PCA 10,
  embedding smoothed with sigma = ``--smooth`` LR pitches (0 and 0.5 by default; a sub-pixel sigma
  smooths the coarse LR grid less than the same physical sigma on the HR grid), seeded k-means++ with
  ``--n-init`` restarts), for every ``--k``; genes only and, as a second variant, genes + histology
  features on both grids;
* noise floor: the LR-spot domains are re-clustered with ``--stability-seeds`` other seeds, and the
  mean ARI against ``--seed`` is reported (``lr_seed_stability_ari``): on ~200 spots k-means has
  several near-equal optima;
* agreement: ARI and NMI over in-tissue HR pixels, LR labels upsampled by nearest
  (:func:`napari_diffst.domains.compare_domains`).

Gene panel: the benchmark's (``select_genes_variance`` on C2-C4, 25 genes); gene_scale from C2-C4.

    OMP_NUM_THREADS=1 python scripts/domains_her2st.py --data ../shared/data/her2st \\
        --out docs/images/domains_her2st.json --fig docs/images/domains_her2st.png [--diffst]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def match_labels(labels: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Renumber ``labels`` to best agree with ``ref`` (Hungarian on the overlap; display only)."""
    from scipy.optimize import linear_sum_assignment

    k = int(max(labels.max(), ref.max()))
    both = (labels > 0) & (ref > 0)
    C = np.zeros((k + 1, k + 1))
    np.add.at(C, (labels[both], ref[both]), 1)
    r, c = linear_sum_assignment(-C[1:, 1:])
    new = np.arange(k + 1)
    new[r + 1] = c + 1
    return np.where(labels > 0, new[labels], 0)


def figure(rows, out: Path, k: int, smooth: float = 0.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from napari_diffst.domains import domain_colours, upsample_labels

    cols = ["H&E"] + [c for c in ("LR spots", "SR nearest", "SR bicubic", "SR diffst") if c in rows[0]["maps"]]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.2 * len(cols), 2.1 * len(rows)), squeeze=False)
    cmap = ListedColormap(["#ffffff"] + domain_colours(k))
    for i, r in enumerate(rows):
        fld = r["field"]
        he = np.clip(fld.he.transpose(1, 2, 0), 0, 1)
        H, W = fld.hr_shape
        ref = upsample_labels(r["maps"]["LR spots"], fld.scale)
        for j, c in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(he, extent=(0, W, H, 0))
            if c != "H&E":
                lab = r["maps"][c]
                lab = upsample_labels(lab, fld.scale) if lab.shape != (H, W) else lab
                lab = lab if c == "LR spots" else match_labels(lab, ref)
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=k, alpha=0.75,
                          extent=(0, W, H, 0), interpolation="nearest")
                if c != "LR spots":
                    m = r["scores"][c.split()[-1]]
                    ax.set_xlabel(f"ARI {m['ari']:.2f} · NMI {m['nmi']:.2f}", fontsize=7)
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(r["section"], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"her2st, 2x native grid, k = {k}, smoothing {smooth:g} LR px: domains of SR maps vs LR spots "
                 "(genes only; SR colours matched to LR)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/her2st")
    ap.add_argument("--sections", default="C2,C3,C4,C5,C6")
    ap.add_argument("--train", default="C2,C3,C4", help="sections for the gene panel, gene_scale and --diffst")
    ap.add_argument("--k", default="4,6")
    ap.add_argument("--n-genes", type=int, default=25)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=50, help="k-means++ restarts (the API default is 10)")
    ap.add_argument("--stability-seeds", type=int, default=3,
                    help="extra k-means seeds on the LR spots: mean ARI vs --seed = the noise floor")
    ap.add_argument("--diffst", action="store_true", help="also train Diff-ST (quick budget) on --train")
    ap.add_argument("--device", default="cpu", help="device of the --diffst model (cpu, cuda, auto)")
    ap.add_argument("--out", default="docs/images/domains_her2st.json")
    ap.add_argument("--fig", default="docs/images/domains_her2st.png")
    ap.add_argument("--fig-k", type=int, default=6)
    ap.add_argument("--smooth", default="0,0.5", help="embedding smoothing sigmas (LR pitches) to run")
    ap.add_argument("--fig-smooth", type=float, default=0.0)
    a = ap.parse_args(argv)

    from napari_diffst.baselines import Bicubic, Nearest
    from napari_diffst.benchmark import select_genes_variance
    from napari_diffst.domains import adjusted_rand_index, compare_domains, lr_domains, sr_domains
    from napari_diffst.pipeline import load_data, make_fields

    t_start = time.time()
    base = Path(a.data)
    names = a.sections.split(",")
    train_names = a.train.split(",")
    ks = [int(x) for x in a.k.split(",")]
    smooths = [float(x) for x in a.smooth.split(",")]
    samples = {n: load_data(base / n) for n in sorted(set(names) | set(train_names))}
    train = [samples[n] for n in train_names]
    genes = select_genes_variance(train, a.n_genes, apply_to=[samples[n] for n in names])
    _, gene_scale = make_fields(train, genes, a.scale, mode="degrade")
    methods = {"nearest": Nearest(), "bicubic": Bicubic()}
    he_per_hr = None
    meta = {}
    if a.diffst:
        import torch

        from napari_diffst.benchmark import make_method

        torch.manual_seed(a.seed)
        tf, _ = make_fields(train, genes, a.scale, mode="degrade", gene_scale=gene_scale)
        dm = make_method("diffst", device=a.device, verbose=True)
        t0 = time.time()
        dm.fit(tf, seed=a.seed, budget="quick")
        meta["diffst_train_seconds"] = round(time.time() - t0, 1)
        meta["diffst_steps"] = int(getattr(dm.trainer, "step", -1))
        he_per_hr = tf[0].he_per_hr
        methods["diffst"] = dm
        print(f"diffst trained in {meta['diffst_train_seconds']} s ({meta['diffst_steps']} steps)", file=sys.stderr)
    doc = {"genes": genes, "scale": a.scale, "ks": ks, "seed": a.seed, "mode": "native",
           "procedure": f"z-score per gene in tissue, PCA 10, embedding smoothed sigma smooth_lr_px LR px, k-means++ "
                        f"({a.n_init} inits); LR labels upsampled by nearest; ARI/NMI over in-tissue HR pixels; "
                        "lr_seed_stability_ari: mean ARI of the LR-spot domains between --seed and other seeds",
           "smooth_lr_px": smooths, "n_init": a.n_init,
           "sections": {}, "records": [], "lr_seed_stability": []}
    rows = []
    for n in names:
        fld = make_fields([samples[n]], genes, a.scale, mode="native", gene_scale=gene_scale,
                          he_per_hr=he_per_hr)[0][0]
        preds, secs = {}, {}
        for m, meth in methods.items():
            t0 = time.time()
            preds[m] = meth.predict(fld)
            secs[m] = round(time.time() - t0, 2)
        doc["sections"][n] = {"n_spots": int(fld.lr_mask.sum()), "hr_pixels": int(fld.hr_mask.sum()),
                              "predict_seconds": secs}
        for k in ks:
            for sm in smooths:
                for hist in (False, True):
                    kw = dict(include_histology=hist, n_init=a.n_init, smooth_lr_px=sm)
                    feats = "genes+histology" if hist else "genes"
                    lr = lr_domains(fld, k, seed=a.seed, **kw)
                    base_rec = {"section": n, "k": k, "smooth_lr_px": sm, "features": feats}
                    if a.stability_seeds:
                        other = [lr_domains(fld, k, seed=a.seed + 1 + i, **kw).labels
                                 for i in range(a.stability_seeds)]
                        stab = float(np.mean([adjusted_rand_index(lr.labels[fld.lr_mask], o[fld.lr_mask])
                                              for o in other]))
                        doc["lr_seed_stability"].append({**base_rec, "ari": round(stab, 4)})
                    maps, scores = {"LR spots": lr.labels}, {}
                    for m, p in preds.items():
                        sr = sr_domains(fld, p, k, seed=a.seed, **kw)
                        c = compare_domains(sr.labels, lr.labels, fld.scale)
                        scores[m] = {"ari": round(c["ari"], 4), "nmi": round(c["nmi"], 4)}
                        doc["records"].append({**base_rec, "method": m, **scores[m], "n_pixels": c["n_pixels"]})
                        maps[f"SR {m}"] = sr.labels
                    print(f"{n} k={k} smooth={sm} {feats}: " + (f"LR seed-stability ARI {stab:.3f}; "
                                                                 if a.stability_seeds else "")
                          + ", ".join(f"{m} ARI {v['ari']:.3f} NMI {v['nmi']:.3f}" for m, v in scores.items()))
                    if k == a.fig_k and sm == a.fig_smooth and not hist:
                        rows.append({"section": n, "field": fld, "maps": maps, "scores": scores})
    doc["meta"] = {"seconds": round(time.time() - t_start, 1), "python": platform.python_version(),
                   "machine": platform.processor() or platform.machine(), "train": train_names, **meta,
                   "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    if rows and a.fig:
        figure(rows, Path(a.fig), a.fig_k, a.fig_smooth)
    print(f"wrote {out}" + (f" and {a.fig}" if rows and a.fig else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
