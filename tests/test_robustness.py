"""The robustness suite's image variants (issue 14): only the image changes; the spots, their counts and the place
of the tissue under each spot stay, so every truth is the same."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_diffst import pipeline as P
from napari_diffst.data.grids import sample_image
from napari_diffst.data.synthetic import make_synthetic
from napari_diffst.data.sample import HistologyImage
from napari_diffst.robustness import VARIANTS, _tissue_full, image_variant


@pytest.fixture(scope="module")
def section():
    smp = make_synthetic(seed=0, size_um=(2000.0, 2000.0))
    smp.name = "syn"
    genes = P.choose_genes([smp], n_genes=2)
    (f,), _ = P.make_fields([smp], genes, 2, mode="degrade", he_per_hr=8)
    # HR pixels (spots) wholly on tissue: where a background variant must leave the image as it was
    mask_img = (_tissue_full(np.asarray(smp.image.levels[0])) * 255).astype(np.uint8)
    on = _he_on_spots(dataclasses.replace(smp, image=HistologyImage.from_array(mask_img)), f) > 0.99
    return smp, genes, f, on & (f.hr_mask > 0)


def _he_on_spots(smp, f):
    """The H&E sampled on the field's HR grid (the spots' frame), through the sample's registration."""
    T = np.asarray(smp.transform, float)
    A_hr = np.linalg.solve(T, np.asarray(f.extra["hr_affine"], float))
    return sample_image(smp, A_hr, f.hr_shape).mean(axis=0)


def _r(a, b, m):
    return float(np.corrcoef(a[m], b[m])[0, 1])


@pytest.mark.parametrize("kind", VARIANTS)
def test_a_variant_changes_the_image_only(section, kind):
    smp, genes, f, on = section
    v = image_variant(smp, kind, seed=0)
    assert v.adata is smp.adata and v.name == f"syn/{kind}" and v.provenance["image_variant"] == kind
    assert v.spot_diameter_um == smp.spot_diameter_um and v.um_per_px == smp.um_per_px
    (g,), _ = P.make_fields([v], genes, 2, mode="degrade", he_per_hr=8)
    np.testing.assert_array_equal(g.hr, f.hr)  # the truth (the spots) is the same
    np.testing.assert_array_equal(g.lr, f.lr)
    clean, var = _he_on_spots(smp, f), _he_on_spots(v, g)
    assert on.sum() >= 20
    # the tissue under each spot is the same tissue (the mirror only after registering it again)
    assert _r(clean, var, on) > 0.8, kind
    if kind == "clean":
        np.testing.assert_array_equal(clean, var)
    else:
        assert not np.array_equal(np.asarray(v.image.levels[0]), np.asarray(smp.image.levels[0])), kind


def test_background_is_set_outside_the_tissue_only(section):
    smp = section[0]
    a = np.asarray(smp.image.levels[0])
    for kind, val in (("black_bg", 0), ("white_bg", 255)):
        b = np.asarray(image_variant(smp, kind).image.levels[0])
        changed = (b != a).any(axis=2)
        assert changed.mean() > 0.01 and (b[changed] == val).all()


def test_downsampled_png_has_the_stated_resolution(section):
    smp = section[0]
    for kind, um in (("png_2um", 2.0), ("png_3.2um", 3.2), ("png_8um", 8.0)):
        v = image_variant(smp, kind)
        assert v.um_per_px * v.image.fullres_per_px == pytest.approx(um, rel=0.02)
        assert np.asarray(v.image.levels[0]).shape[1] == pytest.approx(2000.0 / um, abs=1)


def test_stain_jitter_is_seeded():
    smp = make_synthetic(seed=0, size_um=(400.0, 400.0))
    a = np.asarray(image_variant(smp, "hed_jitter", seed=3).image.levels[0])
    b = np.asarray(image_variant(smp, "hed_jitter", seed=3).image.levels[0])
    c = np.asarray(image_variant(smp, "hed_jitter", seed=4).image.levels[0])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="unknown image variant"):
        image_variant(smp, "sepia")
