"""Which features the cell-level ridge prior should use, scored on the validation section only.

Fits :class:`napari_diffst.prior.CellRidgePrior` on the training sections (ridge strength by leave-one-
section-out CV on them) with either the tissue-level handcrafted features the baselines use
(``baselines.histology_features``, H&E at the field's 4–6 µm/px) or the cell-level features
(``data.cellfeatures``, 1.25 µm/px), and prints PCC / detail-PCC on the validation section against the
cubic LR↑.  The test section is never read.

    python scripts/prior_c5.py --train ../shared/data/her2st/C2 C3 C4 --val C5 [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from napari_diffst import pipeline as P
from napari_diffst.baselines import histology_features
from napari_diffst.benchmark import score_row, select_genes_variance
from napari_diffst.data.cellfeatures import add_cell_features
from napari_diffst.prior import CellRidgePrior


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--n-genes", type=int, default=25)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    base = Path(a.train[0]).parent
    spec = [s if Path(s).exists() else str(base / s) for s in a.train + [a.val]]
    samples = [P.load_data(s, seed=0) for s in spec]
    tr_s, va_s = samples[:-1], samples[-1]
    panel = select_genes_variance(tr_s, a.n_genes, apply_to=[va_s])
    train, gs = P.make_fields(tr_s, panel, a.scale)
    (val,), _ = P.make_fields([va_s], panel, a.scale, gene_scale=gs)
    t0 = time.perf_counter()
    for f, s in zip(train + [val], samples):
        add_cell_features(f, s)
    cell_s = time.perf_counter() - t0

    def tissue(f):
        g = dataclasses.replace(f, extra=dict(f.extra))
        g.extra["cell_features"] = histology_features(f)
        return g

    rows = {"cubic LR↑": score_row(val.lr_upsampled(3) * val.hr_mask, val)[0]}
    for name, fn in (("ridge, tissue-level features", tissue), ("ridge, cell-level features", lambda f: f)):
        pr = CellRidgePrior().fit([fn(f) for f in train])
        sc = score_row(pr.predict(fn(val)) * val.hr_mask, val)[0]
        rows[name] = dict(sc, lam=pr.lam_, cv={str(k): v for k, v in pr.cv_.items()})
    print(f"validation {val.name}, train {', '.join(f.name for f in train)}, {a.scale}×, {len(panel)} genes "
          f"(cell features {cell_s:.1f} s)")
    print(f"{'variant':34s} {'PCC':>7s} {'detail':>7s} {'lam':>5s}")
    for k, r in rows.items():
        print(f"{k:34s} {r['pcc']:7.4f} {r['detail_pcc']:7.4f} {r.get('lam', ''):>5}")
    if a.json:
        Path(a.json).write_text(json.dumps({"val": val.name, "train": [f.name for f in train], "genes": panel,
                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
