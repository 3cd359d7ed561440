"""Known-answer tests of the baselines on hand-built toy fields (tiny budgets, 1 torch thread)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_diffst.baselines import (BASELINES, Bicubic, HisToSGEStyle, IStarStyle, Nearest, TeslaStyle, UNetBaseline,
                                     cubic_upsample, fill_lr, histology_features, make_baseline)
from napari_diffst.errors import DataFormatError
from napari_diffst.metrics import consistency_per_gene, pcc_per_gene, score_field
from toy_fields import make_toy_field

torch.set_num_threads(1)

HISTO_GENES = [0, 1, 3]  # region, cellular, mixed: visible in the H&E ("hidden" is not)


@pytest.fixture(scope="module")
def toy():
    return {"train": [make_toy_field(i) for i in (1, 2, 3)], "val": make_toy_field(10), "test": make_toy_field(0)}


def _pcc(pred, f, genes=None):
    p = pcc_per_gene(pred, f.hr, f.hr_mask)
    return float(np.nanmean(p if genes is None else p[genes]))


def _constant_field(c=0.7, s=4):
    f = make_toy_field(4, s=s)
    lr = np.where(f.lr_mask, c, 0.0).astype(np.float32)[None].repeat(f.G, 0)
    return dataclasses.replace(f, lr=lr, hr=None)


def test_registry():
    assert set(BASELINES) == {"nearest", "bicubic", "tesla", "istar", "unet", "histosge"}
    assert isinstance(make_baseline("tesla", colour_weight=0.0), TeslaStyle)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("nope")


def test_nearest_is_exact_block_copy(toy):
    f = toy["test"]
    p = Nearest().fit([]).predict(f)
    assert p.shape == f.hr.shape and p.dtype == np.float32
    s = f.scale
    for (r, c) in [(0, 0), (5, 7), (6, 6)]:
        block = p[:, r * s:(r + 1) * s, c * s:(c + 1) * s]
        want = f.lr[:, r, c][:, None, None] * f.hr_mask[r * s:(r + 1) * s, c * s:(c + 1) * s]
        np.testing.assert_array_equal(block, want)
    np.testing.assert_array_equal(Nearest(mask_output=False).predict(f), f.lr_upsampled(0))


def test_bicubic_preserves_constants_without_border_bleed():
    f = _constant_field(0.7)
    p = Bicubic().predict(f)
    np.testing.assert_allclose(p[:, f.hr_mask], 0.7, atol=1e-5)  # the zero background does not bleed in
    assert np.all(p[:, ~f.hr_mask] == 0)
    # a naive spline over the zero-padded LR would darken the border
    naive = cubic_upsample(f.lr, f.scale)
    assert naive[:, f.hr_mask].min() < 0.6
    # pixel-centre alignment: a linear ramp along columns is reproduced exactly
    ramp = np.tile(np.arange(6, dtype=np.float32), (1, 5, 1))
    up = cubic_upsample(ramp, 2, order=1)
    np.testing.assert_allclose(up[0, 0, 1:-1], (np.arange(1, 11) + 0.5) / 2 - 0.5, atol=1e-6)


def test_fill_lr_nearest():
    lr = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]]], np.float32)
    m = np.array([[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(fill_lr(lr, m), [[[1, 1, 5], [1, 5, 5]]])


def test_bicubic_consistent_option(toy):
    f = toy["test"]
    _, rm_plain = consistency_per_gene(Bicubic().predict(f), f.lr, f.lr_mask, f.hr_mask, f.scale)
    _, rm_cons = consistency_per_gene(Bicubic(consistent=True).predict(f), f.lr, f.lr_mask, f.hr_mask, f.scale)
    assert np.all(rm_cons < 0.2 * rm_plain) and np.all(rm_cons < 5e-3)


def test_tesla_without_colour_is_smooth_spatial_interpolation(toy):
    f = toy["test"]
    t0 = TeslaStyle(colour_weight=0.0, tune=False)
    p = t0.predict(f)
    # independent of the histology
    rs = np.random.default_rng(0)
    f_noise = dataclasses.replace(f, he=rs.random(f.he.shape).astype(np.float32))
    np.testing.assert_allclose(t0.predict(f_noise), p, atol=1e-6)
    # preserves constants, smoother than the block copy, close to the truth
    fc = _constant_field(0.3)
    np.testing.assert_allclose(t0.predict(fc)[:, fc.hr_mask], 0.3, atol=1e-5)
    m = f.hr_mask[:, 1:] & f.hr_mask[:, :-1]
    energy = lambda x: (np.diff(x, axis=2) ** 2)[:, m].sum()  # noqa: E731  (Dirichlet energy)
    assert energy(p) < 0.5 * energy(Nearest().predict(f))
    assert _pcc(p, f) > _pcc(Nearest().predict(f), f)
    # colour changes the answer
    assert not np.allclose(TeslaStyle(colour_weight=4.0, tune=False).predict(f), p)


def test_tesla_perfect_colour_cue_beats_bicubic():
    f = make_toy_field(0, piecewise=True)
    pb = _pcc(Bicubic().predict(f), f)
    pt = _pcc(TeslaStyle(colour_weight=8.0, tune=False).predict(f), f)
    p0 = _pcc(TeslaStyle(colour_weight=0.0, tune=False).predict(f), f)
    assert pt > pb + 0.03 and pt > p0 + 0.03
    assert pt > 0.95


def test_tesla_fit_tunes_colour_weight(toy):
    t = TeslaStyle(colour_weight=0.0).fit(toy["train"])
    assert t.colour_weight > 0
    assert _pcc(t.predict(toy["test"]), toy["test"]) > _pcc(Bicubic().predict(toy["test"]), toy["test"])


def test_histology_features_shape_and_content(toy):
    f = toy["test"]
    F = histology_features(f, context_sigmas=(1.0,))
    assert F.shape == (22, *f.hr_shape) and np.all(np.isfinite(F))
    # mean-R feature is the k×k block mean of the red channel
    k = f.he_per_hr
    np.testing.assert_allclose(F[0, 3, 5], f.he[0, 3 * k:4 * k, 5 * k:6 * k].mean(), rtol=1e-5)


def test_istar_beats_nearest_on_histology_genes(toy):
    f = toy["test"]
    m = IStarStyle().fit(toy["train"], seed=0, budget="tiny")
    p = m.predict(f)
    assert p.shape == f.hr.shape and np.all(np.isfinite(p))
    assert _pcc(p, f, HISTO_GENES) > _pcc(Nearest().predict(f), f, HISTO_GENES) + 0.03
    # weak supervision: block means track the LR
    cp, _ = consistency_per_gene(p, f.lr, f.lr_mask, f.hr_mask, f.scale)
    assert np.nanmean(cp) > 0.85
    with pytest.raises(RuntimeError, match="fit"):
        IStarStyle().predict(f)


def test_unet_beats_nearest(toy):
    f = toy["test"]
    u = UNetBaseline().fit(toy["train"], toy["val"], seed=0, budget="tiny")
    p = u.predict(f)
    assert p.shape == f.hr.shape and np.all(np.isfinite(p))
    assert _pcc(p, f) > _pcc(Nearest().predict(f), f) + 0.03
    assert score_field(p, f)["detail_pcc"] > 0.5
    wrong = dataclasses.replace(f, genes=list(reversed(f.genes)))
    with pytest.raises(DataFormatError, match="genes"):
        u.predict(wrong)
    with pytest.raises(ValueError, match="HR truth"):
        UNetBaseline().fit([dataclasses.replace(f, hr=None)])


@pytest.mark.parametrize("s", [2, 3])
def test_non_trained_baselines_respect_scale(s):
    f = make_toy_field(7, h=9, w=10, s=s, k=2)
    for name in ("nearest", "bicubic", "tesla"):
        p = make_baseline(name).predict(f)
        assert p.shape == (f.G, 9 * s, 10 * s)
        assert _pcc(p, f) > 0.8, name


def test_trained_baselines_respect_scale_three():
    f = make_toy_field(7, h=9, w=10, s=3, k=1)
    tr = [make_toy_field(8, h=9, w=10, s=3, k=1)]
    for b in (IStarStyle().fit(tr, budget={"steps": 20, "ensemble": 1, "finetune": 5}),
              UNetBaseline().fit(tr, budget={"steps": 3, "batch": 2})):
        assert b.predict(f).shape == (f.G, 27, 30)


# ------------------------------------------------------------------------------------------ histosge
#: step-limited budgets (no wall-clock cut-off, so runs are comparable and deterministic)
HS_SMALL = {"steps": 40, "batch": 64, "ensemble": 1, "val_every": 20}
HS_TRAIN = {"steps": 150, "batch": 128, "ensemble": 1, "val_every": 50, "lr": 3e-3}


def test_histosge_fits_predicts_and_adds_detail(toy):
    f = toy["test"]
    m = HisToSGEStyle().fit(toy["train"], toy["val"], seed=0, budget=HS_TRAIN)
    p = m.predict(f)
    assert p.shape == f.hr.shape and p.dtype == np.float32 and np.all(np.isfinite(p))
    assert np.all(p[:, ~f.hr_mask] == 0)
    assert m.steps_ == [150] and m.val_scores_[0] is not None and 0.5 < m.alpha_ <= 1.0
    b = Bicubic().predict(f)
    assert _pcc(p, f) > _pcc(b, f) + 0.01
    assert score_field(p, f)["detail_pcc"] > score_field(b, f)["detail_pcc"] + 0.05
    # back-projection option: block means reproduce the LR
    m.consistent = True
    _, rm = consistency_per_gene(m.predict(f), f.lr, f.lr_mask, f.hr_mask, f.scale)
    assert np.all(rm < 5e-3)
    wrong = dataclasses.replace(f, genes=list(reversed(f.genes)))
    with pytest.raises(DataFormatError, match="genes"):
        m.predict(wrong)
    with pytest.raises(RuntimeError, match="fit"):
        HisToSGEStyle().predict(f)
    with pytest.raises(ValueError, match="HR truth"):
        HisToSGEStyle().fit([dataclasses.replace(f, hr=None)])


def test_histosge_learns_expression_from_colour():
    """Expression = the region indicator, the H&E colour = the region colour, the LR carries nothing
    (a constant): only the histology → expression relation can recover the map."""
    def no_lr(f):
        return dataclasses.replace(f, lr=np.where(f.lr_mask, 0.5, 0.0).astype(np.float32)[None], extra={})

    train = [no_lr(make_toy_field(i, piecewise=True)) for i in (1, 2, 3)]
    test = no_lr(make_toy_field(0, piecewise=True))
    m = HisToSGEStyle().fit(train, seed=0, budget=HS_TRAIN)
    assert m.alpha_ == 1.0  # no validation field: the residual is not shrunk
    p = m.predict(test)
    assert _pcc(p, test) > 0.9
    # the bicubic of a constant LR knows nothing
    assert np.ptp(Bicubic().predict(test)[:, test.hr_mask]) < 1e-5


def test_histosge_deterministic_with_seed(toy):
    f = toy["test"]
    a = HisToSGEStyle().fit(toy["train"][:1], toy["val"], seed=3, budget=HS_SMALL).predict(f)
    b = HisToSGEStyle().fit(toy["train"][:1], toy["val"], seed=3, budget=HS_SMALL).predict(f)
    np.testing.assert_array_equal(a, b)
    c = HisToSGEStyle().fit(toy["train"][:1], toy["val"], seed=4, budget=HS_SMALL).predict(f)
    assert not np.array_equal(a, c)


def test_histosge_shrinks_the_residual_on_validation(toy):
    """A validation truth with no sub-LR detail (its HR = its LR↑) gives α = 0: the prediction is the LR↑."""
    f, v = toy["test"], toy["val"]
    flat = dataclasses.replace(v, hr=(v.lr_upsampled(3) * v.hr_mask).astype(np.float32), extra={})
    m = HisToSGEStyle().fit(toy["train"][:1], flat, seed=0, budget=HS_SMALL)
    assert m.alpha_ == 0.0
    np.testing.assert_allclose(m.predict(f), Bicubic().predict(f), atol=1e-5)
    m2 = HisToSGEStyle(shrink=False).fit(toy["train"][:1], flat, seed=0, budget=HS_SMALL)
    assert m2.alpha_ == 1.0


def test_histosge_respects_scale_three():
    f = make_toy_field(7, h=9, w=10, s=3, k=1)
    tr = [make_toy_field(8, h=9, w=10, s=3, k=1)]
    p = HisToSGEStyle(radius=1).fit(tr, budget={"steps": 5, "batch": 16, "ensemble": 1}).predict(f)
    assert p.shape == (f.G, 27, 30) and np.all(np.isfinite(p))
