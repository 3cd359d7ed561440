"""Lattices, LR/HR rasters, degradation pairs and aligned H&E tiles (napari_diffst.data.grids).

Known answers:
* square / hexagonal lattices built with a given pitch and angle are recovered (pitch < 0.5 %,
  angle < 0.3° modulo the lattice symmetry), also from sparse subsets via array indices;
* degrade mode: LR raw counts of every block = the sum of the counts of its s×s spots; HR pixel of
  a spot = that spot's log1p(CP10k)/gene_scale;
* her2st (200 µm pitch), s = 2: LR 400 µm, HR 200 µm; native s = 5: HR 40 µm;
  Visium (100 µm pitch): HR = 100/s µm;
* the H&E raster equals the image sampled at the grid positions, with the registration applied;
* the 10k her2st JPEG is decoded at most once per process.
"""
from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_diffst.data.grids import (
    aggregate_counts,
    compute_gene_scale,
    estimate_lattice,
    field_napari_affine,
    lattice_for,
    make_field,
    normalise_counts,
    rasterise_spots,
    spot_values,
)
from napari_diffst.data.pairs import SRField, random_patches
from napari_diffst.data.sample import HistologyImage, Sample, apply_affine, decode_count
from napari_diffst.errors import DataFormatError, GeneNotFoundError


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def square_lattice(n, pitch, angle_deg, origin=(500.0, 400.0), jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    th = math.radians(angle_deg)
    a1 = pitch * np.array([math.cos(th), math.sin(th)])
    a2 = pitch * np.array([-math.sin(th), math.cos(th)])
    i, j = np.meshgrid(np.arange(n), np.arange(n))
    i, j = i.ravel(), j.ravel()
    xy = np.asarray(origin) + i[:, None] * a1 + j[:, None] * a2 + rng.normal(0, jitter, (len(i), 2))
    return xy, np.c_[j, i]  # (array_row, array_col)


def hex_lattice(nrows, ncols, pitch, angle_deg, origin=(300.0, 200.0)):
    """Visium convention: array_col = 2k + (row % 2), rows pitch·√3/2 apart."""
    pts, rc = [], []
    for r in range(nrows):
        for k in range(ncols):
            pts.append(((k + 0.5 * (r % 2)) * pitch, r * pitch * math.sqrt(3) / 2))
            rc.append((r, 2 * k + r % 2))
    th = math.radians(angle_deg)
    R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return np.asarray(origin) + np.array(pts) @ R.T, np.array(rc)


def angle_diff(a, b, period):
    d = (a - b) % period
    return min(d, period - d)


def toy_sample(n=8, pitch_px=100.0, um_per_px=2.0, G=3, seed=0, image=True, tech="legacy_st", angle=0.0):
    """A square-lattice section with Poisson counts, an all-in-tissue obs and a random image."""
    rng = np.random.default_rng(seed)
    xy, rc = square_lattice(n, pitch_px, angle, origin=(150.0, 150.0))
    X = rng.poisson(rng.uniform(1, 30, (len(xy), G + 2))).astype(np.int32)
    obs = pd.DataFrame({"in_tissue": 1, "array_row": rc[:, 0], "array_col": rc[:, 1]},
                       index=[f"s{i}" for i in range(len(xy))])
    var = pd.DataFrame(index=[f"Gene{g}" for g in range(G + 2)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=var)
    adata.obsm["spatial"] = xy
    img = None
    if image:
        side = int(n * pitch_px + 400)
        img = HistologyImage.from_array(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    return Sample(adata, img, um_per_px, 0.5 * pitch_px * um_per_px, tech, name="toy",
                  lattice_pitch_um=pitch_px * um_per_px)


# ------------------------------------------------------------------------------------------------
# lattices
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("angle", [0.0, 7.0, -20.0, 33.0])
def test_square_lattice_pitch_and_axes_recovered(angle):
    xy, _ = square_lattice(15, 272.3, angle, jitter=4.0, seed=1)
    lat = estimate_lattice(xy)
    assert lat.kind == "square"
    assert lat.pitch_px == pytest.approx(272.3, rel=5e-3)
    assert angle_diff(lat.angle_deg, angle, 90.0) < 0.3
    # canonical axes: a1 closest to +x, a2 closest to +y
    assert abs(lat.angle_deg) <= 45.0 + 1e-9 and lat.a2[1] > 0
    # neighbours along a lattice axis differ by exactly one index
    d = np.abs(np.diff(lat.ij[:15], axis=0)).sum(1)
    assert np.all(d == 1)
    assert lat.residual_px < 8.0


@pytest.mark.parametrize("angle", [0.0, 5.0, -12.0, 40.0])
def test_hex_lattice_pitch_and_axes_recovered(angle):
    xy, _ = hex_lattice(20, 25, 137.9, angle)
    lat = estimate_lattice(xy)
    assert lat.kind == "hex"
    assert lat.pitch_px == pytest.approx(137.9, rel=1e-6)
    assert angle_diff(lat.angle_deg, angle, 60.0) < 0.05
    assert lat.residual_px < 1e-6
    # angle between the basis vectors is 60°
    cosang = lat.a1 @ lat.a2 / (np.hypot(*lat.a1) * np.hypot(*lat.a2))
    assert math.degrees(math.acos(cosang)) == pytest.approx(60.0, abs=0.01)


def test_sparse_subset_needs_array_indices():
    xy, rc = hex_lattice(60, 60, 137.9, 2.0)
    pick = np.random.default_rng(3).choice(len(xy), 60, replace=False)  # 1.7 % of the array
    with pytest.raises(DataFormatError):
        estimate_lattice(xy[pick])
    lat = estimate_lattice(xy[pick], "hex", array_rc=rc[pick])
    assert lat.kind == "hex" and lat.pitch_px == pytest.approx(137.9, rel=1e-6)
    assert angle_diff(lat.angle_deg, 2.0, 60.0) < 0.01
    # kind inferred from the indices' parity when not given
    assert estimate_lattice(xy[pick], array_rc=rc[pick]).kind == "hex"


def test_random_points_are_not_a_lattice():
    xy = np.random.default_rng(0).uniform(0, 1000, (200, 2))
    with pytest.raises(DataFormatError, match="lattice"):
        estimate_lattice(xy)


def test_hex_raster_nearest_spot_within_cell():
    xy, _ = hex_lattice(12, 14, 100.0, 10.0)
    r = rasterise_spots(xy)
    assert r.lattice.kind == "hex"
    A = r.affine(1.0)
    rr, cc = np.nonzero(r.index >= 0)
    centres = apply_affine(A, np.c_[cc, rr])
    d = np.hypot(*(centres - xy[r.index[rr, cc]]).T)
    assert d.max() <= 100.0 / math.sqrt(3) * 1.02 + 1e-9
    # square pixels of one pitch: ~√3/2 as many pixels as spots in the interior, none duplicated
    # more than their cell allows
    assert 0.75 * len(xy) < len(rr) < 1.0 * len(xy)
    assert np.hypot(*r.e1) == pytest.approx(100.0) and np.hypot(*r.e2) == pytest.approx(100.0)
    assert abs(r.e1 @ r.e2) < 1e-6


# ------------------------------------------------------------------------------------------------
# degradation pairs
# ------------------------------------------------------------------------------------------------
def test_degrade_block_sums_equal_spot_sums():
    s = toy_sample(n=7, G=3)
    genes = ["Gene0", "gene1", "GENE2"]
    f = make_field(s, genes, scale=2, mode="degrade", he_per_hr=2)
    assert isinstance(f, SRField)
    C = s.counts().toarray()[:, :3]
    lib = np.asarray(s.counts().sum(1)).ravel()
    lh, lw = f.lr.shape[1:]
    assert f.hr.shape == (3, 2 * lh, 2 * lw) and f.hr_spot_index.shape == f.hr.shape[1:]
    lrc = f.extra["lr_counts"].toarray().reshape(lh, lw, 3)
    for R in range(lh):
        for Cc in range(lw):
            blk = f.hr_spot_index[2 * R:2 * R + 2, 2 * Cc:2 * Cc + 2].ravel()
            blk = blk[blk >= 0]
            assert np.array_equal(lrc[R, Cc], C[blk].sum(0))  # raw counts summed
            assert f.extra["lr_library_size"][R, Cc] == lib[blk].sum()
            assert f.lr_mask[R, Cc] == (len(blk) > 0)
            if len(blk):
                want = np.log1p(C[blk].sum(0) / lib[blk].sum() * 1e4) / f.gene_scale
                np.testing.assert_allclose(f.lr[:, R, Cc], want, rtol=1e-5)
    # 7×7 spots → 4×4 blocks: full blocks hold 4 spots, the last row/column fewer
    assert f.extra["lr_n_spots"].sum() == 49 and f.extra["lr_n_spots"][0, 0] == 4
    # HR = the spots themselves
    m = f.hr_mask
    k = f.hr_spot_index[m]
    np.testing.assert_allclose(f.hr[:, m].T, np.log1p(C[k] / lib[k, None] * 1e4) / f.gene_scale, rtol=1e-5)
    assert np.array_equal(f.hr_counts.toarray(), C)  # rows = hr_spot_index targets
    assert f.hr_um == pytest.approx(200.0) and f.extra["lr_um"] == pytest.approx(400.0)
    # LR/HR/H&E share the top-left corner
    lr_corner = apply_affine(f.extra["lr_affine"], np.array([[-0.5, -0.5]]))[0]
    he_corner = apply_affine(f.extra["he_affine"], np.array([[-0.5, -0.5]]))[0]
    np.testing.assert_allclose(lr_corner, f.origin_px, atol=1e-9)
    np.testing.assert_allclose(he_corner, f.origin_px, atol=1e-9)
    np.testing.assert_allclose(f.origin_px, (100.0, 100.0), atol=1e-6)  # first spot at 150 − pitch/2


def test_fields_feed_random_patches():
    s = toy_sample(n=9, G=2)
    f = make_field(s, ["Gene0", "Gene1"], scale=2, mode="degrade", he_per_hr=4)
    p = random_patches([f], 3, 2, np.random.default_rng(0))
    assert p.lr.shape == (3, 2, 2, 2) and p.hr.shape == (3, 2, 4, 4) and p.he.shape == (3, 3, 16, 16)
    assert p.hr_mask.mean() > 0.3


def test_gene_scale_computed_on_training_and_reused():
    train, other = toy_sample(seed=1), toy_sample(seed=2)
    genes = ["Gene0", "Gene1"]
    gs = compute_gene_scale([train], genes)
    vals, _ = spot_values(train, genes)
    np.testing.assert_allclose(gs, np.percentile(vals, 99, axis=0), rtol=1e-6)
    f = make_field(other, genes, scale=2, gene_scale=gs, with_he=False)
    np.testing.assert_array_equal(f.gene_scale, gs)
    assert f.extra["gene_scale_source"] == "given"
    v2, _ = spot_values(other, genes)
    m = f.hr_mask
    np.testing.assert_allclose(f.hr[:, m].T * gs, v2[f.hr_spot_index[m]], rtol=1e-5)


def test_normalise_and_aggregate():
    C = np.array([[1, 3], [0, 0], [2, 2]])
    v = normalise_counts(C, C.sum(1))
    np.testing.assert_allclose(v[0], np.log1p([2500.0, 7500.0]), rtol=1e-6)
    assert np.all(v[1] == 0)
    A = aggregate_counts(sp.csr_matrix(C), np.array([1, -1, 1]), 2).toarray()
    assert np.array_equal(A, [[0, 0], [3, 5]])


def test_bad_arguments():
    s = toy_sample(image=False)
    for bad in (1, 11, 2.5):
        with pytest.raises(ValueError, match="scale"):
            make_field(s, ["Gene0"], scale=bad)
    with pytest.raises(ValueError, match="mode"):
        make_field(s, ["Gene0"], mode="upsample")
    with pytest.raises(GeneNotFoundError, match="Gene0"):
        make_field(s, ["Gen0"])
    with pytest.raises(DataFormatError, match="HR truth"):
        make_field(s, ["Gene0"], mode="truth")


def test_native_mode_and_rotated_lattice_he_alignment():
    s = toy_sample(n=6, G=2, angle=4.0, um_per_px=1.0)
    # registration: spots → image is a 2° rotation + shift; the H&E must follow it
    th = math.radians(2.0)
    s.transform = np.array([[math.cos(th), -math.sin(th), 12.0], [math.sin(th), math.cos(th), -7.0], [0, 0, 1]])
    f = make_field(s, ["Gene0", "Gene1"], scale=4, mode="native", he_per_hr=1)
    assert f.hr is None and f.lr.shape == (2, 6, 6) and f.hr_mask.shape == (24, 24)
    assert f.hr_um == pytest.approx(25.0) and f.extra["lr_um"] == pytest.approx(100.0)
    assert f.extra["lattice_angle_deg"] == pytest.approx(4.0, abs=1e-6)
    # LR pixel (r, c) is spot lr_spot_index[r, c], whose image position is transform(spot)
    k = f.extra["lr_spot_index"]
    r, c = np.nonzero(k >= 0)
    np.testing.assert_allclose(apply_affine(f.extra["lr_affine"], np.c_[c, r]), s.spots_xy_px[k[r, c]], atol=1e-6)
    # H&E pixel centres sample the image there (bilinear; he px = 25 full-res px → box 25 first)
    from scipy.ndimage import map_coordinates

    img = np.asarray(s.image.levels[0], np.float32)
    H, W = f.he.shape[1:]
    rr, cc = np.mgrid[0:H, 0:W]
    pts = apply_affine(f.extra["he_affine"], np.c_[cc.ravel(), rr.ravel()])
    f2 = make_field(s, ["Gene0"], scale=4, mode="native", he_um_per_px=1.0)  # 1 µm = 1 px: no box filter
    H2, W2 = f2.he.shape[1:]
    rr2, cc2 = np.mgrid[0:H2:37, 0:W2:41]
    pts2 = apply_affine(f2.extra["he_affine"], np.c_[cc2.ravel(), rr2.ravel()])
    want = map_coordinates(img[..., 1], [pts2[:, 1], pts2[:, 0]], order=1) / 255.0
    np.testing.assert_allclose(f2.he[1][rr2.ravel(), cc2.ravel()], want, atol=1e-4)
    assert pts.shape[0] == H * W
    # napari affine: HR pixel (0, 0) centre in µm world (row, col)
    B = field_napari_affine(f, "hr")
    xy00 = apply_affine(f.extra["hr_affine"], np.array([[0.0, 0.0]]))[0]
    np.testing.assert_allclose((B @ [0, 0, 1])[:2], xy00[::-1] * s.um_per_px)


def test_truth_mode_on_synthetic_sample():
    from napari_diffst.data.synthetic import make_synthetic, truth_log1p_cp10k

    s = make_synthetic(0, size_um=(1600.0, 1600.0), um_per_px=2.0, n_genes=4)
    g = s.genes[:2]
    f = make_field(s, g, scale=5, mode="truth", he_um_per_px=8.0)
    assert f.hr.shape == (2, f.lr.shape[1] * 5, f.lr.shape[2] * 5)
    assert f.hr_um == pytest.approx(40.0) and f.he_per_hr == 5
    # HR target = log1p(CP10k) of the truth rates binned into 40 µm pixels: pixel-aligned here
    # (spots at (k+½)·200 µm, truth pixels of 10 µm from 0), so it equals 4×4 truth block means
    t = s.hr_truth
    x0, y0 = f.origin_px
    r0, c0 = int(round(y0 * s.um_per_px / 10)), int(round(x0 * s.um_per_px / 10))
    maps = t["maps"].astype(np.float64)
    rr, cc = np.nonzero(f.hr_mask)
    for r, c in list(zip(rr, cc))[:: max(1, len(rr) // 7)]:
        blk = maps[:, r0 + 4 * r:r0 + 4 * r + 4, c0 + 4 * c:c0 + 4 * c + 4].mean(axis=(1, 2))
        want = np.log1p(1e4 * blk / blk.sum())[:2]
        np.testing.assert_allclose(f.hr[:, r, c] * f.gene_scale, want, rtol=1e-4)
        assert truth_log1p_cp10k(blk[:, None, None])[0, 0, 0] == pytest.approx(want[0], rel=1e-4)
    # LR from the observed spots; HR truth correlates with the up-sampled LR under tissue
    up = f.lr_upsampled()
    m = f.hr_mask
    assert m.sum() > 100
    assert np.corrcoef(up[0][m], f.hr[0][m])[0, 1] > 0.3


def test_hex_synthetic_degrade_and_native():
    from napari_diffst.data.synthetic import make_synthetic

    s = make_synthetic(1, size_um=(1200.0, 1200.0), um_per_px=2.0, n_genes=3, technology="visium")
    f = make_field(s, s.genes[:2], scale=2, mode="degrade", with_he=False)
    assert f.extra["lattice_kind"] == "hex" and f.hr_um == pytest.approx(100.0)
    # every in-tissue spot's counts are in exactly one LR block
    assert int(f.extra["lr_n_spots"].sum()) == s.n_spots
    assert np.array_equal(np.asarray(f.extra["lr_counts"].sum(0)).ravel(),
                          np.asarray(s.counts()[:, :2].sum(0)).ravel())
    n = make_field(s, s.genes[:2], scale=4, mode="native", with_he=False)
    assert n.hr_um == pytest.approx(25.0)
    # HR pixels carry the nearest spot within its hexagonal cell
    r, c = np.nonzero(n.hr_spot_index >= 0)
    pts = apply_affine(n.extra["hr_affine"], np.c_[c, r])
    d = np.hypot(*(pts - s.spots_xy_px[n.hr_spot_index[r, c]]).T)
    assert d.max() <= 100.0 / s.um_per_px / math.sqrt(3) * 1.02


# ------------------------------------------------------------------------------------------------
# real data: pixel sizes
# ------------------------------------------------------------------------------------------------
def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_her2st_pixel_sizes_and_single_decode(her2st_dir):
    from napari_diffst.io.readers import read_legacy_st

    s = _quiet(read_legacy_st, her2st_dir / "C2")
    lat = lattice_for(s)
    pitch_um = lat.pitch_px * s.um_per_px
    print(f"her2st C2: pitch {lat.pitch_px:.2f} px × {s.um_per_px:.4f} µm/px = {pitch_um:.2f} µm")
    assert lat.kind == "square" and pitch_um == pytest.approx(200.0, rel=0.01)
    before = decode_count()
    f = make_field(s, ["ERBB2", "gapdh"], scale=2, mode="degrade", he_um_per_px=8.0)
    assert f.hr_um == pytest.approx(200.0, rel=0.01) and f.extra["lr_um"] == pytest.approx(400.0, rel=0.01)
    assert int(f.hr_mask.sum()) == 187 == int(f.extra["lr_n_spots"].sum())
    assert f.he.shape[1:] == (f.hr.shape[1] * 25, f.hr.shape[2] * 25)
    # tissue under the spots: H&E darker at in-tissue HR pixels than outside
    he_hr = f.he.reshape(3, f.hr.shape[1], 25, f.hr.shape[2], 25).mean(axis=(2, 4)).mean(0)
    assert he_hr[f.hr_mask].mean() < he_hr[~f.hr_mask].mean() - 0.05
    n = make_field(s, ["ERBB2"], scale=5, mode="native", he_um_per_px=8.0)
    assert n.hr_um == pytest.approx(40.0, rel=0.01) and n.extra["lr_um"] == pytest.approx(200.0, rel=0.01)
    assert decode_count() - before <= 1  # the 10k JPEG is decoded once for both fields


def test_visium_fixture_pixel_sizes(fixtures_dir):
    from napari_diffst.io.readers import read

    v1 = _quiet(read, fixtures_dir / "visium_v1_squidpy")
    f = _quiet(make_field, v1, v1.genes[:2], scale=4, mode="native", with_he=False)
    print(f"visium_v1_squidpy: pitch {f.extra['pitch_px']:.3f} px × {v1.um_per_px:.4f} µm/px = "
          f"{f.extra['pitch_um']:.2f} µm; HR {f.hr_um:.2f} µm")
    assert f.extra["lattice_kind"] == "hex"
    assert f.extra["pitch_um"] == pytest.approx(100.0, rel=0.01) and f.hr_um == pytest.approx(25.0, rel=0.01)
    ca = _quiet(read, fixtures_dir / "visium_cytassist_placenta")
    g = _quiet(make_field, ca, ca.genes[:1], scale=2, mode="degrade", with_he=False)
    print(f"visium_cytassist_placenta: pitch {g.extra['pitch_px']:.3f} px × {ca.um_per_px:.4f} µm/px = "
          f"{g.extra['pitch_um']:.2f} µm; HR {g.hr_um:.2f} µm, LR {g.extra['lr_um']:.2f} µm")
    assert g.extra["lattice_kind"] == "hex"
    # pixel sizes follow the image scale the reader reports (65 µm ↔ spot_diameter_fullres):
    # 93 µm here, within 10 % of the nominal 100 µm pitch (a warning says so)
    assert g.hr_um == pytest.approx(g.extra["pitch_px"] * ca.um_per_px, rel=1e-9)
    assert g.extra["pitch_um"] == pytest.approx(100.0, rel=0.10)
    with pytest.warns(UserWarning, match="nominal 100"):
        make_field(ca, ca.genes[:1], scale=2, mode="degrade", with_he=False)
    hd = _quiet(read, fixtures_dir / "visium_hd_square_002um")
    lat = lattice_for(hd)
    print(f"visium_hd_square_002um: bin pitch {lat.pitch_px:.3f} px × {hd.um_per_px:.4f} µm/px = "
          f"{lat.pitch_px * hd.um_per_px:.3f} µm")
    assert lat.kind == "square" and lat.pitch_px * hd.um_per_px == pytest.approx(2.0, rel=0.01)
    with pytest.raises(DataFormatError, match="sparse"):  # 10 bins scattered over a 2400² array
        make_field(hd, hd.genes[:1], scale=2, with_he=False)


def test_shown_maps_fill_the_tissue_rim_past_the_lattice_and_nan_outside():
    """Outputs are NaN outside the shown tissue, never 0; on the rim past the spots' lattice cells a masked
    prediction (0 there) is replaced by the nearest predicted value."""
    from napari_diffst.data.grids import shown_maps

    hr = np.zeros((6, 6), bool)
    hr[1:4, 1:4] = True
    shown = np.zeros((6, 6), bool)
    shown[0:5, 0:5] = True
    maps = np.zeros((2, 6, 6), np.float32)
    maps[0][hr] = np.arange(9) + 1.0
    maps[1][hr] = 7.0
    out = shown_maps(maps, hr, shown)
    np.testing.assert_array_equal(out[:, hr], maps[:, hr])           # predictions untouched
    assert np.isnan(out[:, ~shown]).all()                             # NaN outside the tissue
    rim = shown & ~hr
    assert (out[:, rim] > 0).all() and (out[1, rim] == 7.0).all()    # no 0 that means "not predicted"
    assert out[0, 0, 0] == maps[0, 1, 1] and out[0, 4, 4] == maps[0, 3, 3]  # the nearest predicted pixel
