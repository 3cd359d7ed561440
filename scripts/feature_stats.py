"""Scale consistency of the cell-level features (issue 13): per her2st section, the per-feature mean and SD the
prior sees at training (degrade pairs: one 200 µm spot per HR pixel, over the in-tissue spots) against those it
sees at native prediction (pitch / s per HR pixel, over the tissue at HR resolution), with the fixed physical
windows the method uses (``DiffST.feature_windows``) and with the HR pixel's own windows (before).

    OMP_NUM_THREADS=1 python3 scripts/feature_stats.py --sections C2 C3 C4 C5 C6 --scales 2 4 5 8 \\
        --out docs/bench/feature_stats_her2st.json

A feature is "within 10 %" when its native mean is within 0.10 training SD of the training mean and its native SD
within 10 % of the training SD.  Nothing is fitted: no genes, no model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_diffst import pipeline as P  # noqa: E402
from napari_diffst.data.cellfeatures import add_cell_features  # noqa: E402
from napari_diffst.data.grids import display_mask, make_field  # noqa: E402
from napari_diffst.method import DiffST  # noqa: E402


def _stats(F, mask):
    X = np.asarray(F, np.float64)[:, mask]
    return X.mean(axis=1), X.std(axis=1)


def compare(train, native) -> dict:
    (mu_t, sd_t), (mu_n, sd_n) = train, native
    ok = sd_t > 1e-9
    shift = np.abs(mu_n - mu_t)[ok] / sd_t[ok]
    ratio = sd_n[ok] / sd_t[ok]
    within = (shift <= 0.10) & (np.abs(ratio - 1) <= 0.10)
    return {"within_10pct": int(within.sum()), "n_features": int(ok.sum()),
            "max_mean_shift_sd": round(float(shift.max()), 4), "sd_ratio_min": round(float(ratio.min()), 4),
            "sd_ratio_max": round(float(ratio.max()), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    ap.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--scales", nargs="+", type=int, default=[2, 4, 5, 8])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows, t_all = {}, time.perf_counter()
    for name in a.sections:
        smp = P.load_data(str(Path(a.data) / name))
        genes = P.choose_genes([smp], n_genes=2)  # only to build the grids; features do not depend on genes
        (tr,), gs = P.make_fields([smp], genes, min(a.scales), mode="degrade", he_per_hr=4)
        win = DiffST.feature_windows(tr, smp)
        add_cell_features(tr, smp, windows_um=win)
        fixed_t = _stats(tr.extra["cell_features"], tr.hr_mask)
        add_cell_features(tr, smp, force=True)
        pixel_t = _stats(tr.extra["cell_features"], tr.hr_mask)
        names = list(tr.extra["cell_feature_names"])
        for s in a.scales:
            nat = make_field(smp, genes, s, mode="native", gene_scale=gs, with_he=False, he_per_hr=4)
            tissue = nat.hr_mask & display_mask(smp, nat)
            add_cell_features(nat, smp, windows_um=win)
            fixed = _stats(nat.extra["cell_features"], tissue)
            add_cell_features(nat, smp, force=True)
            pixel = _stats(nat.extra["cell_features"], tissue)
            c_fixed, c_pixel = compare(fixed_t, fixed), compare(pixel_t, pixel)
            ok = fixed_t[1] > 1e-9
            off = [n for n, sh, r in zip(np.asarray(names)[ok], np.abs(fixed[0] - fixed_t[0])[ok] / fixed_t[1][ok],
                                         fixed[1][ok] / fixed_t[1][ok]) if sh > 0.10 or abs(r - 1) > 0.10]
            rows.setdefault(name, {})[str(s)] = {"native_hr_um": round(float(nat.hr_um), 3),
                                                "training_hr_um": round(float(tr.hr_um), 3),
                                                "windows_um": [round(float(w), 3) for w in win],
                                                "fixed_windows": dict(c_fixed, outside_10pct=off),
                                                "hr_pixel_windows": c_pixel}
            print(f"{name} {s}×: fixed windows {c_fixed['within_10pct']}/{c_fixed['n_features']} within 10 % "
                  f"(SD ratio {c_fixed['sd_ratio_min']}–{c_fixed['sd_ratio_max']}, mean shift ≤ "
                  f"{c_fixed['max_mean_shift_sd']} SD; off: {', '.join(off) or 'none'}) | HR-pixel windows "
                  f"{c_pixel['within_10pct']}/{c_pixel['n_features']} (SD ratio {c_pixel['sd_ratio_min']}–"
                  f"{c_pixel['sd_ratio_max']}, mean shift ≤ {c_pixel['max_mean_shift_sd']} SD)", flush=True)
    doc = {"command": " ".join(["scripts/feature_stats.py"] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d"), "total_seconds": round(time.perf_counter() - t_all, 1),
           "criterion": "native mean within 0.10 training SD and native SD within 10 % of the training SD",
           "sections": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
