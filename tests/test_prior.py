"""Cell-level H&E features (data/cellfeatures.py), the cell-level ridge prior (prior.py) and their use by
Diff-ST in the benchmark (``prior='cell'``) and by the ``histosge_cell`` ablation."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi
from toy_fields import make_toy_field

from napari_diffst import cli
from napari_diffst.benchmark import DiffusionMethod, parse_methods, validate_result
from napari_diffst.data.cellfeatures import (_pixel_maps, add_cell_features, cell_feature_maps,
                                             cell_feature_names)
from napari_diffst.errors import DataFormatError
from napari_diffst.metrics import detail_pcc_per_gene
from napari_diffst.prior import CellRidgePrior, prior_design


def _nuclei_image(n=8, pitch=12, r=3):
    """(n·pitch, 2·n·pitch, 3): left half white; right half pink stroma with ``n × n`` dark purple disks."""
    H, W = n * pitch, 2 * n * pitch
    img = np.ones((H, W, 3), np.float32)
    img[:, W // 2:] = (0.93, 0.70, 0.82)
    yy, xx = np.mgrid[0:H, 0:W]
    disks = np.zeros((H, W), bool)
    for i in range(n):
        for j in range(n):
            cy, cx = i * pitch + pitch // 2, W // 2 + j * pitch + pitch // 2
            disks |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disks] = (0.25, 0.20, 0.50)
    return img, disks


def test_pixel_maps_see_white_space_and_count_nuclei():
    img, disks = _nuclei_image()
    maps = _pixel_maps(img, 1.25)
    W = img.shape[1]
    left, right = (slice(None), slice(4, W // 2 - 4)), (slice(4, -4), slice(W // 2 + 4, -4))
    assert maps["white"][left].mean() == 1.0 and maps["white"][right].mean() == 0.0
    assert maps["nuc"][left].sum() == 0 and maps["blob"][left].sum() == 0
    # the nucleus mask covers the disks (a smoothed threshold: edges may differ by a pixel)
    frac_true = disks[:, W // 2:].mean()
    assert abs(maps["nuc"][:, W // 2:].mean() - frac_true) < 0.5 * frac_true
    assert maps["blob"][:, W // 2:].sum() == 64                  # one blob per nucleus
    area = maps["nuc_area"][disks]
    assert 0.5 * disks.sum() / 64 < np.median(area) < 2.0 * disks.sum() / 64
    assert maps["H"][right].mean() > maps["H"][left].mean() + 0.02


def test_cell_feature_maps_shape_strips_and_no_image():
    from napari_diffst import pipeline as P

    smp = P.load_data("synthetic:0", seed=0, size_um=(1000, 1000))
    (f,), _ = P.make_fields([smp], list(smp.genes[:2]), 2, mode="degrade")
    add_cell_features(f, smp)
    F = f.extra["cell_features"]
    names = f.extra["cell_feature_names"]
    assert F.shape == (len(cell_feature_names()),) + f.hr_shape and names == cell_feature_names()
    assert F.dtype == np.float32 and np.isfinite(F).all()
    m = f.hr_mask
    assert F[names.index("spot_H")][m].std() > 0                 # the synthetic H&E varies over the tissue
    # strip by strip (one HR row at a time) gives the same features as the default strips
    T = np.asarray(smp.transform, float)
    A_hr = np.linalg.solve(T, f.extra["hr_affine"])
    one = cell_feature_maps(smp, A_hr, f.hr_shape, f.hr_um, spot_um=smp.spot_diameter_um, strip_px=1)
    np.testing.assert_allclose(one, F, rtol=1e-4, atol=1e-5)
    assert add_cell_features(f, smp) is f and f.extra["cell_features"] is F  # cached
    blank = cell_feature_maps(SimpleNamespace(image=None), A_hr, (3, 4), 200.0)
    assert blank.shape == (len(names), 3, 4) and not blank.any()


def _with_cells(field, rng, signal=True):
    """Cell features whose first channel carries gene 0's sub-LR detail (plus noise) when ``signal``."""
    up = field.lr_upsampled(3)
    det = field.hr[0] - up[0]
    F = ndi.gaussian_filter(rng.standard_normal((6,) + field.hr_shape), (0, 1, 1)).astype(np.float32)
    if signal:
        F[0] = det / (det.std() + 1e-9) + 0.1 * rng.standard_normal(field.hr_shape)
    field.extra["cell_features"] = F
    return field


def test_cell_ridge_prior_learns_detail_from_cell_features():
    rng = np.random.default_rng(0)
    train = [_with_cells(make_toy_field(i), rng) for i in (1, 2, 3)]
    test = _with_cells(make_toy_field(0), rng)
    prior = CellRidgePrior().fit(train)
    assert set(prior.cv_) == set(prior.lams) and prior.lam_ in prior.lams
    pred = prior.predict(test)
    assert pred.shape == test.hr.shape and pred.dtype == np.float32
    m = test.hr_mask
    d_prior = detail_pcc_per_gene(pred, test.hr, test.lr_upsampled(0), m)[0]
    d_cubic = detail_pcc_per_gene(test.lr_upsampled(3), test.hr, test.lr_upsampled(0), m)[0]
    assert d_prior > 0.9 and d_prior > d_cubic + 0.1
    # without the signal channel the prior has nothing to find in the cell features: it stays near the cubic
    rng = np.random.default_rng(1)
    blind = CellRidgePrior().fit([_with_cells(make_toy_field(i), rng, signal=False) for i in (1, 2, 3)])
    p0 = blind.predict(_with_cells(make_toy_field(0), rng, signal=False))
    assert detail_pcc_per_gene(p0, test.hr, test.lr_upsampled(0), m)[0] < d_prior - 0.2
    # the design: cell features, their deviation from the LR block, the neighbourhood mean, then LR↑
    X = prior_design(test)
    assert X.shape == (3 * 6 + test.G,) + test.hr_shape
    np.testing.assert_allclose(X[-test.G:], test.lr_upsampled(3), atol=1e-6)


def test_cell_ridge_prior_errors_name_the_field():
    rng = np.random.default_rng(0)
    bare = make_toy_field(5, name="bare")
    with pytest.raises(DataFormatError, match="bare.*cell-level features"):
        CellRidgePrior().fit([bare])
    with pytest.raises(RuntimeError, match="fit"):
        CellRidgePrior().predict(bare)
    prior = CellRidgePrior().fit([_with_cells(make_toy_field(1), rng)])  # one field: the middle strength
    assert prior.cv_ == {} and prior.lam_ == prior.lams[len(prior.lams) // 2]
    other = _with_cells(make_toy_field(2), rng)
    other.genes = list(other.genes)[::-1]
    with pytest.raises(DataFormatError, match="gene panel"):
        prior.predict(other)


def test_diffst_cell_prior_and_the_ablation_without_it(monkeypatch):
    from napari_diffst.baselines import HisToSGEStyle

    monkeypatch.setitem(HisToSGEStyle.BUDGETS, "tiny", {**HisToSGEStyle.BUDGETS["tiny"], "steps": 5,
                                                         "val_every": 5})
    rng = np.random.default_rng(0)
    train = [_with_cells(make_toy_field(i), rng) for i in (1, 2)]
    val, test = _with_cells(make_toy_field(10), rng), _with_cells(make_toy_field(0), rng)
    m = DiffusionMethod(prior="cell", model_overrides={"use_cigc": False})
    assert m.needs_cell_features("tiny") and DiffusionMethod().needs_cell_features("quick")
    m.fit(train, val, seed=0, budget="tiny")
    assert isinstance(m.prior_, CellRidgePrior)
    pred = m.predict(test)
    assert pred.shape == test.hr.shape and np.isfinite(pred).all()
    np.testing.assert_allclose(m.predict_prior(test), m.prior_.predict(test) * test.hr_mask, atol=1e-6)
    # the plain conditional diffusion has no cell level: it falls back to the tissue-level regression prior
    c = DiffusionMethod(ablate_all=True, prior="cell", model_overrides={"use_cigc": False})
    assert not c.needs_cell_features("quick")
    c.fit(train, val, seed=0, budget="tiny")
    assert c.knobs_["prior"] == "histosge" and isinstance(c.prior_, HisToSGEStyle)
    assert DiffusionMethod().predict_prior(test) is None


def test_cli_cell_prior_and_histosge_cell_rows(tmp_path):
    out = tmp_path / "cell.json"
    assert "histosge_cell" not in parse_methods("all")
    assert parse_methods("all,histosge_cell")[-1] == "histosge_cell"
    rc = cli.main(["benchmark", "--synthetic", "--synthetic-scales", "5", "--synthetic-size-um", "1000",
                   "--n-genes", "3", "--methods", "diffst,histosge_cell", "--budget", "tiny", "--device", "cpu",
                   "--quiet", "--out", str(out), "--diffst-set", "prior=cell"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert validate_result(doc) == []
    run = doc["runs"]["5"]
    rows = run["sections"]["synthetic0"]["methods"]
    assert set(rows) == {"diffst", "histosge_cell"} and rows["histosge_cell"]["pcc"] is not None
    kn = run["meta"]["method_knobs"]["diffst"]
    assert kn["prior"] == "cell"
    ps = kn["prior_scores"]["synthetic0"]
    assert set(ps) == {"pcc", "rmse", "ssim", "detail_pcc"} and ps["pcc"] is not None


def test_cell_features_do_not_upsample_a_coarse_image(fixtures_dir):
    """A Space Ranger lowres PNG (≈ 22 µm/px) is read at its own pixel size, not magnified to 1.25 µm/px."""
    from napari_diffst import pipeline as P

    smp = P.load_data(str(fixtures_dir / "visium_cytassist_placenta" / "outs"), seed=0)
    genes = [g for g in smp.genes[:200] if smp.counts()[:, list(smp.genes).index(g)].sum() > 0][:2]
    (f,), _ = P.make_fields([smp], genes, 2)
    add_cell_features(f, smp)
    native = smp.um_per_px * smp.image.fullres_per_px
    assert native > 5 and f.extra["cell_um_per_px"] == pytest.approx(native)
    F = f.extra["cell_features"]
    assert F.shape[1:] == f.hr_shape and np.isfinite(F).all() and F[:, f.hr_mask].std(axis=1).max() > 0
