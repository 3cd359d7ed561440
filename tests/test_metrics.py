"""Known-answer tests of napari_diffst.metrics on hand-built fields."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from napari_diffst.errors import DataFormatError
from napari_diffst.metrics import (block_mean, consistency_per_gene, detail_pcc_per_gene, pearson, pcc_per_gene,
                                   rmse_per_gene, score_field, split_half_reference, ssim_per_gene)
from toy_fields import make_toy_field, masked_block_mean

KEYS = ("pcc", "rmse", "ssim", "detail_pcc", "consistency_pcc")


@pytest.fixture(scope="module")
def field():
    return make_toy_field(0)


def test_perfect_prediction_scores_ideal(field):
    r = score_field(field.hr.copy(), field)
    assert r["pcc"] == pytest.approx(1.0, abs=1e-9)
    assert r["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert r["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert r["detail_pcc"] == pytest.approx(1.0, abs=1e-9)
    assert r["consistency_pcc"] == pytest.approx(1.0, abs=1e-9)
    assert r["consistency_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert r["n_genes"] == field.G
    assert set(KEYS) <= set(r) and r["per_gene"]["gene"] == field.genes
    for k in KEYS:
        assert r["per_gene"][k].shape == (field.G,)
    assert np.isnan(r["split_half"])  # no counts on this field


def test_lr_copy_has_zero_detail_and_full_consistency(field):
    r = score_field(field.lr_upsampled(0), field)
    assert r["detail_pcc"] == 0.0
    assert np.all(r["per_gene"]["detail_pcc"] == 0.0)
    assert r["consistency_pcc"] == pytest.approx(1.0, abs=1e-9)
    assert r["consistency_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < r["pcc"] < 1.0 and r["rmse"] > 0.01 and r["ssim"] < 1.0


def test_affine_prediction_keeps_pcc_but_not_rmse(field):
    pred = 2.5 * field.hr + 0.3
    r = score_field(pred, field)
    assert r["pcc"] == pytest.approx(1.0, abs=1e-9)
    assert r["rmse"] > 0.1
    neg = pcc_per_gene(-field.hr, field.hr, field.hr_mask)
    np.testing.assert_allclose(neg, -1.0, atol=1e-9)


def test_rmse_is_on_truth_minmax_scale(field):
    m = field.hr_mask
    rng = np.ptp(field.hr[:, m], axis=1)
    pred = field.hr + 0.1 * rng[:, None, None]        # shift by 10% of each gene's truth range
    np.testing.assert_allclose(rmse_per_gene(pred, field.hr, m), 0.1, atol=1e-6)
    # pixels outside the mask do not count
    pred2 = field.hr.copy()
    pred2[:, ~m] = 99.0
    np.testing.assert_allclose(rmse_per_gene(pred2, field.hr, m), 0.0, atol=1e-9)
    assert score_field(pred2, field)["pcc"] == pytest.approx(1.0, abs=1e-9)


def test_pearson_matches_numpy_and_constant_is_nan():
    rs = np.random.default_rng(1)
    a, b = rs.random(50), rs.random(50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert np.isnan(pearson(a, np.full(50, 3.0)))
    assert np.isnan(pearson([1.0], [2.0]))


def test_constant_gene_is_nan_and_excluded_from_means(field):
    hr = field.hr.copy()
    hr[1] = 0.4 * field.hr_mask
    lr, _ = masked_block_mean(hr, field.scale, field.hr_mask)
    f = dataclasses.replace(field, hr=hr, lr=lr.astype(np.float32))
    pred = hr + 0.01 * np.random.default_rng(0).standard_normal(hr.shape)
    r = score_field(pred, f)
    for k in ("pcc", "rmse", "ssim", "detail_pcc"):
        assert np.isnan(r["per_gene"][k][1]), k
        assert np.isfinite(r[k])
        assert r[k] == pytest.approx(np.nanmean(r["per_gene"][k]))
    assert r["n_genes"] == f.G - 1


def test_ssim_small_grids_and_noise():
    rs = np.random.default_rng(2)
    yy, xx = np.mgrid[0:33, 0:35]
    t = np.sin(yy / 5.0)[None] + np.cos(xx / 4.0)[None]
    mask = np.ones((33, 35), bool)
    mask[:3] = False
    assert ssim_per_gene(t, t, mask)[0] == pytest.approx(1.0, abs=1e-9)
    noisy = t + 0.3 * rs.standard_normal(t.shape)
    assert 0.0 < ssim_per_gene(noisy, t, mask)[0] < 0.9
    # a 5×6 grid uses win 5; a 2×2 grid is too small (NaN)
    assert np.isfinite(ssim_per_gene(t[:, :5, :6], t[:, :5, :6] + 0.1 * rs.random((1, 5, 6)), mask[3:8, :6])[0])
    assert np.isnan(ssim_per_gene(t[:, :2, :2], t[:, :2, :2], mask[3:5, :2])[0])


def test_detail_pcc_definitions(field):
    up = field.lr_upsampled(0)
    m = field.hr_mask
    np.testing.assert_allclose(detail_pcc_per_gene(field.hr, field.hr, up, m), 1.0, atol=1e-9)
    # opposite detail → −1; half the detail → still 1 (correlation)
    np.testing.assert_allclose(detail_pcc_per_gene(2 * up - field.hr, field.hr, up, m), -1.0, atol=1e-9)
    np.testing.assert_allclose(detail_pcc_per_gene(up + 0.5 * (field.hr - up), field.hr, up, m), 1.0, atol=1e-9)
    # truth equal to its LR copy → nothing to recover → NaN
    assert np.all(np.isnan(detail_pcc_per_gene(field.hr, up, up, m)))


def test_exact_block_mean_sr_is_fully_consistent(field):
    s, m = field.scale, field.hr_mask
    # a wrong SR map whose masked block means equal the LR: add a per-block zero-mean pattern
    rs = np.random.default_rng(3)
    noise = rs.standard_normal(field.hr.shape) * m
    nmean, _ = block_mean(noise, s, m)
    noise = (noise - np.repeat(np.repeat(nmean, s, 1), s, 2)) * m
    pred = field.hr + 0.2 * noise
    pcc, rmse = consistency_per_gene(pred, field.lr, field.lr_mask, m, s)
    np.testing.assert_allclose(pcc, 1.0, atol=1e-9)
    np.testing.assert_allclose(rmse, 0.0, atol=1e-6)
    r = score_field(pred, field)
    assert r["consistency_pcc"] == pytest.approx(1.0, abs=1e-9) and r["pcc"] < 0.99
    # a smoothed map is less consistent
    from scipy.ndimage import gaussian_filter
    blur = np.stack([gaussian_filter(g, 3) for g in field.hr])
    pcc_b, rmse_b = consistency_per_gene(blur, field.lr, field.lr_mask, m, s)
    assert np.all(rmse_b > 1e-3)


def test_block_mean_known_values():
    x = np.arange(16, dtype=float).reshape(1, 4, 4)
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False
    mean, cnt = block_mean(x, 2, mask)
    np.testing.assert_allclose(cnt, [[3, 4], [4, 4]])
    np.testing.assert_allclose(mean[0], [[(1 + 4 + 5) / 3, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]])
    with pytest.raises(DataFormatError):
        block_mean(np.zeros((1, 5, 4)), 2)


def _counts(depth, n=400, G=6, seed=0):
    """Poisson counts at a given depth around a fixed spot × gene expression profile."""
    rs = np.random.default_rng(seed)
    signal = rs.gamma(3.0, 1.0, (1, G)) * rs.lognormal(0.0, 0.7, (n, G))
    p = signal / signal.sum(1, keepdims=True)
    counts = np.random.default_rng(seed + 1).poisson(p * depth)
    return counts, counts.sum(1)


def test_split_half_reference_depth_dependence():
    hi = split_half_reference(*_counts(2_000_000), seed=0)
    lo = split_half_reference(*_counts(300), seed=0)
    assert hi["mean"] > 0.99
    assert lo["mean"] < hi["mean"] - 0.05
    assert np.all(lo["r_half"] < lo["spearman_brown"])  # step-up increases positive r
    np.testing.assert_allclose(lo["spearman_brown"], 2 * lo["r_half"] / (1 + lo["r_half"]))
    np.testing.assert_allclose(lo["ceiling"], np.sqrt(lo["spearman_brown"]))
    # seeded
    again = split_half_reference(*_counts(300), seed=0)
    np.testing.assert_array_equal(again["r_half"], lo["r_half"])
    # an all-zero gene is NaN and left out of the mean
    c, lib = _counts(300)
    c[:, 2] = 0
    r = split_half_reference(c, lib)
    assert np.isnan(r["r_half"][2]) and np.isfinite(r["mean"])


def test_split_half_in_score_field_with_spot_index_and_dataframe(field):
    # one spot per HR pixel under tissue; counts carry an extra gene and a library beyond the panel
    m = field.hr_mask
    idx = -np.ones(m.shape, int)
    idx[m] = np.arange(m.sum())
    rs = np.random.default_rng(5)
    rates = np.expm1(field.hr[:, m].T * 3)       # spots × G
    cols = {g: rs.poisson(rates[:, i] * 200) for i, g in enumerate(field.genes)}
    cols["OTHER"] = rs.poisson(5000, m.sum())
    df = pd.DataFrame(cols)
    f = dataclasses.replace(field, hr_counts=df, hr_spot_index=idx)
    r = score_field(field.hr, f)
    assert 0.5 < r["split_half"] <= 1.0
    assert r["split_half_ceiling"] == pytest.approx(np.nanmean(np.sqrt(r["per_gene"]["split_half"])))
    # sparse counts in gene order + the pipeline's full library sizes give the identical answer
    import scipy.sparse as sp
    f2 = dataclasses.replace(f, hr_counts=sp.csr_matrix(df[field.genes].to_numpy()),
                             extra={"hr_library_size": df.to_numpy().sum(1)})
    np.testing.assert_array_equal(score_field(field.hr, f2)["per_gene"]["split_half"], r["per_gene"]["split_half"])
    # synthetic noise-free truth: no reference
    f3 = dataclasses.replace(f2, extra={"mode": "truth"})
    assert np.isnan(score_field(field.hr, f3)["split_half"])
    with pytest.raises(DataFormatError, match="hr_counts"):
        score_field(field.hr, dataclasses.replace(f, hr_counts=np.zeros((5, 2))))


def test_bad_inputs_raise_clear_errors(field):
    with pytest.raises(DataFormatError, match="shape"):
        score_field(field.hr[:, :-1], field)
    with pytest.raises(DataFormatError, match="no HR truth"):
        score_field(field.hr, dataclasses.replace(field, hr=None))
    bad = field.hr.copy()
    bad[0][field.hr_mask] = np.nan
    with pytest.raises(DataFormatError, match="NaN"):
        score_field(bad, field)
