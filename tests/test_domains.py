"""Spatial domains (napari_diffst.domains): known clusters, seeds, masks, ARI/NMI by hand, AnnData export."""
from __future__ import annotations

import math

import numpy as np
import pytest

from napari_diffst.domains import (adjusted_rand_index, compare_domains, compute_domains, contingency, domain_colours,
                                   domain_legend, domains_to_anndata, kmeans, lr_domains, normalized_mutual_info,
                                   pca, spot_domains, sr_domains, upsample_labels)


def two_region_maps(H=40, W=48, G=5, noise=0.3, seed=0):
    """A left/right two-region map inside an elliptical tissue mask; genes 0, 1 mark the regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    mask = ((yy - H / 2) / (0.45 * H)) ** 2 + ((xx - W / 2) / (0.45 * W)) ** 2 < 1
    region = (xx >= W // 2).astype(int) + 1  # 1 left, 2 right
    maps = rng.normal(0, noise, (G, H, W))
    maps[0] += 2.0 * (region == 1)
    maps[1] += 2.0 * (region == 2)
    maps[:, ~mask] = 0.0
    return maps, mask, np.where(mask, region, 0)


# ------------------------------------------------------------------------------------ agreement by hand
def test_ari_nmi_hand_computed():
    # b splits a's second cluster: contingency [[2,0,0],[0,1,1]]; Σ C(n_ij,2) = 1, rows 2, cols 1, C(4,2) = 6
    # ARI = (1 − 2·1/6) / (1.5 − 1/3) = 4/7; MI = H(a) = ln 2, H(b) = 1.5 ln 2 → NMI = ln2 / 1.25 ln2 = 0.8
    a, b = [0, 0, 1, 1], [0, 0, 1, 2]
    assert adjusted_rand_index(a, b) == pytest.approx(4 / 7)
    assert normalized_mutual_info(a, b) == pytest.approx(0.8)
    # crossing partitions: ARI = (0 − 2/3) / (2 − 2/3) = −0.5; independent → NMI 0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # [[2,1,0],[0,1,2]]: Σ = 2, rows 6, cols 3, C(6,2) = 15 → ARI = (2 − 1.2) / (4.5 − 1.2) = 0.2424…
    a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(a, b) == pytest.approx(0.8 / 3.3)
    # MI = (2/3) ln 2, H(a) = ln 2, H(b) = ln 3 → NMI = (4/3) ln 2 / ln 6
    assert normalized_mutual_info(a, b) == pytest.approx(4 / 3 * math.log(2) / math.log(6))
    # invariant to renaming, symmetric, identical → 1
    assert adjusted_rand_index([5, 5, 9, 9, 7], [1, 1, 0, 0, 2]) == pytest.approx(1.0)
    assert normalized_mutual_info([5, 5, 9, 9, 7], [1, 1, 0, 0, 2]) == pytest.approx(1.0)
    assert adjusted_rand_index(b, a) == pytest.approx(adjusted_rand_index(a, b))
    assert adjusted_rand_index([1, 1, 1], [2, 2, 2]) == 1.0 and normalized_mutual_info([1, 1, 1], [2, 2, 2]) == 1.0
    np.testing.assert_array_equal(contingency([0, 0, 1, 1], [0, 0, 1, 2]), [[2, 0, 0], [0, 1, 1]])


def test_ari_matches_permutation_formula_on_random_labelings():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, 60), rng.integers(0, 3, 60)
    # brute force over pairs: the Rand index's pair counts, then the adjustment
    same_a = a[:, None] == a[None]
    same_b = b[:, None] == b[None]
    iu = np.triu_indices(60, 1)
    n11 = np.sum(same_a[iu] & same_b[iu])
    pa, pb, tot = same_a[iu].sum(), same_b[iu].sum(), len(iu[0])
    exp = pa * pb / tot
    want = (n11 - exp) / (0.5 * (pa + pb) - exp)
    assert adjusted_rand_index(a, b) == pytest.approx(want)


def test_compare_domains_upsamples_lr_and_ignores_unlabelled():
    lr = np.array([[1, 2], [2, 0]])
    sr = upsample_labels(np.array([[3, 1], [1, 2]]), 2)
    assert sr.shape == (4, 4)
    out = compare_domains(sr, lr, 2)
    assert out["n_pixels"] == 12 and out["ari"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0)
    sr2 = sr.copy()
    sr2[0, 0] = 0  # unlabelled SR pixel: not counted
    assert compare_domains(sr2, lr, 2)["n_pixels"] == 11
    with pytest.raises(ValueError, match="do not match"):
        compare_domains(np.zeros((5, 5), int), lr, 2)


# ------------------------------------------------------------------------------------ clustering
def test_kmeans_recovers_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [6, 0], [0, 6]], float)
    truth = np.repeat(np.arange(3), 50)
    X = centres[truth] + rng.normal(0, 0.5, (150, 2))
    lab, C, inertia = kmeans(X, 3, seed=1)
    assert adjusted_rand_index(lab, truth) == pytest.approx(1.0)
    lab2, C2, inertia2 = kmeans(X, 3, seed=1)
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_array_equal(C, C2)
    assert inertia == inertia2 and inertia < 150 * 2 * 0.5 ** 2 * 1.5
    with pytest.raises(ValueError):
        kmeans(X[:2], 3)


def test_pca_is_deterministic_and_ordered():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1])
    S, V, evr = pca(X, 3)
    assert S.shape == (200, 3) and V.shape == (6, 3)
    assert np.all(np.diff(evr) <= 0) and evr[0] > 0.6
    np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-10)
    assert np.all(V[np.argmax(np.abs(V), 0), range(3)] > 0)  # sign convention


def test_two_region_map_recovered_ari_one():
    maps, mask, truth = two_region_maps()
    res = compute_domains(maps, mask, k=2, seed=0)
    assert res.labels.shape == mask.shape and res.labels.dtype == np.int32 and res.k == 2
    assert set(np.unique(res.labels)) == {0, 1, 2}
    assert adjusted_rand_index(res.labels[mask], truth[mask]) == pytest.approx(1.0)
    assert normalized_mutual_info(res.labels[mask], truth[mask]) == pytest.approx(1.0)
    # domain 1 is the larger one
    assert res.sizes[0] >= res.sizes[1] and res.sizes.sum() == mask.sum()
    # smoothing keeps it (and cleans up noisier maps)
    noisy, _, _ = two_region_maps(noise=1.2, seed=2)
    raw = compute_domains(noisy, mask, k=2, seed=0)
    sm = compute_domains(noisy, mask, k=2, seed=0, smooth_sigma=2.0)
    a_raw = adjusted_rand_index(raw.labels[mask], truth[mask])
    a_sm = adjusted_rand_index(sm.labels[mask], truth[mask])
    assert a_sm > 0.9 and a_sm >= a_raw


def test_domains_deterministic_with_seed():
    maps, mask, _ = two_region_maps(G=8, noise=1.0, seed=5)
    a = compute_domains(maps, mask, k=4, seed=7)
    b = compute_domains(maps, mask, k=4, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.inertia == b.inertia
    # the subsampled fit is seeded too
    c = compute_domains(maps, mask, k=4, seed=7, max_fit=300)
    d = compute_domains(maps, mask, k=4, seed=7, max_fit=300)
    np.testing.assert_array_equal(c.labels, d.labels)


def test_masks_respected_and_nan_pixels_excluded():
    maps, mask, truth = two_region_maps()
    maps = maps.copy()
    maps[:, ~mask] = 100.0  # off-tissue values must not influence anything
    maps[2, 20, 10] = np.nan  # a non-finite tissue pixel gets no domain
    res = compute_domains(maps, mask, k=2, seed=0)
    assert np.all(res.labels[~mask] == 0)
    assert res.labels[20, 10] == 0
    keep = mask.copy()
    keep[20, 10] = False
    assert np.all(res.labels[keep] > 0)
    assert adjusted_rand_index(res.labels[keep], truth[keep]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask"):
        compute_domains(maps, mask[:-1], k=2)
    with pytest.raises(ValueError, match="too few"):
        compute_domains(maps, np.zeros_like(mask), k=2)


def test_histology_features_can_carry_the_domains():
    # genes are pure noise; the region is only in the "histology" block
    maps, mask, truth = two_region_maps(noise=1.0)
    rng = np.random.default_rng(9)
    noise_maps = rng.normal(0, 1, maps.shape)
    hist = np.stack([(truth == 1) * 3.0 + rng.normal(0, 0.2, mask.shape), rng.normal(0, 0.2, mask.shape)])
    without = compute_domains(noise_maps, mask, k=2, seed=0)
    with_h = compute_domains(noise_maps, mask, k=2, seed=0, histology=hist, hist_weight=3.0)
    assert adjusted_rand_index(with_h.labels[mask], truth[mask]) > 0.95
    assert adjusted_rand_index(without.labels[mask], truth[mask]) < 0.2
    assert with_h.params["histology"] and not without.params["histology"]


def test_leiden_is_optional():
    from napari_diffst.domains import has_leiden

    maps, mask, truth = two_region_maps()
    if has_leiden():
        res = compute_domains(maps, mask, method="leiden", seed=0)
        assert res.k >= 2 and np.all(res.labels[~mask] == 0)
    else:
        with pytest.raises(ImportError, match="leidenalg"):
            compute_domains(maps, mask, method="leiden")
    with pytest.raises(ValueError, match="unknown method"):
        compute_domains(maps, mask, method="dbscan")


# ------------------------------------------------------------------------------------ legend / spots / AnnData
def test_legend_top_genes_and_colours():
    maps, mask, truth = two_region_maps()
    leg = domain_legend(truth, maps, ["left", "right", "n1", "n2", "n3"], n_top=2)
    assert [e["domain"] for e in leg] == [1, 2]
    assert leg[0]["top_genes"][0][0] == "left" and leg[1]["top_genes"][0][0] == "right"
    assert leg[0]["top_genes"][0][1] > 0.5
    assert sum(e["fraction"] for e in leg) == pytest.approx(1.0)
    assert [e["colour"] for e in leg] == domain_colours(2)
    assert len(set(domain_colours(12))) == 12 and domain_colours(13)[12] == domain_colours(1)[0]


def test_spot_domains_majority():
    labels = np.array([[1, 1, 2, 0], [1, 2, 2, 3]])
    idx = np.array([[0, 0, 1, 1], [0, 1, 1, 2]])
    np.testing.assert_array_equal(spot_domains(labels, idx, 4), [1, 2, 3, 0])
    # ties go to the lower domain; −1 pixels belong to no spot
    np.testing.assert_array_equal(spot_domains(np.array([[1, 2, 2]]), np.array([[0, 0, -1]]), 1), [1])


@pytest.fixture(scope="module")
def synth():
    from napari_diffst.baselines import Bicubic
    from napari_diffst.pipeline import load_data, make_fields

    smp = load_data("synthetic:0")
    genes = list(smp.hr_truth["genes"])[:12]
    fld = make_fields([smp], genes, 2, mode="truth")[0][0]
    return smp, fld, Bicubic().predict(fld)


def test_sr_and_lr_domains_on_synthetic_and_anndata_export(synth):
    import anndata as ad
    import pandas as pd

    smp, fld, sr = synth
    res = sr_domains(fld, sr, k=4, seed=0)
    lr = lr_domains(fld, k=4, seed=0)
    assert res.labels.shape == fld.hr_shape and lr.labels.shape == fld.lr.shape[1:]
    assert np.all(res.labels[~fld.hr_mask] == 0) and np.all(lr.labels[~fld.lr_mask] == 0)
    agree = compare_domains(res.labels, lr.labels, fld.scale)
    assert 0.3 < agree["ari"] <= 1 and 0.3 < agree["nmi"] <= 1
    with_h = sr_domains(fld, sr, k=4, seed=0, include_histology=True)
    assert with_h.params["histology"] and with_h.labels.shape == fld.hr_shape
    lr_h = lr_domains(fld, k=4, seed=0, include_histology=True)
    assert lr_h.labels.shape == fld.lr.shape[1:]

    adata = smp.adata.copy()
    leg = domain_legend(res.labels, sr, fld.genes)
    domains_to_anndata(adata, res.labels, fld, legend=leg, lr_labels=lr.labels, info={"ari": agree["ari"]})
    col = adata.obs["diffst_domain"]
    assert isinstance(col.dtype, pd.CategoricalDtype) and list(col.cat.categories) == ["1", "2", "3", "4"]
    in_t = np.asarray(adata.obs["in_tissue"]).astype(bool) if "in_tissue" in adata.obs else np.ones(adata.n_obs, bool)
    assert col[in_t].notna().mean() > 0.95
    assert "diffst_domain_lr" in adata.obs and adata.uns["diffst_domain_colors"] == domain_colours(4)
    u = adata.uns["diffst_domain"]
    np.testing.assert_array_equal(u["labels"], res.labels)
    assert u["k"] == 4 and u["top_genes"]["1"] and u["ari"] == agree["ari"]
    # each spot's obs value is the majority of its HR pixels
    obs_idx = fld.extra["spot_obs_index"]
    j = int(np.argmax(np.bincount(fld.hr_spot_index[fld.hr_spot_index >= 0])))
    pix = res.labels[fld.hr_spot_index == j]
    want = np.bincount(pix[pix > 0]).argmax()
    assert col.iloc[obs_idx[j]] == str(want)
    # the LR column is each spot's own LR-pixel domain (native/truth grids: one spot per LR pixel)
    r, c = np.argwhere(fld.extra["lr_spot_index"] == j)[0]
    assert adata.obs["diffst_domain_lr"].iloc[obs_idx[j]] == str(lr.labels[r, c])
    # round trip through .h5ad (scanpy/squidpy read this)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.h5ad"
        adata.write_h5ad(p)
        back = ad.read_h5ad(p)
    assert list(back.obs["diffst_domain"].astype(str)) == list(col.astype(str))
    np.testing.assert_array_equal(back.uns["diffst_domain"]["labels"], res.labels)
    with pytest.raises(ValueError, match="HR grid"):
        domains_to_anndata(adata, res.labels[:-1], fld)
