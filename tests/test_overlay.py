"""Overlays that read (issue 17, item 7): gene maps fade to transparent at low values so the H&E shows
through, and their outline follows the tissue instead of the lattice's squares."""
from __future__ import annotations

import numpy as np
import pytest

from napari_diffst import pipeline as P
from napari_diffst.data.grids import display_mask, make_field
from napari_diffst.data.sample import apply_affine


@pytest.fixture(scope="module")
def synth():
    smp = P.load_data("synthetic")
    g = list(smp.hr_truth["genes"][:1])
    fld = make_field(smp, g, 4, mode="truth")
    return smp, fld


def _truth_tissue_on_hr(smp, fld) -> np.ndarray:
    """Which HR pixels lie on tissue, from the synthetic section's known tissue map."""
    t = smp.hr_truth
    tis = np.asarray(t["tissue"], float)
    H, W = fld.hr_shape
    rr, cc = np.mgrid[0:H, 0:W]
    xy = apply_affine(np.asarray(smp.transform) @ np.asarray(fld.extra["hr_affine"]), np.c_[cc.ravel(), rr.ravel()])
    ij = np.floor(xy / (t["um_per_px"] / smp.um_per_px)).astype(int)
    ij = np.clip(ij, 0, [tis.shape[1] - 1, tis.shape[0] - 1])
    return (tis[ij[:, 1], ij[:, 0]] >= 0.5).reshape(H, W)


def test_display_mask_follows_the_tissue(synth):
    smp, fld = synth
    native = make_field(smp, list(fld.genes), 4, mode="native", with_he=False)
    on = _truth_tissue_on_hr(smp, native)
    shown = display_mask(smp, native)
    frac = lambda m: (m & on).sum() / m.sum()  # noqa: E731
    # the lattice cells spill off the tissue (~5% of their pixels); the shown mask stays on it
    assert frac(native.hr_mask) < 0.97
    assert frac(shown) > 0.99
    # and still covers (nearly) all the tissue the cells covered
    assert (shown & on).sum() >= 0.97 * (native.hr_mask & on).sum()
    assert native.extra["display_mask"] is shown  # cached for the dock, CLI and exports alike


def test_display_mask_without_an_image_is_the_hr_mask(synth):
    smp, fld = synth
    import copy

    bare = copy.copy(smp)
    bare.image = None
    f2 = make_field(bare, list(fld.genes), 4, mode="native", with_he=False)
    np.testing.assert_array_equal(display_mask(bare, f2), f2.hr_mask)


def test_overlay_colormap_fades_low_values():
    from napari_diffst.layer_data import overlay_colormap

    cm = overlay_colormap("inferno")
    a = cm.map(np.array([0.0, 0.1, 0.5, 1.0]))[:, 3]
    assert a[0] == 0.0 and 0 < a[1] < 0.5 and a[2] >= 0.98 and a[3] == 1.0
    assert cm.name == "inferno fade"


def _overlay_check(viewer, qtbot, smp, fld, m, name: str, low_frac: float = 0.2):
    """Screenshots of the H&E alone, under ``m`` with the fading colormap (saved as docs/images/<name>.png),
    and under the old opaque one (``<name>_before.png``); returns the mean |Δ| of the H&E's canvas pixels
    under the map's low values (≤ ``low_frac`` of its contrast range) for both."""
    from conftest import save_screenshot

    from napari_diffst._widgets.workers import raster_layer_kwargs
    from napari_diffst.layer_data import OVERLAY_OPACITY, histology_layer_data, overlay_colormap

    data, kw, _ = histology_layer_data(smp)
    he = viewer.add_image(data, **kw)
    hi = float(np.nanpercentile(m, 99.5))
    place = raster_layer_kwargs(fld, "hr")
    viewer.reset_view()
    qtbot.wait(100)
    # a fixed render size: a layer added to the list may resize the canvas between shots
    shot = lambda: viewer.screenshot(canvas_only=True, flash=False, size=(800, 1000))  # noqa: E731
    base = shot().astype(float)
    ly = viewer.add_image(m, colormap=overlay_colormap("inferno"), contrast_limits=(0.0, hi), name=name,
                          blending="translucent", opacity=OVERLAY_OPACITY, units=("um", "um"), **place)
    qtbot.wait(100)
    fade = shot()
    save_screenshot(fade, name)
    ly.colormap, ly.opacity = "inferno", 0.75   # what the dock drew before
    qtbot.wait(100)
    old = shot()
    save_screenshot(old, f"{name}_before")
    # where on the canvas the map is low: gray_r with a step at low_frac·hi, H&E hidden (NaN → black canvas)
    he.visible = False
    ly.colormap, ly.opacity, ly.contrast_limits = "gray_r", 1.0, (low_frac * hi, low_frac * hi + 1e-6)
    qtbot.wait(100)
    under_low = shot()[..., :3].min(axis=-1) > 250
    assert under_low.sum() > 1000
    d = [np.abs(a.astype(float)[..., :3] - base[..., :3])[under_low].mean() for a in (fade, old)]
    print(f"{name}: mean |Δ| of the H&E under low values: fading {d[0]:.1f}, old opaque {d[1]:.1f} (of 255)")
    return d


def test_low_values_leave_the_he_readable(shown_viewer, qtbot, synth):
    """A left-to-right ramp over the tissue: under its low end the H&E stays (nearly) as it was with the
    fading colormap, while the old opaque inferno darkened it."""
    smp, fld = synth
    shown = display_mask(smp, fld)
    ramp = np.broadcast_to(np.linspace(0, 1, fld.hr_shape[1], dtype=np.float32), fld.hr_shape)
    d_fade, d_old = _overlay_check(shown_viewer, qtbot, smp, fld, np.where(shown, ramp, np.nan), "overlay_ramp")
    assert d_fade < 0.3 * d_old


def test_her2st_map_over_the_he(shown_viewer, qtbot, her2st_dir):
    """A real section (her2st C2, COL1A1 spots at 4×, nearest-upsampled) over its H&E: the docs' picture
    (docs/images/overlay_fade.png) and the same check."""
    smp = P.load_data(her2st_dir / "C2")
    fld = make_field(smp, ["COL1A1"], 4, mode="native", with_he=False)
    shown = display_mask(smp, fld)
    m = np.repeat(np.repeat(fld.lr[0] * fld.gene_scale[0], 4, 0), 4, 1)
    d_fade, d_old = _overlay_check(shown_viewer, qtbot, smp, fld, np.where(shown, m, np.nan).astype(np.float32),
                                   "overlay_fade")
    assert d_fade < 0.5 * d_old
