"""Fluorescence (DAPI/PolyT) histology features: the cell-level maps and the baselines' features picked from the
image's modality, the ridge prior bounded on near-constant features, stable Diff-ST training on a DAPI field,
and the real-truth tissue mask (issue 15)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_diffst.baselines import field_modality, histology_features
from napari_diffst.data.cellfeatures import (FLUOR_FEATURE_MAPS, _fluor_pixel_maps, add_cell_features,
                                             cell_feature_names)
from napari_diffst.io import read
from napari_diffst.prior import CellRidgePrior
from napari_diffst.truth_bench import _crop_sup, _Dense, top_genes, truth_grid, truth_tissue_mask


def _nuclei(h, w, rng, left_only=True, r_um=3.5, pitch_um=12.0, um_per_px=0.5):
    """(h, w) uint8 DAPI-like mosaic: dark background, bright nuclei (disks of ``r_um``) on a jittered lattice
    of ``pitch_um`` over the left half only (``left_only``) or everywhere; returns (image, nucleus mask, count)."""
    img = rng.normal(12, 2, (h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    p, r = pitch_um / um_per_px, r_um / um_per_px
    n = 0
    for cy in np.arange(p / 2, h - r, p):
        for cx in np.arange(p / 2, (w // 2 if left_only else w) - r - 2, p):
            cy2, cx2 = cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2)
            mask |= (yy - cy2) ** 2 + (xx - cx2) ** 2 <= r * r
            n += 1
    img[mask] = rng.normal(200, 10, mask.sum())
    return np.clip(img, 0, 255).astype(np.uint8), mask, n


def _bundle(root, rng, w_um=200.0, h_um=160.0, um_per_px=0.5, polyt=False, n=8000):
    """A MERSCOPE region folder: 3 genes, the first denser where the nuclei are (left half)."""
    import tifffile

    root.mkdir()
    x = rng.uniform(0, w_um, n)
    y = rng.uniform(0, h_um, n)
    left = x < w_um / 2
    p = np.c_[np.where(left, 3.0, 0.5), np.cos(y / 15) + 1.2, np.full(n, 1.0)]
    g = np.array(["GeneA", "GeneB", "GeneC"])[[rng.choice(3, p=pi / pi.sum()) for pi in p]]
    pd.DataFrame({"global_x": x, "global_y": y, "global_z": 0, "gene": g}).to_csv(
        root / "detected_transcripts.csv", index=False)
    (root / "images").mkdir()
    np.savetxt(root / "images" / "micron_to_mosaic_pixel_transform.csv",
               np.diag([1 / um_per_px, 1 / um_per_px, 1.0]))
    # dense nuclei on the left half, sparse ones (a 30 µm lattice) on the right
    H, W = int(h_um / um_per_px), int(w_um / um_per_px)
    img, _, _ = _nuclei(H, W, rng, um_per_px=um_per_px)
    sparse, _, _ = _nuclei(H, W, rng, left_only=False, pitch_um=30.0, um_per_px=um_per_px)
    img[:, W // 2:] = sparse[:, W // 2:]
    tifffile.imwrite(root / "images" / "mosaic_DAPI_z0.tif", img)
    if polyt:
        tifffile.imwrite(root / "images" / "mosaic_PolyT_z0.tif",
                         np.clip(rng.normal(60, 10, img.shape), 0, 255).astype(np.uint8))
    return root


def _field(sample, lr_um=40.0, s=4):
    g = truth_grid(sample, lr_um, s)
    genes = top_genes(g, 3)
    d = _Dense(g, genes)
    k = 2
    return _crop_sup(d, 0, g.lr_shape[1], 1, "all", np.ones(3, np.float32), k)


def test_fluor_pixel_maps_count_nuclei_in_um():
    rng = np.random.default_rng(0)
    img, mask, n = _nuclei(160, 240, rng, left_only=True, um_per_px=0.5)
    a = img.astype(np.float32) / 255.0
    rgb = np.stack([a, a, a], axis=-1)
    maps = _fluor_pixel_maps(rgb, 0.5, threshold=0.4, second=False)
    assert set(maps) == set(FLUOR_FEATURE_MAPS)
    W = a.shape[1]
    right = (slice(None), slice(W // 2 + 8, None))
    assert maps["nuc"][right].sum() == 0 and maps["blob"][right].sum() == 0
    assert abs(maps["nuc"].mean() - mask.mean()) < 0.3 * mask.mean()          # nucleus mask ≈ the disks
    assert abs(int(maps["blob"].sum()) - n) <= 0.1 * n                          # one blob per nucleus
    area = np.median(maps["nuc_area"][mask])
    assert 0.6 * np.pi * 3.5 ** 2 < area < 1.5 * np.pi * 3.5 ** 2               # µm², not px
    assert maps["poly"].max() == 0                                             # no second stain: zeros
    # the same image at another pixel size gives the same blob count (filter scales in µm)
    img2 = a[::2, ::2]
    maps2 = _fluor_pixel_maps(np.stack([img2] * 3, axis=-1), 1.0, threshold=0.4, second=False)
    assert abs(int(maps2["blob"].sum()) - n) <= 0.15 * n


@pytest.mark.parametrize("polyt", [False, True])
def test_cell_features_pick_fluorescence_and_are_finite(tmp_path, polyt):
    s = read(_bundle(tmp_path / "r", np.random.default_rng(1), polyt=polyt))
    assert s.image.modality == "fluorescence"
    f = _field(s)
    add_cell_features(f, s)
    F, names = f.extra["cell_features"], f.extra["cell_feature_names"]
    assert f.extra["cell_modality"] == "fluorescence" and names == cell_feature_names("fluorescence")
    assert F.shape == (len(names),) + f.hr_shape and np.isfinite(F).all()
    assert np.abs(F).max() <= 400.0                               # bounded: intensities in [0, 1], areas capped
    m = f.hr_mask
    W = f.hr_shape[1]
    nuc = F[names.index("cell_nuc")]
    left, right = nuc[:, : W // 2 - 2][m[:, : W // 2 - 2]].mean(), nuc[:, W // 2 + 2:][m[:, W // 2 + 2:]].mean()
    assert left > 0.1 and left > 3 * right > 0                    # dense nuclei on the left, sparse on the right
    assert F[names.index("cell_blob")][:, : W // 2 - 2].sum() > 0
    poly = F[names.index("cell_poly")]
    assert (poly.max() > 0) == polyt
    # overridable: the H&E maps on the same image
    add_cell_features(f, s, modality="brightfield", force=True)
    assert f.extra["cell_feature_names"] == cell_feature_names() and f.extra["cell_modality"] == "brightfield"


def test_histology_features_fluorescence_branch(tmp_path):
    s = read(_bundle(tmp_path / "r", np.random.default_rng(2)))
    f = _field(s)
    assert field_modality(f) == "fluorescence" and "nuclear_threshold" in f.extra
    F = histology_features(f)
    assert F.shape == (33,) + f.hr_shape and np.isfinite(F).all()
    W = f.hr_shape[1]
    nfrac = F[4]  # nuclear fraction
    assert nfrac[:, : W // 2 - 2].mean() > 0.1 and nfrac[:, : W // 2 - 2].mean() > 3 * nfrac[:, W // 2 + 2:].mean()
    # detection without the field's tag, and the override
    f.extra.pop("modality")
    assert field_modality(f) == "fluorescence"
    assert field_modality(f, "brightfield") == "brightfield"
    Fb = histology_features(f, modality="brightfield")
    assert Fb.shape == F.shape and not np.allclose(Fb, F)


def test_ridge_prior_is_bounded_on_a_feature_constant_in_training():
    from toy_fields import make_toy_field

    fields = [make_toy_field(seed=i, h=6, w=6, s=2, name=f"f{i}") for i in range(3)]
    rng = np.random.default_rng(0)
    for i, f in enumerate(fields):
        H, W = f.hr_shape
        informative = np.asarray(f.hr[0], np.float32) + 0.1 * rng.standard_normal((H, W)).astype(np.float32)
        # a 'nucleus area' that is one huge connected component on the training fields (constant up to float
        # noise) and a very different value on the test field: it must not be extrapolated
        area = np.full((H, W), 38605.0, np.float32) + (1e-3 * rng.standard_normal((H, W)) if i < 2 else 30000.0)
        f.extra["cell_features"] = np.stack([informative, area.astype(np.float32)])
    prior = CellRidgePrior().fit(fields[:2])
    p = prior.predict(fields[2])
    lo, hi = min(float(f.hr.min()) for f in fields), max(float(f.hr.max()) for f in fields)
    assert np.isfinite(p).all()
    assert p.min() > lo - 3 * (hi - lo) and p.max() < hi + 3 * (hi - lo)


def test_diffst_training_on_a_dapi_field_is_stable(tmp_path):
    """Diff-ST with its cell-level prior on fluorescence fields: finite, bounded training loss (the MERSCOPE run
    diverged to 1e7–1e11 before the DAPI features and the bounded prior)."""
    import torch

    from napari_diffst.benchmark import DiffusionMethod

    s = read(_bundle(tmp_path / "r", np.random.default_rng(3)))
    g = truth_grid(s, 40.0, 4)
    genes = top_genes(g, 3)
    d = _Dense(g, genes)
    gs = np.ones(3, np.float32)
    train = [_crop_sup(d, a, b, 1, f"t{a}", gs, 2) for a, b in ((0, 2), (2, 4))]
    test = _crop_sup(d, 0, g.lr_shape[1], 1, "test", gs, 2)
    for f in train + [test]:
        add_cell_features(f, s)
    from napari_diffst import pipeline as P

    torch.manual_seed(0)
    m = DiffusionMethod(False, device="cpu", steps=6, batch_size=2, lr_size=2, sample_steps=2, n_samples=1,
                        model_preset="tiny", prior="cell", shrink=True,
                        train_overrides=dict(log_every=1, warmup_steps=1))
    kn = m.resolved_knobs("quick")
    tf = m._fit_prior(list(train), train[-1], 0, "quick", kind="cell")  # the cross-fitted bases Diff-ST trains on
    for f in tf:
        base = f.lr_upsampled(3)
        assert np.isfinite(base).all() and np.abs(base).max() < 50
    tr = P.make_trainer(tf, budget="tiny", steps=6, batch_size=2, lr_size=2, seed=0, device="cpu",
                        model_overrides=kn["model_overrides"], **kn["train_overrides"])
    losses = [float(tr.train_step()["loss"]) for _ in range(6)]
    assert np.isfinite(losses).all() and max(losses) < 10.0
    m.fit(train, train[-1], seed=0, budget="quick")
    pred = m.predict(test)
    assert np.isfinite(pred).all() and np.abs(pred).max() < 50


def test_truth_tissue_mask_counts_and_image():
    tot = np.array([[500, 600, 40], [700, 0, 550]], float)        # median of non-empty: 550
    frac_fluor = np.array([[0.5, 0.01, 0.5], [0.3, 0.0, 0.03]])
    assert truth_tissue_mask(tot, None).tolist() == [[True, True, False], [True, False, True]]
    assert truth_tissue_mask(tot, frac_fluor, "fluorescence").tolist() == [[True, False, False],
                                                                          [True, False, True]]
    assert truth_tissue_mask(tot, frac_fluor, "brightfield").tolist() == [[True, False, False],
                                                                         [True, False, False]]


def test_truth_grid_keeps_sparse_stain_tissue(tmp_path):
    """Molecules everywhere, dense nuclei on the left and sparse ones on the right: the right half is tissue by its
    counts and its sparse stain signal; registration's intensity/Otsu mask keeps about the nucleus-dense half."""
    from napari_diffst.data.registration import tissue_mask

    s = read(_bundle(tmp_path / "r", np.random.default_rng(4)))
    g = truth_grid(s, 40.0, 4)
    assert g.lr_mask.all()
    thumb, _ = s.image.thumbnail(1024)
    assert tissue_mask(thumb, modality="fluorescence").mean() < 0.8  # what the old rule built on


def test_molecules_layer_coloured_by_gene(tmp_path):
    """The transcripts Points layer: the most abundant genes in distinct colours, the others one grey; the legend
    in the metadata matches what each point is drawn in."""
    from matplotlib.colors import to_rgba

    from napari_diffst.layer_data import OTHER_GENE_COLOUR, molecule_gene_colours, molecules_layer_data

    s = read(_bundle(tmp_path / "r", np.random.default_rng(5)))
    yx, kw, kind = molecules_layer_data(s, n_coloured=2)
    assert kind == "points" and len(yx) == len(s.molecules)
    cols = kw["metadata"]["gene_colours"]
    counts = s.molecules["gene"].value_counts()
    assert list(cols) == list(counts.index[:2])                     # the two most abundant, in order
    face = np.asarray(kw["face_color"])
    genes = kw["features"]["gene"].astype(str).to_numpy()
    for g, c in cols.items():
        np.testing.assert_allclose(face[genes == g], np.tile(to_rgba(c), ((genes == g).sum(), 1)), atol=1e-6)
    other = ~np.isin(genes, list(cols))
    assert other.any() and np.allclose(face[other, :3], to_rgba(OTHER_GENE_COLOUR)[:3])
    assert set(kw["features"]["colour_gene"].astype(str)) == set(cols) | {"other"}
    assert len(set(cols.values())) == len(cols)                     # distinct
    many = molecule_gene_colours(np.repeat([f"g{i:02d}" for i in range(30)], np.arange(30, 0, -1)), n_top=20)
    assert len(set(many.values())) == 20 and "g00" in many and "g29" not in many
