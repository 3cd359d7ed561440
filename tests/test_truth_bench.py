"""Real-truth benchmark (benchmark --truth) on a small MERSCOPE bundle written here."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_diffst.io import read
from napari_diffst.truth_bench import (crps_coverage, run_truth_benchmark, split_half_log_ceiling, stripes,
                                       truth_grid, validate_truth_result)


def _bundle(root, rng, n=6000, w=200.0, h=160.0):
    import tifffile

    root.mkdir()
    # two genes with spatial structure, one uniform
    x = rng.uniform(0, w, n)
    y = rng.uniform(0, h, n)
    p = np.c_[np.sin(x / 20) + 1.2, np.cos(y / 15) + 1.2, np.full(n, 1.0)]
    g = np.array(["GeneA", "GeneB", "GeneC"])[[rng.choice(3, p=pi / pi.sum()) for pi in p]]
    pd.DataFrame({"global_x": x, "global_y": y, "global_z": 0, "gene": g}).to_csv(root / "detected_transcripts.csv",
                                                                                 index=False)
    (root / "images").mkdir()
    np.savetxt(root / "images" / "micron_to_mosaic_pixel_transform.csv", np.diag([1.0, 1.0, 1.0]))
    img = rng.uniform(20, 60, (int(h), int(w))).astype(np.uint8)  # dark fluorescence, tissue everywhere
    tifffile.imwrite(root / "images" / "mosaic_DAPI_z0.tif", img)
    return root


def test_truth_grid_lr_is_exact_sum_of_hr(tmp_path):
    s = read(_bundle(tmp_path / "r", np.random.default_rng(0)))
    g = truth_grid(s, 40.0, 4)
    assert g.lr_shape == (4, 5) and g.hr_shape == (16, 20)
    H, W = g.hr_shape
    hr = g.hr_counts.toarray().reshape(H, W, -1)
    lr = g.lr_counts.toarray().reshape(4, 5, -1)
    np.testing.assert_array_equal(hr.reshape(4, 4, 5, 4, -1).sum(axis=(1, 3)), lr)
    assert int(g.hr_counts.sum()) == len(s.molecules)  # the grid covers the whole 200 × 160 µm image


@pytest.mark.slow
def test_truth_benchmark_both_settings(tmp_path):
    s = read(_bundle(tmp_path / "r", np.random.default_rng(1)))
    for selfsup in (False, True):
        res = run_truth_benchmark([s], lr_um=40.0, scales=[2], folds=2, n_genes=3, methods="nearest,bicubic,diffst",
                                  budget="tiny", seed=0, device="cpu", self_supervised=selfsup, quiet=True)
        assert validate_truth_result(res) == []
        sec = res["sections"][f"{s.name}@2x"]
        assert sec["n_spots"] > 0 and 0 < sec["ceiling_pcc"] <= 1
        assert set(sec["methods"]) == {"nearest", "bicubic", "diffst"}
        d = sec["methods"]["diffst"]
        assert d["crps"] >= 0 and 0 <= d["coverage90"] <= 1
        assert sec["methods"]["nearest"]["detail_pcc"] == pytest.approx(0.0, abs=0.05)
        assert res["meta"]["setting"] == ("self-supervised" if selfsup else "supervised")


def test_helpers():
    assert stripes(10, 2) == [(0, 5), (5, 10)]
    # a perfect predictor with no spread: CRPS = mean |x - y| = 0, coverage 1
    t = np.random.default_rng(0).random((2, 4, 4))
    crps, cov = crps_coverage(np.stack([t, t]), t, np.ones((4, 4), bool))
    assert crps == pytest.approx(0.0) and cov == 1.0
    c = np.random.default_rng(0).poisson(20, (2, 10, 10))
    ceil, per = split_half_log_ceiling(c, np.ones((10, 10), bool))
    assert per.shape == (2,) and 0 <= ceil <= 1
