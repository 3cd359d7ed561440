#!/usr/bin/env python
"""Figure: scanpy's ``sc.pl.spatial`` on a super-resolved her2st section, beside the input spots.

Trains Diff-ST on her2st C2-C4 (2x, degrade pairs; ``--budget``), super-resolves the test section C6
at native resolution (LR = the 200 um spot lattice, HR = 100 um pixels) with ``napari-diffst sample
--out <section>.h5ad``, reads that file with anndata and draws, with scanpy 1.11 and nothing else:

* left: the input section (``read(C6).adata``), ``sc.pl.spatial(adata, color=gene)``;
* right: the super-resolved AnnData, ``sc.pl.spatial(sr, color=gene)`` (no ``spot_size``: the
  scale factors carry the HR pixel size), over the same H&E.

    OMP_NUM_THREADS=1 python scripts/fig_sc_pl_spatial.py --data ../shared/data/her2st \\
        --out docs/images/sc_pl_spatial_her2st.png [--checkpoint runs/fig_ck] [--budget quick]

The checkpoint folder is reused when it already holds a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", default="../shared/data/her2st")
    ap.add_argument("--section", default="C6")
    ap.add_argument("--train", default="C2,C3,C4")
    ap.add_argument("--genes", default="ERBB2,KRT19,CD74,FASN,MUC1,SCD")
    ap.add_argument("--gene", default="ERBB2", help="gene drawn")
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--checkpoint", default="runs/fig_sc_pl_spatial")
    ap.add_argument("--out", default="docs/images/sc_pl_spatial_her2st.png")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc

    from napari_diffst.cli import main as cli
    from napari_diffst.io import read

    data = Path(a.data)
    ck = Path(a.checkpoint)
    t0 = time.time()
    if not any(ck.glob("**/*.pt")):
        args = ["train", "--data", *[str(data / s) for s in a.train.split(",")], "--scale", "2", "--genes", a.genes,
                "--budget", a.budget, "--out", str(ck)]
        if a.train_steps:
            args += ["--steps", str(a.train_steps)]
        if cli(args) != 0:
            return 1
    t1 = time.time()
    h5 = ck / f"{a.section}_sr.h5ad"
    if cli(["sample", "--checkpoint", str(ck), "--data", str(data / a.section), "--steps", str(a.steps),
            "--n-samples", str(a.n_samples), "--out", str(h5)]) != 0:
        return 1
    t2 = time.time()
    sr = ad.read_h5ad(h5)
    inp = read(data / a.section).adata
    sc.pp.normalize_total(inp, target_sum=1e4)
    sc.pp.log1p(inp)
    g = a.gene
    vmax = float(max(inp[:, g].X.max(), sr[:, g].X.max()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    sc.pl.spatial(inp, color=g, ax=axes[0], show=False, vmin=0, vmax=vmax, img_key="hires",
                  title=f"{a.section} input spots: {g} (log1p CP10k)")
    sc.pl.spatial(sr, color=g, ax=axes[1], show=False, vmin=0, vmax=vmax, img_key="hires",
                  title=f"{a.section} Diff-ST 2x (100 um pixels): {g}")
    chk = sr.uns["napari_diffst"].get("self_check", {})
    fig.suptitle(f"sc.pl.spatial on napari-diffst's .h5ad (scanpy {sc.__version__}); "
                 f"SR averaged back to spots vs input: mean r = {chk.get('spot_pcc_mean', float('nan')):.3f}",
                 fontsize=10)
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: {sr.n_obs} SR pixels x {sr.n_vars} genes; train {t1 - t0:.0f} s, sample {t2 - t1:.0f} s; "
          f"self-check {chk.get('spot_pcc')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
