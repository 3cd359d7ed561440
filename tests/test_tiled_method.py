"""Tiled whole-slide sampling runs the same method as the untiled path (issue 13, "one method"): each tile's
condition / residual base is the checkpoint's cell-level prior computed on the tile plus a context margin, and
the shrink ``base + α·(mean − base)`` is applied per tile before blending."""
from __future__ import annotations

import numpy as np
import pytest

from napari_diffst import pipeline as P
from napari_diffst.data.synthetic import make_synthetic
from napari_diffst.method import DiffST
from napari_diffst.tiling import FieldSource, SlideSource, super_resolve_tiled

#: a tiny Diff-ST with the product's prior and shrink switched on (as tests/test_method.py)
KNOBS = dict(prior="cell", shrink=True, n_samples=2, sample_steps=2, verbose=False)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Bit-level comparisons between runs need one torch thread."""


def _sample(seed, size=(1000.0, 1000.0)):
    smp = make_synthetic(seed=seed, size_um=size)
    smp.name = f"synthetic{seed}"
    return smp


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    train, val = [_sample(1), _sample(2)], _sample(3)
    genes = P.choose_genes(train, n_genes=3)
    fields, gs = P.make_fields(train, genes, 2)
    (vf,), _ = P.make_fields([val], genes, 2, gene_scale=gs)
    m = DiffST(budget="tiny", seed=0, device="cpu", **KNOBS)
    list(m.iter_fit(fields, vf, train_samples=train, val_sample=val, out_dir=tmp_path_factory.mktemp("ck")))
    assert m.prior_ is not None and m.alpha_ != 1.0
    test = _sample(0, (5000.0, 5000.0))  # 40 × 36 HR pixels at 2×: several tiles of 16
    field = m.make_field(test, "native")
    _, base = m.prepare_field(field, test)
    src = SlideSource.from_sample(test, m.genes_, 2, gene_scale=m.gene_scale_,
                                  he_per_hr=int(m.model_.config["he_per_hr"]))
    return m, test, field, base, src


#: a tile's base against the whole section's, in model units (maps span ~0.3–1.2). The few pixels that differ
#: more than 1e-5 sit next to a strip boundary of the *whole-section* feature pass (cellfeatures reads the image
#: in strips of HR rows; a window has its strips elsewhere), measured at most 0.0054.
TOL_MAX, TOL_MEAN = 0.01, 1e-4


@pytest.mark.parametrize("box", [(0, 0, 16, 16), (10, 12, 16, 16), (20, 20, 12, 16), (24, 20, 16, 16)])
def test_a_tile_base_is_the_section_prior_cut_to_the_tile(fitted, box):
    m, _, _, base, src = fitted
    assert src.hr_shape == tuple(base.shape[1:])
    b = m.prepare_tile(src, *box)
    r0, c0, h, w = box
    assert b.shape == (len(m.genes_), h, w)
    inside = src.hr_mask[r0:r0 + h, c0:c0 + w] > 0
    d = np.abs(b - base[:, r0:r0 + h, c0:c0 + w])[:, inside]
    assert d.max() < TOL_MAX and d.mean() < TOL_MEAN
    # the base is the prior, not the cubic LR↑ the bare network would start from
    cubic = np.asarray(P.make_fields([fitted[1]], m.genes_, 2, gene_scale=m.gene_scale_)[0][0].lr_upsampled(3))
    assert np.abs(b - cubic[:, r0:r0 + h, c0:c0 + w])[:, inside].mean() > 100 * TOL_MEAN


def test_tiles_hold_the_section_prior_and_the_shrink(fitted):
    """α = 0: the blended tiles are the whole section's prior map. Any α: the blend is base + α·(mean − base) of
    the same tiles' network means (same seed, position-locked noise), so the shrink is applied per tile."""
    m, _, _, base, src = fitted
    alpha = float(m.alpha_)
    kw = dict(tile=16, overlap=4, steps=2, n_samples=1, seed=0, device="cpu", project=False)  # the blend itself
    out = {}
    try:
        for a in (0.0, 1.0, alpha):
            m.alpha_ = a
            out[a] = super_resolve_tiled(m, src, **kw)
    finally:
        m.alpha_ = alpha
    assert out[0.0].n_tiles > 1
    inside = src.hr_mask > 0
    d = np.abs(out[0.0].mean - base)[:, inside]
    assert d.max() < TOL_MAX and d.mean() < TOL_MEAN
    net = out[1.0].mean
    assert np.abs(net - out[0.0].mean)[:, inside].mean() > 1e-3  # the network moved away from its base
    np.testing.assert_allclose(out[alpha].mean[:, inside],
                               (out[0.0].mean + alpha * (net - out[0.0].mean))[:, inside], atol=1e-5)
    np.testing.assert_allclose(out[alpha].std[:, inside], alpha * out[1.0].std[:, inside], atol=1e-5)


def test_a_field_source_with_its_features_cuts_them_per_tile(fitted):
    """In memory (the dock's FieldSource): features the field already holds are cropped, not recomputed."""
    m, test, field, base, _ = fitted
    src = FieldSource(field, sample=None)  # no sample: recomputing would raise, cropping must suffice
    b = m.prepare_tile(src, 10, 12, 16, 16)
    inside = field.hr_mask[10:26, 12:28] > 0
    np.testing.assert_allclose(b[:, inside], base[:, 10:26, 12:28][:, inside], atol=1e-5)


def test_the_bare_network_has_no_base(fitted):
    m = fitted[0]
    prior, alpha = m.prior_, m.alpha_
    try:
        m.prior_, m.alpha_ = None, 1.0
        assert m.prepare_tile(fitted[4], 0, 0, 16, 16) is None
    finally:
        m.prior_, m.alpha_ = prior, alpha


def test_tiled_maps_are_projected_onto_the_spots_band_by_band(fitted, tmp_path):
    """Native tiled output is true to the spots like the untiled one: in memory (the dock) and in the OME-Zarr
    (the CLI), with the report; band-wise, the spots hold to the projection's tolerance wherever the bands are
    cut, and when the first window holds the section the result is the whole-section projection."""
    from napari_diffst.io.writers import read_maps
    from napari_diffst.spot_consistency import project_bands, project_to_spots, spot_report

    m, _, _, _, src = fitted
    kw = dict(tile=16, overlap=4, steps=2, n_samples=1, seed=0, device="cpu")
    raw = super_resolve_tiled(m, src, project=False, **kw)
    assert raw.report is None and raw.projection is None
    res = super_resolve_tiled(m, src, **kw)  # a DiffST on a native source: projected, reported (in memory)
    rep = res.report
    assert rep["spot_pcc"] >= 0.999 and abs(rep["spot_bias"]) <= 0.001 and rep["masked_in_spots"] < 0.05
    assert rep["before_projection"]["spot_pcc"] < rep["spot_pcc"]
    assert rep["projection"]["max_residual"] <= 1e-4 + 1e-9
    gs = np.asarray(src.gene_scale, np.float32)[:, None, None]
    # the in-memory result is projected and reported on the tissue it is shown on (NaN elsewhere in every output)
    inside = np.asarray(src.hr_mask, bool) & np.asarray(src.output_mask(), bool)
    whole, _ = project_to_spots(raw.mean * gs, src, mask=inside)
    # 40 HR rows: bands of 16 LR rows with 4 of context, so the first window holds the whole section and the
    # second starts from it: the result is the whole-section projection
    assert res.projection["bands"] == 2
    np.testing.assert_allclose((res.mean * gs)[:, inside], whole[:, inside], atol=1e-4)
    # many thin bands: every spot still reproduced, the lattice imprint stays small
    x = np.where(inside[None], raw.mean * gs, np.nan).astype(np.float32)

    def write(r0, t):
        x[:, r0:r0 + t.shape[1]] = t

    info = project_bands(lambda r0, r1: x[:, r0:r1], write, src, band_lr=4, context_lr=2)
    assert info["bands"] == 5 and info["max_residual"] <= 1e-4 + 1e-9
    thin = spot_report(x, src)
    assert thin["spot_pcc"] >= 0.999 and abs(thin["spot_bias"]) <= 0.001 and thin["lattice"] < 0.10
    # into OME-Zarr, with the report in its metadata
    z = super_resolve_tiled(m, src, out=tmp_path / "m.ome.zarr", report=True, **kw)
    md = read_maps(z.path).metadata["napari_diffst"]
    assert md["spot_report"]["spot_pcc"] >= 0.999 and md["projection"]["bands"] == 2


def test_tiled_maps_apply_the_self_check(fitted):
    """The self-check's per-gene β is applied per tile as untiled: β = 0 gives the spots' cubic LR↑ (then made
    true to the spots); the check travels in the report."""
    m, _, _, _, src = fitted
    G = len(m.genes_)
    kw = dict(tile=16, overlap=4, steps=2, n_samples=1, seed=0, device="cpu", project=False)
    zero = {"beta": [0.0] * G, "pcc": {}, "warning": "test"}
    res = super_resolve_tiled(m, src, self_check=zero, **kw)
    cub = (src.cond_tile(0, 0, *src.hr_shape, upsample="cubic")["lr_up"] + 1.0) / 2.0
    inside = src.hr_mask
    np.testing.assert_allclose(res.mean[:, inside], cub[:, inside], atol=1e-5)
    assert float(np.abs(res.std).max()) == 0.0
    one = super_resolve_tiled(m, src, self_check={"beta": [1.0] * G}, **kw)
    plain = super_resolve_tiled(m, src, **kw)
    np.testing.assert_allclose(one.mean, plain.mean, atol=1e-6)
    rep = super_resolve_tiled(m, src, tile=16, overlap=4, steps=2, n_samples=1, seed=0, device="cpu",
                              self_check=zero).report
    assert rep["self_check"] is zero and rep["spot_pcc"] >= 0.999
