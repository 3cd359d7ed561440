"""The seeded synthetic sample: determinism, geometry, morphology dependence, Poisson counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from napari_diffst.data import synthetic as S
from napari_diffst.data.sample import Sample, nearest_neighbour_distance

SMALL = dict(size_um=(900.0, 900.0), um_per_px=2.0)


@pytest.fixture(scope="module")
def legacy() -> Sample:
    return S.make_synthetic(seed=3, size_um=(1600.0, 1600.0), um_per_px=2.0)


@pytest.fixture(scope="module")
def visium() -> Sample:
    return S.make_synthetic(seed=11, size_um=(1500.0, 1500.0), um_per_px=2.0, technology="visium")


def test_same_seed_gives_identical_sample():
    a = S.make_synthetic(seed=7, **SMALL)
    b = S.make_synthetic(seed=7, **SMALL)
    c = S.make_synthetic(seed=8, **SMALL)
    ia, ib, ic = (np.asarray(x.image.levels[0]) for x in (a, b, c))
    assert np.array_equal(ia, ib)
    assert np.array_equal(a.counts().toarray(), b.counts().toarray())
    assert np.array_equal(a.hr_truth["maps"], b.hr_truth["maps"])
    assert np.array_equal(a.adata.obsm["spatial"], b.adata.obsm["spatial"])
    assert list(a.adata.obs_names) == list(b.adata.obs_names)
    assert not np.array_equal(ia, ic)
    assert not np.array_equal(a.hr_truth["maps"], c.hr_truth["maps"])


def test_more_genes_do_not_change_image_or_earlier_genes():
    a = S.make_synthetic(seed=2, n_genes=25, **SMALL)
    b = S.make_synthetic(seed=2, n_genes=28, **SMALL)
    assert np.array_equal(np.asarray(a.image.levels[0]), np.asarray(b.image.levels[0]))
    assert np.array_equal(a.hr_truth["maps"], b.hr_truth["maps"][:25])
    assert b.genes[25:] == ["SYN025", "SYN026", "SYN027"]
    assert (b.hr_truth["maps"][25:] >= 0).all()


def test_structure_and_metadata(legacy):
    s = legacy
    img = np.asarray(s.image.levels[0])
    assert img.dtype == np.uint8 and img.shape == (800, 800, 3)
    # white-ish background outside tissue, H&E colours inside (red > green in eosin/pink)
    t = s.hr_truth
    assert t["maps"].shape == (25, 160, 160) and t["maps"].dtype == np.float32
    assert (t["maps"] >= 0).all() and t["um_per_px"] == 10.0
    assert tuple(t["origin_px"]) == (-0.5, -0.5)  # the image's top-left corner (pixel centres at integers)
    assert t["genes"] == s.genes and len(set(s.genes)) == 25
    assert (t["maps"][:, t["tissue"] == 0] == 0).all()
    assert set(np.unique(t["domains"])) >= {0, 1, 2}
    X = s.adata.X
    assert sp.isspmatrix_csr(X) or sp.issparse(X)
    assert np.issubdtype(X.dtype, np.integer)
    assert set(s.adata.obs.columns) >= {"in_tissue", "array_row", "array_col"}
    assert (s.adata.obs["in_tissue"] == 1).all()
    lib = s.library_id
    sf = s.adata.uns["spatial"][lib]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 / 2.0)
    hires = s.adata.uns["spatial"][lib]["images"]["hires"]
    assert hires.shape[0] == round(800 * sf["tissue_hires_scalef"])
    assert s.provenance["technology"] == "synthetic" and s.provenance["seed"] == 3
    assert s.technology == "legacy_st" and s.spot_diameter_um == 100.0 and s.lattice_pitch_um == 200.0
    # µm/px recovered from the 200 µm lattice
    assert s.check_scale() == pytest.approx(2.0, rel=1e-6)
    # square lattice: spot (row i, col j) at the centre of the 200 µm cell (i, j)
    xy_um = (s.adata.obsm["spatial"] + 0.5) * s.um_per_px
    assert np.allclose(xy_um[:, 0], (s.adata.obs["array_col"].to_numpy() + 0.5) * 200)
    assert np.allclose(xy_um[:, 1], (s.adata.obs["array_row"].to_numpy() + 0.5) * 200)


def test_spots_lie_on_tissue(legacy):
    s = legacy
    img = np.asarray(s.image.levels[0]).astype(np.float32)
    tissue_px = img.mean(-1) < 225  # glass renders ~240
    assert 0.25 < tissue_px.mean() < 0.9
    H, W = tissue_px.shape
    yy, xx = np.mgrid[0:H, 0:W]
    r = s.spot_diameter_px / 2
    n_lattice = (1600 // 200) ** 2
    assert 0 < s.n_spots < n_lattice
    cover = []
    for x, y in s.adata.obsm["spatial"]:
        disk = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
        cover.append(tissue_px[disk].mean())
    # (fat renders like glass inside adipocytes, so single spots may look partly empty)
    assert min(cover) > 0.2 and np.mean(cover) > 0.7
    assert (s.adata.obs["tissue_fraction"] >= 0.5).all()


def test_visium_hex_lattice(visium):
    s = visium
    assert s.technology == "visium" and s.spot_diameter_um == 55.0
    assert nearest_neighbour_distance(s.adata.obsm["spatial"]) * s.um_per_px == pytest.approx(100.0)
    r, c = s.adata.obs["array_row"].to_numpy(), s.adata.obs["array_col"].to_numpy()
    assert ((r % 2) == (c % 2)).all()  # Visium's doubled column index
    assert s.n_spots > 80


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_truth_depends_on_morphology(legacy):
    s = legacy
    t = s.hr_truth
    m, genes = t["maps"], t["genes"]
    tis = t["tissue"] > 0.5
    img = np.asarray(s.image.levels[0]).astype(np.float32)
    k = int(t["um_per_px"] / s.um_per_px)
    dark = (255 - img.mean(-1)).reshape(160, k, 160, k).mean((1, 3))  # histology darkness on the HR grid
    pink = (img[..., 0] - img[..., 2]).reshape(160, k, 160, k).mean((1, 3))  # eosin (pink) over haematoxylin
    logm = lambda g: np.log(m[genes.index(g)][tis] + 1e-9)  # noqa: E731
    # immune genes follow nuclear density, tumour genes follow the (dark, purple) tumour nests
    assert _corr(logm("PTPRC"), t["nuclear_density"][tis]) > 0.5
    assert _corr(logm("EPCAM"), dark[tis]) > 0.4
    assert _corr(logm("COL1A1"), pink[tis]) > 0.4  # collagen in the pink stroma
    assert _corr(logm("EPCAM"), pink[tis]) < -0.4
    # the histology-invisible gene is not explained by the image
    # (a smooth random field over a small section can correlate by chance; it must stay well below
    # the morphology-driven genes)
    assert abs(_corr(logm("HIDDEN1"), dark[tis])) < min(0.3, _corr(logm("EPCAM"), dark[tis]) - 0.25)
    # domain contrast: tumour marker ≫ in tumour than in stroma; lymphoid aggregates are nucleus-dense
    dom = t["domains"]
    ep = m[genes.index("EPCAM")]
    assert ep[dom == 2].mean() > 8 * ep[dom == 1].mean()
    nd = t["nuclear_density"]
    if (dom == 3).sum() > 5:
        assert nd[dom == 3].mean() > 2 * nd[dom == 1].mean()


def _brute_force_integral(maps, hr_um, x_um, y_um, r_um, step=0.5):
    """∫_disk λ by point sampling a fine grid (independent of the implementation's sub-sampling)."""
    g = np.arange(-r_um + step / 2, r_um, step)
    X, Y = np.meshgrid(x_um + g, y_um + g)
    inside = (X - x_um) ** 2 + (Y - y_um) ** 2 <= r_um ** 2
    rr = np.floor(Y[inside] / hr_um).astype(int)
    cc = np.floor(X[inside] / hr_um).astype(int)
    ok = (rr >= 0) & (rr < maps.shape[1]) & (cc >= 0) & (cc < maps.shape[2])
    return maps[:, rr[ok], cc[ok]].sum(axis=1) * step * step


def test_spot_counts_are_poisson_of_integrated_rate(visium):
    s = visium
    t = s.hr_truth
    mu = s.adata.obsm["synthetic_expected"].astype(np.float64)
    assert np.allclose(S.spot_expected_counts(s), mu, rtol=1e-5)
    xy_um = (s.adata.obsm["spatial"] + 0.5) * s.um_per_px
    for i in (0, s.n_spots // 2, s.n_spots - 1):
        ref = _brute_force_integral(t["maps"].astype(np.float64), t["um_per_px"], *xy_um[i], s.spot_diameter_um / 2)
        assert np.allclose(mu[i], ref, rtol=0.02)
    C = s.counts().toarray().astype(np.float64)
    # totals per gene: |z| small
    z = (C.sum(0) - mu.sum(0)) / np.sqrt(mu.sum(0))
    assert np.abs(z).max() < 5
    # Pearson dispersion ≈ 1 for Poisson
    sel = mu > 0.5
    disp = np.mean((C[sel] - mu[sel]) ** 2 / mu[sel])
    assert 0.85 < disp < 1.15


def test_truth_counts_on_grid_exact_aggregation(legacy):
    t = legacy.hr_truth
    m = t["maps"].astype(np.float64)
    G, H, W = m.shape
    exp40, tis40 = S.truth_expected_on_grid(legacy, 40.0)
    assert exp40.shape == (G, H // 4, W // 4)
    block = m.reshape(G, H // 4, 4, W // 4, 4).sum((2, 4)) * 100.0  # λ·(10 µm)² per HR pixel
    assert np.allclose(exp40, block, rtol=1e-6)
    assert np.allclose(tis40, t["tissue"].reshape(H // 4, 4, W // 4, 4).mean((1, 3)), atol=1e-6)
    # a cell size that does not divide the HR grid: the total integral is conserved
    exp25, tis25 = S.truth_expected_on_grid(legacy, 25.0)
    assert exp25.shape == (G, math.ceil(1600 / 25), math.ceil(1600 / 25))
    assert np.allclose(exp25.sum((1, 2)), m.sum((1, 2)) * 100.0, rtol=1e-9)
    assert tis25.min() >= 0 and tis25.max() <= 1 + 1e-9
    # Poisson counts: seeded, integer, centred on the expectation
    c1, _ = S.truth_counts_on_grid(legacy, 40.0)
    c2, _ = S.truth_counts_on_grid(legacy, 40.0)
    c3, _ = S.truth_counts_on_grid(legacy, 40.0, seed=99)
    assert np.issubdtype(c1.dtype, np.integer) and np.array_equal(c1, c2) and not np.array_equal(c1, c3)
    zt = (c1.sum((1, 2)) - exp40.sum((1, 2))) / np.sqrt(exp40.sum((1, 2)))
    assert np.abs(zt).max() < 5


def test_spots_at_any_scale(legacy):
    fine = S.synthetic_spots_at(legacy, 50.0)
    assert fine.spot_diameter_um == 25.0 and fine.hr_truth is legacy.hr_truth and fine.image is legacy.image
    assert fine.n_spots > 10 * legacy.n_spots
    assert nearest_neighbour_distance(fine.adata.obsm["spatial"]) * fine.um_per_px == pytest.approx(50.0)
    again = S.synthetic_spots_at(legacy, 50.0)
    assert np.array_equal(fine.counts().toarray(), again.counts().toarray())
    # depth scales with capture area: per-gene totals per spot area agree across scales
    a_fine = math.pi * 12.5 ** 2
    a_leg = math.pi * 50.0 ** 2
    r_fine = fine.adata.obsm["synthetic_expected"].sum() / (fine.n_spots * a_fine)
    r_leg = legacy.adata.obsm["synthetic_expected"].sum() / (legacy.n_spots * a_leg)
    assert 0.5 < r_fine / r_leg < 2.0
    hexs = S.synthetic_spots_at(legacy, 100.0, lattice="hex")
    assert hexs.spot_diameter_um == pytest.approx(55.0) and hexs.technology == "visium"


def test_log1p_cp10k_truth():
    maps = np.zeros((2, 3, 3), np.float32)
    maps[0, 1, 1] = 3.0
    maps[1, 1, 1] = 1.0
    v = S.truth_log1p_cp10k(maps)
    assert v[0, 1, 1] == pytest.approx(np.log1p(7500.0)) and v[1, 1, 1] == pytest.approx(np.log1p(2500.0))
    assert v[:, 0, 0].tolist() == [0.0, 0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="technology"):
        S.make_synthetic(technology="xenium", **SMALL)
    with pytest.raises(ValueError, match="lattice"):
        S._lattice("triangle", 100.0, 500.0, 500.0)


def test_sample_data_layers(monkeypatch):
    import napari_diffst._sample_data as sd

    monkeypatch.setattr(sd, "SAMPLE_KWARGS", dict(seed=0, size_um=(1000.0, 1000.0), um_per_px=2.0,
                                                  technology="legacy_st"))
    layers = sd.make_synthetic_sample()
    kinds = [k for _, _, k in layers]
    assert kinds == ["image", "image", "points"]
    he, truth, pts = layers
    assert he[1]["rgb"] and he[1]["scale"] == (2.0, 2.0) and he[0].shape == (500, 500, 3)
    assert truth[1]["scale"] == (10.0, 10.0) and truth[1]["translate"] == (4.0, 4.0)
    assert truth[0].shape == (100, 100) and truth[1]["metadata"]["gene"] == "ERBB2" and not truth[1]["visible"]
    assert truth[0].max() > 0
    # spots carry the displayed gene's expression
    assert "ERBB2" in pts[1]["features"].columns and pts[1]["size"] == pytest.approx(50.0)
