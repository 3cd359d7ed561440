"""True to the spots (issue 13): the report figures, the projection, ``sample --report`` and the metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_diffst import pipeline as P
from napari_diffst.cli import main as cli_main
from napari_diffst.spot_consistency import REPORT_KEYS, disk_means, project_to_spots, spot_disks, spot_report


@pytest.fixture(scope="module")
def native():
    smp = P.load_data("synthetic:0", size_um=(1200.0, 1200.0), technology="visium")
    genes = P.choose_genes([smp], n_genes=4)
    fld = P.make_fields([smp], genes, 4, mode="native")[0][0]
    return smp, fld


def test_disks_cover_each_spot_with_its_area(native):
    smp, fld = native
    d = spot_disks(fld)
    n = int((fld.hr_spot_index >= 0).any() and len(d.cr))
    assert d.W.shape == (len(d.cr), fld.hr_shape[0] * fld.hr_shape[1]) and n > 20
    np.testing.assert_allclose(np.asarray(d.W.sum(axis=1)).ravel(), 1.0, atol=1e-9)
    # Visium: 55 µm spots on a 100 µm pitch; at 4× an HR pixel is 25 µm, the disk radius 1.1 px
    assert d.radius == pytest.approx(0.5 * smp.spot_diameter_um / fld.hr_um, rel=1e-6)
    assert d.radius == pytest.approx(1.1, rel=0.02)
    # every disk's centre pixel belongs to that spot's lattice cell
    c, r = np.round(d.cr).astype(int).T
    assert np.mean(fld.hr_spot_index[r, c] == np.arange(len(d.cr))) > 0.95


def test_a_constant_map_reads_back_its_value_in_expression_space(native):
    _, fld = native
    d = spot_disks(fld)
    x = np.full((fld.G,) + fld.hr_shape, 1.5)
    yhat, kept = disk_means(x, d, fld.hr_mask)
    np.testing.assert_allclose(yhat[kept > 0], 1.5, atol=1e-9)
    # averaging in expression space: half 0, half 2 gives log1p(mean(expm1)) > the log-space mean 1
    x[:, :, ::2] = 0.0
    x[:, :, 1::2] = 2.0
    yhat, _ = disk_means(x, d)
    assert np.all(yhat > 1.0)


def test_projection_makes_the_map_true_to_the_spots(native):
    _, fld = native
    gs = fld.gene_scale[:, None, None]
    raw = fld.lr_upsampled(3) * gs * 0.7        # 30 % too low everywhere, like the maps
    before = spot_report(raw, fld)
    assert before["spot_bias"] < -0.2
    x, info = project_to_spots(raw, fld)
    rep = spot_report(x, fld)
    assert rep["spot_pcc"] >= 0.99 and rep["spot_pcc_min"] >= 0.95 and abs(rep["spot_bias"]) <= 0.01
    assert info["max_residual"] < 0.05
    assert np.all(x[:, fld.hr_mask] >= 0)
    np.testing.assert_array_equal(x[:, ~fld.hr_mask], raw[:, ~fld.hr_mask].astype(np.float32))
    assert set(REPORT_KEYS) <= set(rep) and rep["masked_in_spots"] == 0.0
    json.dumps(rep)  # JSON-ready


def test_report_sees_copied_texture_lattice_imprint_and_masking(native):
    _, fld = native
    d = spot_disks(fld)
    H, W = fld.hr_shape
    rng = np.random.default_rng(0)
    texture = rng.random((H, W))
    same = np.stack([texture + 0.01 * rng.random((H, W)) for _ in range(fld.G)])
    rep = spot_report(same, fld, disks=d)
    assert rep["alike_maps"] > 0.95 and rep["alike_spots"] < 0.9
    # a bump at every spot centre: the map's deviation from its cell mean falls with the distance
    rr, cc = np.mgrid[0:H, 0:W]
    k = np.maximum(fld.hr_spot_index, 0)
    dist = np.hypot(cc - d.cr[k, 0], rr - d.cr[k, 1])
    bumps = np.stack([np.exp(-dist ** 2 / 4.0)] * fld.G)
    assert spot_report(bumps, fld, disks=d)["lattice"] > 0.5
    assert spot_report(np.ones((fld.G, H, W)), fld, disks=d)["lattice"] is None  # no deviation at all
    # NaN in half of every disk → about half of the disk area is masked
    holes = np.ones((fld.G, H, W))
    holes[:, :, : W // 2] = np.nan
    assert 0.3 < spot_report(holes, fld, disks=d)["masked_in_spots"] < 0.7


class _LRPlusHE(torch.nn.Module):
    """A deterministic 'denoiser': x0 = the LR condition darkened where the H&E is dark."""

    def __init__(self, G, k):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.k = k
        self.config = {"n_genes": G, "he_per_hr": k, "diffusion": {"target": "x0", "upsample": "cubic"}}
        self.pad_multiple = 1

    def forward(self, x_t, t, cond):
        he = torch.nn.functional.avg_pool2d(cond["he"], self.k).mean(1, keepdim=True)
        return cond["lr_up"] + 0.5 * (he - 0.8) + 0 * self.w, {}


def test_super_resolve_projects_only_native_fields(native):
    smp, fld = native
    model = _LRPlusHE(fld.G, fld.he_per_hr)
    res = P.super_resolve(model, fld, steps=2, n_samples=1, seed=0)
    assert res.report is not None and res.report["spot_pcc"] >= 0.95 and abs(res.report["spot_bias"]) <= 0.05
    assert "before_projection" in res.report and res.report["projection"]["iterations"] >= 1
    raw = P.super_resolve(model, fld, steps=2, n_samples=1, seed=0, project=False)
    assert raw.report is None and not np.array_equal(raw.mean, res.mean)
    truth = P.make_fields([smp], fld.genes, 4, mode="truth", gene_scale=fld.gene_scale)[0][0]
    assert P.super_resolve(model, truth, steps=2, n_samples=1, seed=0).report is None


def test_cli_sample_report_on_a_real_section(her2st_dir, tmp_path):
    """A new user's path on legacy ST: train, sample natively with --report; the figures are in the JSON and
    in the OME-Zarr metadata, and the spots are reproduced (enforced, whatever the tiny model learned)."""
    ck = tmp_path / "run"
    assert cli_main(["train", "--data", str(her2st_dir / "C3"), "--scale", "2", "--n-genes", "4",
                     "--budget", "tiny", "--steps", "2", "--batch-size", "1", "--lr-size", "2",
                     "--out", str(ck)]) == 0
    out, rep_path = tmp_path / "native.zarr", tmp_path / "report.json"
    assert cli_main(["sample", "--checkpoint", str(ck), "--data", str(her2st_dir / "C3"), "--steps", "2",
                     "--n-samples", "1", "--out", str(out), "--report", str(rep_path)]) == 0
    doc = json.loads(rep_path.read_text())
    rep = doc["sections"]["C3"]
    assert set(REPORT_KEYS) <= set(rep)
    assert rep["spot_pcc"] >= 0.95 and abs(rep["spot_bias"]) <= 0.05 and rep["n_spots"] == 180
    assert rep["masked_in_spots"] < 0.05
    from napari_diffst.io.writers import read_maps

    md = read_maps(out).metadata["napari_diffst"]
    assert md["spot_report"]["spot_pcc"] == rep["spot_pcc"]
    # the self-check (issue 14) travels with the report: the section's spots one level coarser
    sc = rep["self_check"]
    assert len(sc["beta"]) == 4 and sc["pcc"]["cubic"] is not None and "2×2 blocks" in sc["level"]
    assert md["spot_report"]["self_check"]["beta"] == sc["beta"]
    # tiled whole-slide output is projected too (band by band) and has the same report
    tz, tj = tmp_path / "t.zarr", tmp_path / "t.json"
    assert cli_main(["sample", "--checkpoint", str(ck), "--data", str(her2st_dir / "C3"), "--tile", "16",
                     "--steps", "2", "--n-samples", "1", "--out", str(tz), "--report", str(tj)]) == 0
    trep = json.loads(tj.read_text())["sections"]["C3"]
    assert set(REPORT_KEYS) <= set(trep) and trep["n_spots"] == 180
    assert trep["spot_pcc"] >= 0.95 and abs(trep["spot_bias"]) <= 0.05 and trep["masked_in_spots"] < 0.05
    # 100 back-projection rounds leave ~1e-3 log1p on real sections, untiled too (C2 2×: 0.0012)
    assert trep["projection"]["max_residual"] <= 1e-2
    assert trep["self_check"]["beta"] == sc["beta"]  # the same self-check (same seed), its β applied per tile
    tmd = read_maps(tz).metadata["napari_diffst"]
    assert tmd["spot_report"]["spot_pcc"] == trep["spot_pcc"] and tmd["projection"]["bands"] >= 1
